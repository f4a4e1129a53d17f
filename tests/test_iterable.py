"""Iterable sources: real Hugging Face ``datasets`` in streaming mode and plain iterables,
resumed exactly through their state protocol, split across ranks."""

from __future__ import annotations

import json
import operator

import pytest
import torch
from torch.utils.data import IterableDataset

from helpers.data import features_and_labels
from helpers.distributed import hugging_face_pool, iterable_worker, rendezvous, spawn
from helpers.loops import sub_batch_ids
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import SelectiveLoader, SettingError, StateError, UnknownLengthError
from jest_stream.policies import Schedule, SelectionPolicy

pytest.importorskip('datasets')


def _loader(dataset, **kwargs) -> SelectiveLoader:
    scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    return SelectiveLoader(dataset, batch_size=8, filter_ratio=0.8, scorer=scorer, seed=2,
                           **kwargs)


def test_a_hugging_face_dataset_is_a_source_with_its_own_ids():
    loader = _loader(hugging_face_pool(200), id_key='uid')
    batches = list(loader)
    # 200 samples in super-batches of 40: 5 full ones.
    assert len(batches) == 5 and all(len(b['uid']) == 8 for b in batches)
    drawn = [i for seen in loader.scorer.seen for i in seen]
    assert sorted(drawn) == list(range(1000, 1200))
    with pytest.raises(UnknownLengthError, match='not known'):
        len(loader)
    assert operator.length_hint(loader, -1) == -1  # a TypeError, as len() expects


@pytest.mark.parametrize('warmup', [0, 3])
@pytest.mark.parametrize('stop_after', [2, 7])
def test_resumption_through_the_state_protocol_is_exact(stop_after, warmup):
    # 180 samples: 4 full super-batches and a partial one of 20 (>= 8: selected from).
    policy = SelectionPolicy(schedule=Schedule(warmup=warmup, ramp=4 if warmup else 0))
    full = sub_batch_ids(_loader(hugging_face_pool(180), id_key='uid', policy=policy), 13, 'uid')
    first = _loader(hugging_face_pool(180), id_key='uid', policy=policy)
    before = sub_batch_ids(first, stop_after, 'uid')
    state = first.state_dict()
    resumed = _loader(hugging_face_pool(180), id_key='uid', policy=policy)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint right after a restart saves it again
    after = sub_batch_ids(resumed, 13 - stop_after, 'uid')
    assert before + after == full
    if warmup:
        return  # a warm-up scores nothing, so the scorer does not see every super-batch
    # Nothing drawn twice or skipped: the resumed loader's scorer saw the rest of the epoch.
    epoch = stop_after // 5
    seen_first = [i for s in first.scorer.seen[epoch * 5:] for i in s][:(stop_after % 5) * 40]
    seen_rest = [i for s in resumed.scorer.seen for i in s]
    assert len(seen_first) == (stop_after % 5) * 40 and seen_rest
    assert not set(seen_first) & set(seen_rest[:180 - len(seen_first)])


def test_counted_ids_when_the_samples_have_none():
    loader = _loader(hugging_face_pool(120))
    batches = sub_batch_ids(loader, 3, 'sample_id')
    assert sorted(i for seen in loader.scorer.seen for i in seen) == list(range(120))
    assert all(0 <= i < 120 for batch in batches for i in batch)


class Counting(IterableDataset):
    """A plain iterable without a state protocol: the same order every time."""

    def __init__(self, n: int) -> None:
        self.x, self.y = features_and_labels(n)

    def __iter__(self):
        for i in range(len(self.y)):
            yield {'x': torch.from_numpy(self.x[i]), 'y': int(self.y[i]), 'uid': 500 + i}


def test_an_iterable_without_state_is_read_again_on_resume_with_a_warning():
    with pytest.warns(UserWarning, match='no state_dict'):
        full = sub_batch_ids(_loader(Counting(160), id_key='uid'), 7, 'uid')
    with pytest.warns(UserWarning):
        first = _loader(Counting(160), id_key='uid')
    before = sub_batch_ids(first, 3, 'uid')
    with pytest.warns(UserWarning):
        resumed = _loader(Counting(160), id_key='uid')
    resumed.load_state_dict(first.state_dict())
    assert before + sub_batch_ids(resumed, 4, 'uid') == full
    # It read the first three super-batches again, and scored none of them.
    assert len(resumed.scorer.seen) == 4


def test_workers_and_mismatched_states_are_refused():
    with pytest.raises(SettingError, match='num_workers=2'):
        _loader(hugging_face_pool(80), num_workers=2)
    state = _loader(hugging_face_pool(80), id_key='uid').state_dict()
    from helpers.distributed import map_dataset

    with pytest.raises(StateError, match='over an iterable dataset'):
        _loader(map_dataset(80)).load_state_dict(state)
    with pytest.warns(UserWarning):
        stateless = _loader(Counting(80), id_key='uid')
    with pytest.raises(StateError, match='state protocol'):
        stateless.load_state_dict(state)


def test_ranks_draw_equal_numbers_of_super_batches(tmp_path):
    spawn(iterable_worker, 2, rendezvous(tmp_path), tmp_path)
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for epoch in range(2):
        assert len(ranks[0]['epochs'][epoch]) == len(ranks[1]['epochs'][epoch]) > 0
        mine = {i for batch in ranks[0]['epochs'][epoch] for i in batch}
        theirs = {i for batch in ranks[1]['epochs'][epoch] for i in batch}
        assert not mine & theirs  # split by node: each rank its own samples


def test_an_iterable_state_resumes_only_on_its_own_rank_of_as_many():
    first = _loader(hugging_face_pool(120), id_key='uid')
    sub_batch_ids(first, 2, 'uid')
    state = first.state_dict()
    assert (state['dataset']['rank'], state['dataset']['world_size']) == (0, 1)
    # The same global sizes on two ranks pass the loader's checks; the position does not.
    on_two = {**state, 'world_size': 2, 'batch_size': 4, 'super_batch_size': 20,
              'dataset': {**state['dataset'], 'world_size': 2}}
    with pytest.raises(StateError, match='saved on 2 rank'):
        _loader(hugging_face_pool(120), id_key='uid').load_state_dict(on_two)
    of_rank_one = {**state, 'dataset': {**state['dataset'], 'rank': 1}}
    with pytest.raises(StateError, match='saved by rank 1'):
        _loader(hugging_face_pool(120), id_key='uid').load_state_dict(of_rank_one)

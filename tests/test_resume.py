"""Exact resumption over real shuffled multi-shard MDS data, with 0 and 2 workers."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.loops import sub_batch_ids
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import SelectiveLoader, StateError

N = 300


def _loader(dataset, scorer, num_workers, method='joint'):
    return SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer,
                           method=method, n_chunks=2, num_workers=num_workers, seed=11)


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('stop_after', [3, 8])
def test_resume_continues_exactly(mds_dir, make_streaming, num_workers, stop_after):
    # 300 samples, B = 50: 6 super-batches per epoch; 9 steps cross into epoch 1.
    total = 9
    reference = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    expected = sub_batch_ids(
        _loader(make_streaming(mds_dir, batch_size=50), reference, num_workers), total)
    gc.collect()

    first = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    loader = _loader(make_streaming(mds_dir, batch_size=50), first, num_workers)
    before = sub_batch_ids(loader, stop_after)
    state = loader.state_dict()
    del loader
    gc.collect()

    second = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    resumed = _loader(make_streaming(mds_dir, batch_size=50), second, num_workers)
    resumed.load_state_dict(state)
    after = sub_batch_ids(resumed, total - stop_after)

    assert before + after == expected
    # Raw draws: the scorers of the two halves saw exactly the uninterrupted run's super-batches.
    drawn = first.seen[:stop_after] + second.seen
    assert drawn == reference.seen[:total]
    epoch0 = sum(drawn[:6], [])
    assert sorted(epoch0) == list(range(N)), 'a sample was replayed or skipped in epoch 0'


def test_state_counts_only_batches_handed_over(mds_dir, make_streaming):
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, criterion='uniform', num_workers=2)
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    state = loader.state_dict()
    assert (state['epoch'], state['super_batches']) == (0, 2)
    assert state['dataset']['sample_in_epoch'] == 100
    list(iterator)
    assert (loader.state_dict()['epoch'], loader.state_dict()['super_batches']) == (1, 0)


def test_map_style_resume_is_exact():
    x, y = features_and_labels(120)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def make():
        scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
        scorer.inner.input_key, scorer.inner.target_key = 0, 1
        return SelectiveLoader(dataset, batch_size=6, filter_ratio=0.8, scorer=scorer,
                               num_workers=2, seed=5)

    def run(loader, steps):
        return sub_batch_ids(loader, steps, 2)

    expected = run(make(), 7)
    loader = make()
    before = run(loader, 2)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert before + run(resumed, 5) == expected


def test_resume_refuses_a_different_seed_or_size(mds_dir, make_streaming):
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, criterion='uniform', seed=1)
    state = loader.state_dict()
    other = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                            filter_ratio=0.8, criterion='uniform', seed=2)
    with pytest.raises(ValueError, match='seed=1'):
        other.load_state_dict(state)
    other = SelectiveLoader(make_streaming(mds_dir, batch_size=40), batch_size=10,
                            filter_ratio=0.75, criterion='uniform', seed=1)
    with pytest.raises(ValueError, match='super_batch_size'):
        other.load_state_dict(state)


def test_load_after_iterating_is_refused(mds_dir, make_streaming):
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, criterion='uniform')
    next(iter(loader))
    with pytest.raises(RuntimeError, match='fresh loader'):
        loader.load_state_dict(loader.state_dict())


# The state is validated completely when it is loaded

def _uniform(dataset, **kwargs):
    return SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, criterion='uniform',
                           seed=1, **kwargs)


def _tensors(n: int = 250) -> TensorDataset:
    x, y = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def test_a_whole_checkpoint_is_refused_with_a_pointer_to_the_loader_state():
    state = _uniform(_tensors()).state_dict()
    checkpoint = {'model': {}, 'loader': state, 'step': 3}
    with pytest.raises(StateError, match=r"lacks \[.*whole checkpoint: pass its 'loader'"):
        _uniform(_tensors()).load_state_dict(checkpoint)


@pytest.mark.parametrize('key, value, message', [
    ('super_batches', -3, r'super_batches=-3; expected an int >= 0'),
    ('super_batches', 2.5, r'super_batches=2.5; expected an int'),
    ('epoch', True, r'epoch=True; expected an int'),
    ('batch_size', 0, r'batch_size=0; expected an int >= 1'),
    ('world_size', None, r'world_size=None'),
    ('version', 7, r'version 7 is not 2'),
    ('source', 'webdataset', r"source='webdataset'"),
    ('super_batches', 99, r'99 super-batches of epoch 0 were handed over, but an epoch of '
                          r'this loader has 5'),
])
def test_fields_out_of_range_or_of_the_wrong_type_are_refused(key, value, message):
    state = _uniform(_tensors()).state_dict()
    state[key] = value
    with pytest.raises(StateError, match=message):
        _uniform(_tensors()).load_state_dict(state)


def test_a_map_style_state_is_refused_by_a_streaming_loader(mds_dir, make_streaming):
    state = _uniform(_tensors(300)).state_dict()
    streaming = _uniform(make_streaming(mds_dir, batch_size=50))
    with pytest.raises(StateError, match='over a map dataset, but this loader reads a '
                                         'streaming one'):
        streaming.load_state_dict(state)
    # A state without the source field (older files) is told apart by its dataset state.
    del state['source']
    with pytest.raises(StateError, match='over a map dataset'):
        streaming.load_state_dict(state)


def test_a_streaming_state_is_refused_by_a_map_style_loader(mds_dir, make_streaming):
    state = _uniform(make_streaming(mds_dir, batch_size=50)).state_dict()
    with pytest.raises(StateError, match='over a streaming dataset'):
        _uniform(_tensors(300)).load_state_dict(state)


def test_a_changed_shuffle_seed_is_refused(mds_dir, make_streaming):
    state = _uniform(make_streaming(mds_dir, batch_size=50, seed=7)).state_dict()
    other = _uniform(make_streaming(mds_dir, batch_size=50, seed=8))
    with pytest.raises(StateError, match=r'shuffle_seed=7 but this one has shuffle_seed=8'):
        other.load_state_dict(state)


def test_a_refused_state_changes_nothing():
    loader = _uniform(_tensors())
    state = loader.state_dict()
    state['super_batches'] = -1
    with pytest.raises(StateError):
        loader.load_state_dict(state)
    assert loader.state_dict()['super_batches'] == 0 and len(list(loader)) == len(loader)

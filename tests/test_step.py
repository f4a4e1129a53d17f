"""The one per-super-batch step, and the behaviours every path shares through it: short last
super-batches, sample ids read by one function, batches walked by one walker."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import (
    ClassificationScorer,
    SelectionConfig,
    SelectionStep,
    SelectiveLoader,
    collate_samples,
    gather,
)
from jest_stream.batch import move_to_device, read_sample_ids
from jest_stream.errors import MissingColumnError

Pair = namedtuple('Pair', 'x y uid')


def _tensors(n: int) -> TensorDataset:
    x, y = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


# Short last super-batches: one policy

@pytest.mark.parametrize('scoring', ['inline', 'process'])
def test_a_short_last_super_batch_is_dropped_or_handed_over_whole(scoring):
    # 55 samples, B = 20, b = 8: super-batches of 20, 20 and 15 (selected from), then
    # with 45 samples a last one of 5 (< b): dropped by default, whole with drop_last=False.
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                  target_key=1)
    with SelectiveLoader(_tensors(55), batch_size=8, super_batch_size=20, scorer=scorer,
                         shuffle=False, scoring=scoring, timeout=60) as loader:
        assert [len(b[0]) for b in loader] == [8, 8, 8] and len(loader) == 3
    with SelectiveLoader(_tensors(45), batch_size=8, super_batch_size=20, scorer=scorer,
                         shuffle=False, scoring=scoring, timeout=60) as loader:
        assert [len(b[0]) for b in loader] == [8, 8] and len(loader) == 2
        assert loader.telemetry.summary()['dropped'] == 5
    with SelectiveLoader(_tensors(45), batch_size=8, super_batch_size=20, scorer=scorer,
                         shuffle=False, scoring=scoring, timeout=60, drop_last=False) as loader:
        batches = list(loader)
        assert [len(b[0]) for b in batches] == [8, 8, 5] and len(loader) == 3
        assert batches[-1][2].tolist() == list(range(40, 45))  # whole, in order, unscored
        assert 'score_all_mean' not in loader.metrics


def test_the_step_keeps_a_short_super_batch_whole_unscored():
    config = SelectionConfig.create(batch_size=8, super_batch_size=20)
    scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    step = SelectionStep(config, scorer)
    x, y = features_and_labels(5)
    batch = {'x': torch.from_numpy(x), 'y': torch.from_numpy(y)}
    sub, selection = step(batch, torch.arange(5), epoch=0, index=0)
    assert selection.short and selection.selected.tolist() == list(range(5))
    assert scorer.seen == [] and sub is batch


# Sample ids: one reader

class UidDataset(Dataset):
    """Dict samples with an id column of their own: item i is {'x': [i], 'uid': 1000 + i}."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return {'x': torch.tensor([float(i)]), 'uid': 1000 + i}


def test_a_map_style_id_column_named_by_id_key_keeps_its_values():
    loader = SelectiveLoader(UidDataset(), batch_size=4, super_batch_size=8,
                             criterion='uniform', id_key='uid', seed=1)
    for batch in loader:
        assert batch['uid'].tolist() == [1000 + int(v) for v in batch['x'][:, 0].tolist()]
        assert 'sample_id' not in batch


class TupleWithIds(Dataset):
    """Tuple samples whose first field is the sample id: (1000 + i, x, y)."""

    def __init__(self) -> None:
        self.x, self.y = features_and_labels(40)

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return 1000 + i, torch.from_numpy(self.x[i]), int(self.y[i])


def test_id_key_is_honoured_for_tuple_batches_as_in_the_algorithm():
    class TupleRecorder(RecordingScorer):
        def __init__(self) -> None:
            super().__init__(tiny_classifier(0), tiny_classifier(1))
            self.inner.input_key, self.inner.target_key = 1, 2

    scorer = TupleRecorder()
    loader = SelectiveLoader(TupleWithIds(), batch_size=4, super_batch_size=8, scorer=scorer,
                             id_key=0, seed=2)
    batches = list(loader)
    assert len(batches[0]) == 3  # nothing appended: the ids are the samples' own field 0
    assert all(1000 <= i < 1040 for ids in scorer.seen for i in ids)
    for batch, seen in zip(batches, scorer.seen, strict=True):
        assert set(batch[0].tolist()) <= set(seen)
    # The Composer algorithm reads ids with the same function and the same key.
    assert read_sample_ids(batches[0], 0).tolist() == batches[0][0].tolist()
    with pytest.raises(MissingColumnError, match='id_key=5'):
        read_sample_ids(batches[0], 5)


def test_map_style_samples_without_ids_get_their_index():
    loader = SelectiveLoader(_tensors(40), batch_size=4, super_batch_size=8,
                             criterion='uniform', shuffle=False)
    first = next(iter(loader))
    assert len(first) == 3 and set(first[2].tolist()) <= set(range(8))


# Batches: one walker

class NamedPairs(Dataset):
    def __init__(self) -> None:
        self.x, self.y = features_and_labels(24)

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> Pair:
        return Pair(torch.from_numpy(self.x[i]), int(self.y[i]), 500 + i)


def test_namedtuple_batches_keep_their_type_through_collate_gather_and_the_loader():
    samples = [NamedPairs()[i] for i in range(6)]
    batch = collate_samples(samples)
    assert type(batch) is Pair and batch.uid.tolist() == list(range(500, 506))
    sub = gather(batch, torch.tensor([4, 1]))
    assert type(sub) is Pair and sub.uid.tolist() == [504, 501]
    assert type(move_to_device(sub, torch.device('cpu'))) is Pair
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='x',
                                  target_key='y')
    loader = SelectiveLoader(NamedPairs(), batch_size=4, super_batch_size=8, scorer=scorer,
                             id_key='uid')
    for out in loader:
        assert type(out) is Pair and all(500 <= i < 524 for i in out.uid.tolist())


def test_collate_keeps_nested_structures_and_value_columns():
    samples = [{'image': torch.ones(2) * i, 'meta': {'name': f's{i}', 'size': i},
                'tags': (i, f't{i}')} for i in range(3)]
    batch = collate_samples(samples)
    assert batch['meta']['name'] == ['s0', 's1', 's2']
    sub = gather(batch, torch.tensor([2, 0]))
    assert sub['meta']['name'] == ['s2', 's0'] and sub['meta']['size'].tolist() == [2, 0]
    assert sub['tags'][0].tolist() == [2, 0] and sub['tags'][1] == ['t2', 't0']


# Mixed precision for scoring

class DtypeProbe(torch.nn.Module):
    """A linear classifier that records the dtype of its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_classifier(0)
        self.dtypes: set[torch.dtype] = set()

    def forward(self, x):
        out = self.inner(x)
        self.dtypes.add(out.dtype)
        return out


@pytest.mark.parametrize('autocast', [None, torch.bfloat16])
def test_autocast_runs_the_scoring_forwards_in_its_dtype(autocast):
    probe = DtypeProbe()
    scorer = ClassificationScorer(probe, None, input_key=0, target_key=1)
    loader = SelectiveLoader(_tensors(40), batch_size=4, super_batch_size=20, scorer=scorer,
                             criterion='hard_learner', autocast=autocast)
    next(iter(loader))
    assert probe.dtypes == {autocast or torch.float32}
    assert loader.metrics['score_all_mean'] > 0  # scores are float32 losses either way
    assert loader.config.describe()['autocast'] == (None if autocast is None else str(autocast))


def test_autocast_refuses_other_dtypes():
    from jest_stream import SettingError

    with pytest.raises(SettingError, match='autocast=torch.float64'):
        SelectionConfig.create(batch_size=4, super_batch_size=20, autocast=torch.float64)

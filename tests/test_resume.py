"""Exact resumption over real shuffled multi-shard MDS data, with 0 and 2 workers."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import SelectiveLoader

N = 300


def _loader(dataset, scorer, num_workers, method='joint'):
    return SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer,
                           method=method, n_chunks=2, num_workers=num_workers, seed=11)


def _run(loader, steps):
    """Sub-batch ids of the next ``steps`` batches, crossing epochs as a trainer would."""
    out = []
    while len(out) < steps:
        for batch in loader:
            out.append(batch['sample_id'].tolist())
            if len(out) == steps:
                break
    return out


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('stop_after', [3, 8])
def test_resume_continues_exactly(mds_dir, make_streaming, num_workers, stop_after):
    # 300 samples, B = 50: 6 super-batches per epoch; 9 steps cross into epoch 1.
    total = 9
    reference = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    expected = _run(_loader(make_streaming(mds_dir, batch_size=50), reference, num_workers),
                    total)
    gc.collect()

    first = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    loader = _loader(make_streaming(mds_dir, batch_size=50), first, num_workers)
    before = _run(loader, stop_after)
    state = loader.state_dict()
    del loader
    gc.collect()

    second = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    resumed = _loader(make_streaming(mds_dir, batch_size=50), second, num_workers)
    resumed.load_state_dict(state)
    after = _run(resumed, total - stop_after)

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
        out = []
        while len(out) < steps:
            for batch in loader:
                out.append(batch[2].tolist())
                if len(out) == steps:
                    break
        return out

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

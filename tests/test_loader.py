"""The loader over real MDS shards and map-style datasets: sizes, ids, selection, telemetry."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from helpers.data import N_CLASSES, features_and_labels
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import (
    ClassificationScorer,
    ColumnReference,
    SelectiveLoader,
    per_example_cross_entropy,
)


def test_yields_sub_batches_of_batch_size_with_ids(mds_dir, make_streaming):
    dataset = make_streaming(mds_dir, batch_size=40)
    scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.75, scorer=scorer,
                             method='topk')
    assert loader.super_batch_size == 40
    batches = list(loader)
    # 300 samples: 7 full super-batches and a partial one of 20 >= batch_size.
    assert len(batches) == len(loader) == 8
    for batch, seen in zip(batches, scorer.seen, strict=True):
        assert batch['x'].shape == (10, 8) and batch['y'].shape == (10,)
        assert set(batch['sample_id'].tolist()) <= set(seen)
        assert len(set(batch['sample_id'].tolist())) == 10
    assert [len(s) for s in scorer.seen] == [40] * 7 + [20]


def test_topk_learnability_picks_highest_learner_minus_reference(mds_dir, make_streaming):
    learner, reference = tiny_classifier(0), tiny_classifier(1)
    dataset = make_streaming(mds_dir, batch_size=50)
    scorer = RecordingScorer(learner, reference)
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer,
                             method='topk')
    batch = next(iter(loader))
    # Recompute the scores of the whole super-batch by hand from the real samples.
    x, y = features_and_labels(300)
    ids = torch.tensor(scorer.seen[0])
    inputs, targets = torch.from_numpy(x)[ids], torch.from_numpy(y)[ids]
    with torch.no_grad():
        scores = (per_example_cross_entropy(learner(inputs), targets)
                  - per_example_cross_entropy(reference(inputs), targets))
    expected = ids[scores.topk(10).indices]
    assert batch['sample_id'].tolist() == expected.tolist()
    assert loader.metrics['score_selected_mean'] >= loader.metrics['score_all_mean']


@pytest.mark.parametrize('criterion', ['learnability', 'hard_learner', 'easy_reference'])
@pytest.mark.parametrize('method', ['joint', 'topk', 'sample'])
def test_every_criterion_and_method_runs(mds_dir, make_streaming, criterion, method):
    dataset = make_streaming(mds_dir, batch_size=60)
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='x',
                                  target_key='y')
    loader = SelectiveLoader(dataset, batch_size=12, filter_ratio=0.8, scorer=scorer,
                             criterion=criterion, method=method, n_chunks=4)
    sizes = [len(b['sample_id']) for b in loader]
    assert sizes == [12] * 5


def test_uniform_scores_nothing_and_is_reproducible(mds_dir, make_streaming):
    def run():
        loader = SelectiveLoader(make_streaming(mds_dir, batch_size=60), batch_size=12,
                                 filter_ratio=0.8, criterion='uniform', seed=3)
        return [b['sample_id'].tolist() for b in loader]

    first, second = run(), run()
    assert first == second
    assert 'score_selected_mean' not in SelectiveLoader(
        make_streaming(mds_dir, batch_size=60), batch_size=12, filter_ratio=0.8,
        criterion='uniform').metrics


def test_learner_is_left_in_training_mode_without_gradients(mds_dir, make_streaming):
    learner = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                  torch.nn.Linear(8, N_CLASSES))
    learner.train()
    running_mean = learner[1].running_mean.clone()
    scorer = ClassificationScorer(learner, None, input_key='x', target_key='y')
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=60), batch_size=12,
                             filter_ratio=0.8, scorer=scorer, criterion='hard_learner')
    next(iter(loader))
    assert learner.training
    # Scoring runs in eval mode: batch-norm statistics do not see the rejected examples.
    assert torch.equal(learner[1].running_mean, running_mean)
    assert all(p.grad is None for p in learner.parameters())


def test_reference_from_a_dataset_column(tmp_path, make_streaming):
    import numpy as np

    from helpers.data import write_mds

    ref_loss = np.linspace(0, 1, 120).astype(np.float32)
    directory = write_mds(tmp_path / 'col', 120, extra={'ref_loss': ('float32', ref_loss)})
    scorer = RecordingScorer(tiny_classifier(0), ColumnReference(loss='ref_loss'))
    loader = SelectiveLoader(make_streaming(directory, batch_size=40), batch_size=10,
                             filter_ratio=0.75, scorer=scorer, criterion='easy_reference',
                             method='topk')
    for batch, seen in zip(list(loader), scorer.seen, strict=True):
        # easy_reference keeps the lowest reference losses, i.e. the smallest ids here.
        assert sorted(batch['sample_id'].tolist()) == sorted(seen)[:10]


def test_map_style_tuple_dataset_is_shuffled_per_epoch_and_covers_everything():
    x, y = features_and_labels(100)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    scorer.inner.input_key, scorer.inner.target_key = 0, 1
    loader = SelectiveLoader(dataset, batch_size=5, filter_ratio=0.75, scorer=scorer, seed=1)
    epoch0 = [b[2].tolist() for b in loader]
    epoch1 = [b[2].tolist() for b in loader]
    assert epoch1 != epoch0
    assert len(epoch0) == 5 and all(len(ids) == 5 for ids in epoch0)
    drawn0 = sum(scorer.seen[:5], [])
    drawn1 = sum(scorer.seen[5:], [])
    assert sorted(drawn0) == sorted(drawn1) == list(range(100))
    assert drawn0 != drawn1
    # The yielded tuple keeps the dataset's fields and adds the ids last.
    batch = next(iter(loader))
    assert torch.equal(batch[0], dataset.tensors[0][batch[2]])


def test_partial_last_super_batch_smaller_than_batch_size_is_dropped(caplog):
    x, y = features_and_labels(47)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.5, criterion='uniform')
    with caplog.at_level(logging.INFO, logger='jest_stream'):
        batches = list(loader)
    # 47 = 2 x 20 + 7: two sub-batches; the last 7 cannot fill one and are dropped.
    assert len(batches) == len(loader) == 2
    assert loader.telemetry.summary()['dropped'] == 7
    assert 'dropped' in caplog.text


def test_telemetry_dict_has_timings_throughputs_scores_and_memory(mds_dir, make_streaming):
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='x',
                                  target_key='y')
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=60), batch_size=12,
                             filter_ratio=0.8, scorer=scorer)
    metrics = []
    for _ in loader:
        metrics.append(dict(loader.metrics))
    for key in ('wait_s', 'transfer_s', 'score_s', 'select_s', 'host_rss_bytes',
                'score_selected_mean', 'score_selected_std', 'score_all_mean'):
        assert key in metrics[-1]
    assert metrics[-1]['drawn'] == 60 and metrics[-1]['yielded'] == 12
    assert 'drawn_per_s' in metrics[-1] and metrics[-1]['yielded_per_s'] > 0
    summary = loader.telemetry.summary()
    assert summary['drawn'] == 300 and summary['yielded'] == 60


class DictDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.x, self.y = features_and_labels(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {'x': self.x[i], 'y': int(self.y[i]), 'name': f'sample-{i}'}


def test_map_style_dict_dataset_keeps_string_columns():
    scorer = ClassificationScorer(tiny_classifier(0), None, input_key='x', target_key='y')
    loader = SelectiveLoader(DictDataset(64), batch_size=8, filter_ratio=0.5, scorer=scorer,
                             criterion='hard_learner', num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert batch['name'] == [f'sample-{i}' for i in batch['sample_id'].tolist()]


@pytest.mark.parametrize('dtype', [torch.bool, torch.uint8, torch.int64, torch.float16,
                                   torch.float32, torch.bfloat16])
def test_gather_matches_index_select(dtype):
    from jest_stream import gather

    x = (torch.arange(48).reshape(8, 3, 2) % 5).to(dtype)
    idx = torch.tensor([4, 0, 7, 7, 2])
    out = gather({'x': x, 't': x.transpose(1, 2), 's': list('abcdefgh')}, idx)
    assert torch.equal(out['x'], x.index_select(0, idx)) and out['x'].dtype == dtype
    assert torch.equal(out['t'], x.transpose(1, 2).index_select(0, idx))
    assert out['s'] == ['e', 'a', 'h', 'h', 'c']

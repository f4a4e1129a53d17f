"""Bad input: each mistake raises early, naming the setting and the fix; NaN is never selected."""

from __future__ import annotations

import pytest
import torch
from streaming import StreamingDataset
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from jest_stream import (
    ClassificationScorer,
    JestStreamError,
    ScoreError,
    SelectiveLoader,
    super_batch_size_for,
)


@pytest.fixture
def tensors():
    x, y = features_and_labels(100)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _scorer(**kwargs):
    return ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                target_key=1, **kwargs)


@pytest.mark.parametrize('ratio', [1.0, -0.1, 1.5, 'half'])
def test_filter_ratio_outside_unit_interval(tensors, ratio):
    with pytest.raises(JestStreamError, match='filter_ratio'):
        SelectiveLoader(tensors, batch_size=10, filter_ratio=ratio, criterion='uniform')


def test_super_batch_size_that_is_not_whole_suggests_ratios():
    with pytest.raises(ValueError, match=r'filter_ratio = .*B=14'):
        super_batch_size_for(10, 0.3)
    assert super_batch_size_for(64, 0.8) == 320
    assert super_batch_size_for(64, 0.9) == 640
    assert super_batch_size_for(10, 0.0) == 10


@pytest.mark.parametrize('kwargs, setting', [
    ({'batch_size': 0, 'filter_ratio': 0.5}, 'batch_size'),
    ({'batch_size': 10, 'filter_ratio': 0.5, 'n_chunks': 0}, 'n_chunks'),
    ({'batch_size': 10, 'filter_ratio': 0.5, 'temperature': -1.0}, 'temperature'),
    ({'batch_size': 10, 'filter_ratio': 0.5, 'num_workers': -1}, 'num_workers'),
    ({'batch_size': 10}, 'filter_ratio'),
    ({'batch_size': 10, 'filter_ratio': 0.5, 'super_batch_size': 20}, 'filter_ratio'),
    ({'batch_size': 10, 'super_batch_size': 5}, 'super_batch_size'),
    ({'batch_size': 200, 'filter_ratio': 0.5}, 'batch_size'),
])
def test_impossible_sizes(tensors, kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        SelectiveLoader(tensors, scorer=_scorer(), **kwargs)


def test_unknown_names_list_the_valid_ones(tensors):
    with pytest.raises(ValueError, match="criterion='learnabilty'.*hard_learner"):
        SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5, scorer=_scorer(),
                        criterion='learnabilty')
    with pytest.raises(ValueError, match="method='greedy'.*topk"):
        SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5, scorer=_scorer(),
                        method='greedy')
    with pytest.raises(ValueError, match='uniform'):
        SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5, scorer=_scorer(),
                        method='uniform')


def test_scoring_criterion_needs_a_scorer(tensors):
    with pytest.raises(ValueError, match='needs a scorer'):
        SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5)


def test_empty_dataset():
    empty = TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match='empty'):
        SelectiveLoader(empty, batch_size=10, filter_ratio=0.5, criterion='uniform')


def test_streaming_dataset_with_other_batch_size(mds_dir, make_streaming):
    with pytest.raises(ValueError, match=r'batch_size=50'):
        SelectiveLoader(make_streaming(mds_dir, batch_size=20), batch_size=10, filter_ratio=0.8,
                        criterion='uniform')


def test_streaming_dataset_without_ids(mds_dir):
    dataset = StreamingDataset(local=str(mds_dir), batch_size=50, num_canonical_nodes=1)
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, criterion='uniform')
    with pytest.raises(KeyError, match='SampleIdStreamingDataset'):
        next(iter(loader))


def test_missing_column_names_setting_and_columns(mds_dir, make_streaming):
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='image',
                                  target_key='y')
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, scorer=scorer)
    with pytest.raises(KeyError, match=r"input_key='image'.*'x'"):
        next(iter(loader))


class _Fixed:
    """A custom scorer returning whatever it is given, to test the checks on scorer output."""

    def __init__(self, make):
        self.make = make
        self.learner = None

    def __call__(self, batch, sample_ids, criterion):
        return self.make(len(sample_ids))


@pytest.mark.parametrize('make, message', [
    (lambda n: torch.zeros(n, 2), 'shape'),
    (lambda n: torch.zeros(n - 1), 'shape'),
    (lambda n: torch.zeros(n, dtype=torch.long), 'dtype'),
    (lambda n: [0.0] * n, 'Tensor'),
    (lambda n: torch.cat([torch.zeros(n - 1), torch.tensor([float('nan')])]), 'NaN'),
    (lambda n: torch.cat([torch.tensor([float('inf')]), torch.zeros(n - 1)]), 'inf'),
])
def test_bad_scorer_output_is_caught_on_the_first_super_batch(tensors, make, message):
    loader = SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5, scorer=_Fixed(make),
                             method='topk')
    with pytest.raises(ScoreError, match=message):
        next(iter(loader))


def test_nan_loss_from_a_diverged_learner_names_the_samples(tensors):
    learner = tiny_classifier(0)
    with torch.no_grad():
        learner.weight[0, 0] = float('nan')
    scorer = ClassificationScorer(learner, tiny_classifier(1), input_key=0, target_key=1)
    loader = SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5, scorer=scorer,
                             shuffle=False)
    with pytest.raises(ScoreError, match=r'sample ids \[0, 1, 2'):
        next(iter(loader))


def test_reference_needed_but_missing(tensors):
    scorer = ClassificationScorer(tiny_classifier(0), None, input_key=0, target_key=1)
    loader = SelectiveLoader(tensors, batch_size=10, filter_ratio=0.5, scorer=scorer)
    with pytest.raises(ValueError, match='hard_learner'):
        next(iter(loader))


def test_dataset_iterated_outside_the_loader_is_detected(mds_dir, make_streaming):
    dataset = make_streaming(mds_dir, batch_size=50)
    next(iter(dataset))  # a peek starts epoch 0 behind the loader's back
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, criterion='uniform')
    with pytest.raises(RuntimeError, match='only the jest_stream loader'):
        next(iter(loader))


def test_input_transform_with_a_custom_forward_is_refused():
    with pytest.raises(ValueError, match='input_transform'):
        ClassificationScorer(tiny_classifier(0), None, forward=lambda m, b: m(b[0]),
                             input_transform=lambda x: x)

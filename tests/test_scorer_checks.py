"""Scorers check their models' outputs and the labels they read: a model that returns the
wrong thing, or a label the loss cannot use, fails on the first super-batch with the setting
to change and the sample ids concerned; targets the loss ignores are never preferred."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from helpers.data import N_CLASSES, features_and_labels
from helpers.models import tiny_classifier
from jest_stream import (
    ClassificationScorer,
    ContrastiveScorer,
    DataError,
    ScoreError,
    SelectionConfig,
    SelectionStep,
    SelectiveLoader,
    get_criterion,
)

LEARNABILITY = get_criterion('learnability')


class TwoTower(nn.Module):
    """A two-tower model whose forward returns ``outputs`` of the embeddings: a tuple of
    the chosen length, normalised or not."""

    def __init__(self, n_outputs: int = 4, normalise: bool = True, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image = nn.Linear(8, 6)
        self.text = nn.Linear(8, 6)
        with torch.no_grad():
            for layer in (self.image, self.text):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        self.n_outputs, self.normalise = n_outputs, normalise

    def forward(self, images, texts):
        x, y = self.image(images), self.text(texts)
        if self.normalise:
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        return (x, y, 5.0, -2.0)[:self.n_outputs]


def _pairs(n: int = 16) -> dict:
    x, _ = features_and_labels(n)
    images = torch.from_numpy(x)
    return {'image': images, 'text': images + 0.1, 'sample_id': torch.arange(100, 100 + n)}


@pytest.mark.parametrize('n_outputs, loss, message', [
    (3, 'sigmoid', r'returned 3 outputs.*the sigmoid loss needs the bias'),
    (2, 'sigmoid', r'returned 2 outputs.*\(image_emb, text_emb, temperature, bias\)'),
    (2, 'softmax', r'returned 2 outputs'),
])
def test_a_contrastive_model_with_missing_outputs_is_refused(n_outputs, loss, message):
    scorer = ContrastiveScorer(TwoTower(n_outputs), TwoTower(4, seed=1), loss=loss)
    batch = _pairs()
    with pytest.raises(ScoreError, match=message):
        scorer(batch, batch['sample_id'], LEARNABILITY)


def test_the_softmax_loss_needs_no_bias():
    scorer = ContrastiveScorer(TwoTower(3), TwoTower(3, seed=1), loss='softmax')
    batch = _pairs()
    assert scorer(batch, batch['sample_id'], LEARNABILITY).size == 16


def test_a_forward_returning_the_wrong_count_names_forward():
    scorer = ContrastiveScorer(TwoTower(), TwoTower(seed=1),
                               forward=lambda model, batch: model(batch['image'],
                                                                  batch['text'])[:3])
    batch = _pairs()
    with pytest.raises(ScoreError, match=r'forward= must return'):
        scorer(batch, batch['sample_id'], LEARNABILITY)


def test_unnormalised_embeddings_are_refused_with_the_sample_ids():
    scorer = ContrastiveScorer(TwoTower(normalise=False), TwoTower(seed=1))
    batch = _pairs()
    with pytest.raises(ScoreError, match=r'learner image embeddings are not L2-normalised.*'
                                         r'\[100, 101'):
        scorer(batch, batch['sample_id'], LEARNABILITY)


class Wrapped(nn.Module):
    """``tiny_classifier``'s logits wrapped by ``wrap``: a dict, an object with ``.logits``."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.inner, self.wrap = tiny_classifier(0), wrap

    def forward(self, x):
        return self.wrap(self.inner(x))


class Output:
    def __init__(self, logits):
        self.logits = logits


def test_a_classifier_that_returns_no_tensor_is_refused():
    scorer = ClassificationScorer(Wrapped(lambda z: {'scores': z}), None, input_key=0,
                                  target_key=1)
    x, y = features_and_labels(8)
    with pytest.raises(ScoreError, match='must return a Tensor of logits'):
        scorer([torch.from_numpy(x), torch.from_numpy(y)], torch.arange(8),
               get_criterion('hard_learner'))


def test_hugging_face_style_outputs_with_logits_are_read():
    model = Wrapped(Output)
    scorer = ClassificationScorer(model, None, input_key=0, target_key=1)
    x, y = features_and_labels(8)
    batch = [torch.from_numpy(x), torch.from_numpy(y)]
    expected = F.cross_entropy(model.inner(batch[0]), batch[1], reduction='none')
    scores = scorer(batch, torch.arange(8), get_criterion('hard_learner')).scores
    assert torch.allclose(scores, expected.detach())


# Labels

def _labelled(n: int, labels: torch.Tensor) -> TensorDataset:
    x, _ = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), labels)


def test_a_class_index_out_of_range_names_the_column_and_the_sample_ids():
    x, y = features_and_labels(40)
    y[[3, 17]] = N_CLASSES + 5
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                  target_key=1)
    loader = SelectiveLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                             batch_size=10, super_batch_size=40, scorer=scorer, shuffle=False)
    with pytest.raises(DataError, match=r'target_key=1 holds class indices \[9\] outside '
                                        r'\[0, 4\) for sample ids \[3, 17\]'):
        next(iter(loader))


@pytest.mark.parametrize('criterion', ['learnability', 'easy_reference'])
@pytest.mark.parametrize('method', ['joint', 'topk', 'sample'])
def test_targets_the_loss_ignores_are_never_preferred(method, criterion):
    # 20% of the pool has no label (-100): cross-entropy gives them loss 0, the best score of
    # easy_reference (-0) and often of learnability (0 - 0 against negative scores of
    # learnable samples). They must not be selected while labelled candidates remain.
    n = 200
    _, y = features_and_labels(n)
    labels = torch.from_numpy(y)
    ignored = torch.arange(n) % 5 == 0
    labels[ignored] = -100
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                  target_key=1)
    config = SelectionConfig.create(batch_size=20, super_batch_size=n, method=method,
                                    criterion=criterion)
    x, _ = features_and_labels(n)
    batch = [torch.from_numpy(x), labels]
    for index in range(5):
        selection = SelectionStep(config, scorer).choose(batch, torch.arange(n), 0, index)
        assert not ignored[selection.selected].any()
    # With fewer labelled candidates than the sub-batch, the rest is filled from the others.
    few = torch.full((n,), -100)
    few[:5] = 0
    selection = SelectionStep(config, scorer).choose([batch[0], few], torch.arange(n), 0, 0)
    assert set(range(5)) <= set(selection.selected.tolist())
    assert len(set(selection.selected.tolist())) == 20

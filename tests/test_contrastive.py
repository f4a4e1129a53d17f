"""Two-tower contrastive scoring through the loader: sigmoid pair scores and softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import write_mds
from jest_stream import (
    ColumnReference,
    ContrastiveScorer,
    Embeddings,
    SelectiveLoader,
    SigmoidPairScores,
    SoftmaxScores,
    get_criterion,
    infonce_conditional_losses,
    joint_select,
    sigmoid_pair_losses,
)
from jest_stream.randomness import SELECTION, derive_generator

N_TOKENS = 16


class TwoTower(nn.Module):
    """Image features -> linear; a token id -> embedding; both L2-normalised."""

    def __init__(self, seed: int, dim: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image = nn.Linear(8, dim)
        self.text = nn.Embedding(N_TOKENS, dim)
        with torch.no_grad():
            self.image.weight.copy_(torch.randn(self.image.weight.shape, generator=generator))
            self.text.weight.copy_(torch.randn(self.text.weight.shape, generator=generator))
            self.image.bias.zero_()
        self.log_temperature = nn.Parameter(torch.tensor(1.5))
        self.bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, images, tokens):
        image = nn.functional.normalize(self.image(images), dim=-1)
        text = nn.functional.normalize(self.text(tokens), dim=-1)
        return image, text, self.log_temperature.exp(), self.bias


@pytest.fixture
def pairs_dir(tmp_path):
    tokens = np.arange(200) % N_TOKENS
    return write_mds(tmp_path / 'pairs', 200, extra={'token': ('int', tokens)})


def _scorer(loss, reference=None):
    return ContrastiveScorer(TwoTower(0), TwoTower(1) if reference is None else reference,
                             loss=loss, image_key='x', text_key='token', dtype=torch.float64)


def test_sigmoid_joint_selection_matches_the_materialised_sampler(pairs_dir, make_streaming):
    scorer = _scorer('sigmoid')
    loader = SelectiveLoader(make_streaming(pairs_dir, batch_size=50, shuffle=False),
                             batch_size=10, filter_ratio=0.8, scorer=scorer, method='joint',
                             n_chunks=5, seed=4)
    iterator = iter(loader)
    batch = next(iterator)
    # Recompute the super-batch's pair-score matrix from scratch and sample from it directly.
    ids = torch.arange(50)
    from helpers.data import features_and_labels
    x = torch.from_numpy(features_and_labels(200)[0])[ids]
    tokens = ids % N_TOKENS
    with torch.no_grad():
        li, lt, ltemp, lbias = scorer.learner(x, tokens)
        ri, rt, rtemp, rbias = scorer.reference(x, tokens)
    matrix = (sigmoid_pair_losses(li.double(), lt.double(), float(ltemp), float(lbias))
              - sigmoid_pair_losses(ri.double(), rt.double(), float(rtemp), float(rbias)))
    expected = joint_select(matrix, 10, n_chunks=5, temperature=1.0,
                            generator=derive_generator(4, SELECTION, 0, 0))
    assert batch['sample_id'].tolist() == ids[expected].tolist()
    assert len(list(iterator)) == 3


def test_sigmoid_pair_scores_blocks_and_marginals():
    generator = torch.Generator().manual_seed(0)

    def emb(t, c):
        def unit():
            return nn.functional.normalize(
                torch.randn(30, 4, generator=generator, dtype=torch.float64), dim=-1)
        return Embeddings(unit(), unit(), t, c)

    learner, reference = emb(5.0, -1.0), emb(8.0, -2.0)
    scores = SigmoidPairScores(learner, reference, get_criterion('learnability'), block_size=7)
    full = (sigmoid_pair_losses(learner.image, learner.text, 5.0, -1.0)
            - sigmoid_pair_losses(reference.image, reference.text, 8.0, -2.0))
    assert torch.allclose(scores.materialise(), full)
    assert torch.allclose(scores.diagonal(), full.diagonal())
    idx = torch.tensor([3, 17])
    assert torch.allclose(scores.columns(idx), full[:, idx])
    assert torch.allclose(scores.rows(idx), full[idx, :])
    assert torch.allclose(scores.per_example(), full.sum(0) + full.sum(1) - full.diagonal())
    hard = SigmoidPairScores(learner, None, get_criterion('hard_learner'))
    assert torch.allclose(hard.materialise(),
                          sigmoid_pair_losses(learner.image, learner.text, 5.0, -1.0))


def test_softmax_scores_use_the_whole_super_batch_for_independent_selection():
    generator = torch.Generator().manual_seed(1)
    image = nn.functional.normalize(torch.randn(12, 4, generator=generator, dtype=torch.float64))
    text = nn.functional.normalize(torch.randn(12, 4, generator=generator, dtype=torch.float64))
    scores = SoftmaxScores(Embeddings(image, text, 3.0), None, get_criterion('hard_learner'))
    everything = torch.arange(12)
    assert torch.allclose(scores.per_example(),
                          infonce_conditional_losses(image, text, 3.0, everything))
    selected = scores.select_jointly(6, n_chunks=3, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0))
    assert len(set(selected.tolist())) == 6


@pytest.mark.parametrize('method', ['joint', 'topk', 'sample'])
def test_softmax_loss_through_the_loader(pairs_dir, make_streaming, method):
    loader = SelectiveLoader(make_streaming(pairs_dir, batch_size=40), batch_size=8,
                             filter_ratio=0.8, scorer=_scorer('softmax'), method=method,
                             n_chunks=4)
    batches = list(loader)
    assert [len(b['sample_id']) for b in batches] == [8] * 5
    assert 'score_selected_mean' in loader.metrics


def test_reference_embeddings_from_columns(tmp_path, make_streaming):
    reference = TwoTower(1)
    from helpers.data import features_and_labels
    x = torch.from_numpy(features_and_labels(100)[0])
    tokens = torch.arange(100) % N_TOKENS
    with torch.no_grad():
        image, text, temperature, bias = reference(x, tokens)
    directory = write_mds(tmp_path / 'ref', 100, extra={
        'token': ('int', tokens.numpy()),
        'ref_image': ('ndarray:float32:6', image.numpy()),
        'ref_text': ('ndarray:float32:6', text.numpy()),
    })
    table = ColumnReference(image_emb='ref_image', text_emb='ref_text',
                            temperature=float(temperature), bias=float(bias))

    def run(ref):
        loader = SelectiveLoader(make_streaming(directory, batch_size=50), batch_size=10,
                                 filter_ratio=0.8, scorer=_scorer('sigmoid', ref), seed=2)
        return [b['sample_id'].tolist() for b in loader]

    assert run(table) == run(reference)


def test_contrastive_errors_name_the_problem(pairs_dir, make_streaming):
    with pytest.raises(ValueError, match="loss='cosine'"):
        ContrastiveScorer(TwoTower(0), TwoTower(1), loss='cosine')
    table = ColumnReference(image_emb='x', text_emb='x')  # no temperature: must fail loudly
    loader = SelectiveLoader(make_streaming(pairs_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, scorer=_scorer('sigmoid', table))
    with pytest.raises(KeyError, match='temperature'):
        next(iter(loader))

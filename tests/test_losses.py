"""Pair and per-example losses against naive loops, and the incremental InfoNCE state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jest_stream.losses import (
    InfoNCEConditional,
    infonce_conditional_losses,
    per_example_cross_entropy,
    sigmoid_pair_losses,
)


def embeddings(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(n, d, generator=generator, dtype=dtype), dim=-1)
    return image, text


def naive_sigmoid_losses(image, text, t, c):
    n = image.shape[0]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * float(image[i] @ text[j]) + c
            out[i, j] = -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return out


def naive_infonce_losses(image, text, t, selected):
    n = image.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    for k in range(n):
        total = 0.0
        for forward in (True, False):
            positive = math.exp(t * float(image[k] @ text[k]))
            negatives = 0.0
            for j in selected:
                if j == k:
                    continue
                pair = image[k] @ text[j] if forward else image[j] @ text[k]
                negatives += math.exp(t * float(pair))
            total += -math.log(positive / (positive + negatives))
        out[k] = total
    return out


@pytest.mark.parametrize('as_tensor', [False, True])
def test_sigmoid_pair_losses_match_naive_loop(as_tensor):
    image, text = embeddings(6, 5, seed=0)
    t, c = 7.5, -3.0
    temperature = torch.tensor(t, dtype=torch.float64) if as_tensor else t
    bias = torch.tensor(c, dtype=torch.float64) if as_tensor else c
    losses = sigmoid_pair_losses(image, text, temperature, bias)
    torch.testing.assert_close(losses, naive_sigmoid_losses(image, text, t, c))


def test_sigmoid_pair_blocks_are_slices_of_the_full_matrix():
    image, text = embeddings(9, 4, seed=1)
    full = sigmoid_pair_losses(image, text, 10.0, -5.0)
    rows = torch.tensor([3, 0, 7, 3])
    cols = torch.tensor([7, 3, 1])
    torch.testing.assert_close(sigmoid_pair_losses(image, text, 10.0, -5.0, rows=rows, cols=cols),
                               full[rows][:, cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(sigmoid_pair_losses(image, text, 10.0, -5.0, cols=cols),
                               full[:, cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(sigmoid_pair_losses(image, text, 10.0, -5.0, rows=rows),
                               full[rows], rtol=0, atol=1e-12)


def test_sigmoid_pair_sign_follows_global_indices():
    # Every image equals every text: the logit is t + c everywhere, so only z tells
    # matching pairs (loss softplus(-(t + c))) from the rest (softplus(t + c)).
    image = torch.ones(5, 3, dtype=torch.float64) / math.sqrt(3)
    t, c = 4.0, -1.0
    block = sigmoid_pair_losses(image, image.clone(), t, c,
                                rows=torch.tensor([4, 1]), cols=torch.tensor([1, 2, 4]))
    positive, negative = F.softplus(torch.tensor(-(t + c))), F.softplus(torch.tensor(t + c))
    expected = torch.tensor([[negative, negative, positive],
                             [positive, negative, negative]], dtype=torch.float64)
    torch.testing.assert_close(block, expected)


def test_sigmoid_pair_losses_are_stable_and_upcast_half():
    image, text = embeddings(4, 8, seed=2, dtype=torch.float16)
    losses = sigmoid_pair_losses(image, text, 1000.0, 0.0)
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all()


def test_sigmoid_pair_losses_reject_bad_shapes():
    image, text = embeddings(4, 3, seed=0)
    with pytest.raises(ValueError, match='image_emb and text_emb'):
        sigmoid_pair_losses(image, text[:3], 1.0, 0.0)
    with pytest.raises(ValueError, match='rows'):
        sigmoid_pair_losses(image, text, 1.0, 0.0, rows=torch.tensor([0.5]))


def test_infonce_with_empty_selection_is_zero():
    image, text = embeddings(7, 4, seed=3)
    losses = infonce_conditional_losses(image, text, 5.0, torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(losses, torch.zeros(7, dtype=torch.float64))
    assert torch.equal(InfoNCEConditional(image, text, 5.0).losses(), torch.zeros(7).double())


@pytest.mark.parametrize('selected', [[2], [0, 4, 5], [6, 1, 3, 0, 2]])
def test_infonce_matches_naive_loop(selected):
    image, text = embeddings(7, 4, seed=4)
    losses = infonce_conditional_losses(image, text, 5.0, torch.tensor(selected))
    torch.testing.assert_close(losses, naive_infonce_losses(image, text, 5.0, selected))


@pytest.mark.parametrize('seed', range(5))
def test_infonce_conditional_state_matches_direct_form(seed):
    image, text = embeddings(40, 6, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(40, generator=generator)
    state = InfoNCEConditional(image, text, 12.0)
    start = 0
    for size in (1, 5, 3, 8, 20):
        chunk = order[start:start + size]
        start += size
        state.add(chunk)
        direct = infonce_conditional_losses(image, text, 12.0, order[:start])
        torch.testing.assert_close(state.losses(), direct, rtol=1e-12, atol=1e-12)
        assert torch.equal(state.current(), state.losses())


def test_infonce_conditional_rejects_a_repeated_candidate():
    image, text = embeddings(6, 3, seed=0)
    state = InfoNCEConditional(image, text, 1.0)
    state.add(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match='already in the selected set'):
        state.add(torch.tensor([2, 3]))
    with pytest.raises(ValueError, match='already in the selected set'):
        state.add(torch.tensor([4, 4]))


def test_per_example_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=generator)
    targets = torch.randint(0, 4, (10,), generator=generator)
    expected = torch.stack([F.cross_entropy(logits[i:i + 1], targets[i:i + 1])
                            for i in range(10)])
    torch.testing.assert_close(per_example_cross_entropy(logits, targets), expected)
    half = per_example_cross_entropy(logits.half(), targets)
    assert half.dtype == torch.float32 and half.shape == (10,)
    with pytest.raises(ValueError, match='logits Tensor'):
        per_example_cross_entropy(logits, targets[:5])

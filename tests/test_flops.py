"""FLOPs counted with FlopCounterMode: the helpers, and the loader's ``score_flops``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jest_stream import ClassificationScorer, SelectiveLoader
from jest_stream.flexi import (
    FlexiForward,
    LowResolution,
    MixedResolution,
    mixed_resolution_loss,
)
from jest_stream.flops import count_flops, forward_flops, score_flops, train_step_flops
from test_flexi import N_LABELS, PooledConv, TinyFlexi, as_float, write_image_mds


def conv_flops(n: int, side: int, channels: int = 4) -> int:
    """FLOPs of :class:`PooledConv` on ``n`` images of ``side x side``: 3x3 conv, linear."""
    return 2 * n * side * side * channels * 9 + 2 * n * channels * N_LABELS


def test_count_flops_returns_the_result_and_the_matmul_flops():
    layer = nn.Linear(16, 8)
    inputs = torch.zeros(5, 16)
    result, flops = count_flops(layer, inputs)
    assert result.shape == (5, 8)
    assert flops == 2 * 5 * 16 * 8


def test_forward_flops_runs_in_eval_mode_and_restores_training():
    model = PooledConv(0)
    model.train()
    assert forward_flops(model, torch.zeros(3, 1, 8, 8)) == conv_flops(3, 8)
    assert model.training


def test_train_step_flops_counts_forward_and_backward_and_leaves_gradients_alone():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batch = (torch.zeros(5, 16), torch.zeros(5, dtype=torch.long))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    flops = train_step_flops(model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    first, second = 2 * 5 * 16 * 8, 2 * 5 * 8 * 4
    # Forward; backward: weight gradients of both layers, input gradient of the second only.
    assert flops == (first + second) + (first + second) + second
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None
    with pytest.raises(ValueError, match='scalar'):
        train_step_flops(model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1],
                                                                    reduction='none'))


def test_mixed_resolution_training_flops_fall_as_expected():
    model = PooledConv(0)
    batch = {'image': torch.zeros(8, 1, 8, 8), 'label': torch.zeros(8, dtype=torch.long)}

    def loss(m, b):
        return mixed_resolution_loss(m, b, F.cross_entropy)

    full = train_step_flops(model, batch, loss)
    mixed = train_step_flops(model, MixedResolution(factor=2)(batch), loss)
    # Half the rows at a quarter of the pixels: the convolution, nearly all of the cost,
    # falls to (1 + 1/4) / 2 = 5/8.
    assert mixed / full == pytest.approx(5 / 8, abs=0.01)


def test_score_flops_at_a_larger_patch_size():
    learner = TinyFlexi(0, base_patch_size=2, dim=6)
    batch = {'image': torch.zeros(4, 8, 8, dtype=torch.uint8), 'label': torch.zeros(4).long()}
    full = ClassificationScorer(learner, None, target_key='label',
                                forward=lambda m, b: m(as_float(b['image'])))
    cheap = ClassificationScorer(learner, None, target_key='label', forward=FlexiForward(
        input_key='image', patch_size=4, preprocess=as_float, learner=learner))

    def expected(tokens: int) -> int:
        # The patch embedding meets every pixel once whatever the patch size; the per-token
        # layer scales with the tokens; the head sees one vector per image.
        return 2 * 4 * 64 * 6 + 2 * 4 * tokens * 6 * 6 + 2 * 4 * 6 * N_LABELS

    # The first call at a new patch size also resizes the weights (then they are cached).
    resize = 2 * 6 * 16 * 4
    assert score_flops(cheap, batch, criterion='hard_learner') == expected(4) + resize
    assert score_flops(cheap, batch, criterion='hard_learner') == expected(4)
    assert score_flops(full, batch, criterion='hard_learner') == expected(16)


def test_loader_telemetry_score_flops_fall_4x_at_half_resolution(tmp_path, make_streaming):
    """The loader's ``score_flops`` telemetry, full against half resolution, same data."""
    directory = write_image_mds(tmp_path / 'images', 80)
    learner = PixelConv(0)
    reported = {}
    for name, transform in (('full', None), ('low', LowResolution(2))):
        scorer = ClassificationScorer(learner, None, input_key='image', target_key='label',
                                      input_transform=transform)
        loader = SelectiveLoader(make_streaming(directory, batch_size=40), batch_size=10,
                                 filter_ratio=0.75, scorer=scorer, criterion='hard_learner',
                                 method='topk', count_flops=True)
        next(iter(loader))
        reported[name] = loader.metrics['score_flops']
    assert reported['full'] == conv_flops(40, 8)
    assert reported['low'] == conv_flops(40, 4)
    # The convolution scales with the pixels (4x); the linear layer does not.
    assert reported['full'] / reported['low'] == pytest.approx(3.93, abs=0.01)


class PixelConv(PooledConv):
    """:class:`PooledConv` on uint8 ``[B, H, W]`` pixels, as they come from the dataset."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(as_float(x))

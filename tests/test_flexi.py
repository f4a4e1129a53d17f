"""Flexi-JEST: downsampling, the FlexiViT PI-resize, cheap scoring, mixed-resolution training."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streaming import MDSWriter
from torch import Tensor, nn

from jest_stream import ClassificationScorer, SelectiveLoader, get_criterion
from jest_stream.errors import DataError, MissingColumnError, SettingError, SettingTypeError
from jest_stream.flexi import (
    FlexiForward,
    FlexiPatchEmbed,
    LowResolution,
    MixedResolution,
    downsample,
    factor_column,
    low_resolution_rows,
    mixed_resolution_forward,
    mixed_resolution_loss,
    patch_size_column,
    pi_resize,
    pi_resize_matrix,
    resize_matrix,
    resize_position_embeddings,
    resolution_groups,
    split_mixed_resolution,
)

IMAGE_SIDE = 8
N_LABELS = 3
# The PI-resize is exact for patch sizes >= the base one; float64 round-off stays near 1e-14.
PI_TOLERANCE = 1e-12


def image_of(sample: int) -> np.ndarray:
    """A uint8 image that names its sample: ``sample`` plus a checkerboard of 100s."""
    board = (np.indices((IMAGE_SIDE, IMAGE_SIDE)).sum(0) % 2) * 100
    return (board + sample).astype(np.uint8)


def write_image_mds(directory: Path, n: int) -> Path:
    """``n`` samples: ``image`` uint8[8, 8] (see :func:`image_of`), ``label`` = sample % 3."""
    columns = {'image': f'ndarray:uint8:{IMAGE_SIDE},{IMAGE_SIDE}', 'label': 'int'}
    with MDSWriter(out=str(directory), columns=columns, size_limit=1 << 11) as writer:
        for i in range(n):
            writer.write({'image': image_of(i), 'label': i % N_LABELS})
    return directory


def as_float(images: Tensor) -> Tensor:
    """uint8 ``[B, H, W]`` to float ``[B, 1, H, W]``."""
    return images.float().unsqueeze(1) / 255.0


class PooledConv(nn.Module):
    """A conv layer, global average pooling and a linear layer: any resolution goes."""

    def __init__(self, seed: int, channels: int = 4, n_classes: int = N_LABELS) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels, n_classes)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


class TinyFlexi(nn.Module):
    """A FlexiViT cut to the bone: flexible patch embedding, a per-token layer, mean, linear."""

    def __init__(self, seed: int, base_patch_size: int = 2, dim: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = FlexiPatchEmbed(in_channels=1, dim=dim, base_patch_size=base_patch_size)
        self.embed.reset_parameters(generator)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, N_LABELS)
        with torch.no_grad():
            for layer in (self.mix, self.head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))

    def forward(self, x: Tensor, patch_size: int | None = None) -> Tensor:
        return self.head(torch.tanh(self.mix(self.embed(x, patch_size))).mean(dim=1))


def upsample_each_patch(images: Tensor, patch: int, new: int) -> Tensor:
    """Resize every ``patch x patch`` patch of ``images`` to ``new x new``, bilinearly."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(b, c, gh, patch, gw, patch).permute(0, 1, 2, 4, 3, 5)
    resized = F.interpolate(patches.reshape(-1, 1, patch, patch), size=(new, new),
                            mode='bilinear', align_corners=False)
    return (resized.reshape(b, c, gh, gw, new, new).permute(0, 1, 2, 4, 3, 5)
            .reshape(b, c, gh * new, gw * new))


# Downsampling


def test_area_downsample_is_the_block_mean_and_keeps_shape_and_dtype():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 8, 6, generator=generator)
    out = downsample(images, 2)
    assert out.shape == (3, 2, 4, 3)
    expected = images.reshape(3, 2, 4, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out, expected)
    pixels = torch.randint(0, 256, (5, 8, 8), generator=generator, dtype=torch.uint8)
    small = downsample(pixels, 2)
    assert small.dtype == torch.uint8 and small.shape == (5, 4, 4)
    expected = pixels.float().reshape(5, 4, 2, 4, 2).mean(dim=(2, 4)).round().to(torch.uint8)
    assert torch.equal(small, expected)
    assert downsample(images, 1) is images


def test_bilinear_downsample_antialiases_and_rounds_the_size():
    images = torch.ones(2, 1, 28, 28)
    out = downsample(images, 1.4, mode='bilinear')
    assert out.shape == (2, 1, 20, 20)
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize('factor,error', [(0.5, SettingError), (0, SettingError),
                                          (True, SettingTypeError), ('2', SettingTypeError)])
def test_bad_factor_is_refused(factor, error):
    with pytest.raises(error, match='factor'):
        LowResolution(factor)


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(SettingError, match="'area', 'bilinear'"):
        downsample(torch.zeros(1, 4, 4), 2, mode='nearest')
    with pytest.raises(DataError, match=r'no \[H, W\]'):
        downsample(torch.zeros(4), 2)


def test_low_resolution_as_input_transform_scores_the_learner_only_at_low_resolution():
    generator = torch.Generator().manual_seed(1)
    learner, reference = PooledConv(0), PooledConv(1)
    images = torch.rand(12, 1, 8, 8, generator=generator)
    labels = torch.randint(0, N_LABELS, (12,), generator=generator)
    scorer = ClassificationScorer(learner, reference, input_key='x', target_key='y',
                                  input_transform=LowResolution(2))
    scores = scorer({'x': images, 'y': labels}, torch.arange(12),
                    get_criterion('learnability')).scores
    with torch.no_grad():
        expected = (F.cross_entropy(learner(downsample(images, 2)), labels, reduction='none')
                    - F.cross_entropy(reference(images), labels, reduction='none'))
    torch.testing.assert_close(scores, expected)


# The PI-resize


@pytest.mark.parametrize('old,new', [(2, 3), (4, 7), (4, 8), (3, 5), (7, 14), (4, 4)])
def test_resize_matrix_is_the_bilinear_resize(old, new):
    generator = torch.Generator().manual_seed(old * 100 + new)
    patches = torch.randn(5, 1, old, old, generator=generator, dtype=torch.float64)
    direct = F.interpolate(patches, size=(new, new), mode='bilinear', align_corners=False)
    by_matrix = patches.reshape(5, -1) @ resize_matrix(old, new).T
    torch.testing.assert_close(by_matrix, direct.reshape(5, -1), atol=1e-13, rtol=0)


@pytest.mark.parametrize('old,new', [(2, 3), (4, 7), (4, 8), (3, 5), (7, 14), (4, 4), (2, 14)])
def test_pi_resize_property_upsampled_image_at_new_patch_size_embeds_the_same(old, new):
    """<B x, pinv(B^T) w> = <x, w>: each patch upsampled by B embeds as the original."""
    generator = torch.Generator().manual_seed(old * 100 + new)
    embed = FlexiPatchEmbed(in_channels=2, dim=5, base_patch_size=old).double()
    embed.reset_parameters(generator)
    images = torch.randn(3, 2, 3 * old, 2 * old, generator=generator, dtype=torch.float64)
    original = embed(images)
    upsampled = embed(upsample_each_patch(images, old, new), patch_size=new)
    assert original.shape == upsampled.shape == (3, 6, 5)
    torch.testing.assert_close(upsampled, original, atol=PI_TOLERANCE, rtol=PI_TOLERANCE)


def test_pi_resize_property_holds_in_float32_to_float32_precision():
    generator = torch.Generator().manual_seed(3)
    embed = FlexiPatchEmbed(in_channels=1, dim=8, base_patch_size=4)
    embed.reset_parameters(generator)
    images = torch.randn(2, 1, 12, 12, generator=generator)
    torch.testing.assert_close(embed(upsample_each_patch(images, 4, 7), patch_size=7),
                               embed(images), atol=1e-5, rtol=1e-5)


def test_pi_resize_to_a_smaller_patch_is_the_least_squares_solution():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(3, 2, 6, 6, generator=generator, dtype=torch.float64)
    resized = pi_resize(weight, 4)
    assert resized.shape == (3, 2, 4, 4)
    # w' minimises ||B^T w' - w||: the residual is orthogonal to the range of B^T.
    b_t = resize_matrix(6, 4).T
    residual = b_t @ resized.reshape(-1, 16).T - weight.reshape(-1, 36).T
    torch.testing.assert_close(b_t.T @ residual, torch.zeros(16, 6, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    assert pi_resize_matrix(6, 4).shape == (16, 36)
    assert pi_resize(weight, 6) is weight


def test_patch_embed_shapes_and_errors():
    embed = FlexiPatchEmbed(in_channels=1, dim=4, base_patch_size=4)
    images = torch.zeros(2, 1, 28, 28)
    assert embed(images).shape == (2, 49, 4)
    assert embed(images, patch_size=7).shape == (2, 16, 4)
    assert embed(images, patch_size=14).shape == (2, 4, 4)
    assert embed.weight_at(7).shape == (4, 1, 7, 7)
    with pytest.raises(SettingError, match=r'patch_size=5 does not divide the image size 28x28; '
                                         r'patch sizes that do: \[1, 2, 4, 7, 14, 28\]'):
        embed(images, patch_size=5)
    with pytest.raises(DataError, match=r'\[B, 1, H, W\]'):
        embed(torch.zeros(2, 3, 28, 28))
    with pytest.raises(SettingError, match='patch_size'):
        embed(images, patch_size=0)
    with pytest.raises(SettingTypeError, match='patch_size'):
        embed(images, patch_size=7.0)
    with pytest.raises(DataError, match='square patch'):
        pi_resize(torch.zeros(2, 3, 4), 5)


def test_gradients_reach_the_base_weights_through_the_resize():
    generator = torch.Generator().manual_seed(5)
    embed = FlexiPatchEmbed(in_channels=1, dim=3, base_patch_size=2).double()
    embed.reset_parameters(generator)
    images = torch.randn(2, 1, 6, 6, generator=generator, dtype=torch.float64)
    embed(images, patch_size=3).square().sum().backward()
    # The same loss written with the functional resize, differentiated by autograd.
    weight = embed.weight.detach().clone().requires_grad_(True)
    tokens = F.conv2d(images, pi_resize(weight, 3), embed.bias.detach(), stride=3)
    tokens.square().sum().backward()
    assert embed.weight.grad.abs().sum() > 0
    torch.testing.assert_close(embed.weight.grad, weight.grad)


def test_resized_weights_are_cached_without_gradients_and_rebuilt_after_a_step():
    embed = FlexiPatchEmbed(in_channels=1, dim=3, base_patch_size=2)
    embed.reset_parameters(torch.Generator().manual_seed(6))
    with torch.no_grad():
        first = embed.weight_at(3)
        assert embed.weight_at(3) is first
    optimizer = torch.optim.SGD(embed.parameters(), lr=0.5)
    embed(torch.ones(1, 1, 6, 6), patch_size=3).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = embed.weight_at(3)
    assert after is not first
    torch.testing.assert_close(after, pi_resize(embed.weight.detach(), 3))
    embed.load_state_dict({'weight': torch.zeros(3, 1, 2, 2), 'bias': torch.zeros(3)})
    with torch.no_grad():
        assert embed.weight_at(3).abs().sum() == 0


# The resized-weight cache sees every kind of update of the base weights

SCORED_PATCH = 4


def image_batch(seed: int, n: int = 16) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {'image': torch.randint(0, 256, (n, IMAGE_SIDE, IMAGE_SIDE), generator=generator,
                                   dtype=torch.uint8),
            'label': torch.randint(0, N_LABELS, (n,), generator=generator)}


def flexi_scores(model: TinyFlexi, batch: dict[str, Tensor]) -> Tensor:
    """Hard-learner scores of ``model`` at patch :data:`SCORED_PATCH`, as a scorer sees them."""
    dtype = model.embed.weight.dtype
    forward = FlexiForward(input_key='image', patch_size=SCORED_PATCH, learner=model,
                           preprocess=lambda images: as_float(images).to(dtype))
    scorer = ClassificationScorer(model, None, target_key='label', forward=forward)
    n = batch['label'].shape[0]
    return scorer(batch, torch.arange(n), get_criterion('hard_learner')).scores


def fresh_copy(model: TinyFlexi) -> TinyFlexi:
    """A new model, never used before, holding ``model``'s current state."""
    fresh = TinyFlexi(99).to(model.embed.weight.dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def assert_scores_like_a_fresh_model(model: TinyFlexi, batch: dict[str, Tensor]) -> None:
    fresh = fresh_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(model.embed.weight_at(SCORED_PATCH),
                                   fresh.embed.weight_at(SCORED_PATCH), rtol=0, atol=0)
    torch.testing.assert_close(flexi_scores(model, batch), flexi_scores(fresh, batch),
                               rtol=0, atol=0)


def scored_learner(seed: int = 0) -> TinyFlexi:
    """A learner that has been scored once, so its resized weights are cached."""
    model = TinyFlexi(seed)
    flexi_scores(model, image_batch(100))
    return model


def train_step(model: TinyFlexi, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
               ) -> None:
    mixed = MixedResolution(patch_sizes=(2, SCORED_PATCH))(batch)
    loss = mixed_resolution_loss(model, mixed, F.cross_entropy, preprocess=as_float)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


OPTIMIZERS = {'SGD': (torch.optim.SGD, {'lr': 0.5, 'momentum': 0.9}),
              'Adam': (torch.optim.Adam, {'lr': 0.05}),
              'AdamW': (torch.optim.AdamW, {'lr': 0.05, 'weight_decay': 0.1})}
FLAVOURS = {'for-loop': {'foreach': False}, 'foreach': {'foreach': True},
            'fused': {'fused': True}}


def make_optimizer(name: str, flavour: str, params) -> torch.optim.Optimizer:
    optimizer_class, settings = OPTIMIZERS[name]
    try:
        return optimizer_class(params, **settings, **FLAVOURS[flavour])
    except RuntimeError as error:  # a build of torch without this fused kernel on the CPU
        pytest.skip(f'{name}({flavour}) is not supported here: {error}')


@pytest.mark.parametrize('flavour', list(FLAVOURS))
@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_scores_after_optimizer_steps_match_a_fresh_model(name, flavour):
    """Fused optimizers do not bump the weights' version counters; the cache must see them."""
    model = scored_learner()
    optimizer = make_optimizer(name, flavour, model.parameters())
    for step in range(3):
        before = model.embed.weight.detach().clone()
        train_step(model, optimizer, image_batch(step))
        assert not torch.equal(model.embed.weight, before)
        assert_scores_like_a_fresh_model(model, image_batch(200 + step))


def test_topk_over_training_with_a_fused_optimizer_matches_a_fresh_model():
    """Score, select, train on the selection, again: what Flexi-JEST does with fused Adam."""
    model = TinyFlexi(0)
    optimizer = make_optimizer('Adam', 'fused', model.parameters())
    for step in range(6):
        super_batch = image_batch(300 + step, n=32)
        scores = flexi_scores(model, super_batch)
        expected = flexi_scores(fresh_copy(model), super_batch)
        torch.testing.assert_close(scores, expected, rtol=0, atol=0)
        chosen = torch.topk(scores, 8).indices
        assert torch.equal(chosen, torch.topk(expected, 8).indices)
        train_step(model, optimizer, {key: column[chosen] for key, column in super_batch.items()})


def _write_through_data(model: TinyFlexi) -> None:
    model.embed.weight.data.add_(0.25)


def _copy_through_data(model: TinyFlexi) -> None:
    model.embed.weight.data.copy_(torch.linspace(-1, 1, model.embed.weight.numel())
                                  .reshape(model.embed.weight.shape))


def _assign_data(model: TinyFlexi) -> None:
    model.embed.weight.data = model.embed.weight.data * -1.5


def _write_under_no_grad(model: TinyFlexi) -> None:
    with torch.no_grad():
        model.embed.weight.mul_(-2.0)


def _write_under_inference_mode(model: TinyFlexi) -> None:
    with torch.inference_mode():
        model.embed.weight.add_(1.0)


def _write_to_detached(model: TinyFlexi) -> None:
    model.embed.weight.detach().sub_(0.5)


def _load_state_dict(model: TinyFlexi) -> None:
    model.load_state_dict(TinyFlexi(7).state_dict())


def _load_state_dict_assign(model: TinyFlexi) -> None:
    model.load_state_dict(TinyFlexi(8).state_dict(), assign=True)


def _reset_parameters(model: TinyFlexi) -> None:
    model.embed.reset_parameters(torch.Generator().manual_seed(9))


def _to_float64(model: TinyFlexi) -> None:
    model.double()


def _to_float64_and_back_with_a_write_between(model: TinyFlexi) -> None:
    model.double()
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    model.float()


def _to_bfloat16(model: TinyFlexi) -> None:
    model.to(torch.bfloat16)


WRITES = [_write_through_data, _copy_through_data, _assign_data, _write_under_no_grad,
          _write_under_inference_mode, _write_to_detached, _load_state_dict,
          _load_state_dict_assign, _reset_parameters, _to_float64,
          _to_float64_and_back_with_a_write_between, _to_bfloat16]


@pytest.mark.parametrize('write', WRITES, ids=lambda write: write.__name__.strip('_'))
def test_scores_after_a_write_to_the_weights_match_a_fresh_model(write):
    model = scored_learner()
    before = model.embed.weight.detach().clone()
    write(model)
    after = model.embed.weight.detach()
    assert after.dtype != before.dtype or not torch.equal(after, before)
    assert_scores_like_a_fresh_model(model, image_batch(400))


def _scale_in_another_process(weight: Tensor) -> None:
    weight.data.mul_(3.0)


def test_a_write_by_another_process_into_shared_memory_is_seen():
    """A learner in shared memory (a Hogwild trainer, say) is written where no counter sees."""
    model = TinyFlexi(0)
    model.share_memory()
    flexi_scores(model, image_batch(100))
    before = model.embed.weight.detach().clone()
    writer = multiprocessing.get_context('fork').Process(target=_scale_in_another_process,
                                                         args=(model.embed.weight,))
    writer.start()
    writer.join(timeout=60)
    assert writer.exitcode == 0
    torch.testing.assert_close(model.embed.weight.detach(), before * 3.0)
    assert_scores_like_a_fresh_model(model, image_batch(400))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_moves_between_devices_are_seen():
    model = scored_learner().cuda()
    with torch.no_grad():
        on_device = model.embed.weight_at(SCORED_PATCH)
        assert on_device.device.type == 'cuda'
        model.embed.weight.add_(1.0)
        model.cpu()
        torch.testing.assert_close(model.embed.weight_at(SCORED_PATCH),
                                   pi_resize(model.embed.weight.detach(), SCORED_PATCH))


def test_unchanged_weights_reuse_the_cache_and_any_change_rebuilds_it():
    model = scored_learner()
    with torch.no_grad():
        cached = model.embed.weight_at(SCORED_PATCH)
        assert model.embed.weight_at(SCORED_PATCH) is cached
        model.embed.weight.data[0, 0, 0, 0] += 1e-3
        rebuilt = model.embed.weight_at(SCORED_PATCH)
    assert rebuilt is not cached
    torch.testing.assert_close(rebuilt, pi_resize(model.embed.weight.detach(), SCORED_PATCH),
                               rtol=0, atol=0)


def test_a_cache_built_in_inference_mode_serves_a_frozen_module_under_autograd():
    model = TinyFlexi(0).requires_grad_(False)
    images = torch.rand(2, 1, IMAGE_SIDE, IMAGE_SIDE)
    with torch.inference_mode():
        model(images, patch_size=SCORED_PATCH)
    inputs = images.clone().requires_grad_(True)
    model(inputs, patch_size=SCORED_PATCH).sum().backward()
    assert inputs.grad.abs().sum() > 0


def test_position_embeddings_resize_to_the_new_grid():
    positions = torch.arange(49 * 2, dtype=torch.float32).reshape(49, 2)
    resized = resize_position_embeddings(positions, (7, 7), (4, 4))
    assert resized.shape == (16, 2)
    assert resize_position_embeddings(positions, (7, 7), (7, 7)) is positions
    with pytest.raises(DataError, match='7x7'):
        resize_position_embeddings(positions[:40], (7, 7), (4, 4))


def test_flexi_forward_scores_the_learner_at_a_larger_patch_size_and_the_reference_plainly():
    generator = torch.Generator().manual_seed(7)
    learner, reference = TinyFlexi(0), TinyFlexi(1)
    batch = {'image': torch.randint(0, 256, (10, 8, 8), generator=generator, dtype=torch.uint8),
             'label': torch.randint(0, N_LABELS, (10,), generator=generator)}
    forward = FlexiForward(input_key='image', patch_size=4, preprocess=as_float, learner=learner)
    scorer = ClassificationScorer(learner, reference, target_key='label', forward=forward)
    scores = scorer(batch, torch.arange(10), get_criterion('learnability')).scores
    images = as_float(batch['image'])
    with torch.no_grad():
        expected = (F.cross_entropy(learner(images, patch_size=4), batch['label'],
                                    reduction='none')
                    - F.cross_entropy(reference(images), batch['label'], reduction='none'))
    torch.testing.assert_close(scores, expected)
    with pytest.raises(SettingError, match='patch_size=... or input_transform'):
        FlexiForward(input_key='image')
    with pytest.raises(SettingTypeError, match='learner must be the nn.Module'):
        FlexiForward(patch_size=4, learner=lambda x: x)


# Mixed resolution


@pytest.mark.parametrize('n,fraction,low', [(8, 0.5, 4), (10, 0.3, 3), (7, 0.5, 3), (5, 0.0, 0),
                                            (5, 1.0, 5)])
def test_low_resolution_rows_count_and_spread(n, fraction, low):
    mask = low_resolution_rows(n, fraction)
    assert mask.dtype == torch.bool and int(mask.sum()) == low
    if fraction == 0.5:
        assert mask[1::2].all()


def test_split_adds_one_row_aligned_column_and_keeps_everything_else():
    batch = {'image': torch.arange(6 * 16, dtype=torch.float32).reshape(6, 4, 4),
             'label': torch.arange(6), 'sample_id': torch.arange(10, 16)}
    split = split_mixed_resolution(batch, key='image', factor=2)
    assert set(split) == {'image', 'label', 'sample_id', factor_column('image')}
    assert split['image'] is batch['image'] and factor_column('image') not in batch
    assert split[factor_column('image')].tolist() == [1, 2, 1, 2, 1, 2]
    vit = MixedResolution(key='image', low_fraction=0.5, patch_sizes=(2, 4))(batch)
    assert vit[patch_size_column('image')].tolist() == [2, 4, 2, 4, 2, 4]
    groups = resolution_groups(split, key='image')
    assert [g.rows.tolist() for g in groups] == [[0, 2, 4], [1, 3, 5]]
    assert groups[0].inputs.shape == (3, 4, 4) and groups[1].inputs.shape == (3, 2, 2)


def test_split_refuses_bad_settings_and_batches():
    batch = {'image': torch.zeros(4, 1, 4, 4), 'label': torch.zeros(4)}
    with pytest.raises(SettingError, match='exactly one of factor'):
        MixedResolution(factor=2, patch_sizes=(2, 4))
    with pytest.raises(SettingError, match='exactly one of factor'):
        MixedResolution()
    with pytest.raises(SettingError, match='low_fraction'):
        MixedResolution(factor=2, low_fraction=1.5)
    with pytest.raises(SettingTypeError, match='low_fraction'):
        MixedResolution(factor=2, low_fraction='half')
    with pytest.raises(SettingError, match='a pair'):
        MixedResolution(patch_sizes=(2, 4, 8))
    with pytest.raises(SettingTypeError, match='dict batches'):
        split_mixed_resolution([batch['image'], batch['label']], factor=2)
    with pytest.raises(MissingColumnError, match='columns are'):
        split_mixed_resolution(batch, key='pixels', factor=2)
    with pytest.raises(DataError, match='Tensor of images'):
        split_mixed_resolution({'image': torch.zeros(4)}, factor=2)
    with pytest.raises(DataError, match='applied twice'):
        split_mixed_resolution(split_mixed_resolution(batch, factor=2), factor=2)
    both = {**split_mixed_resolution(batch, factor=2), patch_size_column('image'): torch.ones(4)}
    with pytest.raises(DataError, match='one way only'):
        resolution_groups(both)


def test_mixed_forward_returns_outputs_in_row_order_with_gradients():
    generator = torch.Generator().manual_seed(8)
    model = TinyFlexi(2)
    images = torch.randn(7, 1, 8, 8, generator=generator)
    batch = MixedResolution(patch_sizes=(2, 4), low_fraction=0.4)(
        {'image': images, 'label': torch.randint(0, N_LABELS, (7,), generator=generator)})
    outputs = mixed_resolution_forward(model, batch)
    sizes = batch[patch_size_column('image')].tolist()
    for row, size in enumerate(sizes):
        torch.testing.assert_close(outputs[row], model(images[row:row + 1], patch_size=size)[0])
    loss = mixed_resolution_loss(model, batch, F.cross_entropy)
    loss.backward()
    assert model.embed.weight.grad.abs().sum() > 0
    # A batch without a resolution column (evaluation) runs whole at the default resolution.
    torch.testing.assert_close(mixed_resolution_forward(model, {'image': images}), model(images))


def test_mixed_resolution_through_a_selective_loader_and_a_plain_loop(tmp_path, make_streaming):
    directory = write_image_mds(tmp_path / 'images', 120)
    dataset = make_streaming(directory, batch_size=40)
    learner = PooledConv(0)
    forward = FlexiForward(input_key='image', preprocess=as_float,
                           input_transform=LowResolution(2), learner=learner)
    scorer = ClassificationScorer(learner, None, target_key='label', forward=forward)
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.75, scorer=scorer,
                             criterion='hard_learner', method='topk', seed=3,
                             batch_transform=MixedResolution(key='image', factor=2))
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    before = [p.detach().clone() for p in learner.parameters()]
    shapes: list[tuple[int, ...]] = []

    def probe(x: Tensor) -> Tensor:
        shapes.append(tuple(x.shape))
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)

    steps = 0
    for batch in loader:
        assert batch[factor_column('image')].tolist() == [1.0, 2.0] * 5
        # Row i of the output belongs to sample i: area downsampling keeps each image's mean.
        means = mixed_resolution_forward(probe, batch, preprocess=as_float).squeeze(1)
        expected = torch.tensor([as_float(torch.from_numpy(image_of(int(i)))[None]).mean()
                                 for i in batch['sample_id']])
        torch.testing.assert_close(means, expected)
        assert batch['label'].tolist() == [int(i) % N_LABELS for i in batch['sample_id']]
        loss = mixed_resolution_loss(learner, batch, F.cross_entropy, preprocess=as_float)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        steps += 1
    assert steps == len(loader) == 3
    assert set(shapes) == {(5, 1, 8, 8), (5, 1, 4, 4)}
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.parameters(), strict=True))

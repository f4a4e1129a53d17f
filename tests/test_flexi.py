"""Flexi-JEST: downsampling, the FlexiViT PI-resize, cheap scoring, mixed-resolution training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streaming import MDSWriter
from torch import Tensor, nn

from jest_stream import ClassificationScorer, SelectiveLoader, get_criterion
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


@pytest.mark.parametrize('factor', [0.5, 0, True, '2'])
def test_bad_factor_is_refused(factor):
    with pytest.raises(ValueError, match='factor'):
        LowResolution(factor)


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'area', 'bilinear'"):
        downsample(torch.zeros(1, 4, 4), 2, mode='nearest')


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
    with pytest.raises(ValueError, match=r'patch_size=5 does not divide the image size 28x28; '
                                         r'patch sizes that do: \[1, 2, 4, 7, 14, 28\]'):
        embed(images, patch_size=5)
    with pytest.raises(ValueError, match=r'\[B, 1, H, W\]'):
        embed(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match='patch_size'):
        embed(images, patch_size=0)


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


def test_position_embeddings_resize_to_the_new_grid():
    positions = torch.arange(49 * 2, dtype=torch.float32).reshape(49, 2)
    resized = resize_position_embeddings(positions, (7, 7), (4, 4))
    assert resized.shape == (16, 2)
    assert resize_position_embeddings(positions, (7, 7), (7, 7)) is positions
    with pytest.raises(ValueError, match='7x7'):
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
    with pytest.raises(ValueError, match='patch_size=... or input_transform'):
        FlexiForward(input_key='image')


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
    with pytest.raises(ValueError, match='exactly one of factor'):
        MixedResolution(factor=2, patch_sizes=(2, 4))
    with pytest.raises(ValueError, match='exactly one of factor'):
        MixedResolution()
    with pytest.raises(ValueError, match='low_fraction'):
        MixedResolution(factor=2, low_fraction=1.5)
    with pytest.raises(TypeError, match='dict batches'):
        split_mixed_resolution([batch['image'], batch['label']], factor=2)
    with pytest.raises(KeyError, match='columns are'):
        split_mixed_resolution(batch, key='pixels', factor=2)
    with pytest.raises(ValueError, match='applied twice'):
        split_mixed_resolution(split_mixed_resolution(batch, factor=2), factor=2)


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

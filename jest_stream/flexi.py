"""Flexi-JEST: score at low resolution, train at mixed resolution.

Three pieces, each usable on its own:

- **Cheaper inputs for CNNs.** :func:`downsample` and :class:`LowResolution` (a scorer's
  ``input_transform``) shrink images by a factor; a factor of 2 cuts the FLOPs of a
  convolutional network about 4x.
- **Patch sizes that change at run time, for ViTs (FlexiViT).** :class:`FlexiPatchEmbed`
  stores its weights at one base patch size and resizes them on the fly with the
  pseudo-inverse resize (:func:`pi_resize`); :func:`resize_position_embeddings` resizes the
  position embeddings to the new grid. A larger patch size means fewer tokens: patch 7
  instead of 4 on 28x28 images is 16 tokens instead of 49. :class:`FlexiForward` is a
  scorer ``forward`` that runs the learner at such a cheaper setting.
- **Mixed-resolution training.** :class:`MixedResolution` (the loader's
  ``batch_transform``) marks a fraction of each selected sub-batch for low resolution with
  one extra per-row column; :func:`mixed_resolution_forward` runs each group at its
  resolution and returns the outputs in row order, so targets, losses and metrics need
  no change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jest_stream.batch import Batch, get_column

__all__ = [
    'DOWNSAMPLE_MODES',
    'FlexiForward',
    'FlexiPatchEmbed',
    'LowResolution',
    'MixedResolution',
    'ResolutionGroup',
    'downsample',
    'factor_column',
    'low_resolution_rows',
    'mixed_resolution_forward',
    'mixed_resolution_loss',
    'patch_size_column',
    'pi_resize',
    'pi_resize_matrix',
    'resize_matrix',
    'resize_position_embeddings',
    'resolution_groups',
    'split_mixed_resolution',
]

DOWNSAMPLE_MODES = ('area', 'bilinear')


# Resolution changes (CNN inputs)


def _check_factor(factor: Any, setting: str = 'factor') -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f'{setting}={factor!r} must be a number >= 1 (2 halves the height and '
                         f'the width)')
    return factor


def _check_mode(mode: str) -> str:
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f'mode={mode!r} is not known; choose one of {list(DOWNSAMPLE_MODES)}')
    return mode


def _check_patch_size(patch_size: Any, setting: str = 'patch_size') -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f'{setting}={patch_size!r} must be a positive int')
    return patch_size


def downsample(images: Tensor, factor: float, *, mode: str = 'area') -> Tensor:
    """Images at ``1 / factor`` of their height and width.

    Args:
        images (Tensor[..., H, W]): The last two dimensions are the image; any leading ones
            (``[B, C, H, W]``, ``[B, H, W]``) are kept. Floating or integer pixels.
        factor (float): At least 1; 1 returns ``images`` itself. The output is
            ``round(H / factor) x round(W / factor)`` (at least 1 x 1).
        mode (str): ``area`` (default): each output pixel is the mean of the input pixels it
            covers (block means when the factor divides the size, adaptive average pooling
            otherwise). ``bilinear``: bilinear resampling with antialiasing (a triangle
            filter as wide as the factor), smoother at non-integer factors.

    Returns:
        Tensor[..., round(H / factor), round(W / factor)]: Same dtype and device. Integer
        pixels are resampled in float32, rounded and clamped back to their dtype, so a
        pipeline that expects ``uint8`` still gets ``uint8``.
    """
    factor = _check_factor(factor)
    _check_mode(mode)
    if images.dim() < 2:
        raise ValueError(f'images of shape {list(images.shape)} have no [H, W] dimensions')
    if factor == 1:
        return images
    *lead, height, width = images.shape
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    flat = images.reshape(-1, 1, height, width)
    integer = not images.is_floating_point()
    if integer:
        flat = flat.float()
    if mode == 'area':
        out = F.interpolate(flat, size=size, mode='area')
    else:
        out = F.interpolate(flat, size=size, mode='bilinear', align_corners=False, antialias=True)
    if integer:
        info = torch.iinfo(images.dtype)
        out = out.round_().clamp_(info.min, info.max).to(images.dtype)
    return out.reshape(*lead, *size)


class LowResolution:
    """A scorer's ``input_transform`` that downsamples the learner's inputs.

    Example::

        scorer = ClassificationScorer(cnn, reference, input_key='image', target_key='label',
                                      input_transform=LowResolution(2))

    The model must accept the smaller images (a CNN that ends in global pooling does).

    Args:
        factor (float): Downsampling factor, at least 1 (see :func:`downsample`).
        mode (str): ``area`` or ``bilinear`` (see :func:`downsample`).
    """

    def __init__(self, factor: float, *, mode: str = 'area') -> None:
        self.factor = _check_factor(factor)
        self.mode = _check_mode(mode)

    def __call__(self, images: Tensor) -> Tensor:
        """Downsample ``images`` (Tensor[..., H, W]) by :attr:`factor`."""
        return downsample(images, self.factor, mode=self.mode)

    def __repr__(self) -> str:
        return f'LowResolution({self.factor!r}, mode={self.mode!r})'


class FlexiForward:
    """A scorer ``forward(model, batch)`` that runs the learner at a cheaper setting.

    Scorers run their ``forward`` for the learner and for a live reference model alike.
    With ``learner`` given, only that module gets the cheap setting and every other model
    (the reference) is called plainly on the (preprocessed) inputs; without it, every model
    gets it. A reference whose losses come from a stored column never goes through the
    forward.

    Example, a FlexiViT learner scored at patch size 7 instead of 4::

        forward = FlexiForward(input_key='image', patch_size=7, learner=vit)
        scorer = ClassificationScorer(vit, reference, target_key='label', forward=forward)

    Args:
        input_key (str | int): Column (dict batches) or field (tuple batches) of the inputs.
        patch_size (int, optional): Calls the model as ``model(inputs, patch_size=...)``.
        input_transform (Callable, optional): ``Tensor -> Tensor`` applied to the inputs of
            the cheap call after ``preprocess`` (e.g. :class:`LowResolution`).
        preprocess (Callable, optional): ``Tensor -> Tensor`` applied to the inputs of every
            model first (e.g. uint8 pixels to normalised floats).
        learner (nn.Module, optional): The only module to run cheaply. In a separate scorer
            process build the forward together with the scorer, so that both refer to the
            same learner object.
    """

    def __init__(self, *, input_key: str | int = 'image', patch_size: int | None = None,
                 input_transform: Callable[[Tensor], Tensor] | None = None,
                 preprocess: Callable[[Tensor], Tensor] | None = None,
                 learner: nn.Module | None = None) -> None:
        if patch_size is None and input_transform is None:
            raise ValueError('FlexiForward needs patch_size=... or input_transform=...: without '
                             'either it is the plain forward, so pass forward=None instead')
        if patch_size is not None:
            _check_patch_size(patch_size)
        if learner is not None and not isinstance(learner, nn.Module):
            raise TypeError(f'learner must be the nn.Module being trained, got '
                            f'{type(learner).__name__}')
        self.input_key = input_key
        self.patch_size = patch_size
        self.input_transform = input_transform
        self.preprocess = preprocess
        self.learner = learner

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        """The model's outputs on the batch's inputs, cheaply for the learner.

        Args:
            model (nn.Module): The model the scorer runs (learner or live reference).
            batch (Batch): A chunk of the super-batch.

        Returns:
            Any: What the model returns, e.g. logits ``Tensor[n, classes]``.
        """
        inputs = get_column(batch, self.input_key, setting='input_key')
        if self.preprocess is not None:
            inputs = self.preprocess(inputs)
        if self.learner is not None and model is not self.learner:
            return model(inputs)
        if self.input_transform is not None:
            inputs = self.input_transform(inputs)
        if self.patch_size is not None:
            return model(inputs, patch_size=self.patch_size)
        return model(inputs)


# FlexiViT: the pseudo-inverse resize of patch-embedding weights


def resize_matrix(old: int, new: int, *, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> Tensor:
    """The matrix of the bilinear resize of an ``old x old`` patch to ``new x new``.

    ``resize(x).flatten() == resize_matrix(old, new) @ x.flatten()`` for every patch ``x``,
    where ``resize`` is ``F.interpolate(mode='bilinear', align_corners=False)`` (with
    antialiasing when shrinking). Built by resizing each basis patch.

    Args:
        old (int): Side of the input patch.
        new (int): Side of the output patch.
        dtype (torch.dtype): Precision (float64 by default: the pseudo-inverse needs it).
        device (torch.device | str, optional): Where to build it.

    Returns:
        Tensor[new * new, old * old]: ``B``, row-major flattening of both patches.
    """
    _check_patch_size(old, 'old')
    _check_patch_size(new, 'new')
    if new == old:
        return torch.eye(old * old, dtype=dtype, device=device)
    basis = torch.eye(old * old, dtype=dtype, device=device).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(new, new), mode='bilinear', align_corners=False,
                            antialias=new < old)
    return resized.reshape(old * old, new * new).T.contiguous()


def pi_resize_matrix(old: int, new: int, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> Tensor:
    """The pseudo-inverse resize of patch-embedding weights: ``pinv(B^T)``.

    A patch ``x`` embeds as ``<x, w>``. Resizing the patch to ``B x`` while resizing the
    weights to ``w' = pinv(B^T) w`` keeps the embedding: ``<B x, w'> = <x, B^T w'> = <x, w>``
    whenever ``B^T pinv(B^T) = I``, that is whenever ``B`` has full column rank, which holds
    for ``new >= old``. For ``new < old`` no ``w'`` can do that for every ``x``; ``w'`` is
    then the least-squares (minimum-norm) solution of ``B^T w' = w``.

    Computed in float64 with an SVD (``torch.linalg.pinv``).

    Args:
        old (int): Base patch size ``p``.
        new (int): Target patch size ``p'``.
        dtype (torch.dtype): Precision of the result.
        device (torch.device | str, optional): Where to build it.

    Returns:
        Tensor[new * new, old * old]: ``P`` with ``w'.flatten() = P @ w.flatten()``.
    """
    matrix = resize_matrix(old, new, dtype=torch.float64, device=device)
    return torch.linalg.pinv(matrix.T).to(dtype)


def pi_resize(weight: Tensor, new: int) -> Tensor:
    """Patch-embedding weights resized from ``p x p`` to ``new x new`` by the PI-resize.

    Differentiable: gradients flow back to ``weight``.

    Args:
        weight (Tensor[..., p, p]): Weights (e.g. ``[dim, channels, p, p]``).
        new (int): Target patch size.

    Returns:
        Tensor[..., new, new]: Same dtype and device.
    """
    _check_patch_size(new, 'new')
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f'weight of shape {list(weight.shape)} does not end in a square patch')
    old = weight.shape[-1]
    if new == old:
        return weight
    matrix = pi_resize_matrix(old, new, dtype=weight.dtype, device=weight.device)
    return _apply_resize(weight, matrix, new)


def _apply_resize(weight: Tensor, matrix: Tensor, new: int) -> Tensor:
    old = weight.shape[-1]
    flat = weight.reshape(-1, old * old) @ matrix.T
    return flat.reshape(*weight.shape[:-2], new, new)


def resize_position_embeddings(embeddings: Tensor, grid: tuple[int, int],
                               new_grid: tuple[int, int]) -> Tensor:
    """Position embeddings of a ``grid`` of patches resized to ``new_grid`` (bilinear).

    FlexiViT resizes the learned position embeddings with the patch size; shrinking uses
    antialiasing. Differentiable.

    Args:
        embeddings (Tensor[gh * gw, dim]): One embedding per patch, row-major.
        grid (tuple[int, int]): ``(gh, gw)``, the grid they were learned on.
        new_grid (tuple[int, int]): ``(gh', gw')``.

    Returns:
        Tensor[gh' * gw', dim]: The resized embeddings, row-major.
    """
    gh, gw = grid
    if embeddings.dim() != 2 or embeddings.shape[0] != gh * gw:
        raise ValueError(f'embeddings of shape {list(embeddings.shape)} do not match the grid '
                         f'{gh}x{gw}: expected [{gh * gw}, dim]')
    if tuple(new_grid) == (gh, gw):
        return embeddings
    image = embeddings.T.reshape(1, -1, gh, gw)
    shrink = new_grid[0] < gh or new_grid[1] < gw
    resized = F.interpolate(image, size=tuple(new_grid), mode='bilinear', align_corners=False,
                            antialias=shrink)
    return resized.reshape(embeddings.shape[1], -1).T


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class FlexiPatchEmbed(nn.Module):
    """A patch embedding whose patch size can change at run time (FlexiViT).

    The weights live at ``base_patch_size``; at another patch size they are resized by the
    pseudo-inverse resize (:func:`pi_resize`), so an image upsampled patch by patch embeds
    exactly as the original (for patch sizes at least the base one). The resize is a small
    matrix product. With gradients enabled it is recomputed on every call, so gradients
    reach the base weights; without them (scoring) the resized weights are cached per
    patch size and rebuilt whenever the base weights change (an optimizer step, a
    ``load_state_dict``, a move to another device).

    Args:
        in_channels (int): Channels of the images.
        dim (int): Embedding width.
        base_patch_size (int): Patch size the weights are stored at.
        patch_size (int, optional): Patch size used when ``forward`` is given none;
            ``base_patch_size`` by default.
        bias (bool): Learn a bias (it does not depend on the patch size).

    Attributes:
        weight (Parameter[dim, in_channels, base_patch_size, base_patch_size]): Base weights.
        bias (Parameter[dim] | None): Bias.
    """

    def __init__(self, *, in_channels: int, dim: int, base_patch_size: int,
                 patch_size: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = _check_patch_size(in_channels, 'in_channels')
        self.dim = _check_patch_size(dim, 'dim')
        self.base_patch_size = _check_patch_size(base_patch_size, 'base_patch_size')
        self.patch_size = _check_patch_size(
            base_patch_size if patch_size is None else patch_size, 'patch_size')
        self.weight = nn.Parameter(torch.empty(dim, in_channels, base_patch_size,
                                               base_patch_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self._matrices: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._weights: dict[int, tuple[tuple[Any, ...], Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The initialisation of ``nn.Conv2d``, from ``generator`` when one is given."""
        fan_in = self.in_channels * self.base_patch_size ** 2
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            # Conv2d's kaiming_uniform_(a=sqrt(5)) is uniform in +-1/sqrt(fan_in).
            self.weight.uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound, generator=generator)
        self._weights.clear()

    def extra_repr(self) -> str:
        return (f'in_channels={self.in_channels}, dim={self.dim}, '
                f'base_patch_size={self.base_patch_size}, patch_size={self.patch_size}, '
                f'bias={self.bias is not None}')

    def grid_size(self, height: int, width: int, patch_size: int | None = None
                  ) -> tuple[int, int]:
        """The ``(gh, gw)`` grid of patches of an image, or an error if they do not tile it.

        Args:
            height (int): Image height ``H``.
            width (int): Image width ``W``.
            patch_size (int, optional): Patch size; :attr:`patch_size` by default.

        Returns:
            tuple[int, int]: ``(H // patch_size, W // patch_size)``.
        """
        p = self.patch_size if patch_size is None else _check_patch_size(patch_size)
        if height % p or width % p:
            fits = _divisors(math.gcd(height, width))
            raise ValueError(f'patch_size={p} does not divide the image size {height}x{width}; '
                             f'patch sizes that do: {fits}')
        return height // p, width // p

    def _matrix(self, new: int) -> Tensor:
        key = (new, self.weight.device, self.weight.dtype)
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = pi_resize_matrix(self.base_patch_size, new, dtype=self.weight.dtype,
                                      device=self.weight.device)
            self._matrices[key] = matrix
        return matrix

    def weight_at(self, patch_size: int) -> Tensor:
        """The weights at ``patch_size``, PI-resized from the base weights.

        Args:
            patch_size (int): Target patch size.

        Returns:
            Tensor[dim, in_channels, patch_size, patch_size]: The weights.
        """
        patch_size = _check_patch_size(patch_size)
        if patch_size == self.base_patch_size:
            return self.weight
        weight = self.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return _apply_resize(weight, self._matrix(patch_size), patch_size)
        # In-place updates bump _version; moves and re-assignments change the storage.
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype)
        cached = self._weights.get(patch_size)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            resized = _apply_resize(weight, self._matrix(patch_size), patch_size)
        self._weights[patch_size] = (key, resized)
        return resized

    def forward(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """Embed the non-overlapping patches of ``images``.

        Args:
            images (Tensor[B, in_channels, H, W]): Images; ``patch_size`` must divide H and W.
            patch_size (int, optional): Patch size; :attr:`patch_size` by default.

        Returns:
            Tensor[B, gh * gw, dim]: One token per patch, row-major over the
            ``(H / patch_size, W / patch_size)`` grid.
        """
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f'images must be [B, {self.in_channels}, H, W], got '
                             f'{list(images.shape)}')
        p = self.patch_size if patch_size is None else _check_patch_size(patch_size)
        self.grid_size(images.shape[2], images.shape[3], p)
        tokens = F.conv2d(images, self.weight_at(p), self.bias, stride=p)
        return tokens.flatten(2).transpose(1, 2)


# Mixed-resolution training


def factor_column(key: str) -> str:
    """Name of the per-row downsampling-factor column that mixed resolution adds for ``key``."""
    return f'{key}_factor'


def patch_size_column(key: str) -> str:
    """Name of the per-row patch-size column that mixed resolution adds for ``key``."""
    return f'{key}_patch_size'


def low_resolution_rows(n: int, low_fraction: float, *,
                        device: torch.device | str | None = None) -> Tensor:
    """Which of ``n`` rows train at low resolution: ``floor(n * low_fraction)``, spread evenly.

    The sub-batch arrives in selection order (top-k selection sorts it by score), so
    spreading the low-resolution rows evenly over it, rather than taking the first or the
    last ones, gives both resolutions a like share of high and low scores. Row 0 is always
    at full resolution, and an odd row left over goes to full resolution. The choice is
    deterministic, so a resumed run repeats it.

    Args:
        n (int): Rows in the sub-batch.
        low_fraction (float): Fraction at low resolution, in ``[0, 1]``; 0.5 alternates.
        device (torch.device | str, optional): Device of the mask.

    Returns:
        BoolTensor[n]: True for the low-resolution rows.
    """
    if isinstance(low_fraction, bool) or not isinstance(low_fraction, (int, float)) \
            or not 0.0 <= low_fraction <= 1.0:
        raise ValueError(f'low_fraction={low_fraction!r} must be in [0, 1] (0.5 trains half '
                         f'of each sub-batch at low resolution)')
    # The small offset keeps products such as 100 * 0.29 = 28.999... from losing a row.
    marks = torch.floor(torch.arange(n + 1, dtype=torch.float64) * low_fraction + 1e-9)
    return (marks[1:] > marks[:-1]).to(device)


def _check_mixed_settings(factor: float | None, patch_sizes: tuple[int, int] | None
                          ) -> tuple[float | None, tuple[int, int] | None]:
    if (factor is None) == (patch_sizes is None):
        raise ValueError('give exactly one of factor=... (CNNs: low-resolution rows are '
                         'downsampled by it) or patch_sizes=(full, low) (FlexiViT: '
                         'low-resolution rows run at the larger patch size)')
    if factor is not None:
        _check_factor(factor)
        return factor, None
    if not isinstance(patch_sizes, (tuple, list)) or len(patch_sizes) != 2:
        raise ValueError(f'patch_sizes={patch_sizes!r} must be a pair (full, low), e.g. (4, 7)')
    full, low = (_check_patch_size(p, 'patch_sizes') for p in patch_sizes)
    return None, (full, low)


def split_mixed_resolution(batch: Batch, *, key: str = 'image', low_fraction: float = 0.5,
                           factor: float | None = None,
                           patch_sizes: tuple[int, int] | None = None) -> dict[str, Any]:
    """Split a sub-batch between full and low resolution by adding one per-row column.

    Nothing is resized here: the batch keeps every column, every row and its order, and gets
    one more column, so that every tensor still has the batch on its first dimension
    (frameworks count samples and cut micro-batches from that). The column says how each
    row is to run; :func:`mixed_resolution_forward` runs it so:

    - with ``factor``: column :func:`factor_column` ``(key)``, float32, 1.0 for full
      resolution and ``factor`` for rows to downsample;
    - with ``patch_sizes=(full, low)``: column :func:`patch_size_column` ``(key)``, int64,
      the patch size of each row.

    The low-resolution rows are chosen by :func:`low_resolution_rows`.

    Args:
        batch (dict): A dict batch of ``b`` rows with an image column ``key``.
        key (str): Column of the images.
        low_fraction (float): Fraction of rows at low resolution, in ``[0, 1]`` (the paper
            uses 0.5).
        factor (float, optional): Downsampling factor of the low-resolution rows.
        patch_sizes (tuple[int, int], optional): ``(full, low)`` patch sizes.

    Returns:
        dict: A new dict with the columns of ``batch`` and the resolution column.
    """
    factor, patch_sizes = _check_mixed_settings(factor, patch_sizes)
    if not isinstance(batch, Mapping):
        raise TypeError(f'mixed resolution needs dict batches (MDS datasets give dicts), got '
                        f'{type(batch).__name__}; collate the samples into a dict of columns')
    images = get_column(batch, key, setting='key')
    if not isinstance(images, Tensor) or images.dim() < 3:
        raise ValueError(f'column {key!r} must be a Tensor of images [b, ..., H, W], got '
                         f'{getattr(images, "shape", type(images).__name__)}')
    column = factor_column(key) if factor is not None else patch_size_column(key)
    if column in batch:
        raise ValueError(f'the batch already has a column {column!r}: mixed resolution was '
                         f'applied twice, or the dataset uses that name')
    low = low_resolution_rows(images.shape[0], low_fraction, device=images.device)
    if factor is not None:
        values = torch.where(low, float(factor), 1.0).to(torch.float32)
    else:
        values = torch.where(low, patch_sizes[1], patch_sizes[0]).to(torch.int64)
    return {**batch, column: values}


class MixedResolution:
    """The loader's ``batch_transform`` for mixed-resolution training.

    Example (a CNN, half of each sub-batch at half the resolution)::

        loader = SelectiveLoader(dataset, ..., batch_transform=MixedResolution(
            key='image', factor=2))
        for batch in loader:
            loss = mixed_resolution_loss(model, batch, F.cross_entropy, key='image',
                                         target_key='label')

    For a FlexiViT give ``patch_sizes=(4, 7)`` instead of ``factor``.

    Args:
        key (str): Column of the images.
        low_fraction (float): Fraction of each sub-batch at low resolution, in ``[0, 1]``.
        factor (float, optional): Downsampling factor of the low-resolution rows (CNNs).
        patch_sizes (tuple[int, int], optional): ``(full, low)`` patch sizes (FlexiViT).
    """

    def __init__(self, *, key: str = 'image', low_fraction: float = 0.5,
                 factor: float | None = None,
                 patch_sizes: tuple[int, int] | None = None) -> None:
        self.factor, self.patch_sizes = _check_mixed_settings(factor, patch_sizes)
        low_resolution_rows(0, low_fraction)
        self.key = key
        self.low_fraction = low_fraction

    def __call__(self, batch: Batch) -> dict[str, Any]:
        """The batch with its resolution column (see :func:`split_mixed_resolution`)."""
        return split_mixed_resolution(batch, key=self.key, low_fraction=self.low_fraction,
                                      factor=self.factor, patch_sizes=self.patch_sizes)

    def __repr__(self) -> str:
        setting = (f'factor={self.factor!r}' if self.factor is not None
                   else f'patch_sizes={self.patch_sizes!r}')
        return f'MixedResolution(key={self.key!r}, low_fraction={self.low_fraction!r}, {setting})'


@dataclass
class ResolutionGroup:
    """Rows of a batch that run at one resolution.

    Attributes:
        rows (LongTensor[n]): Their positions in the batch.
        inputs (Tensor[n, ...]): Their model inputs (preprocessed, downsampled if asked).
        patch_size (int | None): The patch size to call the model with, or None for its
            default.
    """

    rows: Tensor
    inputs: Tensor
    patch_size: int | None


def resolution_groups(batch: Batch, *, key: str = 'image',
                      preprocess: Callable[[Tensor], Tensor] | None = None,
                      mode: str = 'area') -> list[ResolutionGroup]:
    """The rows of a batch grouped by resolution, with their inputs ready for the model.

    A batch without a resolution column (an evaluation batch, say) is one group at the
    model's default resolution.

    Args:
        batch (dict): A batch, usually from :func:`split_mixed_resolution`.
        key (str): Column of the images.
        preprocess (Callable, optional): ``Tensor -> Tensor`` applied to the images before
            downsampling (e.g. uint8 pixels to normalised floats).
        mode (str): Downsampling mode (see :func:`downsample`).

    Returns:
        list[ResolutionGroup]: One group per resolution, full resolution first.
    """
    _check_mode(mode)
    images = get_column(batch, key, setting='key')
    if preprocess is not None:
        images = preprocess(images)
    n = images.shape[0]
    factors = batch.get(factor_column(key)) if isinstance(batch, Mapping) else None
    patches = batch.get(patch_size_column(key)) if isinstance(batch, Mapping) else None
    if factors is not None and patches is not None:
        raise ValueError(f'the batch has both {factor_column(key)!r} and '
                         f'{patch_size_column(key)!r}; mix resolutions one way only')
    column = factors if factors is not None else patches
    if column is None:
        return [ResolutionGroup(torch.arange(n, device=images.device), images, None)]
    if column.shape != (n,):
        raise ValueError(f'the resolution column has shape {list(column.shape)} but {key!r} '
                         f'has {n} rows')
    groups = []
    for value in torch.unique(column).tolist():
        rows = torch.nonzero(column == value).flatten().to(images.device)
        inputs = images.index_select(0, rows)
        if factors is not None:
            groups.append(ResolutionGroup(rows, downsample(inputs, value, mode=mode), None))
        else:
            groups.append(ResolutionGroup(rows, inputs, int(value)))
    if patches is not None:
        # Smaller patches mean more tokens: full resolution first.
        groups.sort(key=lambda group: group.patch_size)
    return groups


def mixed_resolution_forward(model: Callable[..., Tensor], batch: Batch, *, key: str = 'image',
                             preprocess: Callable[[Tensor], Tensor] | None = None,
                             mode: str = 'area') -> Tensor:
    """The model's outputs for every row, each row run at its resolution, in row order.

    Each group of :func:`resolution_groups` is one call: ``model(inputs)``, or
    ``model(inputs, patch_size=p)`` for patch-size groups. The outputs go back to the
    rows' original order, so the batch's targets, losses and metrics apply unchanged.
    Gradients flow through every call.

    Args:
        model (Callable): ``model(inputs[, patch_size=p]) -> Tensor[n, ...]``.
        batch (dict): A batch, usually from :func:`split_mixed_resolution`.
        key (str): Column of the images.
        preprocess (Callable, optional): Applied to the images before downsampling.
        mode (str): Downsampling mode (see :func:`downsample`).

    Returns:
        Tensor[b, ...]: Outputs, row ``i`` for row ``i`` of the batch.
    """
    groups = resolution_groups(batch, key=key, preprocess=preprocess, mode=mode)
    outputs = []
    for group in groups:
        if group.patch_size is None:
            outputs.append(model(group.inputs))
        else:
            outputs.append(model(group.inputs, patch_size=group.patch_size))
    if len(groups) == 1:
        return outputs[0]
    order = torch.cat([group.rows for group in groups])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return torch.cat(outputs).index_select(0, inverse.to(outputs[0].device))


def mixed_resolution_loss(model: Callable[..., Tensor], batch: Batch,
                          loss_fn: Callable[[Tensor, Tensor], Tensor], *, key: str = 'image',
                          target_key: str = 'label',
                          preprocess: Callable[[Tensor], Tensor] | None = None,
                          mode: str = 'area') -> Tensor:
    """``loss_fn(mixed_resolution_forward(model, batch), batch[target_key])``.

    Args:
        model (Callable): ``model(inputs[, patch_size=p]) -> Tensor[n, ...]``.
        batch (dict): A batch, usually from :func:`split_mixed_resolution`.
        loss_fn (Callable): ``loss_fn(outputs, targets)``, e.g. ``F.cross_entropy``.
        key (str): Column of the images.
        target_key (str): Column of the targets.
        preprocess (Callable, optional): Applied to the images before downsampling.
        mode (str): Downsampling mode (see :func:`downsample`).

    Returns:
        Tensor: What ``loss_fn`` returns (a scalar for a mean loss).
    """
    outputs = mixed_resolution_forward(model, batch, key=key, preprocess=preprocess, mode=mode)
    targets = get_column(batch, target_key, setting='target_key')
    return loss_fn(outputs, targets.to(outputs.device))

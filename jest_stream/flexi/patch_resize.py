"""Patch sizes that change at run time, for ViTs (FlexiViT).

:class:`FlexiPatchEmbed` stores its weights at one base patch size and resizes them on the
fly with the pseudo-inverse resize (:func:`pi_resize`); :func:`resize_position_embeddings`
resizes the position embeddings to the new grid. A larger patch size means fewer tokens:
patch 7 instead of 4 on 28x28 images is 16 tokens instead of 49.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jest_stream.errors import DataError, SettingError, SettingTypeError

__all__ = [
    'FlexiPatchEmbed',
    'check_patch_size',
    'pi_resize',
    'pi_resize_matrix',
    'resize_matrix',
    'resize_position_embeddings',
]


def check_patch_size(patch_size: Any, setting: str = 'patch_size') -> int:
    """``patch_size`` if it is a positive int.

    Raises:
        SettingTypeError: ``patch_size`` is not an int.
        SettingError: ``patch_size`` is below 1.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise SettingTypeError(f'{setting}={patch_size!r} must be a positive int, not a '
                               f'{type(patch_size).__name__}')
    if patch_size < 1:
        raise SettingError(f'{setting}={patch_size!r} must be a positive int')
    return patch_size


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

    Raises:
        SettingTypeError: ``old`` or ``new`` is not an int.
        SettingError: ``old`` or ``new`` is below 1.
    """
    check_patch_size(old, 'old')
    check_patch_size(new, 'new')
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

    Raises:
        SettingTypeError: ``old`` or ``new`` is not an int.
        SettingError: ``old`` or ``new`` is below 1.
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

    Raises:
        SettingTypeError: ``new`` is not an int.
        SettingError: ``new`` is below 1.
        DataError: ``weight`` does not end in a square patch.
    """
    check_patch_size(new, 'new')
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2]:
        raise DataError(f'weight of shape {list(weight.shape)} does not end in a square '
                        f'patch; pass weights shaped [..., p, p]')
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

    Raises:
        DataError: ``embeddings`` is not ``[gh * gw, dim]``.
    """
    gh, gw = grid
    if embeddings.dim() != 2 or embeddings.shape[0] != gh * gw:
        raise DataError(f'embeddings of shape {list(embeddings.shape)} do not match the grid '
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


def _normal_tensor(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """``fn(*args)`` without gradients and outside inference mode.

    A cached tensor made in inference mode could not be used later by a frozen module whose
    inputs require gradients (inference tensors cannot be saved for backward).
    """
    with torch.inference_mode(False), torch.no_grad():
        return fn(*args)


@dataclass
class _ResizedWeights:
    """Weights PI-resized from one copy of the base weights.

    Attributes:
        source (Tensor[dim, in_channels, p, p]): A private copy of the base weights; every
            entry of ``by_patch_size`` was computed from it, and from nothing else.
        by_patch_size (dict[int, Tensor]): Resized weights, by patch size.
    """

    source: Tensor
    by_patch_size: dict[int, Tensor] = field(default_factory=dict)

    def holds(self, weight: Tensor) -> bool:
        """Whether ``weight`` is (still) the weights ``source`` copies."""
        source = self.source
        return (source.device == weight.device and source.dtype == weight.dtype
                and source.shape == weight.shape and torch.equal(source, weight))


class FlexiPatchEmbed(nn.Module):
    """A patch embedding whose patch size can change at run time (FlexiViT).

    The weights live at ``base_patch_size``; at another patch size they are resized by the
    pseudo-inverse resize (:func:`pi_resize`), so an image upsampled patch by patch embeds
    exactly as the original (for patch sizes at least the base one). The resize is a small
    matrix product. With gradients enabled it is recomputed on every call, so gradients
    reach the base weights. Without them (scoring) the resized weights are cached per patch
    size, together with a copy of the base weights they were computed from; every call
    compares the base weights with that copy (``torch.equal``) and rebuilds the cache when
    they differ. The comparison sees every kind of update: optimizer steps (for-loop,
    foreach or fused), writes through ``.data``, in-place writes under ``torch.no_grad()``,
    ``load_state_dict``, moves to another device or dtype, and writes by another process
    into shared memory. (Version counters do not: fused optimizers and ``.data`` writes
    leave them unchanged.)

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

    Raises:
        SettingTypeError: A size is not an int.
        SettingError: A size is below 1.
    """

    def __init__(self, *, in_channels: int, dim: int, base_patch_size: int,
                 patch_size: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = check_patch_size(in_channels, 'in_channels')
        self.dim = check_patch_size(dim, 'dim')
        self.base_patch_size = check_patch_size(base_patch_size, 'base_patch_size')
        self.patch_size = check_patch_size(
            base_patch_size if patch_size is None else patch_size, 'patch_size')
        self.weight = nn.Parameter(torch.empty(dim, in_channels, base_patch_size,
                                               base_patch_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self._matrices: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._resized: _ResizedWeights | None = None
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

        Raises:
            SettingError: ``patch_size`` does not divide ``H`` and ``W``; the message lists
                the patch sizes that do.
        """
        p = self.patch_size if patch_size is None else check_patch_size(patch_size)
        if height % p or width % p:
            fits = _divisors(math.gcd(height, width))
            raise SettingError(f'patch_size={p} does not divide the image size '
                               f'{height}x{width}; patch sizes that do: {fits}')
        return height // p, width // p

    def _matrix(self, new: int) -> Tensor:
        # Depends only on the two sizes, the device and the dtype, never on weight values.
        key = (new, self.weight.device, self.weight.dtype)
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = pi_resize_matrix(self.base_patch_size, new, dtype=self.weight.dtype,
                                      device=self.weight.device)
            self._matrices[key] = matrix
        return matrix

    def _cached_weight_at(self, patch_size: int) -> Tensor:
        # Comparing the base weights with the copy the cache came from reads
        # dim * in_channels * p^2 values twice. Measured on one CPU thread: 1.4 us for the
        # benchmarks' small ViT (64x1x4x4, patch 4 -> 7) and 0.45 ms for a ViT-B/16 patch
        # embedding (768x3x16x16, patch 16 -> 32): 0.13% and 0.37% of a one-image forward
        # at the cheaper patch size (0.02% at batch 64, 0.08% at batch 8), where resizing
        # on every call would cost about 1% and 7% (1.2 GFLOP for ViT-B). Unlike version
        # counters, the comparison sees updates that bypass autograd (fused optimizers,
        # ``.data``, another process writing shared memory). On a GPU it also waits for
        # the work queued before it (the answer is a Python bool).
        weight = self.weight.detach()
        cache = self._resized
        if cache is None or not cache.holds(weight):
            # Kept local from here on: a thread that rebuilds the cache meanwhile never
            # mixes its entries with these.
            cache = self._resized = _ResizedWeights(_normal_tensor(weight.clone))
        resized = cache.by_patch_size.get(patch_size)
        if resized is None:
            resized = _normal_tensor(_apply_resize, cache.source, self._matrix(patch_size),
                                     patch_size)
            cache.by_patch_size[patch_size] = resized
        return resized

    def weight_at(self, patch_size: int) -> Tensor:
        """The weights at ``patch_size``, PI-resized from the base weights.

        Args:
            patch_size (int): Target patch size.

        Returns:
            Tensor[dim, in_channels, patch_size, patch_size]: The weights. With gradients
            enabled (and the weights trainable), a fresh resize that gradients flow through;
            otherwise the cached resize of the current base weights.

        Raises:
            SettingTypeError: ``patch_size`` is not an int.
            SettingError: ``patch_size`` is below 1.
        """
        patch_size = check_patch_size(patch_size)
        if patch_size == self.base_patch_size:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _apply_resize(self.weight, self._matrix(patch_size), patch_size)
        return self._cached_weight_at(patch_size)

    def forward(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """Embed the non-overlapping patches of ``images``.

        Args:
            images (Tensor[B, in_channels, H, W]): Images; ``patch_size`` must divide H and W.
            patch_size (int, optional): Patch size; :attr:`patch_size` by default.

        Returns:
            Tensor[B, gh * gw, dim]: One token per patch, row-major over the
            ``(H / patch_size, W / patch_size)`` grid.

        Raises:
            DataError: ``images`` is not ``[B, in_channels, H, W]``.
            SettingError: ``patch_size`` is below 1 or does not divide ``H`` and ``W``.
            SettingTypeError: ``patch_size`` is not an int.
        """
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise DataError(f'images must be [B, {self.in_channels}, H, W], got '
                            f'{list(images.shape)}')
        p = self.patch_size if patch_size is None else check_patch_size(patch_size)
        self.grid_size(images.shape[2], images.shape[3], p)
        tokens = F.conv2d(images, self.weight_at(p), self.bias, stride=p)
        return tokens.flatten(2).transpose(1, 2)

"""Cheaper inputs for scoring: downsampled images, and a forward at a cheaper setting.

:func:`downsample` and :class:`LowResolution` (a scorer's ``input_transform``) shrink images
by a factor; a factor of 2 cuts the FLOPs of a convolutional network about 4x.
:class:`FlexiForward` is a scorer ``forward`` that runs the learner at such a cheaper
setting: downsampled inputs, or a larger patch size for a ViT built on
:class:`~jest_stream.flexi.patch_resize.FlexiPatchEmbed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jest_stream.batch import Batch, get_column
from jest_stream.errors import DataError, SettingError, SettingTypeError
from jest_stream.flexi.patch_resize import check_patch_size

__all__ = [
    'DOWNSAMPLE_MODES',
    'FlexiForward',
    'LowResolution',
    'check_factor',
    'check_mode',
    'downsample',
]

DOWNSAMPLE_MODES = ('area', 'bilinear')


def check_factor(factor: Any, setting: str = 'factor') -> float:
    """``factor`` if it is a downsampling factor (a number >= 1).

    Raises:
        SettingTypeError: ``factor`` is not an int or a float.
        SettingError: ``factor`` is below 1 (or NaN).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise SettingTypeError(f'{setting}={factor!r} must be a number >= 1 (2 halves the '
                               f'height and the width), not a {type(factor).__name__}')
    if not factor >= 1:
        raise SettingError(f'{setting}={factor!r} must be a number >= 1 (2 halves the height '
                           f'and the width)')
    return factor


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`DOWNSAMPLE_MODES`.

    Raises:
        SettingError: ``mode`` is not known; the message lists the known ones.
    """
    if mode not in DOWNSAMPLE_MODES:
        raise SettingError(f'mode={mode!r} is not known; choose one of '
                           f'{list(DOWNSAMPLE_MODES)}')
    return mode


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

    Raises:
        SettingTypeError: ``factor`` is not a number.
        SettingError: ``factor`` is below 1, or ``mode`` is not known.
        DataError: ``images`` has fewer than two dimensions.
    """
    factor = check_factor(factor)
    check_mode(mode)
    if images.dim() < 2:
        raise DataError(f'images of shape {list(images.shape)} have no [H, W] dimensions; '
                        f'pass images as [..., H, W]')
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

    Raises:
        SettingTypeError: ``factor`` is not a number.
        SettingError: ``factor`` is below 1, or ``mode`` is not known.
    """

    def __init__(self, factor: float, *, mode: str = 'area') -> None:
        self.factor = check_factor(factor)
        self.mode = check_mode(mode)

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

    Raises:
        SettingError: Neither ``patch_size`` nor ``input_transform`` is given, or
            ``patch_size`` is below 1.
        SettingTypeError: ``patch_size`` is not an int, or ``learner`` is not a module.
    """

    def __init__(self, *, input_key: str | int = 'image', patch_size: int | None = None,
                 input_transform: Callable[[Tensor], Tensor] | None = None,
                 preprocess: Callable[[Tensor], Tensor] | None = None,
                 learner: nn.Module | None = None) -> None:
        if patch_size is None and input_transform is None:
            raise SettingError('FlexiForward needs patch_size=... or input_transform=...: '
                               'without either it is the plain forward, so pass forward=None '
                               'instead')
        if patch_size is not None:
            check_patch_size(patch_size)
        if learner is not None and not isinstance(learner, nn.Module):
            raise SettingTypeError(f'learner must be the nn.Module being trained, got '
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

        Raises:
            MissingColumnError: ``input_key`` names no column of the batch.
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

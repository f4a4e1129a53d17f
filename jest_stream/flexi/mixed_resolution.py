"""Mixed-resolution training: part of each selected sub-batch trains at low resolution.

:class:`MixedResolution` (the loader's ``batch_transform``) marks a fraction of each selected
sub-batch for low resolution with one extra per-row column; :func:`mixed_resolution_forward`
runs each group at its resolution and returns the outputs in row order, so targets, losses
and metrics need no change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jest_stream.batch import Batch, get_column
from jest_stream.errors import DataError, SettingError, SettingTypeError
from jest_stream.flexi.low_resolution import check_factor, check_mode, downsample
from jest_stream.flexi.patch_resize import check_patch_size

__all__ = [
    'MixedResolution',
    'ResolutionGroup',
    'factor_column',
    'low_resolution_rows',
    'mixed_resolution_forward',
    'mixed_resolution_loss',
    'patch_size_column',
    'resolution_groups',
    'split_mixed_resolution',
]


def factor_column(key: str) -> str:
    """Name of the per-row downsampling-factor column that mixed resolution adds for ``key``."""
    return f'{key}_factor'


def patch_size_column(key: str) -> str:
    """Name of the per-row patch-size column that mixed resolution adds for ``key``."""
    return f'{key}_patch_size'


def _check_low_fraction(low_fraction: Any) -> float:
    if isinstance(low_fraction, bool) or not isinstance(low_fraction, (int, float)):
        raise SettingTypeError(f'low_fraction={low_fraction!r} must be a number in [0, 1], '
                               f'not a {type(low_fraction).__name__}')
    if not 0.0 <= low_fraction <= 1.0:
        raise SettingError(f'low_fraction={low_fraction!r} must be in [0, 1] (0.5 trains half '
                           f'of each sub-batch at low resolution)')
    return low_fraction


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

    Raises:
        SettingTypeError: ``low_fraction`` is not a number.
        SettingError: ``low_fraction`` is outside ``[0, 1]``.
    """
    _check_low_fraction(low_fraction)
    # The small offset keeps products such as 100 * 0.29 = 28.999... from losing a row.
    marks = torch.floor(torch.arange(n + 1, dtype=torch.float64) * low_fraction + 1e-9)
    return (marks[1:] > marks[:-1]).to(device)


def _check_mixed_settings(factor: float | None, patch_sizes: tuple[int, int] | None
                          ) -> tuple[float | None, tuple[int, int] | None]:
    if (factor is None) == (patch_sizes is None):
        raise SettingError('give exactly one of factor=... (CNNs: low-resolution rows are '
                           'downsampled by it) or patch_sizes=(full, low) (FlexiViT: '
                           'low-resolution rows run at the larger patch size)')
    if factor is not None:
        check_factor(factor)
        return factor, None
    if not isinstance(patch_sizes, (tuple, list)):
        raise SettingTypeError(f'patch_sizes={patch_sizes!r} must be a pair (full, low), '
                               f'e.g. (4, 7)')
    if len(patch_sizes) != 2:
        raise SettingError(f'patch_sizes={patch_sizes!r} must be a pair (full, low), e.g. (4, 7)')
    full, low = (check_patch_size(p, 'patch_sizes') for p in patch_sizes)
    return None, (full, low)


def _image_rows(batch: Batch, key: str) -> Tensor:
    if not isinstance(batch, Mapping):
        raise SettingTypeError(f'mixed resolution needs dict batches (MDS datasets give '
                               f'dicts), got {type(batch).__name__}; collate the samples into '
                               f'a dict of columns')
    images = get_column(batch, key, setting='key')
    if not isinstance(images, Tensor) or images.dim() < 3:
        raise DataError(f'column {key!r} must be a Tensor of images [b, ..., H, W], got '
                        f'{getattr(images, "shape", type(images).__name__)}')
    return images


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

    Raises:
        SettingError: Not exactly one of ``factor`` and ``patch_sizes``, or a bad value.
        SettingTypeError: A setting of the wrong type, or a batch that is not a dict.
        MissingColumnError: ``key`` names no column of the batch.
        DataError: Column ``key`` holds no images, or the resolution column is there already.
    """
    factor, patch_sizes = _check_mixed_settings(factor, patch_sizes)
    images = _image_rows(batch, key)
    column = factor_column(key) if factor is not None else patch_size_column(key)
    if column in batch:
        raise DataError(f'the batch already has a column {column!r}: mixed resolution was '
                        f'applied twice, or the dataset uses that name (rename it)')
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

    Raises:
        SettingError: Not exactly one of ``factor`` and ``patch_sizes``, or a bad value.
        SettingTypeError: A setting of the wrong type.
    """

    def __init__(self, *, key: str = 'image', low_fraction: float = 0.5,
                 factor: float | None = None,
                 patch_sizes: tuple[int, int] | None = None) -> None:
        self.factor, self.patch_sizes = _check_mixed_settings(factor, patch_sizes)
        self.low_fraction = _check_low_fraction(low_fraction)
        self.key = key

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


def _resolution_column(batch: Batch, key: str, n: int) -> tuple[Tensor | None, bool]:
    """The batch's resolution column (or None) and whether it holds factors."""
    factors = batch.get(factor_column(key)) if isinstance(batch, Mapping) else None
    patches = batch.get(patch_size_column(key)) if isinstance(batch, Mapping) else None
    if factors is not None and patches is not None:
        raise DataError(f'the batch has both {factor_column(key)!r} and '
                        f'{patch_size_column(key)!r}; mix resolutions one way only')
    column = factors if factors is not None else patches
    if column is not None and column.shape != (n,):
        raise DataError(f'the resolution column has shape {list(column.shape)} but {key!r} '
                        f'has {n} rows')
    return column, factors is not None


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

    Raises:
        SettingError: ``mode`` is not known.
        MissingColumnError: ``key`` names no column of the batch.
        DataError: Both resolution columns are there, or the column does not have one value
            per row.
    """
    check_mode(mode)
    images = get_column(batch, key, setting='key')
    if preprocess is not None:
        images = preprocess(images)
    n = images.shape[0]
    column, by_factor = _resolution_column(batch, key, n)
    if column is None:
        return [ResolutionGroup(torch.arange(n, device=images.device), images, None)]
    groups = []
    for value in torch.unique(column).tolist():
        rows = torch.nonzero(column == value).flatten().to(images.device)
        inputs = images.index_select(0, rows)
        if by_factor:
            groups.append(ResolutionGroup(rows, downsample(inputs, value, mode=mode), None))
        else:
            groups.append(ResolutionGroup(rows, inputs, int(value)))
    if not by_factor:
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

    Raises:
        SettingError, MissingColumnError, DataError: As :func:`resolution_groups`.
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

    Raises:
        SettingError, MissingColumnError, DataError: As :func:`resolution_groups`; also
            MissingColumnError when ``target_key`` names no column.
    """
    outputs = mixed_resolution_forward(model, batch, key=key, preprocess=preprocess, mode=mode)
    targets = get_column(batch, target_key, setting='target_key')
    return loss_fn(outputs, targets.to(outputs.device))

"""Batch structures: collate samples, move batches, gather sub-batches.

A batch is a dict of columns (what MDS samples give) or a tuple/list of
fields (what most map-style datasets give). Tensors have the batch on their
first dimension; non-tensor columns (strings, say) are lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    'Batch',
    'collate_samples',
    'batch_length',
    'gather',
    'move_to_device',
    'pin_batch',
    'get_column',
]

Batch = Any

# dtypes numpy can view without a copy (numpy has no bfloat16).
_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                           torch.int64, torch.float16, torch.float32, torch.float64})


def _collate_column(values: list[Any], name: str) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.stack(values)
    if isinstance(first, np.ndarray):
        # np.stack copies, so the read-only arrays MDS decodes become a writable tensor.
        return torch.from_numpy(np.stack(values))
    if isinstance(first, (bool, np.bool_)):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, (int, np.integer)):
        return torch.tensor(np.asarray(values, dtype=np.int64))
    if isinstance(first, (float, np.floating)):
        return torch.tensor(np.asarray(values), dtype=torch.float32)
    if isinstance(first, (str, bytes)) or first is None:
        return list(values)
    if isinstance(first, Mapping):
        return {key: _collate_column([v[key] for v in values], f'{name}.{key}') for key in first}
    if isinstance(first, (tuple, list)):
        return [_collate_column(list(column), f'{name}[{i}]')
                for i, column in enumerate(zip(*values, strict=True))]
    raise TypeError(f'cannot collate column {name!r} of type {type(first).__name__}')


def collate_samples(samples: list[Any]) -> Batch:
    """Collate samples into one batch, keeping their structure.

    Args:
        samples (list): Dicts of columns, or tuples/lists of fields, all alike.

    Returns:
        Batch: A dict of columns, or a list of fields, batch first.
    """
    if not samples:
        raise ValueError('collate_samples needs at least one sample')
    first = samples[0]
    if isinstance(first, Mapping):
        return {key: _collate_column([s[key] for s in samples], str(key)) for key in first}
    if isinstance(first, (tuple, list)):
        return [_collate_column(list(column), f'[{i}]')
                for i, column in enumerate(zip(*samples, strict=True))]
    return _collate_column(samples, 'sample')


def _columns(batch: Batch) -> list[Any]:
    if isinstance(batch, Mapping):
        return list(batch.values())
    if isinstance(batch, (tuple, list)):
        return list(batch)
    return [batch]


def batch_length(batch: Batch) -> int:
    """The number of examples in ``batch`` (the first dimension of its columns)."""
    for column in _columns(batch):
        if isinstance(column, Tensor):
            return int(column.shape[0])
        if isinstance(column, (Mapping, tuple, list)) and not isinstance(column, (str, bytes)):
            if isinstance(column, Mapping) or (column and isinstance(column[0], Tensor)):
                return batch_length(column)
            return len(column)
    raise ValueError('batch has no column with a batch dimension')


def gather(batch: Batch, indices: Tensor) -> Batch:
    """The sub-batch at ``indices``, in their order.

    Args:
        batch (Batch): A collated batch of ``B`` examples.
        indices (LongTensor[b]): Rows to keep.

    Returns:
        Batch: The same structure with ``b`` examples.
    """
    if isinstance(batch, Tensor):
        if batch.device.type == 'cpu' and batch.dtype in _NUMPY_DTYPES and not batch.requires_grad:
            # A copy on this thread: torch hands an index copy of more than 32k elements to
            # its intra-op pool, which stalls for milliseconds while DataLoader workers hold
            # the cores.
            return torch.from_numpy(np.take(batch.numpy(), indices.cpu().numpy(), axis=0))
        return batch.index_select(0, indices.to(batch.device))
    if isinstance(batch, Mapping):
        return {key: gather(value, indices) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        if batch and not isinstance(batch[0], (Tensor, Mapping, tuple, list)):
            rows = indices.tolist()
            return [batch[i] for i in rows]
        return type(batch)(gather(value, indices) for value in batch)
    raise TypeError(f'cannot gather from a batch of type {type(batch).__name__}')


def move_to_device(batch: Batch, device: torch.device, *, non_blocking: bool = False) -> Batch:
    """Every tensor of ``batch`` moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(v, device, non_blocking=non_blocking) for v in batch)
    return batch


def pin_batch(batch: Batch) -> Batch:
    """Every CPU tensor of ``batch`` in page-locked memory (for asynchronous copies)."""
    if isinstance(batch, Tensor):
        return batch.pin_memory() if batch.device.type == 'cpu' else batch
    if isinstance(batch, Mapping):
        return {key: pin_batch(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(pin_batch(value) for value in batch)
    return batch


def get_column(batch: Batch, key: str | int, *, setting: str) -> Any:
    """Column ``key`` of ``batch``, or an error naming ``setting`` and the columns there are."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(
                f'{setting}={key!r} names no column of the batch; its columns are '
                f'{sorted(map(str, batch))}. Set {setting} to one of them.')
        return batch[key]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        if not isinstance(key, int) or not -len(batch) <= key < len(batch):
            raise KeyError(
                f'{setting}={key!r} does not index the batch, a sequence of {len(batch)} fields; '
                f'set {setting} to a field position from 0 to {len(batch) - 1}.')
        return batch[key]
    raise KeyError(f'{setting}={key!r}: the batch is a {type(batch).__name__}, not a dict or tuple')

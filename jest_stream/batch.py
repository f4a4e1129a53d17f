"""Batch structures: collate samples, walk columns, move and gather batches, read sample ids.

A batch is any nesting of dicts (or other Mappings), lists, tuples and namedtuples whose
*columns* hold one entry per example: tensors with the batch on their first dimension, or
lists of plain values (strings, bytes, None) that the collate step could not stack. Every
function here walks a batch with one walker, :func:`map_columns`, built on torch's pytree
utilities, so gathering, device copies, pinning, stream records, the scorer process's
shared buffers and the row exchange of global selection all see the same structure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from jest_stream.errors import DataError, MissingColumnError, SettingTypeError

__all__ = [
    'Batch',
    'collate_samples',
    'map_columns',
    'flatten_columns',
    'unflatten_columns',
    'batch_length',
    'gather',
    'move_to_device',
    'pin_batch',
    'record_stream',
    'get_column',
    'read_sample_ids',
    'attached_id_key',
    'check_key',
]


Batch = Any

# dtypes numpy can view without a copy (numpy has no bfloat16).
_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                           torch.int64, torch.float16, torch.float32, torch.float64})


# Collation: torch's collate with a few column types handled the way MDS samples need.

def _collate_arrays(batch: list[np.ndarray], **_: Any) -> Tensor:
    # np.stack copies, so the read-only arrays MDS decodes become one writable tensor
    # (torch.as_tensor on each would warn about the read-only memory, then copy twice).
    return torch.from_numpy(np.stack(batch))


def _collate_floats(batch: list[float], **_: Any) -> Tensor:
    # Python floats are float32 columns: per-example losses and weights, never float64 data.
    return torch.tensor(batch, dtype=torch.float32)


def _collate_values(batch: list[Any], **_: Any) -> list[Any]:
    return list(batch)


_COLLATE_FNS = {
    **default_collate_fn_map,
    np.ndarray: _collate_arrays,
    float: _collate_floats,
    type(None): _collate_values,
    str: _collate_values,
    bytes: _collate_values,
}


def collate_samples(samples: list[Any]) -> Batch:
    """Collate samples into one batch, keeping their structure.

    ``torch.utils.data`` collation (dict and namedtuple types are kept, tuples become lists of
    fields) with a few column rules of jest_stream: numpy arrays are stacked into one
    writable tensor, Python floats become float32, and ``None``, strings and bytes become
    lists.

    Args:
        samples (list): Samples of the same structure (dicts of columns, tuples of fields...).

    Returns:
        Batch: The same structure, batch first in every column.

    Raises:
        DataError: ``samples`` is empty, or their structures differ or hold a type that
            cannot be collated.
    """
    if not samples:
        raise DataError('collate_samples needs at least one sample')
    try:
        return collate(samples, collate_fn_map=_COLLATE_FNS)
    except (TypeError, RuntimeError) as error:
        raise DataError(f'cannot collate the samples into a batch: {error}. Every sample must '
                        f'have the same columns, of tensors, arrays, numbers, strings or bytes'
                        ) from error


# The walker

def _is_value_column(node: Any) -> bool:
    """A list (or plain tuple) of plain values: one entry per example, not a nesting level."""
    if not isinstance(node, (list, tuple)) or _is_namedtuple(node):
        return False
    return not node or not isinstance(node[0], (Tensor, Mapping, list, tuple))


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), '_fields')


def _is_leaf(node: Any) -> bool:
    # Mappings that are not dicts are not pytree nodes; they are walked as dicts below.
    return _is_value_column(node) or (isinstance(node, Mapping) and not isinstance(node, dict))


def map_columns(fn: Callable[[Any], Any], batch: Batch) -> Batch:
    """``batch`` with every column replaced by ``fn(column)``, structure kept.

    Columns are tensors, lists of plain values, and any other leaf (scalars, strings); each
    is passed to ``fn`` once. Dicts, lists, tuples and namedtuples are walked with torch's
    pytree utilities; other Mappings are walked too and come back as dicts.

    Args:
        fn (Callable): ``fn(column) -> new column``.
        batch (Batch): Any batch.

    Returns:
        Batch: The same structure with the new columns.
    """
    def visit(node: Any) -> Any:
        if isinstance(node, Mapping) and not isinstance(node, dict):
            return {key: map_columns(fn, value) for key, value in node.items()}
        return fn(node)

    return pytree.tree_map(visit, batch, is_leaf=_is_leaf)


def flatten_columns(batch: Batch) -> tuple[list[Any], pytree.TreeSpec]:
    """The columns of ``batch`` in a fixed order, and the structure to rebuild it from them.

    Returns:
        tuple[list, TreeSpec]: Columns (tensors, value lists, other leaves) and the spec for
        :func:`unflatten_columns`. The spec pickles (it crosses process boundaries).
    """
    plain = map_columns(lambda column: column, batch)  # other Mappings become dicts
    return pytree.tree_flatten(plain, is_leaf=_is_value_column)


def unflatten_columns(columns: Sequence[Any], spec: pytree.TreeSpec) -> Batch:
    """The inverse of :func:`flatten_columns`."""
    return pytree.tree_unflatten(list(columns), spec)


def _columns(batch: Batch) -> list[Any]:
    return flatten_columns(batch)[0]


def batch_length(batch: Batch) -> int:
    """The number of examples in ``batch``: the first dimension of its first column.

    Raises:
        DataError: The batch has no tensor or list column.
    """
    for column in _columns(batch):
        if isinstance(column, Tensor) and column.dim() > 0:
            return int(column.shape[0])
        if _is_value_column(column):
            return len(column)
    raise DataError(f'a batch of type {type(batch).__name__} has no column with a batch '
                    f'dimension (a tensor or a list with one entry per example)')


def _take(column: Any, indices: Tensor) -> Any:
    if isinstance(column, Tensor):
        if column.device.type == 'cpu' and column.dtype in _NUMPY_DTYPES \
                and not column.requires_grad:
            # A copy on this thread: torch hands an index copy of more than 32k elements to
            # its intra-op pool, which stalls for milliseconds while DataLoader workers hold
            # the cores.
            return torch.from_numpy(np.take(column.numpy(), indices.cpu().numpy(), axis=0))
        return column.index_select(0, indices.to(column.device))
    if _is_value_column(column):
        return [column[i] for i in indices.tolist()]
    raise DataError(f'cannot gather rows from a batch column of type {type(column).__name__}; '
                    f'columns must be tensors or lists with one entry per example')


def gather(batch: Batch, indices: Tensor) -> Batch:
    """The sub-batch at ``indices``, in their order.

    Args:
        batch (Batch): A collated batch of ``B`` examples.
        indices (LongTensor[b]): Rows to keep.

    Returns:
        Batch: The same structure with ``b`` examples (value lists come back as lists).

    Raises:
        DataError: A column is neither a tensor nor a list of values.
    """
    return map_columns(lambda column: _take(column, indices), batch)


def move_to_device(batch: Batch, device: torch.device, *, non_blocking: bool = False) -> Batch:
    """Every tensor of ``batch`` moved to ``device`` (other columns unchanged)."""
    return map_columns(lambda column: column.to(device, non_blocking=non_blocking)
                       if isinstance(column, Tensor) else column, batch)


def pin_batch(batch: Batch) -> Batch:
    """Every CPU tensor of ``batch`` in page-locked memory (for asynchronous copies)."""
    return map_columns(lambda column: column.pin_memory()
                       if isinstance(column, Tensor) and column.device.type == 'cpu'
                       else column, batch)


def record_stream(batch: Batch, stream: torch.cuda.Stream) -> None:
    """Mark every CUDA tensor of ``batch`` as used on ``stream``.

    The caching allocator then does not reuse their memory before ``stream`` is done with
    them, although another stream allocated them.
    """
    for column in _columns(batch):
        if isinstance(column, Tensor) and column.is_cuda:
            column.record_stream(stream)


def get_column(batch: Batch, key: str | int, *, setting: str) -> Any:
    """Column ``key`` of ``batch``, or an error naming ``setting`` and the columns there are.

    Args:
        batch (Batch): A dict of columns, or a sequence of fields.
        key (str | int): Column name (or a namedtuple's field name), or field position.
        setting (str): The name of the setting that chose ``key`` (named in the error).

    Raises:
        MissingColumnError: ``key`` names no column (or field) of the batch.
    """
    if isinstance(batch, Mapping):
        if key not in batch:
            raise MissingColumnError(
                f'{setting}={key!r} names no column of the batch; its columns are '
                f'{sorted(map(str, batch))}. Set {setting} to one of them.')
        return batch[key]
    if _is_namedtuple(batch) and isinstance(key, str):
        if key not in batch._fields:
            raise MissingColumnError(
                f'{setting}={key!r} names no field of the batch; its fields are '
                f'{list(batch._fields)}. Set {setting} to one of them.')
        return getattr(batch, key)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        if isinstance(key, bool) or not isinstance(key, int) \
                or not -len(batch) <= key < len(batch):
            raise MissingColumnError(
                f'{setting}={key!r} does not index the batch, a sequence of {len(batch)} '
                f'fields; set {setting} to a field position from 0 to {len(batch) - 1}.')
        return batch[key]
    raise MissingColumnError(f'{setting}={key!r}: the batch is a {type(batch).__name__}, not '
                             f'a dict or a tuple of fields')


def read_sample_ids(batch: Batch, id_key: str | int | None, *, n: int | None = None,
                    setting: str = 'id_key') -> Tensor:
    """The global sample ids of ``batch`` as ``LongTensor[n]`` on the CPU.

    This is the one place sample ids are read: every path (inline, scorer process, global
    selection, Composer) calls it.

    Args:
        batch (Batch): A super-batch.
        id_key (str | int | None): Column (dict batches) or field position (tuple batches) of
            the ids; None names every row by its position in the batch (``arange(n)``).
        n (int, optional): Rows of the batch (read from it when not given).
        setting (str): The name of the setting that chose ``id_key`` (named in errors).

    Returns:
        LongTensor[n]: The ids.

    Raises:
        MissingColumnError: ``id_key`` names no column or field.
        DataError: The ids are not integers, or not one per row.
    """
    n = batch_length(batch) if n is None else n
    if id_key is None:
        return torch.arange(n)
    try:
        ids = get_column(batch, id_key, setting=setting)
    except MissingColumnError as error:
        raise MissingColumnError(
            f'{error} The ids name samples in errors and key reference caches: build the '
            f'dataset as jest_stream.SampleIdStreamingDataset (it adds the global sample id as '
            f'{"sample_id"!r}), or store an id column and name it with {setting}=...') from None
    ids = torch.as_tensor(ids)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) \
            or ids.shape != (n,):
        raise DataError(f'the sample ids in {setting}={id_key!r} must be integers, one per row '
                        f'({n}); got {ids.dtype} of shape {tuple(ids.shape)}')
    return ids.long().cpu()


def attached_id_key(batch: Batch, id_key: str | int) -> str | int:
    """Where a ``SelectiveLoader``'s super-batch carries its sample ids.

    ``id_key`` itself, except for a tuple batch when ``id_key`` names a column: a map-style
    dataset whose samples are tuples gets each sample's index appended as its last field,
    so the ids are the last field (-1).
    """
    if isinstance(id_key, str) and not isinstance(batch, Mapping) \
            and not (_is_namedtuple(batch) and id_key in batch._fields):
        return -1
    return id_key


def check_key(value: Any, setting: str, *, optional: bool = False) -> None:
    """Raise unless ``value`` can name a column (str) or a field (int).

    Raises:
        SettingTypeError: ``value`` is neither (None is allowed when ``optional``).
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SettingTypeError(f'{setting}={value!r} must name a column (str) or a field '
                               f'position (int)')

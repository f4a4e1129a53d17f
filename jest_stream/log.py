"""The selection log: every super-batch's candidates, scores and choices, as Parquet files.

A :class:`SelectionLog` is the loader's recorder of what selection did
(``SelectiveLoader(selection_log=SelectionLog(path))``; off by default). For every
super-batch handed to the trainer it writes one row per sample drawn (long format): its id,
whether it was a candidate and whether (and in which order) it was selected, its combined,
learner and reference scores, its importance weight, its stream, the columns of the batch
the user names, and the step's position and policy values. ``pandas.read_parquet(path)``
and ``pyarrow.dataset.dataset(path)`` read the folder; :func:`read_log` reads it with
damaged files named.

Files. Each rank writes its own files, ``selection-rank{R}-step{S}.parquet`` (``R`` the rank,
``S`` the first step in the file, both zero-padded), of at most ``max_rows_per_file`` rows
(and ``max_bytes_per_file`` bytes of rows in memory); a super-batch's rows are never split.
With ``max_files`` only the newest files of each rank are kept. A file is written whole to a
hidden temporary file, synced and renamed over the old one, so a reader, or a run killed at
any moment, sees either the old file or the new one.

Exactness under resumption. Rows wait in memory until the open file is rewritten: when the
loader saves its position (``state_dict``, which returns the number of steps logged), when
the file is full, on ``close``, and at the latest at interpreter exit (a log that still holds
rows is kept alive until then, also when nothing else refers to it any more; a process
killed by a signal loses them, and a forked child leaves them to its parent).
``load_state_dict`` of that state removes every row a killed run logged after the saved
position (files that begin after it are deleted, the one that straddles it is cut), so the
log of a resumed run equals the log of an uninterrupted one, row for row and file for file.

Metrics. :func:`log_metrics` sends the loader's per-batch metrics (``loader.metrics``) to a
TensorBoard ``SummaryWriter`` or anything with ``add_scalar``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from jest_stream.batch import get_column
from jest_stream.checks import check_bool, check_int
from jest_stream.errors import DataError, SettingError, SettingTypeError, StateError
from jest_stream.step import Recorder, StepResult

__all__ = [
    'SelectionLog',
    'as_recorder',
    'LogError',
    'LogFile',
    'log_files',
    'read_log',
    'as_table',
    'step_rows',
    'log_metrics',
    'MetricsWriter',
    'FIXED_COLUMNS',
    'LOG_VERSION',
    'DEFAULT_MAX_ROWS',
]

logger = logging.getLogger(__name__)

#: Version of the file layout, in every file's metadata and in ``state_dict``.
LOG_VERSION = 1
#: Rows per file by default (about 10 MB of rows in memory, 2 to 4 MB on disk).
DEFAULT_MAX_ROWS = 262_144
_METADATA_KEY = b'jest_stream.selection_log'
_FILE = re.compile(r'^selection-rank(\d+)-step(\d+)\.parquet$')
_TEMP_PREFIX = '.selection-rank'

#: Columns of every log, in order, with their Arrow type names (``None`` marks a nullable one).
FIXED_COLUMNS: dict[str, str] = {
    'step': 'int64',              # steps logged before this one (all epochs)
    'epoch': 'int32',
    'index': 'int32',             # position of the super-batch in its epoch
    'rank': 'int16',
    'row': 'int32',               # row of the sample in this rank's super-batch
    'sample_id': 'int64',
    'candidate': 'bool',          # scored and offered to selection
    'selected': 'bool',
    'order': 'int32',             # position in the selection order, -1 when not selected
    'score': 'float32',           # combined score (null: not a candidate, or uniform)
    'learner': 'float32',         # learner's loss, when the scorer gives it
    'reference': 'float32',       # reference's loss, when the scorer gives it
    'weight': 'float32',          # importance weight of a selected row (weights=True)
    'n_candidates': 'int32',      # candidates selection chose from (all ranks' when global)
    'pressure': 'float32',        # the policy as applied (null for a short super-batch)
    'mix': 'float32',
    'filter_ratio_now': 'float32',
}
#: Bytes of a value of each of them, as max_bytes_per_file counts it (a bool: 1).
_FIXED_WIDTHS = {name: max(np.dtype(kind).itemsize, 1) for name, kind in FIXED_COLUMNS.items()}
_NULLABLE = ('score', 'learner', 'reference', 'weight', 'pressure', 'mix', 'filter_ratio_now')
_STEP_INTS = ('step', 'epoch', 'index', 'rank', 'n_candidates')
_STEP_FLOATS = ('pressure', 'mix', 'filter_ratio_now')
_STREAM = 'stream'


class LogError(DataError):
    """A selection log file that cannot be used: damaged, truncated, not a selection log, or
    holding other columns than this log writes. The message names the file."""


@dataclass(frozen=True)
class LogFile:
    """One file of a selection log: its rank, the first step it holds, its path."""

    rank: int
    first_step: int
    path: Path


def log_files(path: str | os.PathLike[str], rank: int | None = None) -> list[LogFile]:
    """The files of the selection log in ``path``, by rank then first step.

    Args:
        path (str | PathLike): The log's folder.
        rank (int, optional): Only this rank's files.

    Returns:
        list[LogFile]: Empty when the folder does not exist.
    """
    folder = Path(path)
    if not folder.is_dir():
        return []
    files = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match and (rank is None or int(match[1]) == rank):
            files.append(LogFile(int(match[1]), int(match[2]), entry))
    return sorted(files, key=lambda f: (f.rank, f.first_step))


def _file_name(rank: int, first_step: int) -> str:
    return f'selection-rank{rank:03d}-step{first_step:012d}.parquet'


def as_table(log: Any) -> Any:
    """A selection log as a ``pyarrow.Table``: a table as it is, a pandas DataFrame converted.

    Raises:
        SettingTypeError: ``log`` is neither.
    """
    import pyarrow as pa

    if isinstance(log, pa.Table):
        return log
    if type(log).__module__.startswith('pandas') and hasattr(log, 'columns'):
        return pa.Table.from_pandas(log, preserve_index=False)
    raise SettingTypeError(f'a selection log is a pyarrow.Table (read_log) or a pandas '
                           f'DataFrame (pandas.read_parquet), not a {type(log).__name__}')


def _read_file(path: Path, columns: Sequence[str] | None = None) -> Any:
    """One log file as a ``pyarrow.Table``.

    Raises:
        LogError: The file is damaged (named), or not a selection log.
        SettingError: A column of ``columns`` is not in the file (its columns listed).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:
            names = file.schema_arrow.names
            missing = [] if columns is None else [c for c in columns if c not in names]
            table = None if missing else file.read(
                columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as error:
        raise LogError(
            f'{path}: the selection log file cannot be read ({type(error).__name__}: {error}); '
            f'it is damaged or truncated (a copy cut short, a full disk). Delete it to read the '
            f'rest of the log (its rows are lost), or restore it from a copy') from None
    if missing:
        raise SettingError(f'columns={list(columns)!r}: {missing} are not columns of the '
                           f'selection log ({path.name} has {names}); name columns it has')
    _log_metadata(path, table.schema.metadata)
    return table


def _log_metadata(path: Path, metadata: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """The selection log's entry of a file's schema metadata: ``version`` and ``run``.

    Raises:
        LogError: The file is not a log, or one of another version.
    """
    metadata = metadata or {}
    if _METADATA_KEY not in metadata:
        raise LogError(f'{path}: a Parquet file, but not one a SelectionLog wrote (its schema '
                       f'has no {_METADATA_KEY.decode()!r} metadata); move it out of the log\'s '
                       f'folder')
    try:
        entry = json.loads(metadata[_METADATA_KEY])
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        entry = error
    if not isinstance(entry, dict):
        raise LogError(f'{path}: its {_METADATA_KEY.decode()!r} metadata is not the JSON object '
                       f'a SelectionLog writes ({entry}); the file is damaged or another '
                       f'program\'s: move it out of the log\'s folder')
    version = entry.get('version')
    if version != LOG_VERSION:
        raise LogError(f'{path}: selection log version {version!r}, but this jest_stream reads '
                       f'version {LOG_VERSION}')
    return entry


def _file_run(path: Path) -> str | None:
    """The run that wrote a log file; None when the file does not say (a log written before
    runs were recorded) or cannot be read (left to the reader that needs its rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return _log_metadata(path, pq.read_schema(path).metadata).get('run')
    except (pa.ArrowException, OSError, LogError):
        return None


def read_log(path: str | os.PathLike[str], *, columns: Sequence[str] | None = None,
             ranks: Iterable[int] | None = None, progress: bool = False) -> Any:
    """Every row of a selection log, as one ``pyarrow.Table`` (``.to_pandas()`` for pandas).

    Rows come by rank, then step, then row of the super-batch. Files of different ranks may
    log a user column with different types (an int column that one rank saw as floats):
    they are unified where Arrow can.

    Args:
        path (str | PathLike): The log's folder.
        columns (Sequence[str], optional): Only these columns (reading less is faster);
            each must be a column of the log.
        ranks (Iterable[int], optional): Only these ranks' files.
        progress (bool): A progress bar over the files (tqdm).

    Returns:
        pyarrow.Table: The rows.

    Raises:
        LogError: The folder holds no log, or a file is damaged (named).
        SettingError: A column of ``columns`` is not in the log (the message lists its
            columns).
        SettingTypeError: ``columns`` is a str, not a list of them.
    """
    import pyarrow as pa

    if isinstance(columns, str):
        raise SettingTypeError(f'columns={columns!r} must be a list of column names, e.g. '
                               f'[{columns!r}]')
    files = log_files(path)
    if ranks is not None:
        wanted = set(ranks)
        files = [f for f in files if f.rank in wanted]
    if not files:
        raise LogError(f'{path}: no selection log files (selection-rank*-step*.parquet) there; '
                       f'give the folder a SelectionLog wrote')
    iterator: Iterable[LogFile] = files
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc='reading the log', unit='file')
    tables = [_read_file(f.path, columns) for f in iterator]
    try:
        return pa.concat_tables(tables, promote_options='permissive')
    except pa.ArrowException as error:
        raise LogError(f'{path}: the log files do not share their columns ({error}); each '
                       f'folder must hold one log') from None


# One step's rows


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _column_values(batch: Any, name: str, key: str | int, n: int) -> np.ndarray:
    """Column ``key`` of the super-batch as one scalar per row, normalised to a log type."""
    values = _numpy(get_column(batch, key, setting=f'SelectionLog(columns={{{name!r}: ...}})'))
    if values.ndim != 1 or len(values) != n:
        raise DataError(f'SelectionLog logs one value per sample, but the column {key!r} (logged '
                        f'as {name!r}) has shape {tuple(values.shape)} in a super-batch of {n} '
                        f'rows; log a column with one scalar per sample')
    kind = values.dtype.kind
    if kind == 'b':
        return values.astype(bool, copy=False)
    if kind in 'iu':
        return values.astype(np.int64, copy=False)
    if kind == 'f':
        return values.astype(np.float64, copy=False)
    if kind in 'USO':
        return values.astype(str).astype(object)
    raise DataError(f'SelectionLog cannot log the column {key!r} (as {name!r}) of dtype '
                    f'{values.dtype}; log a column of numbers, bools or strings')


def _positions(result: StepResult, ids: np.ndarray) -> np.ndarray:
    """Each row's position among the candidates selection chose from (-1: not a candidate).

    Local scope keeps the rows' order; global scope puts every rank's candidates in order of
    sample id, so this rank's rows are found there by id.
    """
    selection = result.selection
    n = len(ids)
    if selection.short:
        return np.arange(n)
    rows = np.arange(n) if selection.candidates is None else _numpy(selection.candidates)
    positions = np.full(n, -1, dtype=np.int64)
    candidate_ids = None if selection.candidate_ids is None else _numpy(selection.candidate_ids)
    if candidate_ids is None or np.array_equal(candidate_ids, ids[rows]):
        positions[rows] = np.arange(len(rows))
        return positions
    order = np.argsort(candidate_ids, kind='stable')
    found = np.searchsorted(candidate_ids[order], ids[rows])
    found = np.minimum(found, len(order) - 1)
    if not np.array_equal(candidate_ids[order[found]], ids[rows]):
        raise DataError(f'step {result.epoch}/{result.index}: the selection\'s candidate ids do '
                        f'not include every candidate row of this rank\'s super-batch')
    positions[rows] = order[found]
    return positions


def _per_candidate(values: Tensor | None, positions: np.ndarray) -> np.ndarray:
    """``values[position]`` for candidate rows, NaN elsewhere (float32)."""
    out = np.full(len(positions), np.nan, dtype=np.float32)
    if values is not None:
        is_candidate = positions >= 0
        out[is_candidate] = _numpy(values).astype(np.float32)[positions[is_candidate]]
    return out


def step_rows(result: StepResult, *, columns: Mapping[str, str | int] | None = None,
              stream_offsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The per-row columns of one super-batch's log rows (one row per sample drawn).

    Args:
        result (StepResult): The step, as the loader records it (``batch`` still valid).
        columns (Mapping[str, str | int], optional): Log name -> column (dict batches) or field
            position (tuple batches) of the super-batch to log.
        stream_offsets (np.ndarray, optional): First sample id of every stream (int64[S]).

    Returns:
        dict[str, np.ndarray]: ``row``, ``sample_id``, ``candidate``, ``selected``, ``order``,
        ``score``, ``learner``, ``reference``, ``weight`` (NaN where null), ``stream`` (with
        ``stream_offsets``) and the user's columns, each of length ``n`` (this rank's rows).

    Raises:
        DataError: A logged column is not one scalar per row.
        MissingColumnError: A logged column is not in the batch.
    """
    selection = result.selection
    ids = (np.arange(result.drawn, dtype=np.int64) if result.sample_ids is None
           else _numpy(result.sample_ids).astype(np.int64, copy=False))
    n = len(ids)
    positions = _positions(result, ids)
    n_positions = max(int(positions.max(initial=-1)) + 1, selection.n_candidates)
    order_of = np.full(n_positions, -1, dtype=np.int32)
    selected = _numpy(selection.selected).astype(np.int64, copy=False)
    order_of[selected] = np.arange(len(selected), dtype=np.int32)
    order = np.where(positions >= 0, order_of[np.maximum(positions, 0)], -1).astype(np.int32)
    weights = None
    if selection.weights is not None:
        weights = torch.full((n_positions,), float('nan'))
        weights[torch.from_numpy(selected)] = selection.weights.detach().float().cpu()
    rows = {
        'row': np.arange(n, dtype=np.int32), 'sample_id': ids, 'candidate': positions >= 0,
        'selected': order >= 0, 'order': order,
        'score': _per_candidate(selection.scores, positions),
        'learner': _per_candidate(selection.parts.get('learner'), positions),
        'reference': _per_candidate(selection.parts.get('reference'), positions),
        'weight': _per_candidate(weights, positions),
    }
    if stream_offsets is not None:
        rows[_STREAM] = (np.searchsorted(stream_offsets, ids, side='right') - 1).astype(np.int16)
    for name, key in (columns or {}).items():
        rows[name] = _column_values(result.batch, name, key, n)
    return rows


@dataclass
class _Chunk:
    """One step's rows waiting to be written."""

    n: int
    scalars: dict[str, float | int | None]
    rows: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return _rows_nbytes(self.n, self.rows)


def _arrow_column(name: str, values: np.ndarray) -> Any:
    import pyarrow as pa

    if name in FIXED_COLUMNS:
        kind = pa.type_for_alias(FIXED_COLUMNS[name])
        if name in _NULLABLE:
            mask = np.isnan(values)
            return pa.array(values, type=kind, mask=mask if mask.any() else None)
        return pa.array(values.astype(kind.to_pandas_dtype(), copy=False), type=kind)
    if values.dtype == object:
        return pa.array(values, type=pa.string())
    return pa.array(values)


def _chunks_table(chunks: list[_Chunk], names: list[str]) -> Any:
    """The rows of ``chunks`` as a table with the columns ``names``, per-step values repeated."""
    import pyarrow as pa

    counts = np.array([c.n for c in chunks])
    arrays = []
    for name in names:
        if name in _STEP_INTS:
            values = np.repeat(np.array([c.scalars[name] for c in chunks], dtype=np.int64),
                               counts)
        elif name in _STEP_FLOATS:
            values = np.repeat(np.array([np.nan if c.scalars[name] is None else c.scalars[name]
                                         for c in chunks], dtype=np.float32), counts)
        else:
            values = np.concatenate([c.rows[name] for c in chunks])
        arrays.append(_arrow_column(name, values))
    return pa.table(arrays, names=names)


def _column_nbytes(values: Any) -> int:
    """The bytes of one column's values: a numpy array (strings as objects) or an Arrow
    array; see :func:`_rows_nbytes`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, np.ndarray):
        if values.dtype == object:
            return sum(4 + len(value.encode()) for value in values)
        return len(values) * values.dtype.itemsize  # bools: 1 byte
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return 4 * len(values) + int(pc.sum(pc.binary_length(values)).as_py() or 0)
    return len(values) * max(values.type.bit_width // 8, 1)


def _rows_nbytes(n: int, columns: Mapping[str, Any]) -> int:
    """The bytes of ``n`` rows of the log, as ``max_bytes_per_file`` counts them.

    Every value takes its type's width (a bool 1 byte: 68 bytes a row for the log's own
    columns), a string 4 bytes of offset plus its UTF-8 bytes. A run counts each step's
    rows as they come, a resume the rows it reads back, with this one function: the count is
    additive, so both start new files at the same steps.

    Args:
        n (int): Rows.
        columns (Mapping[str, Any]): Their columns, each [n]: a step's numpy arrays
            (:func:`step_rows`; strings as objects) or the Arrow columns of a table. A log
            column missing there (a per-step value, held once) counts by its type.

    Returns:
        int: Bytes.
    """
    widths = sum(_FIXED_WIDTHS[name] for name in FIXED_COLUMNS if name not in columns)
    return n * widths + sum(_column_nbytes(values) for values in columns.values())


# The log

# Logs whose rows wait in memory, with the process that logged them. Strong references: a
# log dropped without close() (a loader in a reference cycle, freed by the garbage collector)
# stays here until its rows are written, at the latest at interpreter exit.
_UNWRITTEN: dict[SelectionLog, int] = {}


@atexit.register
def _flush_unwritten_logs() -> None:
    # A run that ends without closing its loader still writes every row it logged (a forked
    # child that inherited the log leaves it to its parent).
    for log, pid in list(_UNWRITTEN.items()):
        if pid != os.getpid():
            continue
        try:
            log.flush()
        except Exception:  # noqa: BLE001 - the interpreter is exiting: report, don't raise
            logger.exception('could not write the selection log in %s at exit', log.path)


def as_recorder(selection_log: Recorder | str | os.PathLike[str] | None, *,
                streams: Any = None) -> Recorder | None:
    """The ``selection_log`` setting of the loader and of the Composer algorithm.

    Args:
        selection_log: None (no log); a folder, which becomes ``SelectionLog(folder)``
            logging the stream of every sample when ``streams`` is known; or a recorder
            (a :class:`SelectionLog` with columns of your choice, or your own
            :class:`~jest_stream.step.Recorder`), used as given.
        streams (StreamingDataset, optional): The dataset read, when it has streams.

    Raises:
        SettingTypeError: Anything else (the message names the accepted kinds).
    """
    if selection_log is None:
        return None
    if isinstance(selection_log, (str, os.PathLike)):
        offsets = getattr(streams, 'sample_offset_per_stream', None)
        return SelectionLog(selection_log, streams=offsets)
    if not all(callable(getattr(selection_log, name, None))
               for name in ('record', 'state_dict', 'load_state_dict', 'close')):
        raise SettingTypeError(f'selection_log={selection_log!r} must be a folder (str or '
                               f'PathLike), a jest_stream.SelectionLog, or a recorder with '
                               f'record, state_dict, load_state_dict and close')
    return selection_log


def _check_columns(columns: Any, streams: bool) -> dict[str, str | int]:
    if columns is None:
        return {}
    if isinstance(columns, (list, tuple)):
        columns = {name: name for name in columns}
    if not isinstance(columns, Mapping):
        raise SettingTypeError(f'columns={columns!r} must map log names to columns of the batch, '
                               f'e.g. {{"label": "y", "noisy": "noisy"}}, or list column names')
    taken = set(FIXED_COLUMNS) | ({_STREAM} if streams else set())
    for name, key in columns.items():
        if not isinstance(name, str) or not name or name in taken:
            raise SettingError(f'columns: {name!r} cannot name a logged column: it must be a '
                               f'non-empty str other than {sorted(taken)}; rename it')
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise SettingTypeError(f'columns[{name!r}]={key!r} must name a column (str) or a '
                                   f'field position (int) of the batch')
    return dict(columns)


def _stream_offsets(streams: Any) -> np.ndarray | None:
    if streams is None:
        return None
    offsets = getattr(streams, 'sample_offset_per_stream', streams)
    try:
        array = np.asarray(offsets, dtype=np.int64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1 or len(array) == 0 or array[0] != 0 \
            or np.any(np.diff(array) < 0):
        raise SettingError(f'streams={streams!r} must be a StreamingDataset (its streams are '
                           f'logged) or the first sample id of every stream, from 0, ascending')
    return array


class SelectionLog:
    """Writes what selection did, one row per sample drawn, to Parquet files in a folder.

    Give it to the loader: ``SelectiveLoader(..., selection_log=SelectionLog('runs/log'))``.
    The loader calls :meth:`record` for every super-batch it hands over, :meth:`state_dict`
    when it saves its position (which writes every row up to it), :meth:`load_state_dict`
    when it resumes (which removes the rows a killed run logged after it) and :meth:`close`.
    The columns are listed in ``docs/selection-log.md`` and :data:`FIXED_COLUMNS`.

    Args:
        path (str | PathLike): The log's folder (created). Each rank writes its own files
            there; a folder holding files of this rank from another run is refused unless
            ``overwrite`` (or the loader resumes that run).
        columns (Mapping[str, str | int] | Sequence[str], optional): Columns of the batch to
            log, by the name to log them under: ``{'label': 'y', 'noisy': 'noisy'}`` (a field
            position for tuple batches: ``{'label': 1}``); a list logs columns under their own
            names. Each must hold one number, bool or string per sample.
        streams (StreamingDataset | Sequence[int], optional): Log the stream each sample
            came from (``stream``, int16): the dataset, or the first sample id of every stream.
        max_rows_per_file (int): Rows per file; a new file starts at the first super-batch
            that would go past it (a super-batch is never split).
        max_bytes_per_file (int, optional): Also start a new file when the rows of the open
            one would take more than this many bytes in memory: each value its type's width
            (68 bytes a row for the log's own columns), each string 4 bytes plus its UTF-8
            bytes. A resumed run counts the rows it reads back the same way, so it starts the
            same files. On disk a file takes 3 to 5 times less.
        max_files (int, optional): Keep only this many files of each rank; the oldest are
            deleted (their rows are gone for good, also for a resume before them).
        overwrite (bool): Delete this rank's files of an earlier run in ``path`` first.
        rank (int, optional): The rank in file names; by default ``torch.distributed``'s,
            read at the first step.
        compression (str): Parquet codec (``zstd``, ``snappy``, ``gzip``, ``none``).
        sync (bool): ``fsync`` files and the folder when written, so a saved position survives
            a lost machine, not only a killed process.

    Raises:
        SettingError: A setting out of range, or a column name the log uses itself.
        SettingTypeError: A setting of the wrong type.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 columns: Mapping[str, str | int] | Sequence[str] | None = None,
                 streams: Any = None, max_rows_per_file: int = DEFAULT_MAX_ROWS,
                 max_bytes_per_file: int | None = None, max_files: int | None = None,
                 overwrite: bool = False, rank: int | None = None, compression: str = 'zstd',
                 sync: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise SettingTypeError(f'path={path!r} must be a folder (str or PathLike)')
        self.path = Path(path)
        self.stream_offsets = _stream_offsets(streams)
        self.columns = _check_columns(columns, self.stream_offsets is not None)
        self.max_rows_per_file = check_int(max_rows_per_file, 'max_rows_per_file', low=1)
        self.max_bytes_per_file = None if max_bytes_per_file is None \
            else check_int(max_bytes_per_file, 'max_bytes_per_file', low=1)
        self.max_files = None if max_files is None else check_int(max_files, 'max_files', low=1)
        self.overwrite = check_bool(overwrite, 'overwrite')
        self._rank = None if rank is None else check_int(rank, 'rank', low=0)
        if compression not in ('zstd', 'snappy', 'gzip', 'lz4', 'brotli', 'none'):
            raise SettingError(f'compression={compression!r} is not a Parquet codec; choose '
                               f'zstd, snappy, gzip, lz4, brotli or none')
        self.compression = compression
        self.sync = check_bool(sync, 'sync')
        self._opened = False
        self._run: str | None = None  # the run whose log this is, in every file's metadata
        self._steps = 0
        self._names: list[str] | None = None
        self._kinds: dict[str, str] = {}
        self._first_step = 0          # first step of the open file
        self._table: Any = None       # its rows already in a table (written or loaded)
        self._pending: list[_Chunk] = []
        self._bytes = 0               # of the open file's rows, in memory (_rows_nbytes)
        self._rows = 0                # of the open file
        self._written = True          # the open file on disk holds every row of it
        #: Rows logged, files written, and the seconds spent (wall-clock, and this thread's
        #: CPU time) turning steps into rows (``record``) and writing files (``write``).
        self.stats = {'rows': 0, 'files_written': 0, 'record_s': 0.0, 'record_cpu_s': 0.0,
                      'write_s': 0.0, 'write_cpu_s': 0.0}

    def __repr__(self) -> str:
        return (f'SelectionLog({str(self.path)!r}, columns={self.columns!r}, '
                f'max_rows_per_file={self.max_rows_per_file}, max_files={self.max_files})')

    @property
    def rank(self) -> int:
        """The rank whose files this log writes."""
        if self._rank is None:
            from jest_stream.distributed import rank_and_world

            self._rank = rank_and_world()[0]
        return self._rank

    @property
    def steps(self) -> int:
        """Super-batches logged so far (the ``step`` of the next one)."""
        return self._steps

    def __enter__(self) -> SelectionLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The recorder

    def record(self, result: StepResult) -> None:
        """Log one super-batch handed over (rows wait in memory until the file is written).

        Raises:
            SettingError: The folder holds this rank's files of another run (first step only).
            DataError: A logged column is not one scalar per row, or changed its type.
            MissingColumnError: A logged column is not in the batch.
        """
        start = _clock()
        self._open(fresh=True)
        rows = step_rows(result, columns=self.columns, stream_offsets=self.stream_offsets)
        self._check_kinds(rows)
        policy = result.selection.policy
        scalars = {'step': self._steps, 'epoch': result.epoch, 'index': result.index,
                   'rank': self.rank, 'n_candidates': result.selection.n_candidates,
                   **{key: policy.get(key) for key in ('pressure', 'mix', 'filter_ratio_now')}}
        chunk = _Chunk(len(rows['row']), scalars, rows)
        self._count('record', start)
        if self._rows and self._full_with(chunk):
            self.flush()
            self._start_file(self._steps)
        if not self._rows:
            self._first_step = self._steps
        self._pending.append(chunk)
        self._bytes += chunk.nbytes
        self._rows += chunk.n
        self._written = False
        _UNWRITTEN[self] = os.getpid()
        self._steps += 1
        self.stats['rows'] += chunk.n

    def _count(self, kind: str, start: tuple[float, float]) -> None:
        wall, cpu = _clock()
        self.stats[f'{kind}_s'] += wall - start[0]
        self.stats[f'{kind}_cpu_s'] += cpu - start[1]

    def state_dict(self) -> dict[str, Any]:
        """Write every row logged so far (durably), and return the position.

        Returns:
            dict: ``version``, ``steps`` (super-batches logged), ``run`` (the run's id, in
            every file this rank writes) and ``rank``.
        """
        self._open(fresh=True)
        self.flush()
        return {'version': LOG_VERSION, 'steps': self._steps, 'run': self._run,
                'rank': self.rank}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the log at a saved position: rows logged after it are removed from disk.

        The file that straddles the position is cut and stays the open file, so the files of
        the resumed run are those of an uninterrupted one.

        The state of this rank names its run: files of this rank written by another run (a
        folder another run logs to) are refused, not cut. Another rank's state (one checkpoint
        for every rank) and a state saved without a run are not checked for it.

        Args:
            state (Mapping): From :meth:`state_dict`; an empty one (the checkpoint had no log)
                starts the log at step 0 in a folder without this rank's files.

        Raises:
            StateError: The state is not a log state, the folder lacks rows before the
                position (another folder, or files removed by hand), or this rank's files
                there are another run's.
            LogError: The file that straddles the position is damaged.
            SettingError: An empty state, and the folder holds this rank's files.
        """
        if not state:
            self._reset()
            self._opened = False
            self._open(fresh=True)
            return
        steps, run, rank = _check_state(state)
        if self._opened:
            self.flush()
        self._open(fresh=False)
        self._reset()
        self._cut(steps, run if rank in (None, self.rank) else None)
        self._steps = steps

    def flush(self) -> None:
        """Write the open file if rows wait (atomically; synced with ``sync``)."""
        if not self._written:
            self._write_open_file()

    def close(self) -> None:
        """Write every row logged; the log can still record afterwards (it holds no file open).

        Without it, the rows still in memory are written at interpreter exit.
        """
        if self._opened:
            self.flush()

    # Files

    def _open(self, *, fresh: bool) -> None:
        if self._opened:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(f'{_TEMP_PREFIX}{self.rank:03d}-*'):
            stale.unlink(missing_ok=True)  # left by a run killed while it wrote
        existing = log_files(self.path, self.rank)
        if fresh and existing:
            if not self.overwrite:
                raise SettingError(
                    f'{self.path} already holds a selection log of rank {self.rank} '
                    f'({len(existing)} files, e.g. {existing[0].path.name}); give a new folder, '
                    f'pass overwrite=True to replace it, or resume its run with the loader\'s '
                    f'load_state_dict')
            for file in existing:
                file.path.unlink()
        self._opened = True
        if fresh:
            self._run = uuid.uuid4().hex

    def _reset(self) -> None:
        self._start_file(0)
        self._steps = 0

    def _full_with(self, chunk: _Chunk) -> bool:
        if self._rows + chunk.n > self.max_rows_per_file:
            return True
        return self.max_bytes_per_file is not None \
            and self._bytes + chunk.nbytes > self.max_bytes_per_file

    def _start_file(self, first_step: int) -> None:
        self._table, self._pending, self._bytes, self._rows = None, [], 0, 0
        self._first_step = first_step
        self._mark_written()

    def _mark_written(self) -> None:
        self._written = True
        _UNWRITTEN.pop(self, None)

    def _check_kinds(self, rows: dict[str, np.ndarray]) -> None:
        names = [*FIXED_COLUMNS, *(name for name in rows if name not in FIXED_COLUMNS)]
        if self._names is None:
            self._names = names
        elif names != self._names:
            raise self._other_columns(str(self._names), str(names))
        for name in self.columns:
            kind = 'string' if rows[name].dtype == object else str(rows[name].dtype)
            known = self._kinds.setdefault(name, kind)
            if kind != known:
                raise DataError(f'the logged column {name!r} held {known} values and now holds '
                                f'{kind}: a column must keep its type through the log')

    def _other_columns(self, found: str, writes: str) -> LogError:
        """The error of an open file (resumed) whose columns, or their types, differ from the
        rows this log writes now."""
        return LogError(f'{self.path / _file_name(self.rank, self._first_step)}: the log there '
                        f'has the columns {found} but this SelectionLog writes {writes}; resume '
                        f'with the same columns and streams, or log to a new folder')

    def _open_table(self) -> Any:
        """Every row of the open file in one table (the waiting rows joined to it)."""
        import pyarrow as pa

        if self._pending:
            new = _chunks_table(self._pending, self._names)
            if self._table is not None and not new.schema.equals(self._table.schema):
                old = self._table.schema
                raise self._other_columns(f'{old.names} ({old.types})',
                                          f'{new.schema.names} ({new.schema.types})')
            tables = [new] if self._table is None else [self._table, new]
            self._table = pa.concat_tables(tables).combine_chunks()
            self._pending = []
        return self._table

    def _write_open_file(self) -> None:
        start = _clock()
        table = self._open_table()
        if table is None:
            return
        target = self.path / _file_name(self.rank, self._first_step)
        created = not target.exists()
        self._write_atomically(table, target)
        self._mark_written()
        self.stats['files_written'] += 1
        if created and self.max_files is not None:
            for old in log_files(self.path, self.rank)[:-self.max_files]:
                old.path.unlink(missing_ok=True)
        self._count('write', start)

    def _write_atomically(self, table: Any, target: Path) -> None:
        import pyarrow.parquet as pq

        temp = target.with_name(f'{_TEMP_PREFIX}{self.rank:03d}-{os.getpid()}-{target.name}')
        entry = {'version': LOG_VERSION, 'run': self._run}
        table = table.replace_schema_metadata({_METADATA_KEY: json.dumps(entry).encode()})
        try:
            with open(temp, 'wb') as out:
                pq.write_table(table, out, compression=self.compression)
                out.flush()
                if self.sync:
                    os.fsync(out.fileno())
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        if self.sync:
            _sync_folder(self.path)

    def _cut(self, steps: int, run: str | None) -> None:
        """Remove this rank's rows of steps ``>= steps``; the file before becomes the open one.

        The whole cut is checked before any file is touched: a refused resume leaves the
        folder as it was. ``run`` (when known) must be the run of every file the cut touches.
        """
        files = log_files(self.path, self.rank)
        kept = [f for f in files if f.first_step < steps]
        found = self._check_run(run, files[len(kept) - 1 if kept else 0:])
        table, removed = self._straddling(kept[-1], steps) if kept else (None, False)
        if table is None and steps > 0 and self.max_files is None:
            raise StateError(
                f'the saved position is step {steps} of the selection log, but {self.path} '
                f'holds no file of rank {self.rank} before it: resume with the folder the '
                f'run logged to')
        self._run = run or found or uuid.uuid4().hex
        for file in files[len(kept):]:
            file.path.unlink()
        if table is None:
            if steps > 0:
                logger.warning('the selection log in %s resumes at step %d; its earlier rows '
                               'were removed (max_files=%d)', self.path, steps, self.max_files)
            self._start_file(steps)
            return
        last = kept[-1]
        self._start_file(last.first_step)
        self._table = table
        self._bytes = _rows_nbytes(table.num_rows,
                                   {name: table.column(name) for name in table.column_names})
        self._rows = table.num_rows
        self._names = list(table.schema.names)
        if removed:
            self._write_atomically(table, last.path)

    def _check_run(self, run: str | None, files: list[LogFile]) -> str | None:
        """The run that wrote ``files`` (None when none says); refuses files of a run other
        than ``run``."""
        found = None
        for file in files:
            other = _file_run(file.path)
            if run is not None and other is not None and other != run:
                raise StateError(
                    f'{self.path}: the selection log of rank {self.rank} there is another '
                    f'run\'s ({file.path.name} was written by run {other}, the state resumes '
                    f'run {run}); resume with the folder this run logged to, or start a new '
                    f'log without the state')
            found = found or other
        return found

    @staticmethod
    def _straddling(file: LogFile, steps: int) -> tuple[Any, bool]:
        """The rows before step ``steps`` of the file that holds it (read and checked), and
        whether it holds rows after them.

        Raises:
            LogError: The file is damaged.
            StateError: Its rows end before step ``steps - 1``.
        """
        import pyarrow.compute as pc

        table = _read_file(file.path)
        step = table.column('step')
        ends = int(pc.max(step).as_py()) if table.num_rows else -1
        if ends < steps - 1:
            raise StateError(
                f'{file.path}: the saved position is step {steps} of the selection log, but its '
                f'rows end at step {ends}: rows are missing; resume with the folder the run '
                f'logged to, from its own checkpoint')
        before = table.filter(pc.less(step, steps)).combine_chunks()
        return before, before.num_rows != table.num_rows

def _clock() -> tuple[float, float]:
    """Wall-clock seconds and this thread's CPU seconds, now."""
    return time.perf_counter(), time.thread_time()


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _check_state(state: Mapping[str, Any]) -> tuple[int, str | None, int | None]:
    """``steps``, ``run`` and ``rank`` of a log state (a state saved before runs were
    recorded has neither of the last two)."""
    if not isinstance(state, Mapping) or state.get('version') != LOG_VERSION:
        version = state.get('version') if isinstance(state, Mapping) else None
        raise StateError(f'selection log state version {version!r} is not {LOG_VERSION}; it was '
                         f'saved by an incompatible jest_stream, or is not a SelectionLog state')
    steps, run, rank = state.get('steps'), state.get('run'), state.get('rank')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise StateError(f'the selection log state has steps={steps!r}; expected an int >= 0')
    if run is not None and not isinstance(run, str):
        raise StateError(f'the selection log state has run={run!r}; expected a str')
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise StateError(f'the selection log state has rank={rank!r}; expected an int >= 0')
    return steps, run, rank


# Metrics to other loggers


class MetricsWriter(Protocol):
    """What :func:`log_metrics` writes to: ``torch.utils.tensorboard.SummaryWriter`` has it."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        """One scalar at one step."""


def log_metrics(writer: MetricsWriter, metrics: Mapping[str, Any], step: int, *,
                prefix: str = 'jest/') -> int:
    """Send a metrics dict (``loader.metrics``) to a TensorBoard ``SummaryWriter``.

    Every number becomes one ``add_scalar(prefix + name, value, step)``: the timings, the
    throughput, the score statistics (``score_selected_mean``...), the policy
    (``pressure``, ``mix``, ``filter_ratio_now``, ``share/<group>`` with a quota) and the
    path's extras. Bools and anything that is not a number are skipped.

    Args:
        writer (MetricsWriter): A ``SummaryWriter``, or anything with ``add_scalar``.
        metrics (Mapping[str, Any]): Names and values.
        step (int): The x-axis value (the training step).
        prefix (str): Put before every name.

    Returns:
        int: The scalars written.
    """
    written = 0
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            continue
        writer.add_scalar(f'{prefix}{name}', float(value), step)
        written += 1
    return written

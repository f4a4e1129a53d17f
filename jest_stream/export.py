"""A curated subset from a selection log: the samples selected most (or least) often.

Over a run, learnability selection keeps coming back to some samples and never takes
others. Ranking samples by how often selection took them when they were candidates gives a
curated subset to train on again, or to look at (data-quality bootstrapping, as in the
JEST paper: a model trained on the curated subset becomes the next reference):

    jest-stream export runs/log --top 0.5 --out keep.npy

:func:`selection_rates` ranks, :func:`choose_ids` picks, :func:`write_ids` and
:func:`read_ids` store the ids (``.npy``: int64, sorted; ``.parquet``: with their counts), and
:class:`SampleSubset` reads them back as a filtered dataset whose samples keep their global
ids, which a reference cache and the selection log key on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from jest_stream.checks import check_int, check_number
from jest_stream.errors import DataError, SettingError, SettingTypeError
from jest_stream.log import LogError, as_table, read_log

__all__ = ['selection_rates', 'choose_ids', 'write_ids', 'read_ids', 'export_ids',
           'SampleSubset', 'ID_FORMATS']

#: File formats of exported ids, by suffix.
ID_FORMATS = ('.npy', '.parquet')
# What selection_rates reads of a log.
_RATE_COLUMNS = ('sample_id', 'candidate', 'selected')


def _check_ids(ids: Any, setting: str) -> np.ndarray:
    """Sample ids as int64: a 1-D list or array of integers.

    Raises:
        SettingTypeError: Not integers (floats, bools, strings).
        SettingError: Not one-dimensional.
    """
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in 'iu':
        raise SettingTypeError(f'{setting} holds {array.dtype} values; sample ids are integers '
                               f'(read_ids, choose_ids)')
    if array.ndim != 1:
        raise SettingError(f'{setting} has shape {array.shape}; give one list of sample ids')
    return array.astype(np.int64, copy=False)


def _check_path(path: Any, setting: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise SettingTypeError(f'{setting}={path!r} must be a path (str or PathLike)')
    return Path(path)


def _check_out(out: Any) -> Path:
    """An ids file's path: str or PathLike, with a suffix of :data:`ID_FORMATS`.

    Raises:
        SettingTypeError: Not a path.
        SettingError: Another suffix.
    """
    path = _check_path(out, 'out')
    if path.suffix not in ID_FORMATS:
        raise SettingError(f'{path}: write ids to a {" or ".join(ID_FORMATS)} file, e.g. '
                           f'{path.with_suffix(".npy").name}')
    return path


def _check_choice(top: Any, bottom: Any, min_candidates: Any) -> float:
    """The fraction to keep, from ``top`` or ``bottom``.

    Raises:
        SettingError: Neither or both given, a fraction outside ``(0, 1]``, or
            ``min_candidates`` below 1.
        SettingTypeError: A setting of the wrong type (bools are not numbers).
    """
    if (top is None) == (bottom is None):
        raise SettingError('give exactly one of top=... (keep the most selected fraction) or '
                           'bottom=... (the least selected fraction)')
    check_int(min_candidates, 'min_candidates', low=1,
              hint='rank samples that were candidates at least this often')
    setting = 'top' if top is not None else 'bottom'
    return check_number(top if top is not None else bottom, setting, low=0.0, high=1.0,
                        low_open=True, hint='the fraction of the ranked samples to keep')


def selection_rates(table: Any) -> dict[str, np.ndarray]:
    """How often each sample was a candidate and how often it was selected.

    Args:
        table (pyarrow.Table | pandas.DataFrame): A selection log (its ``sample_id``,
            ``candidate`` and ``selected`` columns at least).

    Returns:
        dict[str, np.ndarray]: ``sample_id`` (int64, ascending), ``candidate`` and
        ``selected`` (times, int64) and ``rate`` (``selected / candidate``, float64), over
        the samples that were candidates at least once.

    Raises:
        SettingError: The table lacks one of those columns (not a selection log).
        SettingTypeError: ``table`` is neither a ``pyarrow.Table`` nor a DataFrame.
    """
    table = as_table(table)
    missing = [name for name in _RATE_COLUMNS if name not in table.column_names]
    if missing:
        raise SettingError(f'the table has no {missing} columns ({table.column_names}); give a '
                           f'selection log, read by read_log or pandas.read_parquet')
    ids = table.column('sample_id').to_numpy()
    candidate = table.column('candidate').to_numpy()
    selected = table.column('selected').to_numpy() & candidate
    offered, times_offered = np.unique(ids[candidate], return_counts=True)
    chosen, times_chosen = np.unique(ids[selected], return_counts=True)
    times_selected = np.zeros(len(offered), dtype=np.int64)
    times_selected[np.searchsorted(offered, chosen)] = times_chosen
    return {'sample_id': offered.astype(np.int64), 'candidate': times_offered.astype(np.int64),
            'selected': times_selected,
            'rate': times_selected / np.maximum(times_offered, 1)}


def choose_ids(rates: dict[str, np.ndarray], *, top: float | None = None,
               bottom: float | None = None, min_candidates: int = 1) -> np.ndarray:
    """The ids of the samples selected most (``top``) or least (``bottom``) often.

    Samples are ranked by their selection rate (selections per candidacy, so that a sample
    drawn in fewer epochs is not penalised), then by their number of selections, then by
    id, so the choice is deterministic.

    Args:
        rates (dict): From :func:`selection_rates`.
        top (float): Keep this fraction of the ranked samples, the most selected.
        bottom (float): Or this fraction, the least selected.
        min_candidates (int): Rank only samples that were candidates at least this often.

    Returns:
        np.ndarray: The chosen ids (int64, ascending).

    Raises:
        SettingError: Neither or both of ``top`` and ``bottom``, one outside ``(0, 1]``, or
            ``min_candidates`` below 1.
        SettingTypeError: A setting of the wrong type (bools are not numbers).
    """
    fraction = _check_choice(top, bottom, min_candidates)
    eligible = rates['candidate'] >= min_candidates
    ids, rate, times = (rates[k][eligible] for k in ('sample_id', 'rate', 'selected'))
    # lexsort sorts by the last key first: rate, then selections, then id (all ascending).
    order = np.lexsort((ids, times, rate) if bottom is not None else (ids, -times, -rate))
    keep = int(round(fraction * len(order)))
    return np.sort(ids[order[:keep]]).astype(np.int64)


def write_ids(ids: np.ndarray, path: str | os.PathLike[str],
              rates: dict[str, np.ndarray] | None = None) -> Path:
    """Write ids as ``.npy`` (int64) or ``.parquet`` (``sample_id`` and, with ``rates``,
    ``candidate``, ``selected`` and ``rate``), atomically.

    Args:
        ids (np.ndarray): Sample ids (integers, int64[k]).
        path (str | PathLike): The file, ``.npy`` or ``.parquet`` (its folder is created).
        rates (dict, optional): From :func:`selection_rates`, holding every id of ``ids``:
            their counts go into a Parquet file.

    Returns:
        Path: ``path``.

    Raises:
        SettingError: Another suffix, ``ids`` not one-dimensional, or ids that ``rates``
            has no counts of.
        SettingTypeError: ``ids`` are not integers, or ``path`` is not a path.
        OSError: The file cannot be written.
    """
    path = _check_out(path)
    ids = _check_ids(ids, 'ids')
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f'.{path.name}.{os.getpid()}.partial')
    try:
        if path.suffix == '.npy':
            with open(temp, 'wb') as out:
                np.save(out, ids)
        else:
            _write_parquet(ids, temp, rates)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _write_parquet(ids: np.ndarray, path: Path, rates: dict[str, np.ndarray] | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {'sample_id': ids}
    if rates is not None:
        known = rates['sample_id']
        rows = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
        if len(ids) and (not len(known) or not np.array_equal(known[rows], ids)):
            absent = ids[~np.isin(ids, known)]
            raise SettingError(f'rates has no counts of the ids {absent[:8].tolist()}; give '
                               f'the rates the ids were chosen from (selection_rates)')
        columns.update({key: rates[key][rows] for key in ('candidate', 'selected', 'rate')})
    pq.write_table(pa.table(columns), path)


def read_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """Ids written by :func:`write_ids` (or any ``.npy`` of integers, or Parquet file with a
    ``sample_id`` column), as int64.

    Args:
        path (str | PathLike): The file.

    Returns:
        np.ndarray: The ids (int64[k]), in the file's order.

    Raises:
        DataError: The file cannot be read, or holds no integer ids (the message names it).
        SettingTypeError: ``path`` is not a path.
    """
    path = _check_path(path, 'path')
    try:
        if path.suffix == '.parquet':
            import pyarrow.parquet as pq

            ids = pq.read_table(path, columns=['sample_id']).column('sample_id').to_numpy()
        else:
            ids = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any reader's failure means a bad file here
        raise DataError(f'{path}: cannot read sample ids from it ({type(error).__name__}: '
                        f'{error}); give a file written by jest-stream export') from None
    if ids.ndim != 1 or ids.dtype.kind not in 'iu':
        raise DataError(f'{path}: holds {ids.dtype} of shape {ids.shape}, not a list of integer '
                        f'sample ids')
    return ids.astype(np.int64)


def export_ids(log: str | os.PathLike[str], out: str | os.PathLike[str], *,
               top: float | None = None, bottom: float | None = None,
               min_candidates: int = 1) -> dict[str, Any]:
    """Rank a log's samples and write the chosen ids: what ``jest-stream export`` does.

    Every setting is checked before the log is read.

    Args:
        log (str | PathLike): The log's folder.
        out (str | PathLike): The ids file, ``.npy`` or ``.parquet``.
        top (float, optional): Keep this fraction (in ``(0, 1]``) of the ranked samples, the
            most selected.
        bottom (float, optional): Or this fraction, the least selected.
        min_candidates (int): Rank only samples that were candidates at least this often.

    Returns:
        dict: ``path``, ``ids`` (how many), ``ranked`` (samples ranked) and the mean
        selection ``rate`` of the chosen and of all ranked samples.

    Raises:
        LogError: The log is missing or damaged, or no sample was ever a candidate.
        SettingError: Neither or both of ``top`` and ``bottom``, a fraction outside
            ``(0, 1]``, ``min_candidates`` below 1, or an unknown suffix.
        SettingTypeError: A setting of the wrong type (bools are not numbers).
    """
    _check_choice(top, bottom, min_candidates)
    _check_out(out)
    _check_path(log, 'log')
    rates = selection_rates(read_log(log, columns=['sample_id', 'candidate', 'selected']))
    if not len(rates['sample_id']):
        raise LogError(f'{log}: no sample was ever a candidate in this log; nothing to rank')
    ids = choose_ids(rates, top=top, bottom=bottom, min_candidates=min_candidates)
    path = write_ids(ids, out, rates)
    eligible = rates['candidate'] >= min_candidates
    chosen = np.isin(rates['sample_id'], ids)
    return {'path': str(path), 'ids': int(len(ids)), 'ranked': int(eligible.sum()),
            'rate_chosen': float(rates['rate'][chosen].mean()) if chosen.any() else None,
            'rate_ranked': float(rates['rate'][eligible].mean()) if eligible.any() else None}


class SampleSubset(Subset):
    """The samples of ``dataset`` with the given global ids, each keeping its id.

    A ``torch.utils.data.Subset`` numbers its samples ``0..k-1``, and a ``SelectiveLoader``
    over it would name them by that position. This subset adds each sample's id in
    ``dataset`` instead (``id_key`` of dict samples, the last field of tuple samples: give
    the loader ``id_key=<that position>``), so a reference cache keyed by global id, and a
    selection log of the new run, still name the same samples. Dict samples that already
    carry ``id_key`` (``SampleIdStreamingDataset``'s) are checked to match.

    Works for any map-style dataset whose sample ``i`` is ``dataset[i]``, and for a
    ``StreamingDataset``, whose ``dataset[i]`` is global sample ``i``.

    Args:
        dataset (Dataset): Indexed by global sample id.
        ids (Sequence[int] | np.ndarray): The ids to keep (:func:`read_ids`).
        id_key (str): Column of the id in dict samples.

    Raises:
        SettingError: An id outside the dataset, or ``ids`` not one-dimensional.
        SettingTypeError: ``ids`` are not integers, or ``id_key`` is not a non-empty str.
        DataError: (reading a sample) a dict sample carries another id under ``id_key``,
            or a sample is neither a dict nor a tuple.
    """

    def __init__(self, dataset: Dataset, ids: Sequence[int] | np.ndarray, *,
                 id_key: str = 'sample_id') -> None:
        ids = _check_ids(ids, 'ids')
        if not isinstance(id_key, str) or not id_key:
            raise SettingTypeError(f'id_key={id_key!r} must name the column of the id in dict '
                                   f'samples (a non-empty str)')
        # A StreamingDataset's len() is one rank's share of an epoch; num_samples is all.
        size = getattr(dataset, 'num_samples', None)
        size = len(dataset) if size is None else int(size)  # type: ignore[arg-type]
        if len(ids) and (ids.min() < 0 or ids.max() >= size):
            raise SettingError(f'the ids range over [{ids.min()}, {ids.max()}] but the dataset '
                               f'has {size} samples: give the dataset the log was written from')
        super().__init__(dataset, ids.tolist())
        self.id_key = id_key

    def __getitem__(self, index: int) -> Any:
        sample_id = self.indices[index]
        sample = self.dataset[sample_id]
        if isinstance(sample, dict):
            if self.id_key in sample:
                if int(sample[self.id_key]) != sample_id:
                    raise DataError(f'sample {sample_id} of the dataset carries '
                                    f'{self.id_key}={sample[self.id_key]}: the dataset is not '
                                    f'indexed by global sample id')
                return sample
            return {**sample, self.id_key: sample_id}
        if isinstance(sample, (tuple, list)):
            return (*sample, sample_id)
        raise DataError(f'SampleSubset adds the id to dict or tuple samples, got a '
                        f'{type(sample).__name__}')

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return [self[i] for i in indices]

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
from jest_stream.errors import DataError, SettingError
from jest_stream.log import LogError, as_table, read_log

__all__ = ['selection_rates', 'choose_ids', 'write_ids', 'read_ids', 'export_ids',
           'SampleSubset', 'ID_FORMATS']

#: File formats of exported ids, by suffix.
ID_FORMATS = ('.npy', '.parquet')


def selection_rates(table: Any) -> dict[str, np.ndarray]:
    """How often each sample was a candidate and how often it was selected.

    Args:
        table (pyarrow.Table | pandas.DataFrame): A selection log (its ``sample_id``,
            ``candidate`` and ``selected`` columns at least).

    Returns:
        dict[str, np.ndarray]: ``sample_id`` (int64, ascending), ``candidate`` and
        ``selected`` (times, int64) and ``rate`` (``selected / candidate``, float64), over
        the samples that were candidates at least once.
    """
    table = as_table(table)
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
        SettingError: Neither or both of ``top`` and ``bottom``, or one outside ``(0, 1]``.
    """
    if (top is None) == (bottom is None):
        raise SettingError('give exactly one of top=... (keep the most selected fraction) or '
                           'bottom=... (the least selected fraction)')
    fraction = check_number(top if top is not None else bottom,
                            'top' if top is not None else 'bottom', low=0.0, high=1.0,
                            low_open=True)
    check_int(min_candidates, 'min_candidates', low=1)
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

    Raises:
        SettingError: Another suffix.
    """
    path = Path(path)
    if path.suffix not in ID_FORMATS:
        raise SettingError(f'{path}: write ids to a {" or ".join(ID_FORMATS)} file')
    ids = np.asarray(ids, dtype=np.int64)
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
        rows = np.searchsorted(rates['sample_id'], ids)
        columns.update({key: rates[key][rows] for key in ('candidate', 'selected', 'rate')})
    pq.write_table(pa.table(columns), path)


def read_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """Ids written by :func:`write_ids` (or any ``.npy`` of integers, or Parquet file with a
    ``sample_id`` column), as int64.

    Raises:
        DataError: The file cannot be read, or holds no integer ids (the message names it).
    """
    path = Path(path)
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

    Returns:
        dict: ``path``, ``ids`` (how many), ``ranked`` (samples ranked) and the mean
        selection ``rate`` of the chosen and of all ranked samples.

    Raises:
        LogError: The log is missing or damaged.
        SettingError: Bad ``top``/``bottom``/``min_candidates``, or an unknown suffix.
    """
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
        SettingError: An id outside the dataset.
    """

    def __init__(self, dataset: Dataset, ids: Sequence[int] | np.ndarray, *,
                 id_key: str = 'sample_id') -> None:
        ids = np.asarray(ids, dtype=np.int64)
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

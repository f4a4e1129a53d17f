"""What selection did, from a selection log: summaries (pure functions) and plots.

The functions here take the log as a ``pyarrow.Table`` (:func:`jest_stream.log.read_log`)
and return plain dicts of lists, so they can be tested, printed and written as JSON without
plotting anything; :func:`build_report` runs them all. :func:`plot_report` draws PNGs from
such a report (matplotlib, the ``report`` extra: ``pip install 'jest-stream[report]'``) and
:func:`write_html` a page that shows them; ``jest-stream report LOGDIR`` does all of it.

Windows. Curves over time are computed per window of ``window`` consecutive steps (the
log's ``step``, all ranks together); by default about 50 windows over the run.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jest_stream.checks import check_bool, check_int, check_number
from jest_stream.errors import JestStreamError, SettingError, SettingTypeError
from jest_stream.log import FIXED_COLUMNS, as_table, read_log

__all__ = [
    'ReportDependencyError',
    'SCORE_COLUMNS',
    'default_window',
    'detect_columns',
    'score_quantiles',
    'group_shares',
    'selection_counts',
    'score_scatter',
    'flagged_fraction',
    'summarise',
    'build_report',
    'plot_report',
    'write_html',
    'write_report',
]

#: The score columns of a log: the combined score and its two parts.
SCORE_COLUMNS = ('score', 'learner', 'reference')
QUANTILES = (0.1, 0.5, 0.9)
# A column with at most this many distinct values is a grouping (a class, a stream).
MAX_GROUPS = 50


class ReportDependencyError(JestStreamError, ImportError):
    """Plots need matplotlib (and progress bars tqdm): the ``report`` extra."""


def _require(table: Any, name: str) -> None:
    """Refuse a column the log does not have.

    Raises:
        SettingError: ``name`` is not a column of ``table`` (the message lists its columns).
    """
    if name not in table.column_names:
        raise SettingError(f'{name!r} is not a column of the log; it has {table.column_names}. '
                           f'Name one of them, or give the table read_log or '
                           f'pandas.read_parquet read from a selection log\'s folder')


def _array(table: Any, name: str) -> np.ndarray:
    """Column ``name`` as numpy (nulls of float columns as NaN).

    Raises:
        SettingError: The log has no column ``name``.
    """
    _require(table, name)
    return table.column(name).to_numpy()


def _check_window(window: Any) -> int:
    return check_int(window, 'window', low=1, hint='steps per window of the curves')


def _check_max_points(max_points: Any) -> int:
    return check_int(max_points, 'max_points', low=1,
                     hint='points of the learner-reference scatter')


def _check_names(names: Any, setting: str) -> list[str] | None:
    """``groups`` or ``flags``: None (detect them), or a list of column names."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise SettingTypeError(f'{setting}={names!r} must be a list of column names, e.g. '
                               f'[{names!r}], or None to detect them')
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise SettingTypeError(f'{setting}={names!r}: {bad} are not column names (str)')
    return names


def _check_report_settings(window: Any, groups: Any, flags: Any, max_points: Any,
                           progress: Any) -> tuple[list[str] | None, list[str] | None]:
    """The settings :func:`build_report` and :func:`write_report` share, checked before any
    work; ``groups`` and ``flags`` as lists (or None)."""
    if window is not None:
        _check_window(window)
    _check_max_points(max_points)
    check_bool(progress, 'progress')
    return _check_names(groups, 'groups'), _check_names(flags, 'flags')


def default_window(table: Any, windows: int = 50) -> int:
    """Steps per window so that the run spans about ``windows`` windows (at least 1).

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.
        windows (int): How many windows the run should span, at least 1.

    Returns:
        int: Steps per window.

    Raises:
        SettingError: ``windows`` is below 1, or the log has no ``step`` column.
        SettingTypeError: ``windows`` is not an int, or ``table`` not a table.
    """
    check_int(windows, 'windows', low=1, hint='windows over the run')
    table = as_table(table)
    steps = _array(table, 'step')
    span = int(steps.max()) + 1 if len(steps) else 1
    return max(1, -(-span // windows))


def detect_columns(table: Any) -> tuple[list[str], list[str]]:
    """The logged columns to report on: groupings and flags.

    A *flag* is a logged bool column, or an integer one holding only 0 and 1 (a noise flag);
    a *grouping* is ``stream`` or a logged integer or string column with at most
    :data:`MAX_GROUPS` distinct values (a class label). A 0/1 column is a flag only.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.

    Returns:
        tuple[list[str], list[str]]: ``(groups, flags)``.

    Raises:
        SettingTypeError: ``table`` is neither a ``pyarrow.Table`` nor a pandas DataFrame.
    """
    table = as_table(table)
    groups, flags = [], []
    for name in table.column_names:
        if name in FIXED_COLUMNS:  # the log's own; any other was logged by the user, or stream
            continue
        values = _array(table, name)
        kind = values.dtype.kind
        if kind == 'b':
            flags.append(name)
            continue
        if kind not in 'iuUO':
            continue
        distinct = np.unique(values)
        if kind in 'iu' and set(distinct.tolist()) <= {0, 1}:
            flags.append(name)
        elif len(distinct) <= MAX_GROUPS:
            groups.append(name)
    return groups, flags


def _windows(table: Any, window: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Window start steps and, for each window, the rows in it."""
    index = _array(table, 'step') // window
    order = np.argsort(index, kind='stable')
    starts, first = np.unique(index[order], return_index=True)
    return starts * window, np.split(order, first[1:])


def _quantiles(values: np.ndarray, quantiles: Sequence[float]) -> list[float | None]:
    values = values[~np.isnan(values)]
    if not len(values):
        return [None] * len(quantiles)
    return [float(q) for q in np.quantile(values, quantiles)]


def _check_quantiles(quantiles: Any) -> list[float]:
    given = None if isinstance(quantiles, str) or not isinstance(quantiles, Iterable) \
        else list(quantiles)
    if not given:
        raise SettingTypeError(f'quantiles={quantiles!r} must be a non-empty list of numbers in '
                               f'[0, 1], e.g. [0.1, 0.5, 0.9]')
    values = [check_number(q, f'quantiles[{i}]', low=0.0, high=1.0) for i, q in enumerate(given)]
    if values != sorted(values):
        raise SettingError(f'quantiles={given!r} must be in ascending order (the plots draw a '
                           f'band from the first to the last)')
    return values


def score_quantiles(table: Any, *, window: int, quantiles: Sequence[float] = QUANTILES
                    ) -> dict[str, Any]:
    """Quantiles of every score per window of steps, over all candidates and the selected.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.
        window (int): Steps per window.
        quantiles (Sequence[float]): Which quantiles (0.1, 0.5, 0.9 by default).

    Returns:
        dict: ``step`` (first step of each window), ``quantiles``, and for each score column
        with values (``score``, ``learner``, ``reference``) ``{'candidates': [[q...] per
        window], 'selected': [...]}`` (None where a window has no value).

    Raises:
        SettingError: ``window`` below 1, a quantile outside ``[0, 1]`` or out of order, or a
            column of the log missing.
        SettingTypeError: ``window`` or a quantile of the wrong type.
    """
    _check_window(window)
    quantiles = _check_quantiles(quantiles)
    table = as_table(table)
    starts, rows = _windows(table, window)
    candidate, selected = _array(table, 'candidate'), _array(table, 'selected')
    out: dict[str, Any] = {'step': starts.tolist(), 'quantiles': list(quantiles)}
    for name in SCORE_COLUMNS:
        if name not in table.column_names or table.column(name).null_count == table.num_rows:
            continue
        values = _array(table, name).astype(np.float64)
        out[name] = {
            'candidates': [_quantiles(values[r[candidate[r]]], quantiles) for r in rows],
            'selected': [_quantiles(values[r[selected[r]]], quantiles) for r in rows],
        }
    return out


def _shares(values: np.ndarray, groups: np.ndarray) -> list[float]:
    if not len(values):
        return [0.0] * len(groups)
    found, counts = np.unique(values, return_counts=True)
    share = dict(zip(found.tolist(), (counts / len(values)).tolist(), strict=True))
    return [share.get(g, 0.0) for g in groups.tolist()]


def group_shares(table: Any, column: str, *, window: int) -> dict[str, Any]:
    """Each group's share of the selected samples (and of the candidates), per window.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.
        column (str): The grouping column (``stream``, a label).
        window (int): Steps per window.

    Returns:
        dict: ``step``, ``groups`` (sorted), ``selected`` and ``candidates``: per group, its
        share in each window; ``overall``: per group, ``{'selected', 'candidates'}`` shares
        over the whole log.

    Raises:
        SettingError: ``column`` is not a column of the log, or ``window`` is below 1.
        SettingTypeError: ``window`` is not an int.
    """
    _check_window(window)
    table = as_table(table)
    values = _array(table, column)
    candidate, selected = _array(table, 'candidate'), _array(table, 'selected')
    groups = np.unique(values)
    starts, rows = _windows(table, window)
    chosen = [_shares(values[r[selected[r]]], groups) for r in rows]
    offered = [_shares(values[r[candidate[r]]], groups) for r in rows]
    names = [str(g) for g in groups.tolist()]
    return {
        'column': column, 'step': starts.tolist(), 'groups': names,
        'selected': {g: [w[i] for w in chosen] for i, g in enumerate(names)},
        'candidates': {g: [w[i] for w in offered] for i, g in enumerate(names)},
        'overall': {g: {'selected': s, 'candidates': c} for g, s, c in zip(
            names, _shares(values[selected], groups), _shares(values[candidate], groups),
            strict=True)},
    }


def selection_counts(table: Any) -> dict[str, Any]:
    """How often each sample was selected, over the samples that were candidates.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.

    Returns:
        dict: ``samples`` (distinct candidates), ``never_selected_fraction``,
        ``mean_selected`` and ``max_selected`` (times per sample), ``histogram``:
        ``{'times': [0, 1, ...], 'samples': [...]}`` (samples selected that many times), and
        ``mean_rate`` (selections per candidacy, averaged over samples).

    Raises:
        SettingError: The table lacks a column of the log (``sample_id``, ``candidate``,
            ``selected``).
    """
    table = as_table(table)
    ids = _array(table, 'sample_id')
    candidate, selected = _array(table, 'candidate'), _array(table, 'selected')
    offered, times_offered = np.unique(ids[candidate], return_counts=True)
    if not len(offered):
        return {'samples': 0, 'never_selected_fraction': None, 'mean_selected': None,
                'max_selected': None, 'mean_rate': None, 'histogram': {'times': [],
                                                                       'samples': []}}
    chosen, times_chosen = np.unique(ids[selected & candidate], return_counts=True)
    per_sample = np.zeros(len(offered), dtype=np.int64)
    per_sample[np.searchsorted(offered, chosen)] = times_chosen
    histogram = np.bincount(per_sample)
    return {
        'samples': int(len(offered)),
        'never_selected_fraction': float(np.mean(per_sample == 0)),
        'mean_selected': float(per_sample.mean()),
        'max_selected': int(per_sample.max()),
        'mean_rate': float(np.mean(per_sample / times_offered)),
        'histogram': {'times': list(range(len(histogram))), 'samples': histogram.tolist()},
    }


def score_scatter(table: Any, *, max_points: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Learner against reference losses of the candidates, subsampled for large logs.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.
        max_points (int): At most this many points (a uniform sample, private generator), at
            least 1.
        seed (int): Seed of the subsample (>= 0).

    Returns:
        dict: ``learner``, ``reference``, ``selected`` (lists of the sampled candidates'
        values), ``candidates`` (how many had both losses) and ``shown``; empty lists when
        the log has no learner or reference losses.

    Raises:
        SettingError: ``max_points`` below 1, or a negative ``seed``.
        SettingTypeError: Either is not an int.
    """
    max_points = _check_max_points(max_points)
    seed = check_int(seed, 'seed', low=0)
    table = as_table(table)
    empty = {'learner': [], 'reference': [], 'selected': [], 'candidates': 0, 'shown': 0}
    if not {'learner', 'reference'} <= set(table.column_names):
        return empty
    learner = _array(table, 'learner').astype(np.float64)
    reference = _array(table, 'reference').astype(np.float64)
    both = np.flatnonzero(~np.isnan(learner) & ~np.isnan(reference) & _array(table, 'candidate'))
    if not len(both):
        return empty
    total = len(both)
    if total > max_points:
        both = np.sort(np.random.default_rng(seed).choice(both, max_points, replace=False))
    return {'learner': learner[both].tolist(), 'reference': reference[both].tolist(),
            'selected': _array(table, 'selected')[both].tolist(),
            'candidates': int(total), 'shown': int(len(both))}


def _flags(table: Any, column: str) -> np.ndarray:
    """A flag column as bools.

    Raises:
        SettingError: The log has no such column, or it holds nulls or other values than
            bools or 0 and 1 (a label given as a flag).
    """
    values = _array(table, column)
    if values.dtype.kind == 'b':
        return values
    distinct = np.unique(values) if values.dtype.kind in 'iuf' else None
    if distinct is None or not set(distinct.tolist()) <= {0, 1}:
        shown = distinct[:10].tolist() if distinct is not None else f'{values.dtype} values'
        raise SettingError(f'flags: the column {column!r} holds {shown}, but a flag column holds '
                           f'bools, or 0 and 1, and no nulls (a noise flag); name it in groups '
                           f'instead, or log the flag as a bool column')
    return values.astype(bool)


def flagged_fraction(table: Any, column: str, *, window: int) -> dict[str, Any]:
    """The share of flagged samples (a noise flag) among the selected and the candidates.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.
        column (str): A bool or 0/1 column.
        window (int): Steps per window.

    Returns:
        dict: ``step``, ``selected`` and ``candidates`` (the flagged share in each window),
        ``overall`` (both over the log) and ``kept_ratio``: the flagged share among the
        selected over that among the candidates (below 1: selection avoids them).

    Raises:
        SettingError: ``column`` is not a column of the log or not a flag (bools, or 0 and 1,
            without nulls), or ``window`` is below 1.
        SettingTypeError: ``window`` is not an int.
    """
    _check_window(window)
    table = as_table(table)
    flags = _flags(table, column)
    candidate, selected = _array(table, 'candidate'), _array(table, 'selected')
    starts, rows = _windows(table, window)

    def share(rows: np.ndarray) -> float | None:
        """The flagged share of the log's rows ``rows`` (indices); None when there are none."""
        return float(flags[rows].mean()) if len(rows) else None

    overall_selected = share(np.flatnonzero(selected))
    overall_candidates = share(np.flatnonzero(candidate))
    ratio = None if not overall_candidates or overall_selected is None \
        else overall_selected / overall_candidates
    return {
        'column': column, 'step': starts.tolist(),
        'selected': [share(r[selected[r]]) for r in rows],
        'candidates': [share(r[candidate[r]]) for r in rows],
        'overall': {'selected': overall_selected, 'candidates': overall_candidates},
        'kept_ratio': ratio,
    }


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def summarise(table: Any) -> dict[str, Any]:
    """Totals of a log: its size, and the mean scores of the candidates and of the selected.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log.

    Returns:
        dict: ``rows``, ``steps``, ``epochs``, ``ranks``, ``selected_rows``,
        ``candidate_rows``, ``scores`` (per score column: ``candidates`` and ``selected``
        means) and ``policy`` (mean and last ``pressure``, ``mix``, ``filter_ratio_now``).

    Raises:
        SettingError: The table lacks a column of the log.
        SettingTypeError: ``table`` is neither a ``pyarrow.Table`` nor a pandas DataFrame.
    """
    table = as_table(table)
    step = _array(table, 'step')
    candidate, selected = _array(table, 'candidate'), _array(table, 'selected')
    scores = {}
    for name in SCORE_COLUMNS:
        values = _array(table, name).astype(np.float64)
        scores[name] = {'candidates': _mean(values[candidate]),
                        'selected': _mean(values[selected])}
    last = step == step.max() if len(step) else step.astype(bool)
    policy = {}
    for name in ('pressure', 'mix', 'filter_ratio_now'):
        values = _array(table, name).astype(np.float64)
        policy[name] = {'mean': _mean(values), 'last': _mean(values[last])}
    return {
        'rows': int(table.num_rows), 'steps': int(len(np.unique(step))),
        'epochs': sorted(np.unique(_array(table, 'epoch')).tolist()),
        'ranks': sorted(np.unique(_array(table, 'rank')).tolist()),
        'candidate_rows': int(candidate.sum()), 'selected_rows': int(selected.sum()),
        'scores': scores, 'policy': policy,
    }


def build_report(table: Any, *, window: int | None = None, groups: Sequence[str] | None = None,
                 flags: Sequence[str] | None = None, max_points: int = 5000,
                 progress: bool = False) -> dict[str, Any]:
    """Every summary of a log, as one JSON-ready dict.

    Args:
        table (pyarrow.Table | pandas.DataFrame): The log (:func:`~jest_stream.log.read_log`,
            ``pandas.read_parquet``).
        window (int, optional): Steps per window (at least 1); :func:`default_window` by
            default.
        groups (Sequence[str], optional): Grouping columns (shares of the selected over
            time); detected by :func:`detect_columns` by default.
        flags (Sequence[str], optional): Flag columns (flagged share over time); detected by
            default.
        max_points (int): Points of the learner-reference scatter (at least 1).
        progress (bool): A progress bar over the sections (tqdm).

    Returns:
        dict: ``summary``, ``window``, ``scores``, ``counts``, ``scatter``, ``groups`` (per
        column) and ``flags`` (per column).

    Raises:
        SettingError: A named column is not in the log, a flag column holds other values
            than bools or 0 and 1, or ``window`` or ``max_points`` is below 1.
        SettingTypeError: A setting of the wrong type (``groups='label'`` for ``['label']``,
            a bool for a count).
        ReportDependencyError: ``progress`` and tqdm is not installed.
    """
    groups, flags = _check_report_settings(window, groups, flags, max_points, progress)
    table = as_table(table)
    found_groups, found_flags = detect_columns(table)
    groups = found_groups if groups is None else groups
    flags = found_flags if flags is None else flags
    for name in (*groups, *flags):
        _require(table, name)
    for name in flags:
        _flags(table, name)
    window = default_window(table) if window is None else window
    sections: list[tuple[str, Callable[[], Any]]] = [
        ('summary', lambda: summarise(table)),
        ('scores', lambda: score_quantiles(table, window=window)),
        ('counts', lambda: selection_counts(table)),
        ('scatter', lambda: score_scatter(table, max_points=max_points)),
    ]
    sections += [(f'groups/{g}', lambda g=g: group_shares(table, g, window=window))
                 for g in groups]
    sections += [(f'flags/{f}', lambda f=f: flagged_fraction(table, f, window=window))
                 for f in flags]
    report: dict[str, Any] = {'window': window, 'groups': {}, 'flags': {}}
    for name, compute in _progress(sections, progress, 'report'):
        head, _, column = name.partition('/')
        if column:
            report[head][column] = compute()
        else:
            report[head] = compute()
    return report


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    return _tqdm()(items, desc=desc, unit='section')


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ReportDependencyError(
            "progress bars need tqdm: pip install 'jest-stream[report]'") from error
    return tqdm


# Plots


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ReportDependencyError(
            "jest-stream report draws its plots with matplotlib, which is not installed: "
            "pip install 'jest-stream[report]' (or pass --no-plots for the summary only)"
            ) from error
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _band(ax: Any, steps: list[int], rows: list[list[float | None]], label: str,
          colour: str) -> None:
    """The median and the band between the first and last quantile."""
    values = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    if not len(values) or np.isnan(values).all():
        return
    middle = values.shape[1] // 2
    ax.plot(steps, values[:, middle], color=colour, label=label)
    ax.fill_between(steps, values[:, 0], values[:, -1], color=colour, alpha=0.2)


def _plot_scores(plt: Any, report: dict[str, Any], path: Path) -> bool:
    scores = report['scores']
    names = [n for n in SCORE_COLUMNS if n in scores]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    low, high = scores['quantiles'][0], scores['quantiles'][-1]
    for ax, name in zip(axes[0], names, strict=True):
        _band(ax, scores['step'], scores[name]['candidates'], 'all candidates', 'tab:gray')
        _band(ax, scores['step'], scores[name]['selected'], 'selected', 'tab:blue')
        ax.set_title({'score': 'combined score', 'learner': 'learner loss',
                      'reference': 'reference loss'}[name])
        ax.set_xlabel('step')
        ax.legend(fontsize=8)
    fig.suptitle(f'scores per window of {report["window"]} steps: median and '
                 f'{low:.0%}-{high:.0%} band')
    _save(plt, fig, path)
    return True


def _plot_groups(plt: Any, shares: dict[str, Any], path: Path) -> bool:
    """Each group's share of the selected over time (stacked), and over the whole log
    against its share of the candidates."""
    groups = shares['groups']
    colours = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
    colour = [colours(i % colours.N) for i in range(len(groups))]
    fig, (over_time, overall) = plt.subplots(1, 2, figsize=(11, 3.8),
                                             gridspec_kw={'width_ratios': [3, 2]})
    over_time.stackplot(shares['step'], [shares['selected'][g] for g in groups], labels=groups,
                        colors=colour, alpha=0.85)
    over_time.set_xlabel('step')
    over_time.set_ylabel('share of the selected')
    over_time.set_ylim(0, 1)
    over_time.set_title(f'selected samples per {shares["column"]}')
    positions = np.arange(len(groups))
    overall.bar(positions - 0.2, [shares['overall'][g]['candidates'] for g in groups], 0.4,
                facecolor='none', edgecolor=colour, label='candidates')
    overall.bar(positions + 0.2, [shares['overall'][g]['selected'] for g in groups], 0.4,
                color=colour, label='selected')
    overall.set_xticks(positions, groups, fontsize=7)
    overall.set_xlabel(shares['column'])
    overall.set_title('whole log: candidates (outline), selected', fontsize=10)
    over_time.legend(fontsize=7, ncol=2 if len(groups) > 5 else 1, title=shares['column'],
                     loc='upper left', bbox_to_anchor=(1.0, 1.0))
    _save(plt, fig, path)
    return True


def _plot_counts(plt: Any, counts: dict[str, Any], path: Path) -> bool:
    if not counts['samples']:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(counts['histogram']['times'], counts['histogram']['samples'], color='tab:blue')
    ax.set_xlabel('times selected')
    ax.set_ylabel('samples')
    ax.set_title(f'{counts["samples"]} samples were candidates; '
                 f'{counts["never_selected_fraction"]:.1%} never selected')
    _save(plt, fig, path)
    return True


def _plot_scatter(plt: Any, scatter: dict[str, Any], path: Path) -> bool:
    if not scatter['shown']:
        return False
    learner, reference = np.array(scatter['learner']), np.array(scatter['reference'])
    chosen = np.array(scatter['selected'], dtype=bool)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(reference[~chosen], learner[~chosen], s=3, alpha=0.35, color='tab:gray',
               label='not selected')
    ax.scatter(reference[chosen], learner[chosen], s=3, alpha=0.5, color='tab:blue',
               label='selected')
    ax.set_xlabel('reference loss')
    ax.set_ylabel('learner loss')
    ax.set_title(f'{scatter["shown"]} of {scatter["candidates"]} candidates')
    ax.legend(fontsize=8, markerscale=3)
    _save(plt, fig, path)
    return True


def _plot_flags(plt: Any, flagged: dict[str, Any], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    as_float = [np.nan if v is None else v for v in flagged['selected']]
    ax.plot(flagged['step'], [np.nan if v is None else v for v in flagged['candidates']],
            color='tab:gray', label='among the candidates')
    ax.plot(flagged['step'], as_float, color='tab:red', label='among the selected')
    ax.set_xlabel('step')
    ax.set_ylabel(f'share with {flagged["column"]}')
    ax.set_ylim(bottom=0)
    ratio = flagged['kept_ratio']
    ax.set_title(f'{flagged["column"]} samples' + (
        f': selected at {ratio:.2f}x their share of the candidates' if ratio is not None
        else ''))
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    """Draw the report's plots as PNG files in ``out``.

    Files: ``scores.png``, ``selection_counts.png``, ``scatter.png`` (with learner and
    reference losses), ``share_<column>.png`` per grouping and ``flagged_<column>.png`` per
    flag; a plot with nothing to show is skipped.

    Args:
        report (dict): From :func:`build_report` (with the scatter's points).
        out (str | Path): The folder of the PNG files (created); files of the same names are
            replaced.

    Returns:
        list[Path]: The files written.

    Raises:
        ReportDependencyError: matplotlib is not installed.
        OSError: ``out`` cannot be created or written.
    """
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Callable[[Path], bool]]] = [
        ('scores.png', lambda p: _plot_scores(plt, report, p)),
        ('selection_counts.png', lambda p: _plot_counts(plt, report['counts'], p)),
        ('scatter.png', lambda p: _plot_scatter(plt, report['scatter'], p)),
    ]
    jobs += [(f'share_{c}.png', lambda p, s=s: _plot_groups(plt, s, p))
             for c, s in report['groups'].items()]
    jobs += [(f'flagged_{c}.png', lambda p, f=f: _plot_flags(plt, f, p))
             for c, f in report['flags'].items()]
    return [out / name for name, draw in jobs if draw(out / name)]


def write_html(report: dict[str, Any], images: Sequence[Path], path: str | Path) -> Path:
    """Write a page that shows the plots and the summary of a report.

    The images are linked by file name, so the page belongs in the folder that holds them
    (``index.html`` next to the PNG files of :func:`plot_report`). Text from the report is
    escaped.

    Args:
        report (dict): From :func:`build_report`: its ``summary``, ``counts`` and ``window``
            are shown.
        images (Sequence[Path]): The plots, in the order to show them
            (:func:`plot_report`'s list).
        path (str | Path): The page to write (replaced if it exists).

    Returns:
        Path: ``path``.

    Raises:
        KeyError: ``report`` lacks ``summary``, ``counts`` or ``window`` (not a report of
            :func:`build_report`).
        OSError: ``path`` cannot be written.
    """
    path = Path(path)
    summary = html.escape(json.dumps(report['summary'], indent=1))
    counts = report['counts']
    figures = '\n'.join(f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">'
                        f'<figcaption>{html.escape(p.stem)}</figcaption></figure>'
                        for p in images)
    never = counts['never_selected_fraction']
    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>Selection log report'
        '</title><style>body{font-family:sans-serif;max-width:70em;margin:2em auto}'
        'img{max-width:100%}figure{margin:1.5em 0}</style></head><body>\n'
        '<h1>Selection log report</h1>\n'
        f'<p>{report["summary"]["steps"]} steps, {report["summary"]["rows"]} rows; '
        f'{counts["samples"]} samples were candidates'
        + (f', {never:.1%} of them never selected' if never is not None else '')
        + f'; windows of {report["window"]} steps.</p>\n'
        f'{figures}\n<h2>Summary</h2>\n<pre>{summary}</pre>\n</body></html>\n')
    path.write_text(page)
    return path


def write_report(log: str | Path, out: str | Path, *, window: int | None = None,
                 groups: Sequence[str] | None = None, flags: Sequence[str] | None = None,
                 max_points: int = 5000, plots: bool = True, progress: bool = False
                 ) -> dict[str, Any]:
    """Read a log, and write ``report.json``, the plots and ``index.html`` into ``out``.

    Every setting is checked before the log is read.

    Args:
        log (str | Path): The log's folder.
        out (str | Path): Where the report goes (created).
        window (int, optional): Steps per window (at least 1); about 50 windows by default.
        groups (Sequence[str], optional): Grouping columns (detected by default).
        flags (Sequence[str], optional): Flag columns (detected by default).
        max_points (int): Points of the scatter (at least 1).
        plots (bool): Draw the plots and the page (needs matplotlib).
        progress (bool): Progress bars (tqdm).

    Returns:
        dict: The report, with ``files`` (what was written).

    Raises:
        LogError: The folder holds no log, or a file is damaged.
        SettingError: ``window`` or ``max_points`` below 1, or a named column that the log
            lacks or (for ``flags``) that is not a flag.
        SettingTypeError: A setting of the wrong type (a bool for a count, a str for a list,
            a folder that is not a str or path).
        ReportDependencyError: Plots (or progress bars) were asked and matplotlib (or tqdm)
            is missing.
        OSError: ``out`` cannot be created or written.
    """
    groups, flags = _check_report_settings(window, groups, flags, max_points, progress)
    check_bool(plots, 'plots')
    for setting, folder in (('log', log), ('out', out)):
        if not isinstance(folder, (str, os.PathLike)):
            raise SettingTypeError(f'{setting}={folder!r} must be a folder (str or PathLike)')
    if plots:
        _pyplot()  # fail before the work, not after
    if progress:
        _tqdm()
    table = read_log(log, progress=progress)
    report = build_report(table, window=window, groups=groups, flags=flags,
                          max_points=max_points, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if plots:
        images = plot_report(report, out)
        files = [*images, write_html(report, images, out / 'index.html')]
    report['files'] = [p.name for p in files] + ['report.json']
    # The scatter's points are for the plot; the file keeps its counts.
    points = ('learner', 'reference', 'selected')
    saved = {**report, 'scatter': {k: v for k, v in report['scatter'].items()
                                   if k not in points}}
    (out / 'report.json').write_text(json.dumps(saved, indent=1))
    return report

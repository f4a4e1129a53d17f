"""Statistics of the benchmarks, on numpy and scipy: spreads, intervals, slopes, ranks.

Nothing here is written by hand that numpy or scipy already computes: slopes come from
``scipy.stats.linregress``, rank correlations from ``scipy.stats.spearmanr``, confidence
intervals from Student's t (``scipy.stats.t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    'first_reach',
    'loglog_slope',
    'mean_std',
    'slope',
    'spearman',
    'summary',
    't_interval',
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Args:
        values (Sequence[float]): At least one number.

    Returns:
        tuple[float, float]: ``(mean, std)`` with ``ddof=1``.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError('mean_std needs at least one value')
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def t_interval(values: Sequence[float], confidence: float = 0.95
               ) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean; None with fewer than two values.

    Args:
        values (Sequence[float]): Independent measurements (one per seed, say).
        confidence (float): Coverage of the interval.

    Returns:
        tuple[float, float] | None: ``(low, high)``.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return None
    if np.all(array == array[0]):
        return float(array[0]), float(array[0])
    low, high = stats.t.interval(confidence, df=array.size - 1, loc=array.mean(),
                                 scale=stats.sem(array))
    return float(low), float(high)


def summary(values: Sequence[float | None]) -> dict[str, float | int | list[float] | None]:
    """Mean, std and 95% t interval of the values that exist (None ones are counted apart).

    Args:
        values (Sequence[float | None]): One per seed; None where there is no value (a
            target not reached).

    Returns:
        dict: ``mean``, ``std``, ``ci95`` (``[low, high]`` or None), ``n`` (values present)
        and ``of`` (all values); ``mean`` and ``std`` are None when none is present.
    """
    present = [float(v) for v in values if v is not None]
    mean, std = mean_std(present) if present else (None, None)
    interval = t_interval(present)
    return {'mean': mean, 'std': std, 'ci95': list(interval) if interval else None,
            'n': len(present), 'of': len(values)}


def first_reach(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first step after 0 at which ``values`` reach ``target``; None if none does.

    Step 0 is left out: a run reaches a target by training, and the speed-ups divide by
    the step found.

    Args:
        steps (Sequence[int]): Checkpoints, increasing, starting at 0.
        values (Sequence[float]): The measure at each.
        target (float): The level to reach.

    Returns:
        int | None: The checkpoint.
    """
    steps_a, values_a = np.asarray(steps), np.asarray(values, dtype=np.float64)
    hits = np.flatnonzero((values_a >= target) & (steps_a > 0))
    return int(steps_a[hits[0]]) if hits.size else None


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` against ``x`` (0 with fewer than two points)."""
    if len(x) < 2 or len(set(x)) < 2:
        return 0.0
    return float(stats.linregress(x, y).slope)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x``, over the points with ``y > 0``.

    Returns:
        float | None: The exponent ``k`` of ``y ~ x^k``; None with fewer than two points.
    """
    points = [(a, b) for a, b in zip(x, y, strict=True) if b > 0]
    if len({a for a, _ in points}) < 2:
        return None
    logs = np.log(np.asarray(points, dtype=np.float64))
    return float(stats.linregress(logs[:, 0], logs[:, 1]).slope)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties share their mean rank)."""
    return float(stats.spearmanr(a, b).statistic)

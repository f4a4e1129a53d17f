"""Per-batch telemetry of the data path: timings, throughputs, scores, memory.

Each batch the loader hands over gets a plain dict of metrics (``loader.metrics``)
that a user can log anywhere; the same dict goes to the ``jest_stream`` logger
at DEBUG level, and running totals are kept for a summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil
import torch
from torch import Tensor

__all__ = ['LoaderTelemetry', 'score_statistics', 'logger']

logger = logging.getLogger('jest_stream')

_TIMINGS = ('wait_s', 'transfer_s', 'score_s', 'select_s')


def score_statistics(scores: Tensor | None, selected: Tensor) -> dict[str, float]:
    """Mean, spread and range of the selected scores, and the mean over all candidates.

    Args:
        scores (Tensor[B] | None): Each candidate's own score (None when nothing was scored).
        selected (LongTensor[b]): Indices of the selected candidates.

    Returns:
        dict: ``score_selected_mean/std/min/max`` and ``score_all_mean`` (empty without scores).
    """
    if scores is None:
        return {}
    scores = scores.detach().float().cpu()
    chosen = scores[selected]
    return {
        'score_selected_mean': float(chosen.mean()),
        'score_selected_std': float(chosen.std()) if len(chosen) > 1 else 0.0,
        'score_selected_min': float(chosen.min()),
        'score_selected_max': float(chosen.max()),
        'score_all_mean': float(scores.mean()),
    }


class LoaderTelemetry:
    """Collects one metrics dict per batch and running totals."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._last_handover: float | None = None
        self.metrics: dict[str, Any] = {}
        self.totals: dict[str, float] = {k: 0.0 for k in (*_TIMINGS, 'drawn', 'yielded',
                                                          'dropped', 'batches')}

    def start_epoch(self) -> None:
        """Forget the time of the last hand-over, so a pause between epochs is not counted."""
        self._last_handover = None

    def record(self, *, epoch: int, index: int, drawn: int, yielded: int, timings: dict[str, float],
               scores: Tensor | None, selected: Tensor, extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """Metrics of one handed-over batch; also logged at DEBUG level."""
        now = time.perf_counter()
        interval = None if self._last_handover is None else now - self._last_handover
        self._last_handover = now
        metrics: dict[str, Any] = {'epoch': epoch, 'super_batch': index, 'drawn': drawn,
                                   'yielded': yielded}
        metrics.update({k: timings.get(k, 0.0) for k in _TIMINGS})
        if interval:
            metrics['drawn_per_s'] = drawn / interval
            metrics['yielded_per_s'] = yielded / interval
        metrics.update(score_statistics(scores, selected))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics['device_allocated_bytes'] = torch.cuda.memory_allocated()
        metrics['host_rss_bytes'] = self._process.memory_info().rss
        if extra:
            metrics.update(extra)
        for key in _TIMINGS:
            self.totals[key] += metrics[key]
        self.totals['drawn'] += drawn
        self.totals['yielded'] += yielded
        self.totals['batches'] += 1
        self.metrics = metrics
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug('batch %s', metrics)
        return metrics

    def record_dropped(self, *, epoch: int, index: int, n: int, batch_size: int) -> None:
        """A partial last super-batch too small to fill a sub-batch."""
        self.totals['dropped'] += n
        logger.info('epoch %d: last super-batch %d has %d samples, fewer than batch_size=%d; '
                    'dropped', epoch, index, n, batch_size)

    def summary(self) -> dict[str, float]:
        """Totals so far, with mean seconds per batch for each stage."""
        out = dict(self.totals)
        batches = max(self.totals['batches'], 1.0)
        for key in _TIMINGS:
            out[f'mean_{key}'] = self.totals[key] / batches
        return out

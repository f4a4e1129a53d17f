"""Per-batch telemetry of the data path: timings, throughputs, scores, memory.

Each batch the loader hands over gets a plain dict of metrics (``loader.metrics``)
that a user can log anywhere; the same dict goes to this module's logger
(``jest_stream.telemetry``) at DEBUG level, and running totals are kept for a summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil
import torch
from torch import Tensor

from jest_stream.step import StepResult

__all__ = ['LoaderTelemetry', 'score_statistics', 'logger']

logger = logging.getLogger(__name__)

_TIMINGS = ('wait_s', 'transfer_s', 'score_s', 'select_s')
# Per-batch numbers that add up over a run.
_SUMMED = ('score_flops', 'rescored', 'comm_bytes', 'comm_s')


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
    """Collects one metrics dict per batch and running totals.

    ``record`` is the step's recorder (:class:`~jest_stream.step.SelectionStep`'s
    ``record``): every path hands it a :class:`~jest_stream.step.StepResult`.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._last_handover: float | None = None
        self.metrics: dict[str, Any] = {}
        self.totals: dict[str, float] = {k: 0.0 for k in (*_TIMINGS, *_SUMMED, 'drawn',
                                                          'yielded', 'dropped', 'batches')}

    def start_epoch(self) -> None:
        """Forget the time of the last hand-over, so a pause between epochs is not counted.

        Rates of the first batch of an epoch are measured from the start of the epoch."""
        self._last_handover = time.perf_counter()

    def record(self, result: StepResult) -> dict[str, Any]:
        """Metrics of one handed-over batch; also logged at DEBUG level."""
        now = time.perf_counter()
        interval = None if self._last_handover is None else now - self._last_handover
        self._last_handover = now
        selection = result.selection
        metrics: dict[str, Any] = {'epoch': result.epoch, 'super_batch': result.index,
                                   'drawn': result.drawn, 'yielded': result.yielded}
        metrics.update({k: result.timings.get(k, 0.0) for k in _TIMINGS})
        if interval:
            metrics['drawn_per_s'] = result.drawn / interval
            metrics['yielded_per_s'] = result.yielded / interval
        metrics.update(score_statistics(selection.scores, selection.selected))
        metrics.update(selection.policy)
        if selection.score_flops is not None:
            metrics['score_flops'] = selection.score_flops
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics['device_allocated_bytes'] = torch.cuda.memory_allocated()
        metrics['host_rss_bytes'] = self._process.memory_info().rss
        metrics.update(result.extra)
        for key in (*_TIMINGS, *_SUMMED):
            self.totals[key] += float(metrics.get(key, 0.0))
        self.totals['drawn'] += result.drawn
        self.totals['yielded'] += result.yielded
        self.totals['batches'] += 1
        self.metrics = metrics
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug('batch %s', metrics)
        return metrics

    def record_dropped(self, *, epoch: int, index: int, n: int, batch_size: int) -> None:
        """A short last super-batch, dropped (fewer rows than a sub-batch)."""
        self.totals['dropped'] += n
        logger.info('epoch %d: last super-batch %d has %d samples, fewer than batch_size=%d; '
                    'dropped (drop_last=True)', epoch, index, n, batch_size)

    def summary(self) -> dict[str, float]:
        """Totals so far, with mean seconds per batch for each stage."""
        out = dict(self.totals)
        batches = max(self.totals['batches'], 1.0)
        for key in _TIMINGS:
            out[f'mean_{key}'] = self.totals[key] / batches
        return out

"""One super-batch scored and selected: the step shared by every scoring mode.

``score_and_select`` is what the inline mode runs in the trainer process and the
scorer process runs in its own; both derive the generator from the batch's
position, so they select the same examples from the same scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from jest_stream.batch import Batch
from jest_stream.criteria import Criterion, get_criterion
from jest_stream.randomness import SELECTION, derive_generator
from jest_stream.scores import get_selection_method, select
from jest_stream.scoring import as_batch_scores

__all__ = ['SelectionConfig', 'SelectionResult', 'check_filter_ratio', 'resolve_selection',
           'score_and_select']


def check_filter_ratio(filter_ratio: float) -> None:
    """Raises unless ``filter_ratio``, the fraction of each super-batch left out, is in [0, 1)."""
    if isinstance(filter_ratio, bool) or not isinstance(filter_ratio, (int, float)) \
            or not 0.0 <= filter_ratio < 1.0:
        raise ValueError(
            f'filter_ratio={filter_ratio!r} must be in [0, 1): it is the fraction of each '
            f'super-batch left out (0.8 keeps 1 in 5); 1.0 would keep nothing')


def resolve_selection(criterion: str | Criterion, method: str | None) -> tuple[Criterion, str]:
    """The criterion, and the selection method (``None``: joint for a scoring criterion,
    uniform otherwise); raises for unknown names and for uniform mixed with scoring."""
    crit = get_criterion(criterion)
    if method is None:
        method = 'joint' if crit.scores else 'uniform'
    get_selection_method(method)
    if (method == 'uniform') != (not crit.scores):
        raise ValueError(
            f'criterion={crit.name!r} with method={method!r}: uniform selection scores '
            f'nothing, so use criterion="uniform" with method="uniform" (or method=None)')
    return crit, method



@dataclass(frozen=True)
class SelectionConfig:
    """The selection settings of a loader (plain values, so it crosses process boundaries)."""

    criterion: Criterion
    method: str
    batch_size: int
    n_chunks: int
    temperature: float
    seed: int
    count_flops: bool = False


@dataclass
class SelectionResult:
    """Indices chosen from one super-batch and what telemetry wants to know about them.

    Attributes:
        selected (LongTensor[b]): Rows of the super-batch to keep, in selection order (CPU).
        self_scores (Tensor[B] | None): Each candidate's own score (CPU), None for uniform.
        score_s (float): Seconds spent scoring.
        select_s (float): Seconds spent selecting.
        score_flops (int | None): FLOPs of the scoring forward passes, when counted.
    """

    selected: Tensor
    self_scores: Tensor | None
    score_s: float
    select_s: float
    score_flops: int | None = None


def score_and_select(config: SelectionConfig, scorer, batch: Batch, sample_ids: Tensor,
                     epoch: int, index: int) -> SelectionResult:
    """Score super-batch ``index`` of ``epoch`` and select ``config.batch_size`` rows of it.

    Args:
        config (SelectionConfig): Criterion, method and sizes.
        scorer (Scorer | None): Scores the batch; unused for the uniform criterion.
        batch (Batch): The super-batch of ``B`` examples, on the scoring device.
        sample_ids (LongTensor[B]): Global sample ids (named in errors).
        epoch (int): Epoch of the super-batch.
        index (int): Its position in the epoch; with ``epoch`` and the seed it fixes the
            generator.

    Returns:
        SelectionResult: The selected rows and statistics.
    """
    n = int(sample_ids.shape[0])
    generator = derive_generator(config.seed, SELECTION, epoch, index)
    start = time.perf_counter()
    scores = None
    score_flops = None
    if config.criterion.scores:
        if config.count_flops:
            with FlopCounterMode(display=False) as counter:
                raw = scorer(batch, sample_ids, config.criterion)
            score_flops = int(counter.get_total_flops())
        else:
            raw = scorer(batch, sample_ids, config.criterion)
        scores = as_batch_scores(raw, n, sample_ids)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    selected = select(scores, n, config.batch_size, method=config.method,
                      n_chunks=config.n_chunks, temperature=config.temperature,
                      generator=generator)
    self_scores = None if scores is None else scores.self_scores().detach().float().cpu()
    select_s = time.perf_counter() - start
    return SelectionResult(selected=selected.to(torch.long), self_scores=self_scores,
                           score_s=score_s, select_s=select_s, score_flops=score_flops)

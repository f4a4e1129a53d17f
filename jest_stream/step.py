"""The per-super-batch step: score, select, gather, transform, record.

Every path runs this step and nothing else: the loader's inline scoring, the scorer
process (which runs the selecting half, :meth:`SelectionStep.choose`, in its own process
and hands the indices back for the trainer to run the rest), global selection across
ranks (which plugs in a :class:`SelectionScope` that gathers scores and rows from every
rank), and Composer's ``JESTAlgorithm``.

A super-batch's selection depends only on the configuration, the scores and a generator
derived from ``(seed, epoch, index)``, so it is the same whichever process computes it
and wherever training resumes.

Short super-batches. The last super-batch of an epoch may hold fewer than ``B`` rows.
With ``n >= b`` rows the step selects ``b`` of them (a lower filter ratio for that one
batch). With ``n < b`` there is nothing to choose: the step keeps all ``n`` rows, unscored,
and marks the result ``short``. The loader then drops it by default, as a ``DataLoader``
with ``drop_last=True`` does (``drop_last=False`` hands it over whole); ``JESTAlgorithm``
trains it whole, because Composer has already counted it when the algorithm sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from jest_stream.batch import Batch, batch_length, gather
from jest_stream.config import SelectionConfig
from jest_stream.errors import SettingError
from jest_stream.randomness import SELECTION, derive_generator
from jest_stream.scores import PerExampleScores
from jest_stream.scoring.checks import as_batch_scores
from jest_stream.selection import BatchScores, select, uniform_select

__all__ = ['Selection', 'StepResult', 'SelectionScope', 'LocalScope', 'SelectionStep',
           'score_super_batch']


@dataclass
class Selection:
    """The selecting half of a step: which candidates were chosen, and what it cost.

    Attributes:
        selected (LongTensor[k]): Chosen candidates, in selection order, on the CPU
            (``k = b``, or ``world_size x b`` with global scope, or ``n`` when ``short``).
        scores (Tensor[n] | None): Every candidate's own score (CPU, float32), None when
            nothing was scored.
        n_candidates (int): Candidates selection chose from (all ranks' with global scope).
        score_s (float): Seconds spent scoring.
        select_s (float): Seconds spent selecting (collectives of global scope included).
        score_flops (int | None): FLOPs of the scoring pass, when counted.
        short (bool): The super-batch had fewer than ``b`` rows: all of them are kept.
        extra (dict): Numbers a scope adds (``comm_bytes``, ``comm_s``).
    """

    selected: Tensor
    scores: Tensor | None
    n_candidates: int
    score_s: float = 0.0
    select_s: float = 0.0
    score_flops: int | None = None
    short: bool = False
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class StepResult:
    """One super-batch's step, as telemetry and loggers see it.

    Attributes:
        epoch (int): Epoch of the super-batch.
        index (int): Its position in the epoch.
        drawn (int): Rows of this rank's super-batch.
        yielded (int): Rows handed to the trainer (0 when a short batch is dropped).
        selection (Selection): The selecting half's result.
        timings (dict[str, float]): Seconds: ``wait_s`` (waiting for data), ``transfer_s``
            (device copy), ``score_s``, ``select_s`` (selection, gather and transform).
        extra (dict[str, float]): Path-specific numbers (staleness, communication...).
    """

    epoch: int
    index: int
    drawn: int
    yielded: int
    selection: Selection
    timings: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)


class SelectionScope(Protocol):
    """Where selection looks: this rank's super-batch, or every rank's (global scope).

    ``candidates`` turns this rank's scores into the candidates selection chooses from and
    says how many to choose; ``rows`` turns the chosen candidates into this rank's sub-batch.
    """

    def candidates(self, scores: BatchScores | None, sample_ids: Tensor, batch_size: int
                   ) -> tuple[BatchScores | None, int, int]:
        """``(scores of the candidates, number of candidates, number to select)``."""

    def rows(self, batch: Batch, sample_ids: Tensor, selected: Tensor, batch_size: int
             ) -> Batch:
        """This rank's sub-batch of ``batch_size`` rows."""

    def stats(self) -> dict[str, float]:
        """Numbers to report for the last step (bytes and seconds of communication)."""


class LocalScope:
    """Selection within this rank's super-batch: no communication."""

    def candidates(self, scores: BatchScores | None, sample_ids: Tensor, batch_size: int
                   ) -> tuple[BatchScores | None, int, int]:
        return scores, int(sample_ids.shape[0]), batch_size

    def rows(self, batch: Batch, sample_ids: Tensor, selected: Tensor, batch_size: int
             ) -> Batch:
        return gather(batch, selected)

    def stats(self) -> dict[str, float]:
        return {}


def score_super_batch(config: SelectionConfig, scorer: Any, batch: Batch, sample_ids: Tensor
                      ) -> tuple[BatchScores | None, int | None]:
    """Score a super-batch, checking what the scorer returns.

    Args:
        config (SelectionConfig): Criterion and whether to count FLOPs.
        scorer (Scorer | None): ``scorer(batch, sample_ids, criterion)``; unused when the
            criterion scores nothing.
        batch (Batch): The super-batch of ``n`` rows, on the scoring device.
        sample_ids (LongTensor[n]): Their global ids (named in errors).

    Returns:
        tuple: The scores (None for ``uniform``) and the FLOPs of the pass (None unless
        counted).

    Raises:
        ScoreError: The scorer returned the wrong shape or dtype, NaN or inf.
    """
    if not config.criterion.scores:
        return None, None
    n = int(sample_ids.shape[0])
    if not config.count_flops:
        return as_batch_scores(scorer(batch, sample_ids, config.criterion), n, sample_ids), None
    with FlopCounterMode(display=False) as counter:
        raw = scorer(batch, sample_ids, config.criterion)
    return as_batch_scores(raw, n, sample_ids), int(counter.get_total_flops())


class SelectionStep:
    """Score a super-batch, select its sub-batch, gather it, transform it and record it.

    Args:
        config (SelectionConfig): A sized configuration (``b`` and ``B`` known).
        scorer (Scorer | None): Scores super-batches; None only for the uniform criterion.
        scope (SelectionScope, optional): :class:`LocalScope` by default;
            :class:`jest_stream.distributed.GlobalScope` selects across ranks.
        batch_transform (Callable, optional): Applied to each selected sub-batch on the
            device (e.g. a mixed-resolution split).
        record (Callable, optional): ``record(StepResult)``, called once per super-batch that
            is handed over (telemetry, a logger).

    Raises:
        SettingError: ``config`` is not sized, or a scoring criterion has no scorer.
    """

    def __init__(self, config: SelectionConfig, scorer: Any = None, *,
                 scope: SelectionScope | None = None,
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 record: Callable[[StepResult], None] | None = None) -> None:
        if not config.sized:
            raise SettingError('the selection step needs the sub-batch and super-batch sizes; '
                               'size the configuration first (with_super_batch_size)')
        if config.criterion.scores and (scorer is None or not callable(scorer)):
            raise SettingError(f'criterion={config.criterion.name!r} needs a scorer, e.g. '
                               f'jest_stream.ClassificationScorer(model, reference)')
        self.config = config
        self.scorer = scorer
        self.scope = scope if scope is not None else LocalScope()
        self.batch_transform = batch_transform
        self.record = record

    # The selecting half (the scorer process runs this one)

    def choose(self, batch: Batch, sample_ids: Tensor, epoch: int, index: int) -> Selection:
        """Score super-batch ``index`` of ``epoch`` and choose its sub-batch.

        Args:
            batch (Batch): The super-batch of ``n`` rows, on the scoring device.
            sample_ids (LongTensor[n]): Its global sample ids.
            epoch (int): Its epoch.
            index (int): Its position in the epoch; with the seed and ``epoch`` it fixes the
                selection generator.

        Returns:
            Selection: The chosen candidates and statistics.
        """
        config = self.config
        n = int(sample_ids.shape[0])
        if n < config.batch_size:
            return Selection(selected=torch.arange(n), scores=None, n_candidates=n, short=True)
        start = time.perf_counter()
        scores, flops = score_super_batch(config, self.scorer, batch, sample_ids)
        score_s = time.perf_counter() - start
        start = time.perf_counter()
        candidates, n_candidates, n_select = self.scope.candidates(scores, sample_ids,
                                                                   config.batch_size)
        selected = self._select(candidates, n_candidates, n_select,
                                derive_generator(config.seed, SELECTION, epoch, index))
        self_scores = None if candidates is None \
            else candidates.self_scores().detach().float().cpu()
        return Selection(selected=selected.to(torch.long), scores=self_scores,
                         n_candidates=n_candidates, score_s=score_s,
                         select_s=time.perf_counter() - start, score_flops=flops)

    def _select(self, scores: BatchScores | None, n_candidates: int, n_select: int,
                generator: torch.Generator) -> Tensor:
        """Select ``n_select`` of the candidates; excluded candidates (no loss to score) are
        never preferred: they fill in, uniformly, only when too few others remain."""
        config = self.config
        excluded = scores.excluded if isinstance(scores, PerExampleScores) else None
        if excluded is None or not bool(excluded.any()):
            return select(scores, n_candidates, n_select, method=config.method,
                          n_chunks=config.n_chunks, temperature=config.temperature,
                          generator=generator)
        excluded = excluded.cpu()
        keep = (~excluded).nonzero().flatten()
        if len(keep) >= n_select:
            eligible = scores.map_rows(lambda rows: rows[keep.to(rows.device)])
            chosen = select(eligible, len(keep), n_select, method=config.method,
                            n_chunks=config.n_chunks, temperature=config.temperature,
                            generator=generator)
            return keep[chosen]
        rest = excluded.nonzero().flatten()
        fill = rest[uniform_select(len(rest), n_select - len(keep), generator=generator)]
        return torch.cat([keep, fill])

    # The handing-over half (always in the trainer's process)

    def finish(self, batch: Batch, sample_ids: Tensor, selection: Selection, *, epoch: int,
               index: int, timings: dict[str, float] | None = None,
               extra: dict[str, float] | None = None) -> Batch:
        """Gather the chosen rows, transform them and record the step.

        Args:
            batch (Batch): The super-batch ``selection`` was chosen from.
            sample_ids (LongTensor[n]): Its global ids.
            selection (Selection): From :meth:`choose` (here or in the scorer process).
            epoch (int): The super-batch's epoch.
            index (int): Its position in the epoch.
            timings (dict, optional): ``wait_s`` and ``transfer_s`` of the data path.
            extra (dict, optional): Numbers the path adds to the record.

        Returns:
            Batch: The sub-batch (``b`` rows; all ``n`` of a short super-batch).
        """
        start = time.perf_counter()
        if selection.short:
            sub = batch
        else:
            sub = self.scope.rows(batch, sample_ids, selection.selected, self.config.batch_size)
        if self.batch_transform is not None:
            sub = self.batch_transform(sub)
        gather_s = time.perf_counter() - start
        if self.record is not None:
            times = {'wait_s': 0.0, 'transfer_s': 0.0, **(timings or {}),
                     'score_s': selection.score_s, 'select_s': selection.select_s + gather_s}
            self.record(StepResult(
                epoch=epoch, index=index, drawn=int(sample_ids.shape[0]),
                yielded=batch_length(sub), selection=selection, timings=times,
                extra={**selection.extra, **self.scope.stats(), **(extra or {})}))
        return sub

    def __call__(self, batch: Batch, sample_ids: Tensor, *, epoch: int, index: int,
                 timings: dict[str, float] | None = None) -> tuple[Batch, Selection]:
        """:meth:`choose`, then :meth:`finish`: the whole step in this process.

        Returns:
            tuple[Batch, Selection]: The sub-batch and the selection.
        """
        selection = self.choose(batch, sample_ids, epoch, index)
        return self.finish(batch, sample_ids, selection, epoch=epoch, index=index,
                           timings=timings), selection

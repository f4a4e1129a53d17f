"""The per-super-batch step: score, apply the policy, select, gather, transform, record.

Every path runs this step and nothing else: the loader's inline scoring, the scorer
process (which runs the selecting half, :meth:`SelectionStep.choose`, in its own process
and hands the indices back for the trainer to run the rest), global selection across
ranks (which plugs in a :class:`SelectionScope` that gathers scores and rows from every
rank), and Composer's ``JESTAlgorithm``.

A super-batch's selection depends only on the configuration, its :class:`~jest_stream.
policies.Plan`, the scores and generators derived from ``(seed, epoch, index)``, so it is
the same whichever process computes it and wherever training resumes.

One super-batch, in order:

1. the plan's pressure ``p`` picks the candidates: all ``B`` rows at ``p = 1``, else a
   uniformly random ``b / (1 - p f)`` of them (only those are scored; at ``p = 0`` none);
2. the scorer scores the candidates; global scope gathers every rank's;
3. ``b - round(mix b)`` candidates are selected by the method, then ``round(mix b)``
   uniformly from the rest, all under the plan's quota;
4. with ``weights``, each selected row gets its importance weight;
5. the trainer's process gathers the rows, adds the weights, transforms and records.

Short super-batches. The last super-batch of an epoch may hold fewer than ``B`` rows.
With ``n >= b`` rows the step selects ``b`` of them (a lower filter ratio for that one
batch). With ``n < b`` there is nothing to choose: the step keeps all ``n`` rows, unscored,
and marks the result ``short``. The loader then drops it by default, as a ``DataLoader``
with ``drop_last=True`` does (``drop_last=False`` hands it over whole); ``JESTAlgorithm``
trains it whole, because Composer has already counted it when the algorithm sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from jest_stream.batch import Batch, batch_length, flatten_columns, gather, get_column
from jest_stream.config import SelectionConfig
from jest_stream.errors import DataError, SettingError
from jest_stream.policies import Plan, Quota
from jest_stream.quotas import GroupQuota, proportional_counts, share_bounds
from jest_stream.randomness import POLICY, PROXY, SELECTION, derive_generator, derive_seed
from jest_stream.scores import PerExampleScores
from jest_stream.scoring.base import LearningScorer
from jest_stream.scoring.checks import as_batch_scores
from jest_stream.selection import (
    BatchScores,
    sample_select_with_probabilities,
    select,
    uniform_select,
)

__all__ = ['Selection', 'StepResult', 'Recorder', 'SelectionScope', 'LocalScope', 'SelectionStep',
           'score_super_batch', 'WEIGHT_KEY', 'STREAM']

#: Column of the importance weights in dict sub-batches (tuple sub-batches get a last field).
WEIGHT_KEY = 'sample_weight'
#: ``Quota(key=STREAM)`` groups samples by the stream of a ``StreamingDataset`` they came from.
STREAM = 'stream'


@dataclass
class Selection:
    """The selecting half of a step: which candidates were chosen, and what it cost.

    Attributes:
        selected (LongTensor[k]): Chosen candidates, in selection order (by score, then
            uniformly mixed), on the CPU (``k = b``, or ``world_size x b`` with global scope,
            or ``n`` when ``short``).
        scores (Tensor[N] | None): Every candidate's own score (CPU, float32), None when
            nothing was scored.
        n_candidates (int): Candidates ``N`` selection chose from (all ranks' with global
            scope).
        candidates (LongTensor[N] | None): The rows of this rank's super-batch that were
            candidates, None when all were (local scope).
        candidate_ids (LongTensor[N] | None): Global sample ids of the candidates.
        weights (Tensor[k] | None): Importance weights of the selected rows (float32).
        parts (dict[str, Tensor]): Per-candidate ``learner`` and ``reference`` losses, when
            the scorer gives them (for logs).
        policy (dict[str, float]): The plan as applied: ``pressure``, ``filter_ratio_now``,
            ``mix``, ``candidates`` and the groups' shares (``share/<group>``).
        score_s (float): Seconds spent scoring.
        select_s (float): Seconds spent selecting (collectives of global scope included).
        score_flops (int | None): FLOPs of the scoring pass, when counted.
        short (bool): The super-batch had fewer than ``b`` rows: all of them are kept.
        extra (dict): Numbers a scope adds (``comm_bytes``, ``comm_s``).
    """

    selected: Tensor
    scores: Tensor | None
    n_candidates: int
    candidates: Tensor | None = None
    candidate_ids: Tensor | None = None
    weights: Tensor | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    policy: dict[str, float] = field(default_factory=dict)
    score_s: float = 0.0
    select_s: float = 0.0
    score_flops: int | None = None
    short: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def learnability_mean(self, criterion: str) -> float | None:
        """Mean learnability (learner's loss minus the reference's) of the candidates: from
        the two losses when the scorer gave them, from the scores of the ``learnability``
        criterion otherwise; None when unknown."""
        if 'learner' in self.parts and 'reference' in self.parts:
            return float((self.parts['learner'] - self.parts['reference']).mean())
        if criterion == 'learnability' and self.scores is not None:
            return float(self.scores.mean())
        return None


@dataclass
class StepResult:
    """One super-batch's step, as telemetry and loggers see it.

    Attributes:
        epoch (int): Epoch of the super-batch.
        index (int): Its position in the epoch.
        drawn (int): Rows of this rank's super-batch.
        yielded (int): Rows handed to the trainer.
        selection (Selection): The selecting half's result.
        timings (dict[str, float]): Seconds: ``wait_s`` (waiting for data), ``transfer_s``
            (device copy), ``score_s``, ``select_s`` (selection, gather and transform).
        extra (dict[str, float]): Path-specific numbers (staleness, communication...).
        sample_ids (LongTensor[n] | None): This rank's super-batch's sample ids.
        batch (Batch | None): This rank's super-batch, for recorders that read columns of
            it (labels, groups); valid during the ``record`` call only.
    """

    epoch: int
    index: int
    drawn: int
    yielded: int
    selection: Selection
    timings: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    sample_ids: Tensor | None = None
    batch: Any = None


class Recorder(Protocol):
    """Something that keeps a record of every step handed over, and whose record must
    follow the loader's position exactly (a selection log): it is flushed when the
    position is saved, and cut back to it on resume."""

    def record(self, result: StepResult) -> None:
        """One super-batch handed over (``result.batch`` is valid during the call only)."""

    def state_dict(self) -> dict[str, Any]:
        """What must be saved with the loader's position (after everything is durable)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position: records made after it are dropped."""

    def close(self) -> None:
        """Flush and release files."""


class SelectionScope(Protocol):
    """Where selection looks: this rank's super-batch, or every rank's (global scope).

    ``candidates`` turns this rank's scores into the candidates selection chooses from and
    says how many to choose; ``align`` puts any other per-candidate tensor in the same
    order; ``rows`` turns the chosen candidates into this rank's sub-batch, and ``share``
    says which of the chosen this rank trains.
    """

    def candidates(self, scores: BatchScores | None, sample_ids: Tensor, batch_size: int
                   ) -> tuple[BatchScores | None, int, int]:
        """``(scores of the candidates, number of candidates, number to select)``."""

    def align(self, values: Tensor) -> Tensor:
        """A per-candidate tensor of this rank, in the order of the candidates."""

    def rows(self, batch: Batch, sample_ids: Tensor, selection: Selection, batch_size: int
             ) -> Batch:
        """This rank's sub-batch of ``batch_size`` rows."""

    def share(self, batch_size: int) -> slice:
        """The part of ``selection.selected`` this rank trains."""

    def stats(self) -> dict[str, float]:
        """Numbers to report for the last step (bytes and seconds of communication)."""


class LocalScope:
    """Selection within this rank's super-batch: no communication."""

    def candidates(self, scores: BatchScores | None, sample_ids: Tensor, batch_size: int
                   ) -> tuple[BatchScores | None, int, int]:
        return scores, int(sample_ids.shape[0]), batch_size

    def align(self, values: Tensor) -> Tensor:
        return values

    def rows(self, batch: Batch, sample_ids: Tensor, selection: Selection, batch_size: int
             ) -> Batch:
        rows = selection.selected if selection.candidates is None \
            else selection.candidates[selection.selected]
        return gather(batch, rows)

    def share(self, batch_size: int) -> slice:
        return slice(0, batch_size)

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
    counter = FlopCounterMode(display=False) if config.count_flops else nullcontext()
    with counter, _autocast(config.autocast, batch):
        raw = scorer(batch, sample_ids, config.criterion)
    flops = int(counter.get_total_flops()) if config.count_flops else None
    return as_batch_scores(raw, n, sample_ids), flops


def _autocast(dtype: torch.dtype | None, batch: Batch) -> Any:
    """``torch.autocast`` on the device of the batch's tensors, or nothing."""
    if dtype is None:
        return nullcontext()
    devices = [c.device.type for c in flatten_columns(batch)[0] if isinstance(c, Tensor)]
    return torch.autocast(devices[0] if devices else 'cpu', dtype=dtype)


def _groups(batch: Batch, sample_ids: Tensor, quota: Quota,
            stream_offsets: tuple[int, ...] | None) -> Tensor:
    """The group of every row: a column of the batch, or the stream of each sample id."""
    if quota.key == STREAM and stream_offsets is not None:
        ids = sample_ids.cpu().numpy()
        return torch.from_numpy(np.searchsorted(np.asarray(stream_offsets), ids,
                                                side='right') - 1)
    groups = torch.as_tensor(get_column(batch, quota.key, setting='Quota(key=...)'))
    if groups.dim() != 1 or groups.is_floating_point() or groups.dtype == torch.bool:
        raise DataError(f'the quota column {quota.key!r} must hold one integer group per '
                        f'sample, got {groups.dtype} of shape {tuple(groups.shape)}')
    return groups.long().cpu()


def _constraint(quota: Quota | None, groups: Tensor | None, n_select: int
                ) -> GroupQuota | None:
    if quota is None:
        return None
    if quota.proportional:
        counts = proportional_counts(groups, n_select)
        return GroupQuota(groups, n_select, low=dict(counts), high=dict(counts))
    low, high = share_bounds(groups, n_select, min_share=quota.min_share,
                             max_share=quota.max_share)
    return GroupQuota(groups, n_select, low=low, high=high)


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
            is handed over (telemetry, a logger, a selection log).
        stream_offsets (tuple[int, ...], optional): First sample id of every stream, for
            quotas per stream (``Quota(key='stream')``).

    Raises:
        SettingError: ``config`` is not sized, or a scoring criterion has no scorer.
    """

    def __init__(self, config: SelectionConfig, scorer: Any = None, *,
                 scope: SelectionScope | None = None,
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 record: Callable[[StepResult], None] | None = None,
                 stream_offsets: tuple[int, ...] | None = None) -> None:
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
        self.stream_offsets = stream_offsets

    # The selecting half (the scorer process runs this one)

    def _candidate_count(self, n: int, plan: Plan) -> int:
        """Candidates at the plan's pressure: ``b / (1 - p f)``, between ``b`` and ``n``."""
        b = self.config.batch_size
        ratio = plan.pressure * self.config.filter_ratio
        return min(n, max(b, round(b / (1.0 - ratio))))

    def choose(self, batch: Batch, sample_ids: Tensor, epoch: int, index: int,
               plan: Plan | None = None) -> Selection:
        """Score super-batch ``index`` of ``epoch`` and choose its sub-batch.

        Args:
            batch (Batch): The super-batch of ``n`` rows, on the scoring device.
            sample_ids (LongTensor[n]): Its global sample ids.
            epoch (int): Its epoch.
            index (int): Its position in the epoch; with the seed and ``epoch`` it fixes the
                generators of selection and of the policy.
            plan (Plan, optional): The policy's plan; full pressure, nothing else, when None.

        Returns:
            Selection: The chosen candidates and statistics.
        """
        config, plan = self.config, plan if plan is not None else Plan()
        n = int(sample_ids.shape[0])
        if n < config.batch_size:
            return Selection(selected=torch.arange(n), scores=None, n_candidates=n, short=True)
        policy_generator = derive_generator(config.seed, POLICY, epoch, index)
        count = self._candidate_count(n, plan)
        rows = None
        if count < n:
            rows = uniform_select(n, count, generator=policy_generator).sort().values
            batch, sample_ids = gather(batch, rows), sample_ids[rows]
        start = time.perf_counter()
        scores, flops = (None, None) if count == config.batch_size \
            else score_super_batch(config, self.scorer, batch, sample_ids)
        score_s = time.perf_counter() - start
        start = time.perf_counter()
        candidates, n_candidates, n_select = self.scope.candidates(scores, sample_ids,
                                                                   config.batch_size)
        groups = None if plan.quota is None else self.scope.align(
            _groups(batch, sample_ids, plan.quota, self.stream_offsets))
        selected, probabilities, constraint = self._choose_rows(
            candidates, n_candidates, n_select, plan, groups,
            derive_generator(config.seed, SELECTION, epoch, index), policy_generator)
        select_s = time.perf_counter() - start
        learn_s, proxy_flops = self._learn(batch, sample_ids, selected,
                                           derive_seed(config.seed, PROXY, epoch, index))
        selection = Selection(
            selected=selected.to(torch.long), scores=None, n_candidates=n_candidates,
            candidates=rows, candidate_ids=self.scope.align(sample_ids),
            score_s=score_s + learn_s, select_s=select_s,
            score_flops=flops if proxy_flops is None else (flops or 0) + proxy_flops,
            extra={} if proxy_flops is None else {'proxy_flops': proxy_flops},
            weights=None if probabilities is None
            else (1.0 / (n_candidates * probabilities)).float())
        self._describe(selection, candidates, plan, n_select, constraint)
        return selection

    def _learn(self, batch: Batch, sample_ids: Tensor, selected: Tensor, seed: int
               ) -> tuple[float, int | None]:
        """A scorer with a model of its own (a proxy learner) learns from what it selected,
        where it scores; the seconds it took and its FLOPs (when counted)."""
        if not isinstance(self.scorer, LearningScorer) or not self.config.criterion.scores:
            return 0.0, None
        start = time.perf_counter()
        flops = self.scorer.learn(batch, sample_ids, selected,
                                  count_flops=self.config.count_flops, seed=seed)
        return time.perf_counter() - start, flops

    def _choose_rows(self, scores: BatchScores | None, n_candidates: int, n_select: int,
                     plan: Plan, groups: Tensor | None, generator: torch.Generator,
                     policy_generator: torch.Generator
                     ) -> tuple[Tensor, Tensor | None, GroupQuota | None]:
        """The ``n_select`` candidates of the sub-batch, their inclusion probabilities (with
        weights) and the quota they were picked under.

        Excluded candidates (no loss to score) are never preferred: selection, uniform mixing
        and quotas run over the others, and the excluded fill in, uniformly and outside any
        quota, only when fewer than ``n_select`` others remain.
        """
        excluded = scores.excluded if isinstance(scores, PerExampleScores) else None
        keep = None
        if excluded is not None and bool(excluded.any()):
            excluded = excluded.cpu()
            keep = (~excluded).nonzero().flatten()
            if len(keep) < n_select:
                rest = excluded.nonzero().flatten()
                fill = rest[uniform_select(len(rest), n_select - len(keep), generator=generator)]
                chance = torch.cat([torch.ones(len(keep), dtype=torch.float64),
                                    torch.full((len(fill),), len(fill) / len(rest),
                                               dtype=torch.float64)])
                return torch.cat([keep, fill]), chance if plan.weights else None, None
            scores = scores.map_rows(lambda rows: rows[keep.to(rows.device)])
            groups = None if groups is None else groups[keep]
        n = n_candidates if keep is None else len(keep)
        constraint = _constraint(plan.quota, groups, n_select)
        n_mixed = round(plan.mix * n_select)
        selected, probabilities = self._select(scores, n, n_select - n_mixed, constraint,
                                               plan.weights, generator)
        if n_mixed:
            selected = torch.cat([selected, self._mix(n, selected, n_mixed, constraint,
                                                      policy_generator)])
        return (selected if keep is None else keep[selected]), probabilities, constraint

    def _select(self, scores: BatchScores | None, n_candidates: int, n_select: int,
                constraint: GroupQuota | None, weights: bool, generator: torch.Generator
                ) -> tuple[Tensor, Tensor | None]:
        """Select ``n_select`` of the candidates (and their inclusion probabilities when
        weights are asked)."""
        config = self.config
        if scores is None:
            chosen = uniform_select(n_candidates, n_select, generator=generator,
                                    constraint=constraint)
            share = torch.full((n_select,), n_select / n_candidates, dtype=torch.float64)
            return chosen, share if weights else None
        if weights:
            return sample_select_with_probabilities(
                scores.per_example(), n_select, temperature=config.temperature,
                generator=generator)
        return select(scores, n_candidates, n_select, method=config.method,
                      n_chunks=config.n_chunks, temperature=config.temperature,
                      generator=generator, constraint=constraint), None

    @staticmethod
    def _mix(n_candidates: int, selected: Tensor, n_mixed: int,
             constraint: GroupQuota | None, generator: torch.Generator) -> Tensor:
        """``n_mixed`` more candidates, uniformly from those not selected."""
        keys = torch.rand(n_candidates, generator=generator, dtype=torch.float64)
        keys[selected] = -torch.inf
        if constraint is not None:
            return constraint.pick(keys, n_mixed)
        return torch.topk(keys, n_mixed).indices

    @staticmethod
    def _describe(selection: Selection, scores: BatchScores | None, plan: Plan, n_select: int,
                  constraint: GroupQuota | None) -> None:
        if scores is not None:
            selection.scores = scores.self_scores().detach().float().cpu()
            if isinstance(scores, PerExampleScores):
                selection.parts = {name: part.detach().float().cpu() for name, part in
                                   (('learner', scores.learner),
                                    ('reference', scores.reference)) if part is not None}
        selection.policy = {'pressure': plan.pressure, 'mix': plan.mix,
                            'candidates': float(selection.n_candidates),
                            'filter_ratio_now': 1.0 - n_select / selection.n_candidates}
        if constraint is not None:
            selection.policy.update({f'share/{g}': s for g, s in constraint.shares().items()})
            selection.policy['quota_relaxed'] = float(constraint.relaxed)
        elif plan.quota is not None:  # too few rows with a loss to pick under the quota
            selection.policy['quota_relaxed'] = 1.0

    # The handing-over half (always in the trainer's process)

    def finish(self, batch: Batch, sample_ids: Tensor, selection: Selection, *, epoch: int,
               index: int, timings: dict[str, float] | None = None,
               extra: dict[str, float] | None = None) -> Batch:
        """Gather the chosen rows, add their weights, transform them and record the step.

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
        b = self.config.batch_size
        if selection.short:
            sub = batch
        else:
            sub = self.scope.rows(batch, sample_ids, selection, b)
            if selection.weights is not None:
                sub = _with_weights(sub, selection.weights[self.scope.share(b)])
        if self.batch_transform is not None:
            sub = self.batch_transform(sub)
        gather_s = time.perf_counter() - start
        if self.record is not None:
            times = {'wait_s': 0.0, 'transfer_s': 0.0, **(timings or {}),
                     'score_s': selection.score_s, 'select_s': selection.select_s + gather_s}
            self.record(StepResult(
                epoch=epoch, index=index, drawn=int(sample_ids.shape[0]),
                yielded=batch_length(sub), selection=selection, timings=times,
                extra={**selection.extra, **self.scope.stats(), **(extra or {})},
                sample_ids=sample_ids, batch=batch))
        return sub

    def __call__(self, batch: Batch, sample_ids: Tensor, *, epoch: int, index: int,
                 plan: Plan | None = None, timings: dict[str, float] | None = None
                 ) -> tuple[Batch, Selection]:
        """:meth:`choose`, then :meth:`finish`: the whole step in this process.

        Returns:
            tuple[Batch, Selection]: The sub-batch and the selection.
        """
        selection = self.choose(batch, sample_ids, epoch, index, plan)
        return self.finish(batch, sample_ids, selection, epoch=epoch, index=index,
                           timings=timings), selection


def _with_weights(sub: Batch, weights: Tensor) -> Batch:
    """The sub-batch with a weight per row: a ``sample_weight`` column of a dict, the last
    field of a tuple or list."""
    if isinstance(sub, Mapping):
        if WEIGHT_KEY in sub:
            raise DataError(f'the batch already has a column {WEIGHT_KEY!r}; rename it to get '
                            f'importance weights')
        return {**sub, WEIGHT_KEY: weights}
    if isinstance(sub, (tuple, list)) and not hasattr(type(sub), '_fields'):
        return [*sub, weights]
    raise DataError(f'importance weights need dict or tuple batches, got '
                    f'{type(sub).__name__}')

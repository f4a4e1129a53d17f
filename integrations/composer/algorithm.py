"""``JESTAlgorithm``: JEST selection inside a Composer ``Trainer``.

The train dataloader is a plain ``DataLoader`` that reads super-batches of ``B``; at
``Event.AFTER_DATALOADER`` the algorithm runs the one selection step of
:mod:`jest_stream.step` on ``state.batch`` with ``state.model`` as the learner and replaces
``state.batch`` with the selected sub-batch. Composer counts the batch before that event,
so samples are counted raw and Composer's own dataset checkpoint resumes the data exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch import Tensor, nn

from jest_stream.batch import Batch, batch_length, check_key, read_sample_ids
from jest_stream.checks import check_choice, check_int, check_number
from jest_stream.config import SelectionConfig
from jest_stream.criteria import Criterion
from jest_stream.distributed import gather_rank_states, own_rank_state
from jest_stream.errors import SettingError, SettingTypeError, StateError, UsageError
from jest_stream.integrations.composer.models import call_model, unwrap_model
from jest_stream.log import as_recorder
from jest_stream.losses import per_example_cross_entropy
from jest_stream.policies import Progress, Schedule, SelectionPolicy
from jest_stream.rollback import all_or_nothing
from jest_stream.scoring import ClassificationScorer, ColumnReference, ReferenceTable
from jest_stream.scoring.base import LearningScorer
from jest_stream.scoring.reference import resolve_reference
from jest_stream.step import Recorder, Selection, SelectionStep, StepResult
from jest_stream.telemetry import score_statistics

__all__ = ['JESTAlgorithm', 'OUTSIDE_WINDOW', 'STATE_VERSION']

logger = logging.getLogger(__name__)

STATE_VERSION = 1

OUTSIDE_WINDOW = ('uniform', 'first')


def _batch_parts(batch: Any) -> tuple[Any, ...]:
    """The batch object and its top-level columns, to see whether anything replaced them."""
    if isinstance(batch, Mapping):
        return (batch, *batch.values())
    if isinstance(batch, (tuple, list)):
        return (batch, *batch)
    return (batch,)


def _same_parts(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    return len(before) == len(after) and all(a is b for a, b in zip(before, after, strict=True))


class JESTAlgorithm(Algorithm):
    """Selects the most learnable sub-batch of every super-batch inside a Composer ``Trainer``.

    The train dataloader reads super-batches of ``B`` examples: a ``DataLoader`` with
    ``batch_size=B`` over a ``StreamingDataset`` built with ``batch_size=B`` (use
    :class:`~jest_stream.SampleIdStreamingDataset` so every row carries its global id). At
    ``Event.AFTER_DATALOADER`` the algorithm moves the super-batch to the device and runs
    the selection step (:class:`jest_stream.step.SelectionStep`, the step every jest_stream
    path runs): it scores the super-batch with ``state.model`` as the learner (no gradients,
    eval mode, in chunks, under the run's precision) and the reference, selects
    ``b = B * (1 - filter_ratio)`` rows and replaces ``state.batch`` with them. The settings
    are validated once, at construction, into a
    :class:`~jest_stream.config.SelectionConfig` (the one the loader builds too).

    The selection generator is derived from ``(seed, epoch, batch_in_epoch)`` of Composer's
    timestamp, so a run resumed from a Composer checkpoint selects what the uninterrupted run
    selects. The seed is the algorithm's checkpointed state.

    Composer counts each batch *before* ``AFTER_DATALOADER``: samples, tokens and throughput
    are raw (``B`` per batch), which is what the dataset's checkpoint needs. ``max_duration``
    in batches counts optimizer steps; in samples, raw samples read; in epochs, passes over
    the data. A last super-batch with fewer than ``b`` rows is trained whole (Composer has
    counted it already, so it cannot be dropped here; ``drop_last=True`` on the train
    ``DataLoader`` drops it before); one with at least ``b`` rows is selected from.

    Composer runs ``AFTER_*`` events in reverse order of its ``algorithms`` list: pass
    ``algorithm_passes=jest_first`` to the ``Trainer`` so that selection runs before any
    other algorithm touches the batch. If another algorithm replaces the batch (or one of
    its columns) before this one selects, it raises instead of selecting from altered data.

    Args:
        filter_ratio (float): Fraction of each super-batch left out, in ``[0, 1)``;
            ``B * (1 - filter_ratio)`` must be whole. Give this or ``batch_size``.
        batch_size (int): The sub-batch size ``b`` directly (at most ``B``).
        reference (nn.Module | ReferenceTable, optional): The frozen reference of the default
            scorer: a model called like the learner (``forward(model, batch)``, so usually a
            trained ``ComposerModel`` of the same kind), or stored outputs
            (:class:`~jest_stream.ColumnReference`, a reference cache). Not used with
            ``scorer_factory``. Moved to the training device at ``FIT_START``.
        scorer_factory (Callable, optional): ``scorer_factory(model) -> scorer`` builds the
            scorer at ``FIT_START`` from the ``ComposerModel`` being trained (unwrapped from
            DDP), for anything the default does not cover: a contrastive model
            (:class:`~jest_stream.ContrastiveScorer`), a cheaper low-resolution learner
            (Flexi-JEST), a recording wrapper. The scorer then does its own chunking and
            device placement of its reference.
        target_key (str | int): Column (dict batches) or field (tuple batches) of the targets
            for the default scorer's loss; 1 fits ``ComposerClassifier``'s ``(input, target)``.
        loss_fn (Callable): ``loss_fn(outputs, targets) -> Tensor[n]``, per-example losses of
            the default scorer (cross-entropy by default).
        forward (Callable): ``forward(model, batch) -> outputs`` of the default scorer;
            ``model(batch)`` by default, which is how Composer calls a ``ComposerModel``.
        criterion (str | Criterion): ``learnability`` (default), ``hard_learner``,
            ``easy_reference`` or ``uniform``.
        method (str, optional): ``joint`` (default when scoring), ``topk``, ``sample``;
            ``uniform`` goes with the uniform criterion.
        n_chunks (int): Chunks of the joint sampler.
        temperature (float): Softmax temperature of sampling; 0 is greedy.
        seed (int, optional): Seed of the selection generators; by default the trainer's
            ``seed`` (``rank_zero_seed``). Saved in checkpoints; a resumed run keeps the saved
            seed, and refuses an explicit different one.
        chunk_size (int, optional): Examples per scoring forward of the default scorer. By
            default the trainer's ``device_train_microbatch_size`` (at most ``b``): a
            forward without gradients on as many examples as one training microbatch
            cannot run out of memory where training does not. Scoring runs outside
            Composer's out-of-memory retry, so lower this if it does.
        start (float): Fraction of training (of ``max_duration``) at which selection starts.
        end (float): Fraction of training at which it stops.
        outside_window (str): What the trainer gets outside ``[start, end)``: ``uniform``
            (default; a uniformly random ``b`` of the super-batch, the baseline) or ``first``
            (its first ``b`` rows: free, and already random when the dataset shuffles).
            Either way the batch size stays ``b`` and Composer still counts ``B`` raw samples.
        id_key (str | int | None): Column (dict batches) or field (tuple batches) of the
            global sample ids, the key of reference caches and the ids named in errors. None
            for batches without ids (``ComposerClassifier``'s ``(input, target)``): rows are
            then named by their position in the super-batch, and only references that do not
            look samples up by id can be used.
        batch_transform (Callable, optional): Applied to each selected sub-batch on the
            device before training (e.g. :class:`jest_stream.flexi.MixedResolution`).
        count_flops (bool): Count the FLOPs of every scoring pass (``jest/score_flops``).
        policy (SelectionPolicy, optional): Schedules (``unit='fraction'`` of
            ``max_duration`` is available here), uniform mixing, adaptive pressure, quotas and
            importance weights (see :mod:`jest_stream.policies`). ``start``/``end`` are a
            schedule too: give one or the other.
        autocast (torch.dtype, optional): Score under ``torch.autocast`` in this dtype, inside
            the run's own precision context.
        eval_metric (str, optional): Name of an evaluation metric (``MulticlassAccuracy``)
            reported to the policy's :class:`~jest_stream.policies.AdaptivePressure`.
            Composer fires ``EVAL_END`` once per evaluator; at each, the value of the
            evaluator that just ran (``state.dataloader_label``) is reported when that
            evaluator has the metric, so with ``eval_label=None`` every evaluator that has it
            reports its own value once per evaluation (give ``eval_label`` when several
            evaluators have it and only one held-out set should steer the pressure).
        eval_label (str, optional): Label of the one evaluator whose ``eval_metric`` is
            reported; the others are ignored. Needs ``eval_metric``.
        selection_log (str | PathLike | Recorder, optional): Records every super-batch: a
            folder (a :class:`~jest_stream.log.SelectionLog` there), or a ``SelectionLog``
            built with columns of the batch to log (and ``streams=`` the dataset, to log the
            stream of each sample). Each rank writes its own files. Flushed whenever Composer
            saves a checkpoint, cut back to the checkpoint's position when a run resumes from
            it, closed at ``FIT_END``.

    A scorer that learns (a :class:`~jest_stream.ProxyScorer` built by ``scorer_factory``, or
    assigned to ``scorer`` before training) is part of the checkpointed state: its weights,
    optimizer state and update count are saved with the algorithm's and restored on resume
    (when the scorer is built after the state is loaded, as a factory's is at ``FIT_START``,
    the state waits and is applied as soon as the scorer exists). Under several ranks (DDP)
    each rank's proxy learns from that rank's sub-batches, and the checkpoint Composer writes
    from rank 0 holds every rank's state (:meth:`state_dict`).

    Raises:
        SettingError: A setting out of range, unknown or inconsistent with another.
        SettingTypeError: A setting of the wrong type (bools are not numbers).
    """

    def __init__(self, *, filter_ratio: float | None = None, batch_size: int | None = None,
                 reference: Any = None,
                 scorer_factory: Callable[[nn.Module], Any] | None = None,
                 target_key: str | int = 1,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = per_example_cross_entropy,
                 forward: Callable[[nn.Module, Batch], Tensor] = call_model,
                 criterion: str | Criterion = 'learnability', method: str | None = None,
                 n_chunks: int = 16, temperature: float = 1.0, seed: int | None = None,
                 chunk_size: int | None = None, start: float = 0.0, end: float = 1.0,
                 outside_window: str = 'uniform', id_key: str | int | None = 'sample_id',
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 count_flops: bool = False, policy: SelectionPolicy | None = None,
                 eval_metric: str | None = None, eval_label: str | None = None,
                 autocast: torch.dtype | None = None,
                 selection_log: Recorder | str | os.PathLike[str] | None = None) -> None:
        if (filter_ratio is None) == (batch_size is None):
            raise SettingError('give exactly one of filter_ratio=... or batch_size=... (the '
                               'sub-batch size)')
        self.config = SelectionConfig.create(
            batch_size=batch_size, filter_ratio=filter_ratio, criterion=criterion, method=method,
            n_chunks=n_chunks, temperature=temperature, seed=seed, count_flops=count_flops,
            autocast=autocast)
        crit = self.config.criterion
        if scorer_factory is not None and reference is not None:
            raise SettingError('give reference= to the default scorer, or build the scorer '
                               'with scorer_factory=, not both (the factory chooses its own '
                               'reference)')
        if scorer_factory is not None and not callable(scorer_factory):
            raise SettingTypeError('scorer_factory must be callable: scorer_factory(model) -> '
                                   'scorer')
        if crit.scores and scorer_factory is None:
            resolve_reference(reference, needed=crit.needs_reference)
        if chunk_size is not None:
            check_int(chunk_size, 'chunk_size', low=1)
        self.policy = _window_policy(policy, check_number(start, 'start', low=0.0, high=1.0),
                                     check_number(end, 'end', low=0.0, high=1.0))
        self.policy.check_method(self.config.method, self.config.temperature, prefetch_depth=1)
        check_choice(outside_window, 'outside_window', OUTSIDE_WINDOW)
        if eval_metric is not None and (not isinstance(eval_metric, str)
                                        or self.policy.adaptive is None):
            raise SettingError(f'eval_metric={eval_metric!r} names the evaluation metric '
                               f'reported to the policy\'s AdaptivePressure: give a metric name '
                               f'and policy=SelectionPolicy(adaptive=AdaptivePressure(...))')
        if eval_label is not None and (not isinstance(eval_label, str) or eval_metric is None):
            raise SettingError(f'eval_label={eval_label!r} names the evaluator whose eval_metric '
                               f'is reported: give an evaluator label and eval_metric=...')
        self.eval_metric = eval_metric
        self.eval_label = eval_label
        self.selection_log = as_recorder(selection_log)
        check_key(id_key, 'id_key', optional=True)
        check_key(target_key, 'target_key')
        self.reference = reference
        self.scorer_factory = scorer_factory
        self.target_key = target_key
        self.loss_fn = loss_fn
        self.forward = forward
        self.chunk_size = chunk_size
        self.batch_transform = batch_transform
        self.outside_window = outside_window
        self.id_key = id_key
        self._explicit_seed = seed
        self.scorer: Any = None
        # A learning scorer's state loaded before the scorer was built: (loaded, state).
        self._pending_scorer: tuple[bool, dict[str, Any] | None] = (False, None)
        self.batches_selected = 0
        self.batches_outside = 0
        self.samples_trained = 0
        self._step_: SelectionStep | None = None
        self._sized: SelectionConfig | None = None
        self._matched_parts: tuple[Any, ...] | None = None
        self._warned_short = False
        self._logger: Logger | None = None
        self._active = True
        self._steps_done = 0

    # Settings as attributes, for logs and tests

    @property
    def seed(self) -> int | None:
        """The seed of the selection generators (the trainer's until set or loaded)."""
        return self.config.seed

    @property
    def criterion(self) -> Criterion:
        return self.config.criterion

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def sub_batch_size(self) -> int | None:
        """``b``, known once the super-batch size is (at ``FIT_START`` or the first batch)."""
        return None if self._sized is None else self._sized.batch_size

    # Composer's hooks

    def match(self, event: Event, state: State) -> bool:
        if event == Event.AFTER_DATALOADER:
            # Composer asks every algorithm to match before it runs any: remember the batch
            # as the dataloader made it, to notice an algorithm that replaces it before us.
            self._matched_parts = _batch_parts(state.batch)
            return True
        if event == Event.EVAL_END:
            return self.eval_metric is not None
        if event == Event.FIT_END:
            return self.selection_log is not None
        return event in (Event.INIT, Event.FIT_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._take_trainer_seed(state)
        elif event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.AFTER_DATALOADER:
            self._select(state, logger)
        elif event == Event.EVAL_END:
            self._report_eval(state)
        elif event == Event.FIT_END:
            self.selection_log.close()

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the seed, counters, the policy's state, a learning scorer's
        state (a ProxyScorer's weights, optimizer and updates; None for a scorer that does not
        learn) and the selection log's position (positions in the data come from the
        timestamp). Writes every row of the selection log logged so far.

        Under several ranks, every rank's state (``{'ranks': [...]}``): Composer writes rank
        0's state alone, and the policy's, the proxy's and the selection log's are each
        rank's own. The call is then a collective
        (:func:`~jest_stream.distributed.gather_rank_states`): every rank must make it at
        once, as Composer does when it saves."""
        return gather_rank_states({
            'version': STATE_VERSION, 'seed': self.seed,
            'batches_selected': self.batches_selected,
            'batches_outside': self.batches_outside,
            'samples_trained': self.samples_trained,
            'policy': self.policy.state_dict(),
            'scorer': self._scorer_state(),
            'log': None if self.selection_log is None else self.selection_log.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, all of it or nothing; an explicit ``seed`` must match
        the saved one.

        The fields are checked first; then the policy's, the scorer's and the selection log's
        states are loaded, each checking its own, and one that refuses puts back those loaded
        before it (the log, which may cut files, goes last). A scorer built later (by
        ``scorer_factory`` at ``FIT_START``) gets its saved state as soon as it exists. Each
        rank takes its own of a state saved on several ranks.

        Raises:
            StateError: Another version, a missing or ill-typed field, another seed, a state
                that does not fit the policy, the scorer or the selection log (another run's
                folder), or a learning scorer's state for a scorer that does not learn (or
                the reverse); differing ranks' states saved on another number of ranks.
        """
        state = own_rank_state(state, 'the JESTAlgorithm state')
        saved = self._check_state(state)
        learner = [self.scorer] if isinstance(self.scorer, LearningScorer) else []
        pending = self._pending_scorer
        try:
            with all_or_nothing(self.policy, *learner):
                self.policy.load_state_dict(state.get('policy', {}))
                self._load_scorer_state(state.get('scorer'))
                if self.selection_log is not None:
                    self.selection_log.load_state_dict(state.get('log') or {})
        except BaseException:
            self._pending_scorer = pending  # a state kept for a scorer not built yet
            raise
        self._set_seed(saved)
        self.batches_selected = state['batches_selected']
        self.batches_outside = state['batches_outside']
        self.samples_trained = state['samples_trained']

    def _check_state(self, state: Any) -> int | None:
        """Check the fields of a state before anything changes; the saved seed."""
        if not isinstance(state, Mapping) or state.get('version') != STATE_VERSION:
            version = state.get('version') if isinstance(state, Mapping) else None
            raise StateError(f'JESTAlgorithm state version {version!r} is not '
                             f'{STATE_VERSION}; it was saved by an incompatible jest_stream')
        for key in ('batches_selected', 'batches_outside', 'samples_trained'):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StateError(f'the JESTAlgorithm state has {key}={value!r}; expected an '
                                 f'int >= 0')
        scorer = state.get('scorer')
        if scorer is not None and not isinstance(scorer, Mapping):
            raise StateError(f'the JESTAlgorithm state has scorer={type(scorer).__name__}; '
                             f'expected a learning scorer\'s state (a dict) or None')
        saved = state.get('seed')
        if saved is not None and (isinstance(saved, bool) or not isinstance(saved, int)):
            raise StateError(f'the JESTAlgorithm state has seed={saved!r}; expected an int')
        if self._explicit_seed is not None and saved is not None and saved != self._explicit_seed:
            raise StateError(
                f'the checkpoint selected with seed={saved} but this JESTAlgorithm has '
                f'seed={self._explicit_seed}; resume with the same seed (or seed=None to take the '
                f'saved one) or selections will not continue exactly')
        return saved

    # A learning scorer's state

    def _scorer_learns(self) -> bool | None:
        """Whether the scorer learns; None while a ``scorer_factory`` has yet to build it."""
        if self.scorer is not None:
            return isinstance(self.scorer, LearningScorer)
        if not self.criterion.scores or self.scorer_factory is None:
            return False  # no scorer, or the default one, which does not learn
        return None

    def _scorer_state(self) -> dict[str, Any] | None:
        """A learning scorer's state (copies); a loaded one while the scorer is not built."""
        loaded, pending = self._pending_scorer
        if loaded:
            return copy.deepcopy(pending)
        return self.scorer.state_dict() if isinstance(self.scorer, LearningScorer) else None

    def _load_scorer_state(self, saved: dict[str, Any] | None) -> None:
        learns = self._scorer_learns()
        if learns is None:  # the factory builds the scorer at FIT_START: keep the state
            self._pending_scorer = (True, copy.deepcopy(saved))
            return
        _check_scorer_state(learns, saved, self.scorer)
        if learns:
            self.scorer.load_state_dict(saved)
        self._pending_scorer = (False, None)

    def _apply_pending_scorer_state(self) -> None:
        """Give a scorer built after the state was loaded its saved state."""
        loaded, saved = self._pending_scorer
        if not loaded or self.scorer is None:
            return
        learns = isinstance(self.scorer, LearningScorer)
        _check_scorer_state(learns, saved, self.scorer)
        if learns:
            self.scorer.load_state_dict(saved)
        self._pending_scorer = (False, None)

    def _set_seed(self, seed: int | None) -> None:
        self.config = _replace(self.config, seed=seed)
        if self._sized is not None:
            self._sized = _replace(self._sized, seed=seed)
        self._step_ = None

    def _take_trainer_seed(self, state: State) -> None:
        if self.seed is None:
            self._set_seed(int(state.rank_zero_seed))

    # Set-up

    def _fit_start(self, state: State) -> None:
        from jest_stream.loader import SelectiveLoader

        loader = state.train_dataloader
        if isinstance(loader, SelectiveLoader):
            raise SettingTypeError(
                'the train dataloader is already a jest_stream SelectiveLoader, which selects by '
                'itself: use JESTAlgorithm with a DataLoader of super-batches, or the '
                'SelectiveLoader with JESTLoaderCallback, not both')
        super_batch = getattr(loader, 'batch_size', None)
        if isinstance(super_batch, int):
            sub = self._size(super_batch).batch_size
            _check_streaming_batch_size(loader, super_batch)
            # Composer sizes its default microbatch from the dataloader, which reads B; the
            # trainer only ever gets b.
            microbatch = state.device_train_microbatch_size
            if isinstance(microbatch, int) and microbatch > sub:
                state.device_train_microbatch_size = sub
        _resume_streaming_epoch_boundary(state)
        if self.criterion.scores and self.scorer is None:
            self.scorer = self._build_scorer(state)
        self._apply_pending_scorer_state()
        self._step_ = None

    def _size(self, super_batch: int) -> SelectionConfig:
        """The configuration sized for super-batches of ``super_batch`` rows."""
        if self._sized is None or self._sized.super_batch_size != super_batch:
            self._sized = self.config.with_super_batch_size(super_batch)
            self._step_ = None
        return self._sized

    def _build_scorer(self, state: State) -> Any:
        model = unwrap_model(state.model)
        if self.scorer_factory is not None:
            scorer = self.scorer_factory(model)
            if not callable(scorer):
                raise SettingTypeError(f'scorer_factory returned {type(scorer).__name__}, which '
                                       f'is not a scorer: scorer(batch, sample_ids, criterion) '
                                       f'-> scores')
            return scorer
        reference = resolve_reference(self.reference, needed=self.criterion.needs_reference)
        if isinstance(reference, nn.Module):
            state.device.module_to_device(reference)
        if self.id_key is None and isinstance(reference, ReferenceTable) \
                and not isinstance(reference, ColumnReference):
            raise SettingError(
                f'id_key=None names rows by their position, but the reference '
                f'{type(reference).__name__} looks outputs up by sample id; give the batches a '
                f'sample id column (jest_stream.SampleIdStreamingDataset) and set id_key')
        return ClassificationScorer(model, reference, target_key=self.target_key,
                                    forward=self.forward, loss_fn=self.loss_fn)

    def _step(self, config: SelectionConfig) -> SelectionStep:
        if self._step_ is None:
            self._apply_pending_scorer_state()
            self._step_ = SelectionStep(config, self.scorer, batch_transform=self.batch_transform,
                                        record=self._record)
        return self._step_

    # Selection

    @property
    def start(self) -> float:
        """Fraction of training at which selection starts (the schedule's warm-up)."""
        schedule = self.policy.schedule
        return 0.0 if schedule is None or schedule.unit != 'fraction' else schedule.warmup

    @property
    def end(self) -> float:
        """Fraction of training at which selection stops (the schedule's anneal)."""
        schedule = self.policy.schedule
        if schedule is None or schedule.unit != 'fraction' or schedule.anneal_end is None:
            return 1.0
        return schedule.anneal_end

    def _progress(self, state: State) -> Progress:
        return Progress(steps=int(state.timestamp.batch), samples=int(state.timestamp.sample),
                        fraction=_elapsed_fraction(state))

    def _chunk_size(self, state: State, sub: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        microbatch = state.device_train_microbatch_size
        if isinstance(microbatch, int) and microbatch > 0:
            return min(microbatch, sub)
        return sub

    def _check_order(self, state: State) -> None:
        matched, self._matched_parts = self._matched_parts, None
        if matched is not None and not _same_parts(matched, _batch_parts(state.batch)):
            raise UsageError(
                'another algorithm changed the batch at Event.AFTER_DATALOADER before '
                'JESTAlgorithm selected from it (Composer runs AFTER_* events in reverse order '
                'of the algorithms list); pass algorithm_passes=jest_first (from '
                'jest_stream.integrations.composer) to the Trainer so selection runs first')

    def _select(self, state: State, logger: Logger) -> None:
        self._check_order(state)
        self._take_trainer_seed(state)
        n = batch_length(state.batch)
        config = self._size(self._sized.super_batch_size if self._sized is not None else n)
        ids = read_sample_ids(state.batch, self.id_key, n=n)
        start = time.perf_counter()
        batch = state.device.batch_to_device(state.batch)
        timings = {'transfer_s': time.perf_counter() - start}
        self._logger = logger
        epoch, index = int(state.timestamp.epoch), int(state.timestamp.batch_in_epoch)
        self._steps_done = int(state.timestamp.batch)
        plan = self.policy.plan(self._progress(state))
        self._active = plan.pressure > 0
        step = self._step(config)
        if not self._active and self.outside_window == 'first' and n >= config.batch_size:
            # The first b rows are all that was considered: the candidates, all selected (as
            # outside_window='uniform' offers b random rows), so the log's selection rates
            # do not count the rest as passed over.
            rows = torch.arange(config.batch_size)
            first = Selection(rows, None, config.batch_size, candidates=rows)
            state.batch = step.finish(batch, ids, first, epoch=epoch, index=index,
                                      timings=timings)
            return
        if config.criterion.scores and isinstance(self.scorer, ClassificationScorer) \
                and self.scorer_factory is None:
            self.scorer.chunk_size = self._chunk_size(state, config.batch_size)
        with get_precision_context(state.precision, state.precision_config):
            selection = step.choose(batch, ids, epoch, index, plan)
        if selection.short:
            self._warn_short(n, config.batch_size)
        state.batch = step.finish(batch, ids, selection, epoch=epoch, index=index,
                                  timings=timings)

    def _report_eval(self, state: State) -> None:
        """Report ``eval_metric`` of the evaluator that just ran (``state.dataloader_label``)
        to the adaptive pressure, when it has the metric (and is ``eval_label``, if given).

        Raises:
            SettingError: No evaluator has the metric, or ``eval_label`` names no evaluator
                that has it: nothing would ever be reported.
        """
        label = state.dataloader_label
        if self.eval_label is None or label == self.eval_label:
            metric = state.eval_metrics.get(label, {}).get(self.eval_metric)
            if metric is not None:
                self.policy.report(int(state.timestamp.batch), float(metric.compute()))
                return
        having = [name for name, metrics in state.eval_metrics.items()
                  if self.eval_metric in metrics]
        reported_elsewhere = bool(having) if self.eval_label is None else self.eval_label in having
        if reported_elsewhere:
            return  # another evaluator's turn
        wanted = 'any evaluator' if self.eval_label is None else \
            f'the evaluator eval_label={self.eval_label!r}'
        raise SettingError(
            f'eval_metric={self.eval_metric!r} is not a metric of {wanted}; the evaluators '
            f'have {({name: sorted(metrics) for name, metrics in state.eval_metrics.items()})}: '
            f'name one of their metrics (and labels)')

    def _warn_short(self, n: int, sub: int) -> None:
        if not self._warned_short:
            self._warned_short = True
            logger.warning('JESTAlgorithm: a super-batch of %d rows is smaller than the '
                           'sub-batch size %d (a partial last batch); it is trained whole. Use '
                           'drop_last=True on the train DataLoader to drop it.', n, sub)

    def _record(self, result: StepResult) -> None:
        """The step's recorder: counters, and the metrics to Composer's logger."""
        if self._active:
            self.batches_selected += 1
        else:
            self.batches_outside += 1
        self.samples_trained += result.yielded
        selection = result.selection
        metrics: dict[str, float] = {
            'jest/active': float(self._active),
            'jest/kept_fraction': result.yielded / result.drawn,
            'jest/transfer_s': result.timings.get('transfer_s', 0.0),
            'jest/score_s': result.timings['score_s'],
            'jest/select_s': result.timings['select_s'],
            'jest/samples_trained': float(self.samples_trained),
        }
        if selection.score_flops is not None:
            metrics['jest/score_flops'] = float(selection.score_flops)
        metrics.update({f'jest/{k}': float(v) for k, v in selection.policy.items()})
        self.policy.observe(self._steps_done,
                            selection.learnability_mean(self.criterion.name))
        if not selection.short:
            metrics.update({f'jest/{k}': v for k, v in
                            score_statistics(selection.scores, selection.selected).items()})
        if self._logger is not None:
            self._logger.log_metrics(metrics)
        if self.selection_log is not None:
            self.selection_log.record(result)


def _check_scorer_state(learns: bool, saved: dict[str, Any] | None, scorer: Any) -> None:
    """Refuse a learning scorer's state for a scorer that does not learn, and the reverse."""
    if learns and saved is None:
        raise StateError(
            f'the scorer learns ({type(scorer).__name__}, a proxy learner) but the JESTAlgorithm '
            f'state holds none of its state: it was saved with a scorer that does not learn. '
            f'Resume with the scorer it was saved with, or start the proxy afresh in a new run')
    if not learns and saved is not None:
        raise StateError(
            'the JESTAlgorithm state holds a learning scorer\'s state (a ProxyScorer\'s) but '
            'this algorithm\'s scorer does not learn: resume with the scorer it was saved with '
            '(scorer_factory=lambda model: ProxyScorer(...))')


def _window_policy(policy: SelectionPolicy | None, start: float, end: float
                   ) -> SelectionPolicy:
    """The policy, with the selection window ``[start, end)`` as its schedule."""
    if policy is not None and not isinstance(policy, SelectionPolicy):
        raise SettingTypeError(f'policy={policy!r} must be a jest_stream.SelectionPolicy')
    policy = policy if policy is not None else SelectionPolicy()
    if (start, end) == (0.0, 1.0):
        return policy
    if not start < end:
        raise SettingError(f'start={start!r}, end={end!r}: selection runs while the fraction '
                           f'of training done is in [start, end), so 0 <= start < end <= 1')
    if policy.schedule is not None:
        raise SettingError('give the selection window as start/end or as the policy\'s '
                           'schedule, not both')
    return dataclasses.replace(policy, schedule=Schedule(
        unit='fraction', warmup=start, anneal_start=end, anneal_end=end))


def _replace(config: SelectionConfig, **changes: Any) -> SelectionConfig:
    return dataclasses.replace(config, **changes)


def _elapsed_fraction(state: State) -> float:
    """Fraction of ``max_duration`` done before the current batch.

    Composer's ``get_elapsed_duration`` moves in whole epochs when ``max_duration`` is in
    epochs; with a dataloader of known length this counts batches instead, so a selection
    window can open or close inside an epoch.
    """
    max_duration = state.max_duration
    length = state.dataloader_len
    if max_duration is not None and max_duration.unit == TimeUnit.EPOCH and length is not None \
            and int(length) > 0:
        return int(state.timestamp.batch) / (int(max_duration.value) * int(length))
    elapsed = state.get_elapsed_duration()
    return 0.0 if elapsed is None else float(elapsed.value)


def _check_streaming_batch_size(loader: Any, super_batch: int) -> None:
    from streaming import StreamingDataset

    dataset = getattr(loader, 'dataset', None)
    if isinstance(dataset, StreamingDataset) and dataset.batch_size != super_batch:
        raise SettingError(
            f'the StreamingDataset has batch_size={dataset.batch_size} but the train DataLoader '
            f'reads batches of {super_batch}: streaming deals chunks of its batch_size to the '
            f'workers, and a different read size breaks exact resumption. Build the dataset '
            f'with batch_size={super_batch}.')


def _resume_streaming_epoch_boundary(state: State) -> None:
    """Make a resume from a checkpoint taken at an epoch boundary start the *next* epoch.

    At the end of epoch ``e`` Composer's timestamp says epoch ``e + 1``, sample 0, but a
    ``StreamingDataset`` that has not begun its next epoch reports ``epoch e`` in its state
    (its ``next_epoch - 1``). Loaded into a fresh dataset, that state replays epoch ``e``'s
    shuffle as epoch ``e + 1``. Before the first batch of a resumed run, rewrite the resume
    state to epoch ``e + 1``, sample 0, which is what the uninterrupted run reads next.
    """
    from streaming import StreamingDataset

    dataset = getattr(state.train_dataloader, 'dataset', None)
    if not isinstance(dataset, StreamingDataset) or 'train' not in state.dataset_resumption:
        return
    epoch = int(state.timestamp.epoch)
    if int(state.timestamp.batch_in_epoch) != 0 or epoch == 0 or dataset.next_epoch != 0:
        return
    # On a dataset that has not iterated, state_dict reads back the resume state just loaded.
    resume = dataset.state_dict(0, from_beginning=False)
    if 0 <= resume['epoch'] < epoch and resume['sample_in_epoch'] == 0:
        logger.info('JESTAlgorithm: the dataset state of this epoch-boundary checkpoint says '
                 'epoch %d; resuming at epoch %d, sample 0, as the timestamp says',
                 resume['epoch'], epoch)
        resume['epoch'] = epoch
        dataset.load_state_dict(resume)


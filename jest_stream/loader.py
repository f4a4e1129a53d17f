"""The loader the trainer iterates: super-batches in, selected sub-batches out.

Read top to bottom, one super-batch goes through::

    source (DataLoader workers, pinned host memory)
      -> device copy (side stream on CUDA)
      -> the step (jest_stream.step): score -> select -> gather -> transform -> record

With ``scoring='process'`` the selecting half of the step runs in a co-located scorer
process that shares the learner's weights (:mod:`jest_stream.process`); the batches it
selects from the same weights are the same.

``SelectiveLoader`` is a ``torch.utils.data.DataLoader`` whose ``batch_size`` is
the sub-batch size and whose ``dataset`` answers Composer-style
``state_dict(num_samples, from_beginning)`` from the loader's own raw counter, so
training frameworks can checkpoint it like any DataLoader.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from jest_stream.batch import (
    Batch,
    attached_id_key,
    check_key,
    move_to_device,
    read_sample_ids,
)
from jest_stream.checks import check_bool, check_int
from jest_stream.config import SelectionConfig, super_batch_size_for
from jest_stream.criteria import Criterion
from jest_stream.distributed import GlobalScope, gather_rank_states, own_rank_state, rank_and_world
from jest_stream.errors import (
    SettingError,
    SettingTypeError,
    StateError,
    UnknownLengthError,
    UsageError,
)
from jest_stream.log import as_recorder
from jest_stream.policies import Plan, Progress, SelectionPolicy
from jest_stream.process import ProcessScoring, check_picklable
from jest_stream.rollback import all_or_nothing
from jest_stream.scoring.base import LearningScorer
from jest_stream.source import ID_KEY, ReadSettings, SuperBatchSource, make_source
from jest_stream.step import STREAM, LocalScope, Recorder, SelectionStep, StepResult
from jest_stream.telemetry import LoaderTelemetry
from jest_stream.transfer import DevicePrefetcher
from jest_stream.workers import check_worker_temp_dir

__all__ = ['SelectiveLoader', 'super_batch_size_for', 'STATE_VERSION']


# Version 2 added the source kind and the policy's state; version 1 states (neither) load.
STATE_VERSION = 2

_STATE_KEYS = ('version', 'epoch', 'super_batches', 'seed', 'batch_size', 'super_batch_size',
               'world_size', 'dataset')


class _LoaderPosition(IterableDataset):
    """The loader's ``.dataset``: answers checkpoint calls from the loader's raw counter.

    Frameworks that checkpoint ``train_dataloader.dataset`` (Composer does) call
    ``state_dict(num_samples, from_beginning)``; the sample count they pass counts
    selected samples, which would replay data, so it is ignored in favour of the
    super-batches actually handed to the trainer. Composer writes rank 0's answer alone, so
    under several ranks the answer holds every rank's loader state, and each rank loads its
    own: ``state_dict`` is then a collective that every rank must call at once, as Composer
    does when it saves (:func:`~jest_stream.distributed.gather_rank_states`).
    """

    def __init__(self, loader: SelectiveLoader) -> None:
        self._loader = loader

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True
                   ) -> dict[str, Any]:
        loader = self._loader
        if num_samples and loader._epoch_complete(loader._consumed):
            # A framework that checkpoints after the last batch of an epoch without having
            # ended the epoch (Composer when training stops there) still counts this epoch:
            # keep the position in it, so the epoch is not counted twice on resume.
            return gather_rank_states(loader._state(loader._epoch, loader._consumed))
        return gather_rank_states(loader.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(own_rank_state(state, "the SelectiveLoader's state"))

    def __iter__(self) -> Iterator[Any]:
        raise UsageError('iterate the SelectiveLoader, not its .dataset')

    def __len__(self) -> int:
        return len(self._loader) * self._loader.batch_size


def _learner_device(scorer: Any) -> torch.device:
    # A proxy learner scores and learns where its own model is.
    learner = getattr(scorer, 'learner', None) or getattr(scorer, 'proxy', None)
    if isinstance(learner, nn.Module):
        for param in learner.parameters():
            return param.device
    return torch.device('cpu')


class SelectiveLoader(DataLoader):
    """Yields sub-batches of ``batch_size`` selected from super-batches of ``B``.

    The settings of selection are validated once, into :attr:`config` (a
    :class:`~jest_stream.config.SelectionConfig`; ``repr(loader)`` shows it), and every
    super-batch goes through the one step of :mod:`jest_stream.step`.

    Args:
        dataset (StreamingDataset | Dataset): A ``StreamingDataset`` built with
            ``batch_size=B`` (use :class:`~jest_stream.SampleIdStreamingDataset` so samples
            carry their global id), or a map-style ``Dataset``.
        batch_size (int): Sub-batch size ``b`` handed to the trainer.
        filter_ratio (float): Fraction of each super-batch left out, in ``[0, 1)``;
            ``B = b / (1 - filter_ratio)``. Give this or ``super_batch_size``.
        super_batch_size (int): ``B`` directly, ``>= batch_size``.
        scorer (Scorer): Scores a super-batch (see :mod:`jest_stream.scoring`); not needed
            for ``criterion='uniform'``.
        criterion (str): ``learnability`` (default), ``hard_learner``, ``easy_reference`` or
            ``uniform``.
        method (str): ``joint`` (default when scoring), ``topk``, ``sample``; ``uniform``
            goes with the uniform criterion.
        n_chunks (int): Chunks of the joint sampler (default 16); more than ``batch_size``
            means one example per chunk.
        temperature (float): Softmax temperature of sampling (default 1); 0 is greedy.
        seed (int): Seed of the selection generators and of map-style shuffling.
        device (str | torch.device): Where batches are scored and delivered; by default the
            device of the scorer's learner.
        num_workers (int): DataLoader workers that read and collate super-batches.
        pin_memory (bool): Page-locked host batches; by default True on CUDA.
        prefetch_factor (int): Super-batches each worker reads ahead.
        timeout (float): Seconds any wait on another process (a DataLoader worker's batch,
            the scorer process) may last before it raises (default 300). 0 means no
            timeout, as for ``DataLoader``; process scoring refuses it.
        shuffle (bool): Shuffle map-style datasets (streaming datasets shuffle themselves).
        id_key (str | int): Column (dict batches) or field position (tuple batches) of the
            global sample ids; ``sample_id`` by default, the column
            ``SampleIdStreamingDataset`` adds. A map-style dataset whose samples lack it gets
            each sample's index as its id: added as that column to dict samples, appended as
            the last field of tuple samples (unless ``id_key`` is a field position).
        batch_transform (Callable, optional): Applied to each selected sub-batch on the
            device before it is handed over (e.g. a mixed-resolution split).
        count_flops (bool): Count the FLOPs of every scoring pass (``score_flops`` in the
            telemetry) with ``torch.utils.flop_counter``; costs some time per batch.
        drop_last (bool): Drop the last super-batch of an epoch when it has fewer than
            ``batch_size`` rows (default, as ``DataLoader(drop_last=True)``); False hands it
            over whole, unscored. A last super-batch with at least ``batch_size`` rows is
            always selected from.
        scoring (str): ``inline`` (default): score in the trainer's process, with the current
            weights. ``process``: score in a co-located scorer process that shares the
            learner's weights, while the trainer trains (the scorer must be picklable; see
            :mod:`jest_stream.process`). Call :meth:`close` (or use the loader as a context
            manager) to stop the process.
        sync_every (int, optional): Process scoring: publish the learner's weights to the
            scorer process every this many weight updates (optimizer steps; default 1).
        max_staleness (int, optional): Process scoring: most weight updates by which the
            weights a batch was scored with may lag the trainer's when it is handed over; a
            staler result is scored again. At least ``sync_every - 1``; 0 (with
            ``sync_every=1``) selects exactly what inline scoring selects. Default
            ``sync_every - 1 + prefetch_depth``.
        prefetch_depth (int, optional): Process scoring: super-batches in flight (default 2).
        selection_scope (str): Under ``torch.distributed``: ``rank`` (default) selects each
            rank's sub-batch from its own super-batch; ``global`` all-gathers the scores (or
            embeddings) and selects ``world_size x batch_size`` examples jointly over the
            global super-batch, each rank training its share (inline scoring only; see
            :mod:`jest_stream.distributed`).
        policy (SelectionPolicy, optional): Schedules of the selection pressure, uniform
            mixing, adaptive pressure, quotas per group and importance weights (see
            :mod:`jest_stream.policies`); full pressure and nothing else by default. Its
            state is part of :meth:`state_dict`.
        selection_log (str | PathLike | Recorder, optional): Records every super-batch handed
            over: a folder (a :class:`~jest_stream.log.SelectionLog` there, with the stream of
            each sample of a ``StreamingDataset``), or a ``SelectionLog`` built with columns
            of the batch to log. Flushed by :meth:`state_dict`, cut back to the saved
            position by :meth:`load_state_dict`, closed by :meth:`close`.
        autocast (torch.dtype, optional): Run the scoring forwards under ``torch.autocast``
            in this dtype (``torch.bfloat16``, or ``torch.float16`` on CUDA): cheaper scoring
            on accelerators; scores are still computed in float32.

    Raises:
        SettingError: A setting out of range or inconsistent (the message names it and the
            fix), an empty dataset, or one smaller than a sub-batch; ``num_workers > 0``
            with a temp dir too long for the workers' sockets
            (:func:`~jest_stream.workers.check_worker_temp_dir`).
        SettingTypeError: A setting of the wrong type (bools are not numbers).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, filter_ratio: float | None = None,
                 super_batch_size: int | None = None, scorer: Any = None,
                 criterion: str | Criterion = 'learnability', method: str | None = None,
                 n_chunks: int = 16, temperature: float = 1.0, seed: int = 0,
                 device: str | torch.device | None = None, num_workers: int = 0,
                 pin_memory: bool | None = None, prefetch_factor: int = 2, timeout: float = 300.0,
                 shuffle: bool = True, id_key: str | int = ID_KEY,
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 count_flops: bool = False, drop_last: bool = True, scoring: str = 'inline',
                 sync_every: int | None = None, max_staleness: int | None = None,
                 prefetch_depth: int | None = None, selection_scope: str = 'rank',
                 policy: SelectionPolicy | None = None,
                 selection_log: Recorder | str | os.PathLike[str] | None = None,
                 autocast: torch.dtype | None = None) -> None:
        if filter_ratio is None and super_batch_size is None:
            raise SettingError('give filter_ratio=... (the fraction of each super-batch left '
                               'out) or super_batch_size=...')
        config = SelectionConfig.create(
            batch_size=batch_size, filter_ratio=filter_ratio, super_batch_size=super_batch_size,
            criterion=criterion, method=method, n_chunks=n_chunks, temperature=temperature,
            seed=seed, count_flops=count_flops, selection_scope=selection_scope,
            scoring=scoring, sync_every=sync_every, max_staleness=max_staleness,
            prefetch_depth=prefetch_depth, timeout=timeout, autocast=autocast)
        check_int(seed, 'seed')
        check_worker_temp_dir(check_int(num_workers, 'num_workers', low=0))
        check_int(prefetch_factor, 'prefetch_factor', low=1)
        check_bool(shuffle, 'shuffle')
        check_bool(drop_last, 'drop_last')
        check_key(id_key, 'id_key')
        if pin_memory is not None:
            check_bool(pin_memory, 'pin_memory')
        device = torch.device(device) if device is not None else _learner_device(scorer)
        policy = _check_policy(policy, config)
        if isinstance(scorer, LearningScorer) and config.scope == 'global':
            raise SettingError('a scorer that learns (a ProxyScorer) trains on the rows each '
                               'rank selects: use it with selection_scope="rank"')
        step = SelectionStep(config, scorer,
                             scope=GlobalScope() if config.scope == 'global' else LocalScope(),
                             batch_transform=batch_transform)
        if config.process is not None:
            if device.type not in ('cpu', 'cuda'):
                raise SettingError(f'scoring="process" runs on the cpu or a cuda device, not '
                                   f'{device}; use scoring="inline"')
            if config.criterion.scores:
                check_picklable(scorer)
        if pin_memory is None:
            pin_memory = device.type == 'cuda'
        rank, world_size = rank_and_world()
        source = make_source(
            dataset, super_batch_size=config.super_batch_size, shuffle=shuffle, seed=seed,
            rank=rank, world_size=world_size, id_key=id_key,
            read=ReadSettings(num_workers=num_workers, pin_memory=pin_memory,
                              prefetch_factor=prefetch_factor, timeout=config.timeout))
        samples = source.samples_per_rank()
        if samples == 0:
            raise SettingError('the dataset is empty: there is nothing to select from')
        if samples is not None and samples < config.batch_size:
            raise SettingError(
                f'the dataset gives each rank {samples} samples, fewer than batch_size='
                f'{config.batch_size}: not one sub-batch can be filled; lower batch_size')
        super().__init__(_LoaderPosition(self), batch_size=config.batch_size,
                         num_workers=num_workers, pin_memory=pin_memory, timeout=config.timeout)
        self.config = config
        self.source: SuperBatchSource = source
        self.scorer = scorer
        self.device = device
        self.id_key = id_key
        self.drop_last_short = drop_last
        self.telemetry = LoaderTelemetry()
        step.record = self._record
        step.stream_offsets = _stream_offsets(dataset, policy)
        self.policy = policy
        self.selection_log = as_recorder(selection_log, streams=dataset)
        self._handed: tuple[int, int] | None = None  # last super-batch handed over
        # Sub-batches handed over in the epochs before the current one, and in it: the steps
        # of a schedule.
        self._steps_before, self._handed_in_epoch = 0, 0
        self.step = step
        self._next_epoch = 0
        self._epoch = 0
        self._consumed = 0
        self._resume: tuple[int, int] | None = None
        self._started = False
        self._process: ProcessScoring | None = None

    def __repr__(self) -> str:
        settings = ', '.join(f'{key}={value!r}' for key, value in self.config.describe().items())
        return (f'SelectiveLoader({type(self.source.dataset).__name__}, {settings}, '
                f'device={str(self.device)!r}, id_key={self.id_key!r})')

    @property
    def super_batch_size(self) -> int:
        """``B``: rows read per step on each rank."""
        return self.config.super_batch_size

    @property
    def filter_ratio(self) -> float:
        """``1 - b / B``: the fraction of each super-batch left out."""
        return self.config.filter_ratio

    @property
    def seed(self) -> int:
        """The seed of selection's private generators and of map-style shuffling (``seed=``)."""
        return self.config.seed

    @property
    def metrics(self) -> dict[str, Any]:
        """Telemetry of the last batch handed over (a plain dict)."""
        return self.telemetry.metrics

    @property
    def scorer_process(self) -> ProcessScoring | None:
        """The scorer process's handle (``pid``, ``startup``), None unless it is running."""
        return self._process if self._process is not None and self._process.running else None

    def publish_weights(self) -> None:
        """Send the learner's current weights to the scorer process now.

        Process scoring publishes by itself every ``sync_every`` weight updates, which it
        counts at each batch boundary: optimizer steps on the learner's parameters (plain,
        foreach or fused), in-place changes, ``load_state_dict``, and writes through
        ``param.data``. Call this to publish at once, e.g. right after loading new weights;
        it counts as one update if none was seen since the last publish. Does nothing with
        inline scoring or before the scorer process has started (it starts with the current
        weights).
        """
        if self._process is not None:
            self._process.publish_weights()

    def close(self) -> None:
        """Stop the scorer process and free its shared buffers; iterating again restarts it.

        A scorer that learns (a ProxyScorer) keeps what it learned in the scorer process: it
        is brought back first, so that a restarted process continues from it. Called on exit
        from a ``with`` block and, at the latest, when the loader is garbage collected or the
        interpreter exits.
        """
        if self._process is not None:
            if self.scorer_process is not None and isinstance(self.scorer, LearningScorer) \
                    and self._handed is not None:
                self.scorer.load_state_dict(self._scorer_state())
                self._handed = None
            self._process.close()
        if self.selection_log is not None:
            self.selection_log.close()

    def __enter__(self) -> SelectiveLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Sub-batches per epoch: one per super-batch that can fill one (all of them with
        ``drop_last=False``).

        Raises:
            UnknownLengthError: The source is an iterable dataset of unknown length (a
                ``TypeError``, as ``len()`` expects).
        """
        per_rank = self.source.samples_per_rank()
        if per_rank is None:
            raise UnknownLengthError(f'the length of a {type(self.source.dataset).__name__} is not '
                            f'known: an iterable dataset ends when it runs out')
        full, rest = divmod(per_rank, self.super_batch_size)
        if rest and (rest >= self.batch_size or not self.drop_last_short):
            full += 1
        return full

    # The policy

    def _progress(self, epoch: int, index: int) -> Progress:
        """Steps and raw samples before super-batch ``index`` of ``epoch``, over all epochs:
        the sub-batches handed over in earlier epochs, plus ``index``."""
        steps = self._steps_before + index
        return Progress(steps=steps, samples=steps * self.super_batch_size
                        * self.source.world_size)

    def _plan(self, epoch: int, index: int) -> Plan:
        return self.policy.plan(self._progress(epoch, index))

    def _record(self, result: StepResult) -> None:
        self._handed = (result.epoch, result.index)
        self._handed_in_epoch += 1
        self.telemetry.record(result)
        if self.selection_log is not None:
            self.selection_log.record(result)
        self.policy.observe(self._progress(result.epoch, result.index).steps,
                            result.selection.learnability_mean(self.config.criterion.name))

    def report_metric(self, value: float) -> None:
        """Report a held-out metric (a validation accuracy, a loss) measured now.

        The policy's :class:`~jest_stream.policies.AdaptivePressure` eases selection when
        it stops improving (``mode`` says which way is better). The metric is tied to the
        number of sub-batches handed over so far, so that a resumed run plans the same.

        Raises:
            SettingError: The loader's policy has no adaptive pressure.
        """
        epoch, consumed = self._epoch, self._consumed
        self.policy.report(self._progress(epoch, consumed).steps, value)

    # Position and resumption

    def state_dict(self) -> dict[str, Any]:
        """The position: the epoch and the super-batches of it handed to the trainer.

        Super-batches read or scored ahead are not counted: they are drawn again after a resume.
        Once the last sub-batch of an epoch has been handed over, the position is the start of
        the next epoch, whether or not the loop has asked the loader for more yet.
        """
        epoch, consumed = self._epoch, self._consumed
        if self._epoch_complete(consumed):
            epoch, consumed = epoch + 1, 0
        return self._state(epoch, consumed)

    def _epoch_complete(self, consumed: int) -> bool:
        """Whether ``consumed`` super-batches are the whole epoch (an iterable source of
        unknown length says so only when it runs out, at the end of the iteration)."""
        return self.source.samples_per_rank() is not None and consumed >= len(self)

    def _state(self, epoch: int, consumed: int) -> dict[str, Any]:
        return {
            'version': STATE_VERSION,
            'epoch': epoch,
            'super_batches': consumed,
            'seed': self.seed,
            'batch_size': self.batch_size,
            'super_batch_size': self.super_batch_size,
            'world_size': self.source.world_size,
            'source': self.source.kind,
            'dataset': self.source.dataset_state(epoch, consumed),
            'policy': self.policy.state_dict(),
            'log': None if self.selection_log is None else self.selection_log.state_dict(),
            'scorer': self._scorer_state(),
            'steps_before_epoch': self._steps_before_epoch(epoch),
        }

    def _steps_before_epoch(self, epoch: int) -> int:
        if epoch == self._epoch:
            return self._steps_before
        return self._steps_before + self._handed_in_epoch  # the position rolled over

    def _scorer_state(self) -> dict[str, Any] | None:
        """A learning scorer's state after the last super-batch handed over."""
        if not isinstance(self.scorer, LearningScorer):
            return None
        process = self.scorer_process
        if process is None or self._handed is None:
            return self.scorer.state_dict()
        return torch.load(io.BytesIO(process.scorer_state(*self._handed)), weights_only=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; call on a fresh loader before iterating it.

        The state is checked completely before anything changes: its keys and their types
        and ranges, the kind of source, the seed, the global sizes and the dataset's settings.

        Raises:
            StateError: The state does not belong to this loader (the message names the field).
            UsageError: The loader has already been iterated.
        """
        if self._started:
            raise UsageError('load_state_dict must be called on a fresh loader, before '
                             'iterating it: a StreamingDataset only resumes at its next epoch')
        _check_state_fields(state)
        self._check_state_matches(state)
        self.source.check_dataset_state(state['dataset'])
        self._load_component_states(state)
        self._resume = (int(state['epoch']), int(state['super_batches']))
        self._epoch, self._consumed = self._resume
        steps = state.get('steps_before_epoch')
        if steps is None:  # version 1: sized sources only
            steps = self._resume[0] * len(self)
        self._steps_before, self._handed_in_epoch = int(steps), self._resume[1]
        self._next_epoch = self._epoch
        self.source.load_dataset_state(state['dataset'])

    def _load_component_states(self, state: Mapping[str, Any]) -> None:
        """The policy's, the scorer's and the selection log's states, all or none: each checks
        its own, so one that refuses puts back those loaded before it (the log, which may cut
        files, goes last and checks everything before it deletes anything)."""
        learner = [self.scorer] if isinstance(self.scorer, LearningScorer) else []
        with all_or_nothing(self.policy, *learner):
            self.policy.load_state_dict(state.get('policy', {}))
            self._load_scorer_state(state.get('scorer'))
            if self.selection_log is not None:
                self.selection_log.load_state_dict(state.get('log') or {})

    def _check_state_matches(self, state: Mapping[str, Any]) -> None:
        source = state.get('source', _infer_source(state['dataset']))
        if source != self.source.kind:
            raise StateError(
                f'the state comes from a loader over {_a(source)} dataset, but this loader '
                f'reads {_a(self.source.kind)} one: load it into a loader over the dataset it '
                f'was saved from')
        if state['seed'] != self.seed:
            raise StateError(f'the saved loader had seed={state["seed"]} but this one has '
                             f'seed={self.seed}; resume with the same seed or selections will '
                             f'not continue exactly')
        world = self.source.world_size
        for key, mine in (('super_batch_size', self.super_batch_size),
                          ('batch_size', self.batch_size)):
            # Positions count global raw samples, so only the global sizes must match: a run
            # may resume on another world size with the same global batch.
            if state[key] * state['world_size'] != mine * world:
                raise StateError(
                    f'the saved loader had {key}={state[key]} on {state["world_size"]} rank(s) '
                    f'(global {state[key] * state["world_size"]}) but this one has {key}={mine} '
                    f'on {world} (global {mine * world}); resume with the same global '
                    f'{key} or selections will not continue exactly')
        # With the same global sizes, an epoch has as many super-batches on any world size.
        if self.source.samples_per_rank() is not None and state['super_batches'] > len(self):
            raise StateError(f'the state says {state["super_batches"]} super-batches of epoch '
                             f'{state["epoch"]} were handed over, but an epoch of this loader '
                             f'has {len(self)}: the state belongs to another dataset')

    def _load_scorer_state(self, state: dict[str, Any] | None) -> None:
        learns = isinstance(self.scorer, LearningScorer)
        if learns and state is None:
            raise StateError('the scorer learns (a ProxyScorer) but the state holds none of its '
                             'state: it was saved by a loader with another scorer')
        if not learns and state is not None:
            raise StateError('the state holds a learning scorer\'s state (a ProxyScorer\'s) '
                             'but this loader\'s scorer does not learn: resume with the scorer '
                             'it was saved with')
        if learns:
            self.scorer.load_state_dict(state)

    def _begin_epoch(self) -> tuple[int, int]:
        self._started = True
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
        else:
            epoch, start = self._next_epoch, 0
        if epoch != self._epoch:  # the epoch before is over: count what it handed over
            self._steps_before += self._handed_in_epoch
            self._handed_in_epoch = 0
        self._next_epoch = epoch + 1
        self._epoch, self._consumed = epoch, start
        self.telemetry.start_epoch()
        return epoch, start

    def _end_epoch(self, epoch: int) -> None:
        self._steps_before += self._handed_in_epoch
        self._handed_in_epoch = 0
        self._epoch, self._consumed = epoch + 1, 0

    # The data path

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._begin_epoch()
        host_batches = iter(self.source.iter_epoch(epoch, start))
        if self.config.process is not None:
            yield from self._iter_process(host_batches, epoch, start)
            return
        index = start
        for _host, batch, timings in DevicePrefetcher(host_batches, self.device):
            ids = read_sample_ids(batch, attached_id_key(batch, self.id_key))
            selection = self.step.choose(batch, ids, epoch, index, self._plan(epoch, index))
            sub = None
            if not (selection.short and self._drop(epoch, index, len(ids))):
                sub = self.step.finish(batch, ids, selection, epoch=epoch, index=index,
                                       timings=timings)
            index += 1
            self._consumed = index
            if sub is not None:
                yield sub
        self._end_epoch(epoch)

    def _drop(self, epoch: int, index: int, n: int) -> bool:
        if self.drop_last_short:
            self.telemetry.record_dropped(epoch=epoch, index=index, n=n,
                                          batch_size=self.batch_size)
        return self.drop_last_short

    def _iter_process(self, host_batches: Iterator[Batch], epoch: int, start: int
                      ) -> Iterator[Batch]:
        if self._process is None:
            self._process = ProcessScoring(step=self.step, device=self.device, id_key=self.id_key)
        for index, entry, sub in self._process.iter_epoch(host_batches, epoch, start,
                                                          self._plan, self._handed):
            self._consumed = index + 1
            if sub is None and not self._drop(epoch, index, entry.n):
                # A short super-batch is not scored: it is handed over whole, here.
                batch = move_to_device(entry.host, self.device)
                sub = self.step.finish(batch, entry.ids,
                                       self.step.choose(batch, entry.ids, epoch, index),
                                       epoch=epoch, index=index, timings={'wait_s': entry.wait_s})
            if sub is not None:
                yield sub
        self._end_epoch(epoch)


def _check_policy(policy: SelectionPolicy | None, config: SelectionConfig) -> SelectionPolicy:
    if policy is None:
        return SelectionPolicy()
    if not isinstance(policy, SelectionPolicy):
        raise SettingTypeError(f'policy={policy!r} must be a jest_stream.SelectionPolicy')
    if policy.schedule is not None and policy.schedule.unit == 'fraction':
        raise SettingError('a SelectiveLoader does not know how long training will be: give '
                           'the schedule in unit="steps" or "samples"')
    depth = config.process.prefetch_depth if config.process is not None else 1
    policy.check_method(config.method, config.temperature, prefetch_depth=depth)
    return policy


def _stream_offsets(dataset: Any, policy: SelectionPolicy) -> tuple[int, ...] | None:
    """The first sample id of every stream, for quotas per stream."""
    if policy.quota is None or policy.quota.key != STREAM:
        return None
    offsets = getattr(dataset, 'sample_offset_per_stream', None)
    if offsets is None:
        raise SettingError(f'Quota(key={STREAM!r}) groups samples by the stream they came '
                           f'from, which only a StreamingDataset knows; give a column instead')
    return tuple(int(offset) for offset in offsets)


def _a(word: str) -> str:
    return f'{"an" if word[0] in "aeiou" else "a"} {word}'


def _infer_source(dataset_state: Any) -> str:
    # States without a 'source' field: streaming keeps a dict, a map-style dataset nothing.
    return 'map' if dataset_state is None else 'streaming'


def _check_state_fields(state: Any) -> None:
    """Keys, types and ranges of a loader state; a :class:`StateError` naming the field."""
    if not isinstance(state, Mapping):
        raise StateError(f'a loader state is a dict from SelectiveLoader.state_dict(), got a '
                         f'{type(state).__name__}')
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        nested = [key for key, value in state.items()
                  if isinstance(value, Mapping) and all(k in value for k in _STATE_KEYS)]
        hint = (f'; it looks like a whole checkpoint: pass its {nested[0]!r} entry'
                if nested else '')
        raise StateError(f'this is not a SelectiveLoader state: it lacks {missing}{hint}')
    if state['version'] not in (1, STATE_VERSION):
        raise StateError(f'loader state version {state["version"]!r} is not {STATE_VERSION}; '
                         f'it was saved by an incompatible jest_stream')
    for key, low in (('epoch', 0), ('super_batches', 0), ('batch_size', 1),
                     ('super_batch_size', 1), ('world_size', 1), ('seed', None)):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) \
                or (low is not None and value < low):
            raise StateError(f'the loader state has {key}={value!r}; expected an int'
                             + (f' >= {low}' if low is not None else ''))
    if state['super_batch_size'] < state['batch_size']:
        raise StateError(f'the loader state has super_batch_size={state["super_batch_size"]} < '
                         f'batch_size={state["batch_size"]}')
    if state.get('source') not in (None, 'map', 'streaming', 'iterable'):
        raise StateError(f'the loader state has source={state["source"]!r}; expected "map", '
                         f'"streaming" or "iterable"')

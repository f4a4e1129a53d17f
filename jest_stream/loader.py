"""The loader the trainer iterates: super-batches in, selected sub-batches out.

Read top to bottom, one super-batch goes through::

    source (DataLoader workers, pinned host memory)
      -> device copy (side stream on CUDA)
      -> scorer (learner forward without gradients + reference)
      -> selection (private generator derived from the batch's position)
      -> gather the sub-batch -> trainer

With ``scoring='process'`` the scorer and the selection run in a co-located scorer
process that shares the learner's weights (:mod:`jest_stream.scorer_process`); the
batches it selects from the same weights are the same.

``SelectiveLoader`` is a ``torch.utils.data.DataLoader`` whose ``batch_size`` is
the sub-batch size and whose ``dataset`` answers Composer-style
``state_dict(num_samples, from_beginning)`` from the loader's own raw counter, so
training frameworks can checkpoint it like any DataLoader.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from jest_stream.batch import Batch, batch_length, gather
from jest_stream.criteria import Criterion
from jest_stream.distributed import (
    SELECTION_SCOPES,
    CommStats,
    global_score_and_select,
    rank_and_world,
)
from jest_stream.pipeline import (
    SelectionConfig,
    check_filter_ratio,
    resolve_selection,
    score_and_select,
)
from jest_stream.scorer_process import ProcessScoring, check_picklable, process_settings
from jest_stream.source import ID_KEY, SuperBatchSource, make_source, sample_ids_of
from jest_stream.telemetry import LoaderTelemetry
from jest_stream.transfer import DevicePrefetcher

__all__ = ['SelectiveLoader', 'super_batch_size_for', 'STATE_VERSION']

STATE_VERSION = 1


def super_batch_size_for(batch_size: int, filter_ratio: float) -> int:
    """``B = batch_size / (1 - filter_ratio)``, which must be a whole number.

    Args:
        batch_size (int): Sub-batch size ``b``.
        filter_ratio (float): Fraction of each super-batch filtered out, in ``[0, 1)``.

    Returns:
        int: The super-batch size ``B``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f'batch_size={batch_size!r} must be a positive int')
    check_filter_ratio(filter_ratio)
    exact = batch_size / (1.0 - filter_ratio)
    size = round(exact)
    if abs(size - exact) > 1e-6 * exact:
        near = sorted({math.floor(exact), math.ceil(exact)})
        options = ', '.join(f'{1 - batch_size / n:.6g} (B={n})' for n in near if n >= batch_size)
        raise ValueError(
            f'batch_size / (1 - filter_ratio) = {batch_size} / {1 - filter_ratio:.6g} = '
            f'{exact:.4f} is not a whole super-batch size; use filter_ratio = {options}, or pass '
            f'super_batch_size=... instead of filter_ratio')
    return size


class _LoaderPosition(IterableDataset):
    """The loader's ``.dataset``: answers checkpoint calls from the loader's raw counter.

    Frameworks that checkpoint ``train_dataloader.dataset`` (Composer does) call
    ``state_dict(num_samples, from_beginning)``; the sample count they pass counts
    selected samples, which would replay data, so it is ignored in favour of the
    super-batches actually handed to the trainer.
    """

    def __init__(self, loader: SelectiveLoader) -> None:
        self._loader = loader

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True
                   ) -> dict[str, Any]:
        loader = self._loader
        if num_samples and loader._consumed >= len(loader):
            # A framework that checkpoints after the last batch of an epoch without having
            # ended the epoch (Composer when training stops there) still counts this epoch:
            # keep the position in it, so the epoch is not counted twice on resume.
            return loader._state(loader._epoch, loader._consumed)
        return loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        raise TypeError('iterate the SelectiveLoader, not its .dataset')

    def __len__(self) -> int:
        return len(self._loader) * self._loader.batch_size


def _learner_device(scorer: Any) -> torch.device:
    learner = getattr(scorer, 'learner', None)
    if isinstance(learner, nn.Module):
        for param in learner.parameters():
            return param.device
    return torch.device('cpu')


class SelectiveLoader(DataLoader):
    """Yields sub-batches of ``batch_size`` selected from super-batches of ``B``.

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
        criterion (str): ``learnability``, ``hard_learner``, ``easy_reference`` or ``uniform``.
        method (str): ``joint`` (default), ``topk``, ``sample``; ``uniform`` goes with the
            uniform criterion.
        n_chunks (int): Chunks of the joint sampler; more than ``batch_size`` means one
            example per chunk.
        temperature (float): Softmax temperature of sampling; 0 is greedy.
        seed (int): Seed of the selection generators and of map-style shuffling.
        device (str | torch.device): Where batches are scored and delivered; by default the
            device of the scorer's learner.
        num_workers (int): DataLoader workers that read and collate super-batches.
        pin_memory (bool): Page-locked host batches; by default True on CUDA.
        prefetch_factor (int): Super-batches each worker reads ahead.
        timeout (float): Seconds to wait for a worker's batch before raising.
        shuffle (bool): Shuffle map-style datasets (streaming datasets shuffle themselves).
        id_key (str): Column that carries the global sample id.
        batch_transform (Callable, optional): Applied to each selected sub-batch on the
            device before it is handed over (e.g. a mixed-resolution split).
        count_flops (bool): Count the FLOPs of every scoring pass (``score_flops`` in the
            telemetry) with ``torch.utils.flop_counter``; costs some time per batch.
        scoring (str): ``inline`` (default): score in the trainer's process, with the current
            weights. ``process``: score in a co-located scorer process that shares the
            learner's weights, while the trainer trains (the scorer must be picklable; see
            :mod:`jest_stream.scorer_process`). Call :meth:`close` (or use the loader as a
            context manager) to stop the process.
        sync_every (int, optional): Process scoring: publish the learner's weights to the
            scorer process every this many weight updates (optimizer steps; default 1).
        max_staleness (int, optional): Process scoring: most weight updates by which the
            weights a batch was scored with may lag the trainer's when it is handed over; a
            staler result is scored again. At least ``sync_every - 1``; 0 (with
            ``sync_every=1``) selects exactly what inline scoring selects. Default
            ``sync_every - 1 + prefetch_depth``.
        prefetch_depth (int, optional): Process scoring: super-batches in flight: the next
            one for the trainer and those loaded (and, as far as ``max_staleness`` allows,
            scored) behind it while the trainer trains; 2 or more overlap scoring with
            training (default 2).
        selection_scope (str): Under ``torch.distributed``: ``rank`` (default) selects each
            rank's sub-batch from its own super-batch; ``global`` all-gathers the scores (or
            embeddings) and selects ``world_size x batch_size`` examples jointly over the
            global super-batch, each rank training its share (inline scoring only; see
            :mod:`jest_stream.distributed`).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, filter_ratio: float | None = None,
                 super_batch_size: int | None = None, scorer: Any = None,
                 criterion: str | Criterion = 'learnability', method: str | None = None,
                 n_chunks: int = 16, temperature: float = 1.0, seed: int = 0,
                 device: str | torch.device | None = None, num_workers: int = 0,
                 pin_memory: bool | None = None, prefetch_factor: int = 2, timeout: float = 300.0,
                 shuffle: bool = True, id_key: str = ID_KEY,
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 count_flops: bool = False, scoring: str = 'inline',
                 sync_every: int | None = None, max_staleness: int | None = None,
                 prefetch_depth: int | None = None, selection_scope: str = 'rank') -> None:
        if (filter_ratio is None) == (super_batch_size is None):
            raise ValueError('give exactly one of filter_ratio=... or super_batch_size=...')
        if super_batch_size is None:
            big = super_batch_size_for(batch_size, filter_ratio)
        else:
            super_batch_size_for(batch_size, 0.0)
            if not isinstance(super_batch_size, int) or super_batch_size < batch_size:
                raise ValueError(f'super_batch_size={super_batch_size!r} must be an int >= '
                                 f'batch_size={batch_size}')
            big = super_batch_size
        crit, method = resolve_selection(criterion, method)
        if crit.scores and (scorer is None or not callable(scorer)):
            raise ValueError(f'criterion={crit.name!r} needs a scorer, e.g. '
                             f'jest_stream.ClassificationScorer(model, reference)')
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f'n_chunks={n_chunks!r} must be a positive int (chunks larger '
                             f'than batch_size are capped: one example per chunk)')
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f'temperature={temperature!r} must be >= 0 (0 is greedy)')
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f'num_workers={num_workers!r} must be an int >= 0')
        if selection_scope not in SELECTION_SCOPES:
            raise ValueError(f'selection_scope={selection_scope!r} is not known; choose one of '
                             f'{list(SELECTION_SCOPES)}')
        if selection_scope == 'global' and scoring != 'inline':
            raise ValueError('selection_scope="global" runs collectives in the trainer process, '
                             'so it needs scoring="inline"; use selection_scope="rank" with '
                             'scoring="process"')
        settings = process_settings(scoring, sync_every=sync_every, max_staleness=max_staleness,
                                    prefetch_depth=prefetch_depth)
        device = torch.device(device) if device is not None else _learner_device(scorer)
        if settings is not None:
            if device.type not in ('cpu', 'cuda'):
                raise ValueError(f'scoring="process" runs on the cpu or a cuda device, not '
                                 f'{device}; use scoring="inline"')
            check_picklable(scorer)
        if pin_memory is None:
            pin_memory = device.type == 'cuda'
        rank, world_size = rank_and_world()
        source = make_source(
            dataset, super_batch_size=big, shuffle=shuffle, seed=seed, rank=rank,
            world_size=world_size, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor, timeout=timeout, id_key=id_key)
        samples = source.samples_per_rank()
        if samples == 0:
            raise ValueError('the dataset is empty: there is nothing to select from')
        if samples < batch_size:
            raise ValueError(
                f'the dataset gives each rank {samples} samples, fewer than batch_size='
                f'{batch_size}: not one sub-batch can be filled; lower batch_size')
        super().__init__(_LoaderPosition(self), batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, timeout=timeout)
        self.source: SuperBatchSource = source
        self.super_batch_size = big
        self.scorer = scorer
        self.selection = SelectionConfig(criterion=crit, method=method, batch_size=batch_size,
                                         n_chunks=n_chunks, temperature=float(temperature),
                                         seed=int(seed), count_flops=bool(count_flops))
        self.seed = int(seed)
        self.device = device
        self.id_key = id_key
        self.batch_transform = batch_transform
        self.telemetry = LoaderTelemetry()
        self._next_epoch = 0
        self._epoch = 0
        self._consumed = 0
        self._resume: tuple[int, int] | None = None
        self._started = False
        self.scoring = scoring
        self.process_settings = settings
        self._process: ProcessScoring | None = None
        self.selection_scope = selection_scope
        self._comm = CommStats()

    @property
    def filter_ratio(self) -> float:
        return 1.0 - self.batch_size / self.super_batch_size

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
        counts at each batch boundary: ``torch.optim`` optimizer steps on the learner's
        parameters, and any other in-place change of them. Call this after changing the
        weights in a way it cannot see (``param.data``, a non-``torch.optim`` update through
        ``.data``); it counts as one update if none was seen since the last publish. Does
        nothing with inline scoring or before the scorer process has started (it starts
        with the current weights).
        """
        if self._process is not None:
            self._process.publish_weights()

    def close(self) -> None:
        """Stop the scorer process and free its shared buffers; iterating again restarts it.

        Does nothing with inline scoring. Called on exit from a ``with`` block and, at the
        latest, when the loader is garbage collected or the interpreter exits.
        """
        if self._process is not None:
            self._process.close()

    def __enter__(self) -> SelectiveLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Sub-batches per epoch: one per super-batch that can fill one."""
        per_rank = self.source.samples_per_rank()
        full, rest = divmod(per_rank, self.super_batch_size)
        return full + (1 if rest >= self.batch_size else 0)

    # Position and resumption

    def state_dict(self) -> dict[str, Any]:
        """The position: the epoch and the super-batches of it handed to the trainer.

        Super-batches read or scored ahead are not counted: they are drawn again after a resume.
        Once the last sub-batch of an epoch has been handed over, the position is the start of
        the next epoch, whether or not the loop has asked the loader for more yet.
        """
        epoch, consumed = self._epoch, self._consumed
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        return self._state(epoch, consumed)

    def _state(self, epoch: int, consumed: int) -> dict[str, Any]:
        return {
            'version': STATE_VERSION,
            'epoch': epoch,
            'super_batches': consumed,
            'seed': self.seed,
            'batch_size': self.batch_size,
            'super_batch_size': self.super_batch_size,
            'world_size': self.source.world_size,
            'dataset': self.source.dataset_state(epoch, consumed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; call on a fresh loader before iterating it."""
        if self._started:
            raise RuntimeError('load_state_dict must be called on a fresh loader, before iterating '
                               'it: a StreamingDataset only resumes at its next epoch')
        if state.get('version') != STATE_VERSION:
            raise ValueError(f'loader state version {state.get("version")!r} is not '
                             f'{STATE_VERSION}; it was saved by an incompatible jest_stream')
        if state['seed'] != self.seed:
            raise ValueError(f'the saved loader had seed={state["seed"]} but this one has '
                             f'seed={self.seed}; resume with the same seed or selections will '
                             f'not continue exactly')
        world = self.source.world_size
        for key, mine in (('super_batch_size', self.super_batch_size),
                          ('batch_size', self.batch_size)):
            # Positions count global raw samples, so only the global sizes must match: a run
            # may resume on another world size with the same global batch.
            if state[key] * state['world_size'] != mine * world:
                raise ValueError(
                    f'the saved loader had {key}={state[key]} on {state["world_size"]} rank(s) '
                    f'(global {state[key] * state["world_size"]}) but this one has {key}={mine} '
                    f'on {world} (global {mine * world}); resume with the same global '
                    f'{key} or selections will not continue exactly')
        self._resume = (int(state['epoch']), int(state['super_batches']))
        self._epoch, self._consumed = self._resume
        self._next_epoch = self._epoch
        self.source.load_dataset_state(state.get('dataset'))

    def _begin_epoch(self) -> tuple[int, int]:
        self._started = True
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
        else:
            epoch, start = self._next_epoch, 0
        self._next_epoch = epoch + 1
        self._epoch, self._consumed = epoch, start
        self.telemetry.start_epoch()
        return epoch, start

    # The data path

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._begin_epoch()
        host_batches = iter(self.source.iter_epoch(epoch, start))
        if self.process_settings is not None:
            yield from self._iter_process(host_batches, epoch, start)
            return
        index = start
        for _host, batch, timings in DevicePrefetcher(host_batches, self.device):
            sub = self._select(batch, epoch, index, timings)
            index += 1
            if sub is None:
                self._consumed = index
                continue
            self._consumed = index
            yield sub
        self._epoch, self._consumed = epoch + 1, 0

    def _iter_process(self, host_batches: Iterator[Batch], epoch: int, start: int
                      ) -> Iterator[Batch]:
        if self._process is None:
            self._process = ProcessScoring(
                scorer=self.scorer, config=self.selection, settings=self.process_settings,
                super_batch_size=self.super_batch_size, device=self.device, id_key=self.id_key,
                telemetry=self.telemetry, timeout=self.timeout,
                batch_transform=self.batch_transform)
        for index, sub in self._process.iter_epoch(
                host_batches, epoch, start, lambda batch: sample_ids_of(batch, self.id_key)):
            self._consumed = index + 1
            if sub is not None:
                yield sub
        self._epoch, self._consumed = epoch + 1, 0

    def _select(self, batch: Batch, epoch: int, index: int, timings: dict[str, float]
                ) -> Batch | None:
        ids = sample_ids_of(batch, self.id_key)
        n = batch_length(batch)
        if n < self.batch_size:
            self.telemetry.record_dropped(epoch=epoch, index=index, n=n,
                                          batch_size=self.batch_size)
            return None
        if self.selection_scope == 'global':
            return self._select_globally(batch, ids, epoch, index, timings)
        result = score_and_select(self.selection, self.scorer, batch, ids, epoch, index)
        start = time.perf_counter()
        sub = gather(batch, result.selected)
        if self.batch_transform is not None:
            sub = self.batch_transform(sub)
        timings.update(score_s=result.score_s,
                       select_s=result.select_s + time.perf_counter() - start)
        self.telemetry.record(epoch=epoch, index=index, drawn=n, yielded=self.batch_size,
                              timings=timings, scores=result.self_scores,
                              selected=result.selected,
                              extra=None if result.score_flops is None
                              else {'score_flops': result.score_flops})
        return sub

    def _select_globally(self, batch: Batch, ids: torch.Tensor, epoch: int, index: int,
                         timings: dict[str, float]) -> Batch:
        before = CommStats(self._comm.bytes, self._comm.seconds)
        sub, selected, self_scores, score_s, select_s = global_score_and_select(
            self.selection, self.scorer, batch, ids, epoch, index, self._comm)
        if self.batch_transform is not None:
            sub = self.batch_transform(sub)
        timings.update(score_s=score_s, select_s=select_s)
        self.telemetry.record(
            epoch=epoch, index=index, drawn=len(ids), yielded=self.batch_size, timings=timings,
            scores=self_scores, selected=selected,
            extra={'comm_bytes': self._comm.bytes - before.bytes,
                   'comm_s': self._comm.seconds - before.seconds})
        return sub

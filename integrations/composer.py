"""Composer integration: JEST selection inside a Composer ``Trainer``.

Two ways to select in a Composer run, with different costs (see ``docs/composer.md``):

- :class:`JESTAlgorithm`: the train dataloader is a plain ``DataLoader`` that reads
  super-batches of ``B``; at ``Event.AFTER_DATALOADER`` the algorithm scores the
  super-batch with ``state.model`` and replaces ``state.batch`` with the selected
  sub-batch. Scoring runs inline, in the trainer's process. Composer counts the batch
  before that event, so samples are counted raw and Composer's own dataset checkpoint
  resumes the data exactly.
- :class:`~jest_stream.SelectiveLoader` as the ``train_dataloader``, inline or with a
  co-located scorer process, with :class:`JESTLoaderCallback` for checks, metrics and the
  scorer process's life cycle. Composer sees sub-batches and counts selected samples; the
  loader's ``.dataset`` answers Composer's checkpoint calls from its own raw counter.

Importing this module needs Composer (``pip install 'jest-stream[composer]'``); the rest of
jest_stream never imports it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

try:
    from composer.core import Algorithm, Callback, Event, State, TimeUnit
    from composer.core.precision import get_precision_context
    from composer.loggers import Logger
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'jest_stream.integrations.composer needs Composer; install it with '
        "pip install 'jest-stream[composer]' (mosaicml>=0.32.1,<0.33)") from error

from jest_stream.batch import Batch, batch_length, gather
from jest_stream.criteria import Criterion, get_criterion
from jest_stream.losses import per_example_cross_entropy
from jest_stream.pipeline import (
    SelectionConfig,
    check_filter_ratio,
    resolve_selection,
    score_and_select,
)
from jest_stream.reference import ColumnReference, ReferenceTable, resolve_reference
from jest_stream.scoring import ClassificationScorer
from jest_stream.telemetry import score_statistics

__all__ = [
    'JESTAlgorithm',
    'JESTLoaderCallback',
    'OUTSIDE_WINDOW',
    'call_model',
    'jest_first',
    'unwrap_model',
]

log = logging.getLogger('jest_stream')

STATE_VERSION = 1

OUTSIDE_WINDOW = ('uniform', 'first')


def call_model(model: nn.Module, batch: Batch) -> Tensor:
    """The default scoring forward: ``model(batch)``, as Composer calls a ``ComposerModel``.

    Args:
        model (nn.Module): A ``ComposerModel`` (or any module that takes the whole batch).
        batch (Batch): A chunk of the super-batch, on the device.

    Returns:
        Tensor[n, C]: The model's outputs (class logits for the default loss).
    """
    return model(batch)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (itself otherwise).

    Scoring runs without gradients on one rank's super-batch; calling the DDP wrapper would
    broadcast buffers, a collective call the other ranks are not making at that moment.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def jest_first(algorithms: Sequence[Algorithm], event: Event) -> Sequence[Algorithm]:
    """Algorithm pass: :class:`JESTAlgorithm` runs first on ``Event.AFTER_DATALOADER``.

    Composer runs ``AFTER_*`` events in reverse order of the ``algorithms`` list, so without
    this pass an algorithm listed after :class:`JESTAlgorithm` (MixUp, say) would change the
    super-batch before it is scored. Pass it to the trainer:
    ``Trainer(..., algorithm_passes=jest_first)``.

    Args:
        algorithms (Sequence[Algorithm]): The algorithms that match ``event``, in run order.
        event (Event): The event.

    Returns:
        Sequence[Algorithm]: The same algorithms, :class:`JESTAlgorithm` first on
        ``AFTER_DATALOADER``; unchanged on every other event.
    """
    if event != Event.AFTER_DATALOADER:
        return algorithms
    return sorted(algorithms, key=lambda algorithm: not isinstance(algorithm, JESTAlgorithm))


def _batch_parts(batch: Any) -> tuple[Any, ...]:
    """The batch object and its top-level columns, to see whether anything replaced them."""
    if isinstance(batch, Mapping):
        return (batch, *batch.values())
    if isinstance(batch, (tuple, list)):
        return (batch, *batch)
    return (batch,)


def _same_parts(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    return len(before) == len(after) and all(a is b for a, b in zip(before, after, strict=True))


def _model_device(model: nn.Module) -> torch.device | None:
    for param in model.parameters():
        return param.device
    return None


def _canonical_device(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current index>``, so that equal devices compare equal."""
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device())
    return device


class JESTAlgorithm(Algorithm):
    """Selects the most learnable sub-batch of every super-batch inside a Composer ``Trainer``.

    The train dataloader reads super-batches of ``B`` examples: a ``DataLoader`` with
    ``batch_size=B`` over a ``StreamingDataset`` built with ``batch_size=B`` (use
    :class:`~jest_stream.SampleIdStreamingDataset` so every row carries its global id). At
    ``Event.AFTER_DATALOADER`` the algorithm moves the super-batch to the device, scores it
    with ``state.model`` as the learner (no gradients, eval mode, in chunks, under the run's
    precision) and the reference, selects ``b = B * (1 - filter_ratio)`` rows with
    :func:`jest_stream.pipeline.score_and_select` and replaces ``state.batch`` with them.

    The selection generator is derived from ``(seed, epoch, batch_in_epoch)`` of Composer's
    timestamp, so a run resumed from a Composer checkpoint selects what the uninterrupted run
    selects. The seed is the algorithm's checkpointed state.

    Composer counts each batch *before* ``AFTER_DATALOADER``: samples, tokens and throughput
    are raw (``B`` per batch), which is what the dataset's checkpoint needs. ``max_duration``
    in batches counts optimizer steps; in samples, raw samples read; in epochs, passes over
    the data.

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
                 batch_transform: Callable[[Batch], Batch] | None = None) -> None:
        if (filter_ratio is None) == (batch_size is None):
            raise ValueError('give exactly one of filter_ratio=... or batch_size=... (the '
                             'sub-batch size)')
        if filter_ratio is not None:
            check_filter_ratio(filter_ratio)
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f'batch_size={batch_size!r} must be a positive int')
        crit, method = resolve_selection(criterion, method)
        if scorer_factory is not None and reference is not None:
            raise ValueError('give reference= to the default scorer, or build the scorer with '
                             'scorer_factory=, not both (the factory chooses its own reference)')
        if scorer_factory is not None and not callable(scorer_factory):
            raise TypeError('scorer_factory must be callable: scorer_factory(model) -> scorer')
        if crit.scores and scorer_factory is None:
            resolve_reference(reference, needed=crit.needs_reference)
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f'n_chunks={n_chunks!r} must be a positive int')
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or temperature < 0:
            raise ValueError(f'temperature={temperature!r} must be >= 0 (0 is greedy)')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f'seed={seed!r} must be an int or None (the trainer\'s seed)')
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f'chunk_size={chunk_size!r} must be a positive int or None')
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float))
                and 0.0 <= start < end <= 1.0):
            raise ValueError(f'start={start!r}, end={end!r}: selection runs while the fraction '
                             f'of training done is in [start, end), so 0 <= start < end <= 1')
        if outside_window not in OUTSIDE_WINDOW:
            raise ValueError(f'outside_window={outside_window!r} is not known; choose one of '
                             f'{", ".join(map(repr, OUTSIDE_WINDOW))}')
        self.filter_ratio = None if filter_ratio is None else float(filter_ratio)
        self.batch_size = batch_size
        self.reference = reference
        self.scorer_factory = scorer_factory
        self.target_key = target_key
        self.loss_fn = loss_fn
        self.forward = forward
        self.criterion = crit
        self.method = method
        self.n_chunks = n_chunks
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.batch_transform = batch_transform
        self.start = float(start)
        self.end = float(end)
        self.outside_window = outside_window
        self.id_key = id_key
        self._explicit_seed = seed
        self.seed: int | None = seed
        self.scorer: Any = None
        self.batches_selected = 0
        self.batches_outside = 0
        self.samples_trained = 0
        self._sub_batch_size: int | None = None
        self._super_batch_size: int | None = None
        self._matched_parts: tuple[Any, ...] | None = None
        self._warned_short = False

    # Composer's hooks

    def match(self, event: Event, state: State) -> bool:
        if event == Event.AFTER_DATALOADER:
            # Composer asks every algorithm to match before it runs any: remember the batch
            # as the dataloader made it, to notice an algorithm that replaces it before us.
            self._matched_parts = _batch_parts(state.batch)
            return True
        return event in (Event.INIT, Event.FIT_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            if self.seed is None:
                self.seed = int(state.rank_zero_seed)
        elif event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.AFTER_DATALOADER:
            self._select(state, logger)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the seed and counters (positions come from the timestamp)."""
        return {'version': STATE_VERSION, 'seed': self.seed,
                'batches_selected': self.batches_selected,
                'batches_outside': self.batches_outside,
                'samples_trained': self.samples_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; an explicit ``seed`` must match the saved one."""
        if state.get('version') != STATE_VERSION:
            raise ValueError(f'JESTAlgorithm state version {state.get("version")!r} is not '
                             f'{STATE_VERSION}; it was saved by an incompatible jest_stream')
        saved = state['seed']
        if self._explicit_seed is not None and saved is not None and saved != self._explicit_seed:
            raise ValueError(
                f'the checkpoint selected with seed={saved} but this JESTAlgorithm has '
                f'seed={self._explicit_seed}; resume with the same seed (or seed=None to take the '
                f'saved one) or selections will not continue exactly')
        self.seed = saved
        self.batches_selected = int(state['batches_selected'])
        self.batches_outside = int(state['batches_outside'])
        self.samples_trained = int(state['samples_trained'])

    # Set-up

    def _fit_start(self, state: State) -> None:
        from jest_stream.loader import SelectiveLoader

        loader = state.train_dataloader
        if isinstance(loader, SelectiveLoader):
            raise TypeError(
                'the train dataloader is already a jest_stream SelectiveLoader, which selects by '
                'itself: use JESTAlgorithm with a DataLoader of super-batches, or the '
                'SelectiveLoader with JESTLoaderCallback, not both')
        super_batch = getattr(loader, 'batch_size', None)
        if isinstance(super_batch, int):
            sub = self._check_sizes(super_batch)
            _check_streaming_batch_size(loader, super_batch)
            # Composer sizes its default microbatch from the dataloader, which reads B; the
            # trainer only ever gets b.
            microbatch = state.device_train_microbatch_size
            if isinstance(microbatch, int) and microbatch > sub:
                state.device_train_microbatch_size = sub
        _resume_streaming_epoch_boundary(state)
        if self.criterion.scores and self.scorer is None:
            self.scorer = self._build_scorer(state)

    def _check_sizes(self, super_batch: int) -> int:
        """The sub-batch size for super-batches of ``super_batch``; raises if not whole."""
        if self._super_batch_size == super_batch and self._sub_batch_size is not None:
            return self._sub_batch_size
        if self.batch_size is not None:
            if self.batch_size > super_batch:
                raise ValueError(
                    f'batch_size={self.batch_size} is larger than the super-batches of '
                    f'{super_batch} the train dataloader reads; read at least batch_size rows')
            sub = self.batch_size
        else:
            exact = super_batch * (1.0 - self.filter_ratio)
            sub = round(exact)
            if abs(sub - exact) > 1e-6 * max(exact, 1.0) or sub < 1:
                raise ValueError(
                    f'super-batches of {super_batch} times (1 - filter_ratio={self.filter_ratio:g})'
                    f' = {exact:.4f} is not a whole sub-batch size; choose a filter_ratio that '
                    f'keeps a whole number of rows, or give batch_size=... instead')
        self._super_batch_size, self._sub_batch_size = super_batch, sub
        return sub

    def _build_scorer(self, state: State) -> Any:
        model = unwrap_model(state.model)
        if self.scorer_factory is not None:
            scorer = self.scorer_factory(model)
            if not callable(scorer):
                raise TypeError(f'scorer_factory returned {type(scorer).__name__}, which is not '
                                f'a scorer: scorer(batch, sample_ids, criterion) -> scores')
            return scorer
        reference = resolve_reference(self.reference, needed=self.criterion.needs_reference)
        if isinstance(reference, nn.Module):
            state.device.module_to_device(reference)
        if self.id_key is None and isinstance(reference, ReferenceTable) \
                and not isinstance(reference, ColumnReference):
            raise ValueError(
                f'id_key=None names rows by their position, but the reference '
                f'{type(reference).__name__} looks outputs up by sample id; give the batches a '
                f'sample id column (jest_stream.SampleIdStreamingDataset) and set id_key')
        return ClassificationScorer(model, reference, target_key=self.target_key,
                                    forward=self.forward, loss_fn=self.loss_fn)

    # Selection

    def _in_window(self, state: State) -> bool:
        if self.start == 0.0 and self.end == 1.0:
            return True
        done = _elapsed_fraction(state)
        return self.start <= done < self.end

    def _sample_ids(self, batch: Batch, n: int) -> Tensor:
        key = self.id_key
        if key is None:
            return torch.arange(n)
        if isinstance(batch, Mapping):
            if key not in batch:
                raise KeyError(
                    f'the batch has no {key!r} column of sample ids (its columns are '
                    f'{sorted(map(str, batch))}); build the dataset as '
                    f'jest_stream.SampleIdStreamingDataset, set id_key to the id column, or '
                    f'id_key=None to name rows by position')
            ids = batch[key]
        elif isinstance(batch, (tuple, list)):
            if not isinstance(key, int) or not -len(batch) <= key < len(batch):
                raise KeyError(
                    f'id_key={key!r} does not index the batch, a sequence of {len(batch)} fields; '
                    f'set id_key to the field of the sample ids, or None to name rows by position')
            ids = batch[key]
        else:
            raise KeyError(f'id_key={key!r}: the batch is a {type(batch).__name__}; use '
                           f'id_key=None to name rows by position')
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int64, torch.int32) or ids.shape != (n,):
            raise TypeError(f'the sample ids in {key!r} must be an int tensor of {n} rows, got '
                            f'{ids.dtype} {tuple(ids.shape)}')
        return ids.long().cpu()

    def _config(self, sub: int, scoring: bool) -> SelectionConfig:
        if scoring:
            return SelectionConfig(criterion=self.criterion, method=self.method, batch_size=sub,
                                   n_chunks=self.n_chunks, temperature=self.temperature,
                                   seed=self.seed)
        return SelectionConfig(criterion=get_criterion('uniform'), method='uniform',
                               batch_size=sub, n_chunks=self.n_chunks,
                               temperature=self.temperature, seed=self.seed)

    def _chunk_size(self, state: State, sub: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        microbatch = state.device_train_microbatch_size
        if isinstance(microbatch, int) and microbatch > 0:
            return min(microbatch, sub)
        return sub

    def _select(self, state: State, logger: Logger) -> None:
        matched, self._matched_parts = self._matched_parts, None
        if matched is not None and not _same_parts(matched, _batch_parts(state.batch)):
            raise RuntimeError(
                'another algorithm changed the batch at Event.AFTER_DATALOADER before '
                'JESTAlgorithm selected from it (Composer runs AFTER_* events in reverse order '
                'of the algorithms list); pass algorithm_passes=jest_first (from '
                'jest_stream.integrations.composer) to the Trainer so selection runs first')
        if self.seed is None:
            self.seed = int(state.rank_zero_seed)
        n = batch_length(state.batch)
        sub = self._check_sizes(self._super_batch_size or n)
        if n <= sub:
            # A partial last super-batch no larger than a sub-batch: there is nothing to choose.
            if n < sub and not self._warned_short:
                self._warned_short = True
                log.warning('JESTAlgorithm: a super-batch of %d rows is smaller than the '
                            'sub-batch size %d (a partial last batch); it is trained whole. Use '
                            'drop_last=True on the train DataLoader to drop it.', n, sub)
            state.batch = state.device.batch_to_device(state.batch)
            self.samples_trained += n
            logger.log_metrics({'jest/kept_fraction': 1.0,
                                'jest/samples_trained': float(self.samples_trained)})
            return
        epoch = int(state.timestamp.epoch)
        index = int(state.timestamp.batch_in_epoch)
        ids = self._sample_ids(state.batch, n)
        start = time.perf_counter()
        batch = state.device.batch_to_device(state.batch)
        transfer_s = time.perf_counter() - start
        active = self._in_window(state)
        if active or self.outside_window == 'uniform':
            scoring = active and self.criterion.scores
            config = self._config(sub, scoring=active)
            if scoring and isinstance(self.scorer, ClassificationScorer) \
                    and self.scorer_factory is None:
                self.scorer.chunk_size = self._chunk_size(state, sub)
            with get_precision_context(state.precision, state.precision_config):
                result = score_and_select(config, self.scorer if scoring else None, batch, ids,
                                          epoch, index)
            selected, score_s, select_s = result.selected, result.score_s, result.select_s
            self_scores = result.self_scores
        else:
            selected, score_s, select_s, self_scores = torch.arange(sub), 0.0, 0.0, None
        start = time.perf_counter()
        state.batch = gather(batch, selected)
        if self.batch_transform is not None:
            state.batch = self.batch_transform(state.batch)
        gather_s = time.perf_counter() - start
        if active:
            self.batches_selected += 1
        else:
            self.batches_outside += 1
        self.samples_trained += sub
        metrics: dict[str, float] = {
            'jest/active': float(active),
            'jest/kept_fraction': sub / n,
            'jest/transfer_s': transfer_s,
            'jest/score_s': score_s,
            'jest/select_s': select_s + gather_s,
            'jest/samples_trained': float(self.samples_trained),
        }
        metrics.update({f'jest/{k}': v for k, v in score_statistics(self_scores,
                                                                     selected).items()})
        logger.log_metrics(metrics)

    # For tests and logs

    @property
    def sub_batch_size(self) -> int | None:
        """``b``, known once the super-batch size is (at ``FIT_START`` or the first batch)."""
        return self._sub_batch_size


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
        raise ValueError(
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
        log.info('JESTAlgorithm: the dataset state of this epoch-boundary checkpoint says '
                 'epoch %d; resuming at epoch %d, sample 0, as the timestamp says',
                 resume['epoch'], epoch)
        resume['epoch'] = epoch
        dataset.load_state_dict(resume)


class JESTLoaderCallback(Callback):
    """Runs a :class:`~jest_stream.SelectiveLoader` that is Composer's ``train_dataloader``.

    The loader selects by itself (inline, or in its scorer process); Composer sees
    sub-batches and counts selected samples. Composer checkpoints the loader's position
    through ``train_dataloader.dataset.state_dict(num_samples, from_beginning)``, which the
    loader answers from its own count of super-batches handed over, and restores it into the
    fresh loader of a resumed run before the first batch, so nothing is drawn or scored twice.

    With ``scoring='process'`` the loader publishes the learner's weights to its scorer
    process by itself: it counts optimizer steps on the learner's parameters and publishes
    every ``sync_every`` of them when Composer asks for the next batch (after
    ``BATCH_END``), so this callback adds no publishing of its own. It checks what that
    relies on and what a Composer run would otherwise get silently wrong:

    - at ``FIT_START``: the train dataloader is a ``SelectiveLoader``; its scorer's learner is
      (part of) the model the trainer trains, not a copy; the loader delivers batches on the
      model's device; no :class:`JESTAlgorithm` selects a second time. It warns when a
      mid-epoch resume did not restore the loader's position (Composer would then spin the
      loader, drawing and scoring every skipped batch again);
    - at ``BATCH_END``: logs the loader's metrics of the batch (``jest/...``: timings,
      throughput, score statistics and, in process mode, weight staleness);
    - at ``FIT_END`` and on ``close``: stops the scorer process (a later ``fit`` restarts it
      with the current weights).

    Args:
        log_metrics (bool): Log the loader's per-batch metrics to Composer's logger.
    """

    def __init__(self, *, log_metrics: bool = True) -> None:
        self.log_metrics = log_metrics

    @staticmethod
    def _loader(state: State) -> Any:
        from jest_stream.loader import SelectiveLoader

        loader = state.train_dataloader
        if not isinstance(loader, SelectiveLoader):
            raise TypeError(
                f'JESTLoaderCallback needs a jest_stream SelectiveLoader as the train dataloader, '
                f'got {type(loader).__name__}; for a DataLoader of super-batches use '
                f'JESTAlgorithm instead')
        return loader

    def fit_start(self, state: State, logger: Logger) -> None:
        loader = self._loader(state)
        if any(isinstance(algorithm, JESTAlgorithm) for algorithm in state.algorithms):
            raise TypeError('JESTAlgorithm would select a second time from the SelectiveLoader\'s '
                            'sub-batches: use one of the two')
        model = unwrap_model(state.model)
        device = _model_device(model)
        if device is not None and _canonical_device(device) != _canonical_device(loader.device):
            raise ValueError(
                f'the SelectiveLoader delivers batches on {loader.device} but the model trains '
                f'on {device}; build the loader with device={str(device)!r} (it defaults to the '
                f'device of the learner when the loader is built, before the Trainer moves the '
                f'model)')
        learner = getattr(loader.scorer, 'learner', None)
        if loader.selection.criterion.needs_learner and isinstance(learner, nn.Module):
            trained = {id(param) for param in model.parameters()}
            scored = [param for param in learner.parameters()]
            if scored and not all(id(param) in trained for param in scored):
                raise ValueError(
                    'the SelectiveLoader\'s scorer scores with a learner whose parameters are not '
                    'those of the model the Trainer trains, so it would select with stale weights; '
                    'give the scorer the trained model itself (the ComposerModel or its inner '
                    'module), not a copy')
        if int(state.timestamp.batch_in_epoch) > 0 and 'train' not in state.dataset_resumption:
            warnings.warn(
                'resuming mid-epoch without the SelectiveLoader\'s position in the checkpoint: '
                'Composer will spin the loader, drawing and scoring every batch it skips. Load '
                'a checkpoint saved with this loader as the train dataloader.', stacklevel=2)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.log_metrics:
            return
        metrics = self._loader(state).metrics
        logger.log_metrics({f'jest/{key}': float(value) for key, value in metrics.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool)})

    def fit_end(self, state: State, logger: Logger) -> None:
        self._loader(state).close()

    def close(self, state: State, logger: Logger) -> None:
        loader = state.train_dataloader
        if loader is not None and hasattr(loader, 'close'):
            loader.close()

"""Scoring in a co-located process that shares the learner's weights (``scoring='process'``).

The trainer process keeps loading: DataLoader workers collate super-batches, and
each one is copied into a slot of a :class:`~jest_stream.batch_ring.BatchRing`
(shared memory on the CPU; device memory shared by CUDA IPC, filled from pinned
host memory on a side stream, on CUDA). A *scorer process* (spawned, daemonic,
started on the first iteration and kept across epochs) receives the scorer once,
keeps a replica of the learner whose weights it copies from a
:class:`~jest_stream.shared_weights.SharedWeights` double buffer, and runs
:func:`jest_stream.pipeline.score_and_select` (the function inline scoring runs,
with the same position-derived generator) on each slot it is sent. Only handles,
slot ids, indices, weight versions, timings and small non-tensor columns cross the
process boundary.

Staleness. The trainer counts weight updates (optimizer steps) and publishes the
weights every ``sync_every`` of them. The *staleness* of a batch is the number of
updates the trainer has made when the batch is handed over minus the version of the
weights it was scored with. A result staler than ``max_staleness`` is scored again
with freshly published weights (``rescored`` in the telemetry). Batches are loaded
up to ``prefetch_depth`` ahead, and submitted for scoring only as far ahead as the
recent rate of updates per batch lets them stay within ``max_staleness``; with
``max_staleness=0`` nothing is scored ahead and the selections equal inline scoring's.

Faults. While it waits, the trainer watches the scorer process: if it raises, dies
or stops answering for ``timeout`` seconds, a :class:`ScorerProcessError` (with the
child's traceback, exit code or signal) is raised in the trainer. The scorer process
exits when the trainer process is gone. Requests carry the generation of the
iteration that made them, so results still in flight when an epoch is abandoned
(``break``) are discarded.

This module does not import mosaicml-streaming, so the scorer process starts quickly.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as torch_mp
from torch import Tensor, nn

from jest_stream.batch import Batch, batch_length, gather
from jest_stream.batch_ring import BatchRing, SlotCache, SlotRequest
from jest_stream.pipeline import SelectionConfig, score_and_select
from jest_stream.shared_weights import SharedWeights, StepCounter, TensorSpec, state_tensors
from jest_stream.telemetry import LoaderTelemetry

__all__ = [
    'SCORING_MODES',
    'ProcessSettings',
    'ProcessScoring',
    'ScorerProcessError',
    'check_picklable',
    'process_settings',
]

SCORING_MODES = ('inline', 'process')

# How often a waiting side checks that the other process is still there.
_POLL_S = 0.25
# How long a stopping scorer process gets before it is terminated, then killed.
_STOP_GRACE_S = 3.0


class ScorerProcessError(RuntimeError):
    """The scorer process raised (its traceback is in the message and the cause), died (the
    exit code or signal is in the message), or stopped answering."""


# Settings

@dataclass(frozen=True)
class ProcessSettings:
    """Settings of process scoring (see :func:`process_settings`)."""

    sync_every: int
    max_staleness: int
    prefetch_depth: int


def process_settings(scoring: str, *, sync_every: int | None, max_staleness: int | None,
                     prefetch_depth: int | None) -> ProcessSettings | None:
    """Validate the scoring mode and its settings; None for inline scoring.

    Args:
        scoring (str): ``inline`` or ``process``.
        sync_every (int, optional): Publish the learner's weights every this many updates
            (default 1).
        max_staleness (int, optional): Most updates a batch's scoring weights may lag the
            trainer's when it is handed over; at least ``sync_every - 1``. Default
            ``sync_every - 1 + prefetch_depth``: scoring ahead never forces a re-score at one
            update per batch.
        prefetch_depth (int, optional): Super-batches in flight: the next one for the
            trainer and those loaded (and, staleness permitting, scored) behind it while the
            trainer trains; 2 or more overlap scoring with training (default 2).

    Returns:
        ProcessSettings | None: The settings with defaults filled in.
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f'scoring={scoring!r} is not known; choose one of '
                         f'{", ".join(map(repr, SCORING_MODES))}')
    given = {'sync_every': sync_every, 'max_staleness': max_staleness,
             'prefetch_depth': prefetch_depth}
    if scoring == 'inline':
        extra = [f'{k}={v!r}' for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f'{", ".join(extra)} only apply to scoring="process"; inline '
                             f'scoring always uses the current weights. Pass scoring="process" '
                             f'or drop them')
        return None
    for name, value in (('sync_every', sync_every), ('prefetch_depth', prefetch_depth),
                        ('max_staleness', max_staleness)):
        low = 0 if name == 'max_staleness' else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise ValueError(f'{name}={value!r} must be an int >= {low}')
    sync_every = 1 if sync_every is None else sync_every
    prefetch_depth = 2 if prefetch_depth is None else prefetch_depth
    if max_staleness is None:
        max_staleness = sync_every - 1 + prefetch_depth
    if max_staleness < sync_every - 1:
        raise ValueError(
            f'max_staleness={max_staleness} < sync_every - 1 = {sync_every - 1}: weights published '
            f'every {sync_every} updates are up to {sync_every - 1} updates old by design. Raise '
            f'max_staleness to at least {sync_every - 1} or lower sync_every')
    return ProcessSettings(sync_every=sync_every, max_staleness=max_staleness,
                           prefetch_depth=prefetch_depth)


# Sending the scorer: its learner's tensors are left out, they come from the shared weights

class _ScorerPickler(pickle.Pickler):
    """Pickles a scorer with some tensors replaced by references.

    ``placeholders`` maps ``id(tensor)`` to an index; None replaces every tensor (to check
    that everything else pickles without copying any tensor data).
    """

    def __init__(self, file: Any, placeholders: dict[int, int] | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._placeholders = placeholders

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, Tensor):
            return None
        if self._placeholders is None:
            return ('tensor', id(obj))
        index = self._placeholders.get(id(obj))
        return None if index is None else ('learner', index)


class _ScorerUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, specs: list[TensorSpec]) -> None:
        super().__init__(file)
        self._specs = specs
        self.learner_tensors: dict[int, Tensor] = {}

    def persistent_load(self, pid: Any) -> Tensor:
        kind, index = pid
        if kind != 'learner':
            raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
        if index not in self.learner_tensors:
            self.learner_tensors[index] = self._specs[index].empty()
        return self.learner_tensors[index]


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


def check_picklable(scorer: Any) -> None:
    """Raise a ``TypeError`` naming ``scorer`` and the fix if it cannot go to another process.

    Tensor data is not copied, so the check is cheap for any model size.
    """
    try:
        _ScorerPickler(_Sink(), None).dump(scorer)
    except Exception as error:
        raise TypeError(
            f'scoring="process" sends the scorer to another process, so scorer= must be '
            f'picklable, and pickling it failed: {type(error).__name__}: {error}. Lambdas and '
            f'functions defined inside other functions cannot be pickled: define them at the '
            f'top level of a module (def forward(model, batch): ...) and pass those '
            f'(forward=, loss_fn=, input_transform=, ...); open files, locks and generators '
            f'must not be attributes of the scorer. Or use scoring="inline"') from error


def _dump_scorer(scorer: Any, learner: list[Tensor]) -> bytes:
    buffer = io.BytesIO()
    _ScorerPickler(buffer, {id(t): i for i, t in enumerate(learner)}).dump(scorer)
    return buffer.getvalue()


def _load_scorer(data: bytes, specs: list[TensorSpec]) -> tuple[Any, list[Tensor]]:
    unpickler = _ScorerUnpickler(io.BytesIO(data), specs)
    scorer = unpickler.load()
    made = unpickler.learner_tensors
    # Tensors the pickle did not reach still get a place to load into.
    replica = [made[i] if i in made else spec.empty() for i, spec in enumerate(specs)]
    return scorer, replica


def _shared_learner(scorer: Any, config: SelectionConfig) -> nn.Module | None:
    learner = getattr(scorer, 'learner', None)
    if not config.criterion.needs_learner or not isinstance(learner, nn.Module):
        return None
    if not state_tensors(learner):
        return None
    return learner


# The scorer process

@dataclass
class _ChildSpec:
    scorer: bytes
    specs: list[TensorSpec]
    weights: SharedWeights | None
    config: SelectionConfig
    id_key: str | int
    device: torch.device
    threads: int
    parent_pid: int
    requests: Connection
    results: Connection


@dataclass
class _Request:
    generation: int
    request_id: int
    urgent: bool
    epoch: int
    index: int
    slot: SlotRequest


def _sample_ids(batch: Batch, id_key: str | int) -> Tensor:
    # The trainer has already checked the ids (jest_stream.source.sample_ids_of) before
    # sending the batch; this process does not import the source module (streaming).
    ids = batch[id_key] if isinstance(batch, dict) else batch[-1]
    return torch.as_tensor(ids).long()


def _pickled_error(error: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return None


class _Inbox:
    """Reads requests on a thread, so that the trainer's sends never wait for a scoring."""

    def __init__(self, requests: Connection) -> None:
        self.messages: queue.Queue = queue.Queue()
        self._requests = requests
        threading.Thread(target=self._read, name='jest_stream-inbox', daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self._requests.recv()
            except (EOFError, OSError):
                message = ('stop',)  # The trainer's end is closed: it stopped or died.
            except BaseException as error:  # An unreadable message fails the next request.
                message = ('broken', error)
            self.messages.put(message)
            if message[0] == 'stop':
                return


def _scorer_main(spec: _ChildSpec) -> None:
    """The scorer process: receive requests, score and select, send results, until told to
    stop or the trainer is gone."""
    # Ctrl-C reaches the whole process group; the trainer decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    results = spec.results
    started = time.perf_counter()

    def parent_gone() -> None:
        if os.getppid() != spec.parent_pid:
            raise SystemExit(0)

    try:
        if spec.device.type == 'cuda' and spec.device.index is not None:
            torch.cuda.set_device(spec.device)
        scorer, replica = _load_scorer(spec.scorer, spec.specs)
        results.send(('ready', {'pid': os.getpid(), 'start_s': time.perf_counter() - started,
                                'streaming_imported': 'streaming' in sys.modules,
                                'threads': torch.get_num_threads()}))
    except BaseException:
        results.send(('fatal', traceback.format_exc()))
        return
    inbox = _Inbox(spec.requests)
    slots = SlotCache()
    pending: deque[_Request] = deque()
    newest_generation = 0
    loaded = None
    try:
        while True:
            # Take everything that has arrived: stop and newer generations act at once, and
            # re-scores go first.
            block = not pending
            while True:
                try:
                    message = inbox.messages.get(timeout=_POLL_S) if block else \
                        inbox.messages.get_nowait()
                except queue.Empty:
                    if block:
                        parent_gone()
                        continue
                    break
                block = False
                kind = message[0]
                if kind == 'stop':
                    return
                if kind == 'broken':
                    raise message[1]
                if kind == 'generation':
                    newest_generation = max(newest_generation, message[1])
                elif kind == 'score':
                    request: _Request = message[1]
                    newest_generation = max(newest_generation, request.generation)
                    if request.urgent:
                        pending.appendleft(request)
                    else:
                        pending.append(request)
            if not pending:
                continue
            request = pending.popleft()
            # Newly sent buffers are kept even when the request itself is skipped.
            slots.receive(request.slot)
            if request.generation < newest_generation:
                results.send(('skipped', request.generation, request.request_id,
                              request.slot.slot))
                continue
            try:
                start = time.perf_counter()
                version = 0
                if spec.weights is not None:
                    version, number = spec.weights.latest(give_up=parent_gone)
                    if number != loaded:
                        version, loaded = spec.weights.read_into(replica, give_up=parent_gone)
                load_s = time.perf_counter() - start
                batch = slots.batch(request.slot)
                ids = _sample_ids(batch, spec.id_key)
                result = score_and_select(spec.config, scorer, batch, ids, request.epoch,
                                          request.index)
            except Exception as error:
                results.send(('error', request.generation, request.request_id,
                              request.slot.slot, traceback.format_exc(), _pickled_error(error)))
                continue
            self_scores = None if result.self_scores is None else result.self_scores.numpy()
            results.send(('result', request.generation, request.request_id, request.slot.slot,
                          _Result(selected=result.selected.numpy(), self_scores=self_scores,
                                  version=version, score_s=result.score_s,
                                  select_s=result.select_s, load_s=load_s,
                                  score_flops=result.score_flops)))
    except (BrokenPipeError, EOFError, ConnectionResetError, SystemExit):
        return  # The trainer is gone.
    except BaseException:
        try:
            results.send(('fatal', traceback.format_exc()))
        except OSError:
            pass


@dataclass
class _Result:
    selected: np.ndarray
    self_scores: np.ndarray | None
    version: int
    score_s: float
    select_s: float
    load_s: float
    score_flops: int | None


# The trainer's side

def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return 'is still running'
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f'signal {-exitcode}'
        return f'was killed by {name}'
    return f'exited with code {exitcode}'


class _Child:
    """The scorer process and both ends of its pipes; stops it when collected."""

    def __init__(self, process: Any, requests: Connection, results: Connection) -> None:
        self.process = process
        self.requests = requests
        self.results = results

    def stop(self) -> None:
        try:
            self.requests.send(('stop',))
        except (OSError, ValueError):
            pass
        process = self.process
        process.join(_STOP_GRACE_S)
        if process.is_alive():
            process.terminate()
            process.join(_STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
        for connection in (self.requests, self.results):
            connection.close()
        process.close()


@dataclass
class _Entry:
    """One super-batch of the current epoch, from loading to hand-over."""

    index: int
    n: int
    wait_s: float
    slot: int | None = None
    transfer_s: float = 0.0
    request_id: int | None = None


@dataclass
class _Reply:
    result: _Result | None = None
    error: tuple[str, bytes | None] | None = None


@dataclass
class _Weights:
    """The trainer's side of weight sharing."""

    shared: SharedWeights
    learner: nn.Module
    counter: StepCounter
    published: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=8))
    last_steps: int | None = None


class ProcessScoring:
    """The trainer's side of process scoring: the ring, the shared weights, the scorer process.

    Built by :class:`~jest_stream.SelectiveLoader` with ``scoring='process'``; the loader's
    ``__iter__`` delegates each epoch to :meth:`iter_epoch`.

    Args:
        scorer (Scorer | None): Sent to the scorer process once (its learner's tensors are
            not pickled: they come from the shared weights).
        config (SelectionConfig): Selection settings.
        settings (ProcessSettings): ``sync_every``, ``max_staleness``, ``prefetch_depth``.
        super_batch_size (int): ``B``, the rows of a ring slot.
        device (torch.device): Where batches are scored and delivered (cpu or cuda).
        id_key (str | int): Column of the sample ids.
        telemetry (LoaderTelemetry): Receives one record per handed-over batch.
        timeout (float): Seconds without an answer from the scorer process before giving up.
        batch_transform (Callable, optional): Applied to each gathered sub-batch.
    """

    def __init__(self, *, scorer: Any, config: SelectionConfig, settings: ProcessSettings,
                 super_batch_size: int, device: torch.device, id_key: str | int,
                 telemetry: LoaderTelemetry, timeout: float,
                 batch_transform: Callable[[Batch], Batch] | None = None) -> None:
        if device.type not in ('cpu', 'cuda'):
            raise ValueError(f'scoring="process" runs on the cpu or a cuda device, not {device}; '
                             f'use scoring="inline"')
        self.scorer = scorer
        self.config = config
        self.settings = settings
        self.super_batch_size = super_batch_size
        self.device = device
        self.id_key = id_key
        self.telemetry = telemetry
        self.timeout = timeout
        self.batch_transform = batch_transform
        self.startup: dict[str, Any] | None = None
        self._child: _Child | None = None
        self._finalizer: weakref.finalize | None = None
        self._ring: BatchRing | None = None
        self._weights: _Weights | None = None
        self._child_allocations: dict[int, int] = {}
        self._generation = 0
        self._next_request = 0
        self._awaited: dict[int, _Entry] = {}
        self._replies: dict[int, _Reply] = {}
        self._held: list[_Entry] = []

    # Life cycle

    @property
    def pid(self) -> int | None:
        """The scorer process's pid, or None when it is not running."""
        return None if self._child is None else self._child.process.pid

    @property
    def running(self) -> bool:
        return self._child is not None

    def _start(self) -> None:
        ctx = torch_mp.get_context('spawn')
        self.startup = None
        learner = _shared_learner(self.scorer, self.config)
        specs: list[TensorSpec] = []
        tensors: list[Tensor] = []
        shared = None
        if learner is not None:
            named = state_tensors(learner)
            specs = [TensorSpec.of(name, tensor) for name, tensor in named]
            tensors = [tensor for _, tensor in named]
            shared = SharedWeights(specs, ctx.Lock())
            counter = StepCounter(learner)
            shared.publish([t.detach() for t in tensors], 0)
            self._weights = _Weights(shared=shared, learner=learner, counter=counter)
        self._ring = BatchRing(self.settings.prefetch_depth, self.super_batch_size, self.device)
        self._child_allocations = {}
        requests_read, requests_write = ctx.Pipe(duplex=False)
        results_read, results_write = ctx.Pipe(duplex=False)
        # Half the trainer's CPU threads, at least one: the trainer and the scorer each get a
        # share of the cores instead of fighting over all of them.
        threads = max(1, torch.get_num_threads() // 2)
        spec = _ChildSpec(scorer=_dump_scorer(self.scorer, tensors), specs=specs, weights=shared,
                          config=self.config, id_key=self.id_key, device=self.device,
                          threads=threads, parent_pid=os.getpid(), requests=requests_read,
                          results=results_write)
        process = ctx.Process(target=_scorer_main, args=(spec,), name='jest_stream-scorer',
                              daemon=True)
        try:
            process.start()
        finally:
            # Only the scorer process keeps these ends: when it dies, the trainer's reads and
            # writes fail instead of waiting.
            requests_read.close()
            results_write.close()
        self._child = _Child(process, requests_write, results_read)
        self._finalizer = weakref.finalize(self, self._child.stop)

    def close(self) -> None:
        """Stop the scorer process and free the shared buffers (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._child = None
        self._generation += 1  # An iterator left suspended is stale from now on.
        if self._weights is not None:
            self._weights.counter.close()
        self._weights = None
        self._ring = None
        self._awaited.clear()
        self._replies.clear()
        self._held.clear()

    def _fail(self, message: str, cause: BaseException | None = None) -> ScorerProcessError:
        self.close()
        error = ScorerProcessError(message)
        error.__cause__ = cause
        return error

    def _check_child(self) -> None:
        """Raise if the scorer process is gone (used while waiting for a shared lock)."""
        child = self._child
        if child is not None and not child.process.is_alive():
            raise self._fail(self._died())

    def _died(self) -> str:
        process = self._child.process
        message = f'the scorer process (pid {process.pid}) {_describe_exit(process.exitcode)}'
        if self.startup is None:
            message += (
                ' before it was ready (its traceback, if any, is on stderr). A script that '
                'starts one must guard its entry point with if __name__ == "__main__": the '
                'scorer process imports the main module')
        return message

    # Weights

    def _poll_weights(self) -> int:
        """At a batch boundary: count updates, publish when ``sync_every`` have accumulated."""
        weights = self._weights
        if weights is None:
            return 0
        steps = weights.counter.poll()
        if weights.last_steps is not None:
            weights.recent.append(steps - weights.last_steps)
        weights.last_steps = steps
        if steps - weights.published >= self.settings.sync_every:
            self._publish(steps)
        return steps

    def _publish(self, steps: int) -> None:
        weights = self._weights
        tensors = [tensor.detach() for _, tensor in state_tensors(weights.learner)]
        weights.shared.publish(tensors, steps, give_up=self._check_child)
        weights.published = steps

    def publish_weights(self) -> None:
        """Publish the learner's weights now, counting one update if none was seen since the
        last publish (for changes the step counter cannot see, such as ``param.data``)."""
        weights = self._weights
        if weights is None or self._child is None:
            return
        steps = weights.counter.poll()
        if steps == weights.published:
            steps = weights.counter.bump()
        self._publish(steps)

    def _lookahead(self) -> int:
        """Super-batches that may be scored ahead of the one handed over next.

        A batch submitted ``k`` batches before its hand-over is ``k`` times the updates per
        batch (plus up to ``sync_every - 1`` unpublished ones) stale by then.
        """
        depth = self.settings.prefetch_depth
        weights = self._weights
        if weights is None:
            return depth
        # Updates per batch, recently; before any are seen, one (a training loop).
        per_batch = max(weights.recent) if weights.recent else 1
        if per_batch == 0:
            return depth
        budget = self.settings.max_staleness - (self.settings.sync_every - 1)
        return min(depth, budget // per_batch)

    # Messages

    def _send(self, message: tuple) -> None:
        try:
            self._child.requests.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError) as error:
            self._await_exit()
            raise self._fail(self._died(), error) from error

    def _await_exit(self) -> None:
        if self._child is not None:
            self._child.process.join(_POLL_S)

    def _submit(self, entry: _Entry, epoch: int, *, urgent: bool = False) -> None:
        ring = self._ring
        ring.wait_ready(entry.slot)
        allocation = ring.allocation(entry.slot)
        fresh = self._child_allocations.get(entry.slot) != allocation
        request_id = self._next_request
        self._next_request += 1
        message = ('score', _Request(generation=self._generation, request_id=request_id,
                                     urgent=urgent, epoch=epoch, index=entry.index,
                                     slot=ring.request(entry.slot, with_buffers=fresh)))
        ring.add_user(entry.slot)
        self._send(message)
        self._child_allocations[entry.slot] = allocation
        entry.request_id = request_id
        self._awaited[request_id] = entry

    def _receive(self, deadline: float) -> None:
        """Handle one message from the scorer process, waiting until ``deadline`` at most."""
        child = self._child
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(
                    f'the scorer process (pid {child.process.pid}) sent nothing for '
                    f'{self.timeout:g} s (timeout=); it may be stuck in the scorer')
            ready = wait([child.results, child.process.sentinel], min(left, _POLL_S * 4))
            if child.results in ready:
                try:
                    message = child.results.recv()
                except (EOFError, OSError):
                    self._await_exit()
                    raise self._fail(self._died()) from None
                self._handle(message)
                return
            if ready:
                # Dead: its last words (an error) may still be in the pipe.
                try:
                    while child.results.poll():
                        self._handle(child.results.recv())
                except (EOFError, OSError):
                    pass
                child.process.join(_POLL_S)
                raise self._fail(self._died())

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == 'ready':
            self.startup = message[1]
            return
        if kind == 'fatal':
            raise self._fail(f'the scorer process failed:\n{message[1]}')
        generation, request_id, slot = message[1:4]
        self._ring.drop_user(slot)
        if request_id not in self._awaited or generation != self._generation:
            return  # From an abandoned epoch, or superseded by a re-score.
        reply = _Reply()
        if kind == 'result':
            reply.result = message[4]
        elif kind == 'error':
            reply.error = (message[4], message[5])
        else:
            return
        self._replies[request_id] = reply

    def _result(self, entry: _Entry, epoch: int) -> _Result:
        deadline = time.monotonic() + self.timeout
        request_id = entry.request_id
        while request_id not in self._replies:
            self._receive(deadline)
        reply = self._replies.pop(request_id)
        del self._awaited[request_id]
        if reply.error is not None:
            text, data = reply.error
            cause = None
            if data is not None:
                try:
                    cause = pickle.loads(data)
                except Exception:
                    cause = None
            raise self._fail(f'the scorer process raised while scoring super-batch '
                             f'{entry.index} of epoch {epoch}:\n{text}', cause)
        return reply.result

    # Loading

    def _free_slot(self) -> int:
        ring = self._ring
        deadline = time.monotonic() + self.timeout
        while True:
            slot = ring.acquire()
            if slot is not None:
                return slot
            # Every slot is held or read by unanswered requests (from an abandoned epoch).
            self._receive(deadline)

    def _load(self, host: Batch, index: int, wait_s: float) -> _Entry:
        n = batch_length(host)
        entry = _Entry(index=index, n=n, wait_s=wait_s)
        if n < self.config.batch_size:
            return entry
        entry.slot = self._free_slot()
        self._held.append(entry)
        start = time.perf_counter()
        self._ring.fill(entry.slot, host)
        entry.transfer_s = time.perf_counter() - start
        return entry

    def _let_go(self, entry: _Entry) -> None:
        if entry.slot is not None and entry in self._held:
            self._held.remove(entry)
            self._ring.release(entry.slot)

    def _abandon(self) -> None:
        """Let go of the slots of an epoch that was left early; its requests still in flight
        are answered (or skipped) by the scorer process and then discarded."""
        for entry in list(self._held):
            self._let_go(entry)
        self._awaited.clear()
        self._replies.clear()

    # The epoch

    def iter_epoch(self, batches: Iterator[Batch], epoch: int, start: int,
                   check_ids: Callable[[Batch], Any]) -> Iterator[tuple[int, Batch | None]]:
        """Hand over one epoch: ``(index, sub_batch)`` per super-batch, ``None`` for a dropped one.

        Args:
            batches (Iterator[Batch]): Host super-batches of the epoch, from ``start`` on.
            epoch (int): The epoch.
            start (int): Index of the first super-batch.
            check_ids (Callable): Raises if a batch's sample ids are missing or not integers.
        """
        if self._child is None:
            self._start()
        self._abandon()
        self._generation += 1
        generation = self._generation
        self._send(('generation', generation))
        entries: deque[_Entry] = deque()
        next_index = start
        exhausted = False
        try:
            while True:
                if self._generation != generation:
                    raise RuntimeError('this iterator of the loader is stale: the loader was '
                                       'iterated again (or closed) since; use the newest iterator')
                steps = self._poll_weights()
                while not exhausted and len(entries) < self.settings.prefetch_depth:
                    begin = time.perf_counter()
                    host = next(batches, None)
                    if host is None:
                        exhausted = True
                        break
                    check_ids(host)
                    entries.append(self._load(host, next_index, time.perf_counter() - begin))
                    next_index += 1
                if not entries:
                    return
                entry = entries[0]
                if entry.slot is None:
                    entries.popleft()
                    self.telemetry.record_dropped(epoch=epoch, index=entry.index, n=entry.n,
                                                  batch_size=self.config.batch_size)
                    yield entry.index, None
                    continue
                sub = self._hand_over(entries, epoch, steps)
                yield entry.index, sub
        finally:
            if self._generation == generation and self._ring is not None:
                self._abandon()

    def _hand_over(self, entries: deque[_Entry], epoch: int, steps: int) -> Batch:
        entry = entries[0]
        ahead = 1 + self._lookahead()
        for queued in list(entries)[:ahead]:
            if queued.slot is not None and queued.request_id is None:
                self._submit(queued, epoch)
        begin = time.perf_counter()
        result = self._result(entry, epoch)
        rescored = 0
        staleness = steps - result.version if self._weights is not None else 0
        if staleness > self.settings.max_staleness:
            if self._weights.published < steps:
                self._publish(steps)
            self._submit(entry, epoch, urgent=True)
            result = self._result(entry, epoch)
            rescored = 1
            staleness = steps - result.version
        result_wait_s = time.perf_counter() - begin
        entries.popleft()
        begin = time.perf_counter()
        selected = torch.from_numpy(result.selected)
        sub = gather(self._ring.batch(entry.slot), selected)
        self._let_go(entry)
        if self.batch_transform is not None:
            sub = self.batch_transform(sub)
        gather_s = time.perf_counter() - begin
        self_scores = None if result.self_scores is None else torch.from_numpy(result.self_scores)
        extra: dict[str, Any] = {
            'staleness': staleness, 'weights_version': result.version, 'trainer_steps': steps,
            'rescored': rescored, 'result_wait_s': result_wait_s,
            'weights_load_s': result.load_s,
            'scoring_ahead': sum(1 for e in entries if e.request_id is not None)}
        if result.score_flops is not None:
            extra['score_flops'] = result.score_flops
        self.telemetry.totals['rescored'] = self.telemetry.totals.get('rescored', 0.0) + rescored
        self.telemetry.record(
            epoch=epoch, index=entry.index, drawn=entry.n, yielded=self.config.batch_size,
            timings={'wait_s': entry.wait_s, 'transfer_s': entry.transfer_s,
                     'score_s': result.score_s, 'select_s': result.select_s + gather_s},
            scores=self_scores, selected=selected, extra=extra)
        return sub

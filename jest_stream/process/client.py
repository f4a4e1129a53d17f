"""The trainer's side of process scoring: the ring, the shared weights, the scorer process.

The trainer keeps loading: DataLoader workers collate super-batches, and each one is copied
into a slot of a :class:`~jest_stream.process.ring.BatchRing` (shared memory on the CPU;
device memory shared by CUDA IPC on CUDA). The scorer process runs the selecting half of
the step on each slot it is sent; the trainer runs the other half
(:meth:`~jest_stream.step.SelectionStep.finish`: gather, transform, record).

Staleness. The trainer counts weight updates (optimizer steps) and publishes the weights
every ``sync_every`` of them (:class:`~jest_stream.process.weights.WeightSync`). The
*staleness* of a batch is the number of updates the trainer has made when the batch is
handed over minus the version of the weights it was scored with. A result staler than
``max_staleness`` is scored again with freshly published weights (``rescored`` in the
telemetry). Batches are submitted for scoring only as far ahead as the recent rate of
updates per batch lets them stay within ``max_staleness``.

Faults. Every wait on the scorer process is bounded by ``timeout``: for a reply, for a
request to be taken (requests are sent from a thread, so a process that stopped reading
cannot block the trainer), for a free ring slot, for the shared-weights lock. A wait that
runs out, a scorer that raises, and a process that dies all raise
:class:`~jest_stream.process.lifecycle.ScorerProcessError` in the trainer, naming what was
waited for, the traceback, or the exit code or signal. Requests carry the generation of
the iteration that made them, so results still in flight when an epoch is abandoned
(``break``) are discarded.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as torch_mp
from torch import Tensor

from jest_stream.batch import Batch, attached_id_key, batch_length, read_sample_ids
from jest_stream.config import ProcessSettings
from jest_stream.errors import UsageError
from jest_stream.policies import Plan
from jest_stream.process.child import POLL_S, scorer_main
from jest_stream.process.lifecycle import (
    Child,
    ChildSpec,
    ScorerProcessError,
    describe_exit,
    dump_scorer,
    shared_learner,
)
from jest_stream.process.messages import (
    Failed,
    Fatal,
    NewGeneration,
    Ready,
    Reply,
    Request,
    Scored,
    ScoreRequest,
    ScorerState,
    Skipped,
    StateRequest,
)
from jest_stream.process.ring import BatchRing
from jest_stream.process.weights import TensorSpec, WeightsTimeout, WeightSync, state_tensors
from jest_stream.step import SelectionStep

__all__ = ['ProcessScoring', 'STARTUP_S']

# Seconds a new scorer process has at least to start (import torch, load the scorer).
STARTUP_S = 120.0


class _Outbox:
    """Sends requests on a thread; the trainer waits for each send at most ``timeout``.

    A scorer process that is stopped (SIGSTOP, a debugger) stops reading, and once its pipe
    is full a plain send would block the trainer for good.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name='jest_stream-outbox', daemon=True).start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            message, done = item
            try:
                self._connection.send(message)
            except BaseException as error:  # reported to the waiting trainer
                done['error'] = error
            done['event'].set()

    def send(self, message: Request, *, timeout: float, check: Callable[[], None]) -> None:
        """Send ``message``; raise what sending raised, or ``TimeoutError`` after
        ``timeout`` seconds. ``check`` runs while waiting (it raises if the process died)."""
        done: dict[str, Any] = {'event': threading.Event()}
        self._queue.put((message, done))
        deadline = time.monotonic() + timeout
        while not done['event'].wait(min(POLL_S, max(deadline - time.monotonic(), 0.0))):
            check()
            if time.monotonic() >= deadline:
                raise TimeoutError
        if 'error' in done:
            raise done['error']

    def close(self) -> None:
        self._queue.put(None)


@dataclass
class _Entry:
    """One super-batch of the current epoch, from loading to hand-over."""

    index: int
    n: int
    wait_s: float
    ids: Tensor | None = None
    host: Batch | None = None
    slot: int | None = None
    transfer_s: float = 0.0
    request_id: int | None = None
    plan: Plan | None = None


@dataclass
class _Answer:
    scored: Scored | None = None
    failed: Failed | None = None


class ProcessScoring:
    """The trainer's side of process scoring.

    Built by :class:`~jest_stream.SelectiveLoader` with ``scoring='process'``; the loader's
    ``__iter__`` delegates each epoch to :meth:`iter_epoch`.

    Args:
        step (SelectionStep): The loader's step: its configuration (with the process
            settings and the timeout of every wait) and its scorer go to the scorer process
            (the learner's tensors come from the shared weights); its handing-over half runs
            here.
        device (torch.device): Where batches are scored and delivered (cpu or cuda).
        id_key (str | int): Column or field of the sample ids.
    """

    def __init__(self, *, step: SelectionStep, device: torch.device, id_key: str | int
                 ) -> None:
        self.step = step
        self.settings: ProcessSettings = step.config.process
        self.super_batch_size = step.config.super_batch_size
        self.timeout = step.config.timeout
        self.device = device
        self.id_key = id_key
        self.startup: dict[str, Any] | None = None
        self._child: Child | None = None
        self._outbox: _Outbox | None = None
        self._finalizer: weakref.finalize | None = None
        self._ring: BatchRing | None = None
        self._weights: WeightSync | None = None
        self._child_allocations: dict[int, int] = {}
        self._generation = 0
        self._next_request = 0
        self._awaited: dict[int, _Entry] = {}
        self._answers: dict[int, _Answer] = {}
        self._held: list[_Entry] = []
        self._plan_for: Callable[[int, int], Plan] = lambda epoch, index: Plan()
        self._states: dict[tuple[int, int], bytes | None] = {}

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
        scorer, config = self.step.scorer, self.step.config
        learner = shared_learner(scorer, config)
        specs: list[TensorSpec] = []
        tensors: list[Tensor] = []
        if learner is not None:
            named = state_tensors(learner)
            specs = [TensorSpec.of(name, tensor) for name, tensor in named]
            tensors = [tensor for _, tensor in named]
            self._weights = WeightSync(learner, sync_every=self.settings.sync_every,
                                       max_staleness=self.settings.max_staleness,
                                       prefetch_depth=self.settings.prefetch_depth,
                                       timeout=self.timeout)
        self._ring = BatchRing(self.settings.prefetch_depth, self.super_batch_size, self.device)
        self._child_allocations = {}
        requests_read, requests_write = ctx.Pipe(duplex=False)
        replies_read, replies_write = ctx.Pipe(duplex=False)
        # Half the trainer's CPU threads, at least one: the trainer and the scorer each get a
        # share of the cores instead of fighting over all of them.
        threads = max(1, torch.get_num_threads() // 2)
        spec = ChildSpec(scorer=dump_scorer(scorer, tensors), specs=specs,
                         weights=None if self._weights is None else self._weights.shared,
                         config=config, id_key=self.id_key, device=self.device,
                         threads=threads, parent_pid=os.getpid(), requests=requests_read,
                         replies=replies_write)
        process = ctx.Process(target=scorer_main, args=(spec,), name='jest_stream-scorer',
                              daemon=True)
        try:
            process.start()
        finally:
            # Only the scorer process keeps these ends: when it dies, the trainer's reads and
            # writes fail instead of waiting.
            requests_read.close()
            replies_write.close()
        self._child = Child(process, requests_write, replies_read)
        self._outbox = _Outbox(requests_write)
        self._finalizer = weakref.finalize(self, _shut_down, self._child, self._outbox)

    def _await_ready(self) -> None:
        """Wait for the new scorer process to load the scorer: importing torch and a model
        can take longer than one request may, so start-up gets at least ``STARTUP_S``."""
        limit = max(self.timeout, STARTUP_S)
        deadline = time.monotonic() + limit
        while self.startup is None:
            self._receive(deadline, 'the scorer process to start', f'{limit:g} s')

    def close(self) -> None:
        """Stop the scorer process and free the shared buffers (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._child = None
        self._outbox = None
        self._generation += 1  # An iterator left suspended is stale from now on.
        if self._weights is not None:
            self._weights.close()
        self._weights = None
        self._ring = None
        self._awaited.clear()
        self._answers.clear()
        self._held.clear()

    def _fail(self, message: str, cause: BaseException | None = None) -> ScorerProcessError:
        self.close()
        error = ScorerProcessError(message)
        error.__cause__ = cause
        return error

    def _check_child(self) -> None:
        """Raise if the scorer process is gone (run while waiting on it)."""
        child = self._child
        if child is not None and not child.process.is_alive():
            raise self._fail(self._died())

    def _died(self) -> str:
        process = self._child.process
        message = f'the scorer process (pid {process.pid}) {describe_exit(process.exitcode)}'
        if self.startup is None:
            message += (
                ' before it was ready (its traceback, if any, is on stderr). A script that '
                'starts one must guard its entry point with if __name__ == "__main__": the '
                'scorer process imports the main module')
        return message

    # Weights

    def _weights_call(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except WeightsTimeout as error:
            raise self._fail(f'the scorer process (pid {self.pid}) did not let the trainer '
                             f'publish weights: {error}', error) from error

    def _poll_weights(self) -> int:
        """At a batch boundary: count updates, publish when ``sync_every`` have accumulated."""
        if self._weights is None:
            return 0
        return self._weights_call(lambda: self._weights.poll(give_up=self._check_child))

    def publish_weights(self) -> None:
        """Publish the learner's weights now, counting one update if none was seen since the
        last publish."""
        if self._weights is None or self._child is None:
            return
        self._weights_call(lambda: self._weights.publish_now(give_up=self._check_child))

    # Messages

    def _send(self, message: Request, what: str) -> None:
        try:
            self._outbox.send(message, timeout=self.timeout, check=self._check_child)
        except TimeoutError:
            raise self._fail(
                f'the scorer process (pid {self.pid}) took no request for {self.timeout:g} s '
                f'(timeout=) while the trainer sent {what}: it is stopped (SIGSTOP, a '
                f'debugger, a frozen container) or stuck') from None
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as error:
            self._await_exit()
            raise self._fail(self._died(), error) from error

    def _await_exit(self) -> None:
        if self._child is not None:
            self._child.process.join(POLL_S)

    def _submit(self, entry: _Entry, epoch: int, *, urgent: bool = False) -> None:
        ring = self._ring
        ring.wait_ready(entry.slot)
        allocation = ring.allocation(entry.slot)
        fresh = self._child_allocations.get(entry.slot) != allocation
        request_id = self._next_request
        self._next_request += 1
        if entry.plan is None:  # a re-score keeps the plan of the first scoring
            entry.plan = self._plan_for(epoch, entry.index)
        message = ScoreRequest(generation=self._generation, request_id=request_id,
                               urgent=urgent, epoch=epoch, index=entry.index,
                               slot=ring.request(entry.slot, with_buffers=fresh),
                               plan=entry.plan)
        ring.add_user(entry.slot)
        self._send(message, f'super-batch {entry.index} of epoch {epoch}')
        self._child_allocations[entry.slot] = allocation
        entry.request_id = request_id
        self._awaited[request_id] = entry

    def _receive(self, deadline: float, what: str, limit: str | None = None) -> None:
        """Handle one reply from the scorer process, waiting until ``deadline`` at most
        (``limit`` says how long that is, for the message; ``timeout`` by default)."""
        child = self._child
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(
                    f'the scorer process (pid {child.process.pid}) sent nothing for '
                    f'{limit or f"{self.timeout:g} s (timeout=)"} while the trainer waited for '
                    f'{what}: it is stopped (SIGSTOP, a debugger, a frozen container) or stuck')
            ready = wait([child.replies, child.process.sentinel], min(left, POLL_S * 4))
            if child.replies in ready:
                try:
                    message = child.replies.recv()
                except (EOFError, OSError):
                    self._await_exit()
                    raise self._fail(self._died()) from None
                self._handle(message)
                return
            if ready:
                # Dead: its last words (an error) may still be in the pipe.
                try:
                    while child.replies.poll():
                        self._handle(child.replies.recv())
                except (EOFError, OSError):
                    pass
                child.process.join(POLL_S)
                raise self._fail(self._died())

    def _handle(self, message: Reply) -> None:
        if isinstance(message, Ready):
            self.startup = message.as_dict()
            return
        if isinstance(message, Fatal):
            raise self._fail(f'the scorer process failed:\n{message.traceback}')
        if isinstance(message, ScorerState):
            self._states[(message.epoch, message.index)] = message.data
            return
        self._ring.drop_user(message.slot)
        if message.request_id not in self._awaited or message.generation != self._generation:
            return  # From an abandoned epoch, or superseded by a re-score.
        if isinstance(message, Scored):
            self._answers[message.request_id] = _Answer(scored=message)
        elif isinstance(message, Failed):
            self._answers[message.request_id] = _Answer(failed=message)
        elif not isinstance(message, Skipped):
            raise self._fail(f'the scorer process sent an unknown message {message!r}')

    def _result(self, entry: _Entry, epoch: int) -> Scored:
        deadline = time.monotonic() + self.timeout
        request_id = entry.request_id
        while request_id not in self._answers:
            self._receive(deadline, f'the selection of super-batch {entry.index} of epoch '
                                    f'{epoch}')
        answer = self._answers.pop(request_id)
        del self._awaited[request_id]
        if answer.failed is not None:
            cause = None
            if answer.failed.error is not None:
                try:
                    cause = pickle.loads(answer.failed.error)
                except Exception:
                    cause = None
            raise self._fail(f'the scorer process raised while scoring super-batch '
                             f'{entry.index} of epoch {epoch}:\n{answer.failed.traceback}',
                             cause)
        return answer.scored

    def scorer_state(self, epoch: int, index: int) -> bytes:
        """A learning scorer's state after super-batch ``(epoch, index)``, from the scorer
        process (``torch.save`` bytes).

        Raises:
            ScorerProcessError: It did not answer within ``timeout``, or no longer keeps it.
        """
        self._states.pop((epoch, index), None)
        self._send(StateRequest(epoch, index), 'a request for the scorer\'s state')
        deadline = time.monotonic() + self.timeout
        while (epoch, index) not in self._states:
            self._receive(deadline, f'the scorer\'s state after super-batch {index} of epoch '
                                    f'{epoch}')
        data = self._states.pop((epoch, index))
        if data is None:
            raise self._fail(f'the scorer process no longer keeps the scorer\'s state after '
                             f'super-batch {index} of epoch {epoch}')
        return data

    # Loading

    def _free_slot(self) -> int:
        ring = self._ring
        deadline = time.monotonic() + self.timeout
        while True:
            slot = ring.acquire()
            if slot is not None:
                return slot
            # Every slot is held or read by unanswered requests (from an abandoned epoch).
            self._receive(deadline, 'a free slot of the batch ring')

    def _load(self, host: Batch, index: int, wait_s: float) -> _Entry:
        n = batch_length(host)
        entry = _Entry(index=index, n=n, wait_s=wait_s,
                       ids=read_sample_ids(host, attached_id_key(host, self.id_key), n=n))
        if n < self.step.config.batch_size:
            entry.host = host  # not scored: the loader hands it over, or drops it
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
        self._answers.clear()

    # The epoch

    def iter_epoch(self, batches: Iterator[Batch], epoch: int, start: int,
                   plan_for: Callable[[int, int], Plan] = lambda epoch, index: Plan(),
                   handed: tuple[int, int] | None = None
                   ) -> Iterator[tuple[int, _Entry, Batch | None]]:
        """Hand over one epoch: ``(index, entry, sub_batch)`` per super-batch; the sub-batch
        is None for a short super-batch (fewer than ``b`` rows), which is not scored.

        Args:
            batches (Iterator[Batch]): Host super-batches of the epoch, from ``start`` on.
            epoch (int): The epoch.
            start (int): Index of the first super-batch.
            plan_for (Callable): ``plan_for(epoch, index) -> Plan``, asked when a super-batch
                is first sent for scoring.
            handed (tuple[int, int] | None): ``(epoch, index)`` of the last super-batch
                handed over (None: none since the scorer process started); a learning scorer
                goes back to its state after it.

        Raises:
            ScorerProcessError: The scorer process raised, died or stopped answering.
            UsageError: This iterator is stale (the loader was iterated again or closed).
        """
        if self._child is None:
            self._start()
            self._await_ready()
        self._plan_for = plan_for
        self._abandon()
        self._generation += 1
        generation = self._generation
        self._send(NewGeneration(generation, restore=handed), 'the start of an epoch')
        entries: deque[_Entry] = deque()
        next_index = start
        exhausted = False
        try:
            while True:
                if self._generation != generation:
                    raise UsageError('this iterator of the loader is stale: the loader was '
                                     'iterated again (or closed) since; use the newest iterator')
                steps = self._poll_weights()
                while not exhausted and len(entries) < self.settings.prefetch_depth:
                    begin = time.perf_counter()
                    host = next(batches, None)
                    if host is None:
                        exhausted = True
                        break
                    entries.append(self._load(host, next_index, time.perf_counter() - begin))
                    next_index += 1
                if not entries:
                    return
                entry = entries[0]
                if entry.slot is None:
                    entries.popleft()
                    yield entry.index, entry, None
                    continue
                yield entry.index, entry, self._hand_over(entries, epoch, steps)
        finally:
            if self._generation == generation and self._ring is not None:
                self._abandon()

    def _hand_over(self, entries: deque[_Entry], epoch: int, steps: int) -> Batch:
        entry = entries[0]
        ahead = 1 + (self.settings.prefetch_depth if self._weights is None
                     else self._weights.lookahead())
        for queued in list(entries)[:ahead]:
            if queued.slot is not None and queued.request_id is None:
                self._submit(queued, epoch)
        begin = time.perf_counter()
        scored = self._result(entry, epoch)
        rescored = 0
        staleness = steps - scored.version if self._weights is not None else 0
        if staleness > self.settings.max_staleness:
            if self._weights.published < steps:
                self._weights_call(lambda: self._weights.publish(steps,
                                                                 give_up=self._check_child))
            self._submit(entry, epoch, urgent=True)
            scored = self._result(entry, epoch)
            rescored = 1
            staleness = steps - scored.version
        result_wait_s = time.perf_counter() - begin
        entries.popleft()
        extra = {'staleness': staleness, 'weights_version': scored.version,
                 'trainer_steps': steps, 'rescored': rescored, 'result_wait_s': result_wait_s,
                 'weights_load_s': scored.load_s,
                 'scoring_ahead': sum(1 for e in entries if e.request_id is not None)}
        sub = self.step.finish(self._ring.batch(entry.slot), entry.ids, scored.selection(),
                               epoch=epoch, index=entry.index,
                               timings={'wait_s': entry.wait_s, 'transfer_s': entry.transfer_s},
                               extra=extra)
        self._let_go(entry)
        return sub


def _shut_down(child: Child, outbox: _Outbox) -> None:
    outbox.close()
    child.stop()

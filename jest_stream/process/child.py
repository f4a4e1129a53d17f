"""The scorer process's loop: receive requests, run the selecting half of the step, reply.

It runs :meth:`jest_stream.step.SelectionStep.choose`, the same code inline scoring runs,
with the same position-derived generator, on the super-batch a request names in the ring,
after copying the newest published weights into its replica of the learner.

It exits when told to stop, when the trainer's end of the request pipe closes, or when the
trainer process is gone: it checks before every request, and every 0.25 s while idle, and
leaves at once (``os._exit``; it holds nothing that needs flushing). So it outlives a
killed trainer by the super-batch it is scoring at that moment, at most, plus 0.25 s. Its
waits for the shared weights are bounded by the loader's ``timeout``; a reply to a trainer
that is stopped (not dead) waits for it to go on.

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
from collections import OrderedDict, deque
from multiprocessing.connection import Connection

import torch

from jest_stream.batch import attached_id_key, read_sample_ids
from jest_stream.errors import UsageError
from jest_stream.process import messages as msg
from jest_stream.process.lifecycle import ChildSpec, load_scorer
from jest_stream.process.ring import SlotCache
from jest_stream.scoring.base import LearningScorer
from jest_stream.step import SelectionStep

__all__ = ['scorer_main', 'POLL_S']

# How often an idle scorer process checks that the trainer is still there.
POLL_S = 0.25


class _Broken:
    """A request that could not be read: fails the next request."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


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
                message = msg.Stop()  # The trainer's end is closed: it stopped or died.
            except BaseException as error:  # An unreadable message fails the next request.
                message = _Broken(error)
            self.messages.put(message)
            if isinstance(message, msg.Stop):
                return


def _pickled_error(error: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return None


class _ScorerMemory:
    """The states of a learning scorer (a proxy learner) after recent super-batches.

    It learns from every super-batch it scores, ahead of the trainer; the trainer's saved
    position needs its state after the last super-batch handed over, and an abandoned
    iteration must forget what was learned from super-batches never handed over.
    """

    def __init__(self, scorer: LearningScorer, keep: int) -> None:
        self.scorer = scorer
        self.keep = keep
        self.initial = _save(scorer.state_dict())
        self.states: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def remember(self, epoch: int, index: int) -> None:
        self.states[(epoch, index)] = _save(self.scorer.state_dict())
        while len(self.states) > self.keep:
            self.states.popitem(last=False)

    def get(self, epoch: int, index: int) -> bytes | None:
        return self.states.get((epoch, index))

    def restore(self, position: tuple[int, int] | None) -> None:
        data = self.initial if position is None else self.states.get(tuple(position))
        if data is None:
            raise UsageError(f'the scorer process no longer holds its state after super-batch '
                             f'{position}: it kept the last {self.keep}')
        self.scorer.load_state_dict(torch.load(io.BytesIO(data), weights_only=False))
        # What was learned after that position is forgotten.
        self.states = OrderedDict((k, v) for k, v in self.states.items()
                                  if position is not None and k <= tuple(position))


def _save(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _Loop:
    """The state of the scorer process's loop."""

    def __init__(self, spec: ChildSpec, step: SelectionStep, replica: list[torch.Tensor]
                 ) -> None:
        self.spec = spec
        self.step = step
        self.replica = replica
        self.inbox = _Inbox(spec.requests)
        self.slots = SlotCache()
        self.pending: deque[msg.ScoreRequest] = deque()
        self.newest_generation = 0
        self.loaded: int | None = None
        depth = spec.config.process.prefetch_depth if spec.config.process is not None else 1
        self.memory = _ScorerMemory(step.scorer, keep=2 * depth + 4) \
            if isinstance(step.scorer, LearningScorer) else None

    def parent_gone(self) -> None:
        """Leave at once if the trainer process is gone (this process was re-parented)."""
        if os.getppid() != self.spec.parent_pid:
            _leave()

    def take_messages(self) -> bool:
        """Take everything that has arrived; False once told to stop.

        Blocks (checking the trainer every ``POLL_S``) only while nothing is pending.
        """
        block = not self.pending
        while True:
            try:
                message = self.inbox.messages.get(timeout=POLL_S) if block \
                    else self.inbox.messages.get_nowait()
            except queue.Empty:
                if block:
                    self.parent_gone()
                    continue
                return True
            block = False
            if not self._take(message):
                return False

    def _take(self, message: msg.Request | _Broken) -> bool:
        if isinstance(message, msg.Stop):
            return False
        if isinstance(message, _Broken):
            raise message.error
        if isinstance(message, msg.NewGeneration):
            self.newest_generation = max(self.newest_generation, message.generation)
            if self.memory is not None:
                self.memory.restore(message.restore)
        elif isinstance(message, msg.StateRequest):
            data = None if self.memory is None else self.memory.get(message.epoch,
                                                                    message.index)
            self.spec.replies.send(msg.ScorerState(message.epoch, message.index, data))
        elif isinstance(message, msg.ScoreRequest):
            self.newest_generation = max(self.newest_generation, message.generation)
            if message.urgent:  # a re-score goes first
                self.pending.appendleft(message)
            else:
                self.pending.append(message)
        return True

    def _load_weights(self) -> tuple[int, float]:
        start = time.perf_counter()
        weights = self.spec.weights
        if weights is None:
            return 0, 0.0
        version, number = weights.latest(give_up=self.parent_gone)
        if number != self.loaded:
            version, self.loaded = weights.read_into(self.replica, give_up=self.parent_gone)
        return version, time.perf_counter() - start

    def serve_one(self) -> None:
        """Answer the first pending request."""
        self.parent_gone()
        request = self.pending.popleft()
        # Newly sent buffers are kept even when the request itself is skipped.
        self.slots.receive(request.slot)
        replies = self.spec.replies
        if request.generation < self.newest_generation:
            replies.send(msg.Skipped(request.generation, request.request_id, request.slot.slot))
            return
        try:
            version, load_s = self._load_weights()
            batch = self.slots.batch(request.slot)
            ids = read_sample_ids(batch, attached_id_key(batch, self.spec.id_key))
            selection = self.step.choose(batch, ids, request.epoch, request.index,
                                         request.plan)
        except Exception as error:
            replies.send(msg.Failed(request.generation, request.request_id, request.slot.slot,
                                traceback.format_exc(), _pickled_error(error)))
            return
        if self.memory is not None:
            self.memory.remember(request.epoch, request.index)
        replies.send(msg.Scored.of(request, selection, version=version, load_s=load_s))


def scorer_main(spec: ChildSpec) -> None:
    """The scorer process: receive requests, score and select, send replies, until told to
    stop or the trainer is gone."""
    # Ctrl-C reaches the whole process group; the trainer decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    try:
        if spec.device.type == 'cuda' and spec.device.index is not None:
            torch.cuda.set_device(spec.device)
        scorer, replica = load_scorer(spec.scorer, spec.specs)
        loop = _Loop(spec, SelectionStep(spec.config, scorer), replica)
        spec.replies.send(msg.Ready(pid=os.getpid(), start_s=time.perf_counter() - started,
                                streaming_imported='streaming' in sys.modules,
                                threads=torch.get_num_threads()))
    except BaseException:
        spec.replies.send(msg.Fatal(traceback.format_exc()))
        _leave(1)
    try:
        while loop.take_messages():
            if loop.pending:
                loop.serve_one()
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # The trainer is gone.
    except BaseException:
        try:
            spec.replies.send(msg.Fatal(traceback.format_exc()))
        except OSError:
            pass
        _leave(1)
    _leave()


def _leave(code: int = 0) -> None:
    """Exit now: this process holds nothing to flush or save, and an interpreter shutdown
    with torch loaded takes most of a second."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

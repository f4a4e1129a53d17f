"""The scorer process's life: sending it the scorer, starting it, describing its exit,
stopping it.

The scorer is pickled once, with its learner's tensors left out (they come from the shared
weights), and the process is spawned (never forked: a forked copy of a trainer that has
started CUDA or threads is unsafe). It is daemonic, so it never outlives the trainer's
interpreter; :class:`Child` stops it: a ``Stop`` message, then terminate, then kill.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import select
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor, nn

from jest_stream.config import SelectionConfig
from jest_stream.errors import JestStreamError, SettingTypeError
from jest_stream.process.messages import Stop
from jest_stream.process.weights import SharedWeights, TensorSpec, state_tensors

__all__ = ['ScorerProcessError', 'ChildSpec', 'Child', 'check_picklable', 'dump_scorer',
           'load_scorer', 'shared_learner', 'describe_exit', 'STOP_GRACE_S']

logger = logging.getLogger(__name__)

# How long a stopping scorer process gets before it is terminated, then killed.
STOP_GRACE_S = 3.0


class ScorerProcessError(JestStreamError, RuntimeError):
    """The scorer process raised (its traceback is in the message and the cause), died (the
    exit code or signal is in the message), or stopped answering for ``timeout`` seconds
    (the message names what was waited for)."""


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
    """Raise unless ``scorer`` can go to another process (tensor data is not copied, so the
    check is cheap for any model size).

    Raises:
        SettingTypeError: Pickling failed; the message names the usual causes and the fix.
    """
    try:
        _ScorerPickler(_Sink(), None).dump(scorer)
    except Exception as error:
        raise SettingTypeError(
            f'scoring="process" sends the scorer to another process, so scorer= must be '
            f'picklable, and pickling it failed: {type(error).__name__}: {error}. Lambdas and '
            f'functions defined inside other functions cannot be pickled: define them at the '
            f'top level of a module (def forward(model, batch): ...) and pass those '
            f'(forward=, loss_fn=, input_transform=, ...); open files, locks and generators '
            f'must not be attributes of the scorer. Or use scoring="inline"') from error


def dump_scorer(scorer: Any, learner: list[Tensor]) -> bytes:
    """The scorer pickled with the tensors ``learner`` replaced by their positions."""
    buffer = io.BytesIO()
    _ScorerPickler(buffer, {id(t): i for i, t in enumerate(learner)}).dump(scorer)
    return buffer.getvalue()


def load_scorer(data: bytes, specs: list[TensorSpec]) -> tuple[Any, list[Tensor]]:
    """The scorer, and the replica tensors its learner reads (to be filled from the shared
    weights), in the order of ``specs``."""
    unpickler = _ScorerUnpickler(io.BytesIO(data), specs)
    scorer = unpickler.load()
    made = unpickler.learner_tensors
    # Tensors the pickle did not reach still get a place to load into.
    replica = [made[i] if i in made else spec.empty() for i, spec in enumerate(specs)]
    return scorer, replica


def shared_learner(scorer: Any, config: SelectionConfig) -> nn.Module | None:
    """The learner whose weights the scorer process must mirror (None if it needs none)."""
    learner = getattr(scorer, 'learner', None)
    if not config.criterion.needs_learner or not isinstance(learner, nn.Module):
        return None
    if not state_tensors(learner):
        return None
    return learner


@dataclass
class ChildSpec:
    """What the scorer process is started with.

    Attributes:
        scorer (bytes): From :func:`dump_scorer`.
        specs (list[TensorSpec]): The learner's state tensors.
        weights (SharedWeights | None): The shared weights (None without a learner).
        config (SelectionConfig): The selection configuration.
        id_key (str | int): Column or field of the sample ids.
        device (torch.device): Where it scores.
        threads (int): torch intra-op threads it uses.
        parent_pid (int): The trainer's pid (it exits when that process is gone).
        requests (Connection): Where requests arrive.
        replies (Connection): Where replies go.
    """

    scorer: bytes
    specs: list[TensorSpec]
    weights: SharedWeights | None
    config: SelectionConfig
    id_key: str | int
    device: torch.device
    threads: int
    parent_pid: int
    requests: Connection
    replies: Connection


def describe_exit(exitcode: int | None) -> str:
    """``'was killed by SIGKILL'``, ``'exited with code 1'``...: how a process ended."""
    if exitcode is None:
        return 'is still running'
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f'signal {-exitcode}'
        return f'was killed by {name}'
    return f'exited with code {exitcode}'


class Child:
    """The scorer process and the trainer's ends of its pipes; :meth:`stop` ends it."""

    def __init__(self, process: Any, requests: Connection, replies: Connection) -> None:
        self.process = process
        self.requests = requests
        self.replies = replies

    def stop(self) -> None:
        """Ask it to stop, then terminate it, then kill it, each after a grace period; close
        the pipes. Bounded: at most about ``3 x STOP_GRACE_S`` seconds."""
        try:
            # Only if the pipe has room: a stopped process that reads nothing must not block
            # the trainer here (a Stop fits in one atomic write).
            if self.process.is_alive() and select.select([], [self.requests], [], 0)[1]:
                self.requests.send(Stop())
        except (OSError, ValueError):
            pass
        process = self.process
        process.join(STOP_GRACE_S)
        if process.is_alive():
            process.terminate()
            _continue(process.pid)  # a stopped process handles SIGTERM once it runs again
            process.join(STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join(STOP_GRACE_S)
        for connection in (self.requests, self.replies):
            connection.close()
        if not process.is_alive():
            process.close()
        else:  # pragma: no cover - a process SIGKILL cannot end (uninterruptible I/O)
            logger.warning('the scorer process (pid %s) did not end after SIGKILL',
                           process.pid)


def _continue(pid: int | None) -> None:
    try:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
    except OSError:
        pass

"""The messages between the trainer and its scorer process, one dataclass each.

Requests go from the trainer to the scorer process; replies come back. Only small
things cross: slot handles (sent once per allocation), indices, scores, timings and
weight versions. Tensors in replies travel as numpy arrays, so that no shared memory
is allocated for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jest_stream.policies import Plan
from jest_stream.process.ring import SlotRequest
from jest_stream.step import Selection

__all__ = [
    'ScoreRequest',
    'NewGeneration',
    'StateRequest',
    'Stop',
    'Ready',
    'Fatal',
    'Scored',
    'Failed',
    'Skipped',
    'ScorerState',
    'Request',
    'Reply',
]


# Trainer -> scorer process

@dataclass(frozen=True)
class ScoreRequest:
    """Score and select super-batch ``index`` of ``epoch``, which is in a ring slot.

    Attributes:
        generation (int): The iteration of the loader that asked; older ones are skipped.
        request_id (int): Answered in the reply.
        urgent (bool): A re-score: goes before queued requests.
        epoch (int): Epoch of the super-batch.
        index (int): Its position in the epoch (fixes the selection generator).
        slot (SlotRequest): Where the super-batch is, and its structure.
        plan (Plan): The policy's plan for it.
    """

    generation: int
    request_id: int
    urgent: bool
    epoch: int
    index: int
    slot: SlotRequest
    plan: Plan


@dataclass(frozen=True)
class NewGeneration:
    """The loader started another iteration: skip requests of older ones.

    Attributes:
        generation (int): The new iteration.
        restore (tuple[int, int] | None): A scorer that learns (a proxy learner) goes back to
            its state after this ``(epoch, index)``, the last super-batch handed over (None:
            its state when the process started): what it learned from super-batches scored
            ahead and never handed over is forgotten.
    """

    generation: int
    restore: tuple[int, int] | None = None


@dataclass(frozen=True)
class StateRequest:
    """Send the learning scorer's state after super-batch ``(epoch, index)``."""

    epoch: int
    index: int


@dataclass(frozen=True)
class Stop:
    """Finish: the trainer is closing the scorer process."""


# Scorer process -> trainer

@dataclass(frozen=True)
class Ready:
    """The scorer process has loaded the scorer and waits for requests.

    Attributes:
        pid (int): Its process id.
        start_s (float): Seconds from its start to ready.
        streaming_imported (bool): Whether mosaicml-streaming was imported (it should not be:
            it costs seconds).
        threads (int): torch intra-op threads it uses.
    """

    pid: int
    start_s: float
    streaming_imported: bool
    threads: int

    def as_dict(self) -> dict[str, object]:
        return {'pid': self.pid, 'start_s': self.start_s,
                'streaming_imported': self.streaming_imported, 'threads': self.threads}


@dataclass(frozen=True)
class Fatal:
    """The scorer process cannot go on (its traceback)."""

    traceback: str


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)


@dataclass(frozen=True)
class Scored:
    """The selection of a request, and the weights it was scored with.

    Attributes:
        generation (int): Of the request.
        request_id (int): Of the request.
        slot (int): The ring slot it read (no longer in use by this request).
        arrays (dict[str, np.ndarray | None]): The selection's tensors: ``selected``,
            ``scores``, ``candidates``, ``candidate_ids``, ``weights``, and ``parts/<name>``.
        numbers (dict[str, Any]): Its other fields (``n_candidates``, timings, FLOPs,
            ``short``, ``policy``, ``extra``).
        version (int): Weight updates included in the weights it was scored with.
        load_s (float): Seconds spent copying weights before scoring.
    """

    generation: int
    request_id: int
    slot: int
    arrays: dict[str, np.ndarray | None]
    numbers: dict[str, Any]
    version: int
    load_s: float

    @classmethod
    def of(cls, request: ScoreRequest, selection: Selection, *, version: int, load_s: float
           ) -> Scored:
        arrays = {name: _array(getattr(selection, name)) for name in _ARRAYS}
        arrays.update({f'parts/{k}': v.numpy() for k, v in selection.parts.items()})
        numbers = {name: getattr(selection, name) for name in _NUMBERS}
        return cls(generation=request.generation, request_id=request.request_id,
                   slot=request.slot.slot, arrays=arrays, numbers=numbers, version=version,
                   load_s=load_s)

    def selection(self) -> Selection:
        """The :class:`~jest_stream.step.Selection` this reply carries."""
        tensors = {name: _tensor(self.arrays[name]) for name in _ARRAYS}
        parts = {name.split('/', 1)[1]: _tensor(array) for name, array in self.arrays.items()
                 if name.startswith('parts/')}
        return Selection(**tensors, parts=parts, **self.numbers)


_ARRAYS = ('selected', 'scores', 'candidates', 'candidate_ids', 'weights')
_NUMBERS = ('n_candidates', 'policy', 'score_s', 'select_s', 'score_flops', 'short', 'extra')


@dataclass(frozen=True)
class ScorerState:
    """A learning scorer's state after ``(epoch, index)``, saved with ``torch.save``.

    Attributes:
        epoch (int): Of the request.
        index (int): Of the request.
        data (bytes | None): The state; None when it is no longer kept.
    """

    epoch: int
    index: int
    data: bytes | None


@dataclass(frozen=True)
class Failed:
    """The scorer raised on a request: its traceback, and the exception if it pickles."""

    generation: int
    request_id: int
    slot: int
    traceback: str
    error: bytes | None


@dataclass(frozen=True)
class Skipped:
    """A request of an abandoned iteration, not scored."""

    generation: int
    request_id: int
    slot: int


Request = ScoreRequest | NewGeneration | StateRequest | Stop
Reply = Ready | Fatal | Scored | Failed | Skipped | ScorerState

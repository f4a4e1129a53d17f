"""The messages between the trainer and its scorer process, one dataclass each.

Requests go from the trainer to the scorer process; replies come back. Only small
things cross: slot handles (sent once per allocation), indices, scores, timings and
weight versions. Tensors in replies travel as numpy arrays, so that no shared memory
is allocated for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jest_stream.process.ring import SlotRequest
from jest_stream.step import Selection

__all__ = [
    'ScoreRequest',
    'NewGeneration',
    'Stop',
    'Ready',
    'Fatal',
    'Scored',
    'Failed',
    'Skipped',
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
    """

    generation: int
    request_id: int
    urgent: bool
    epoch: int
    index: int
    slot: SlotRequest


@dataclass(frozen=True)
class NewGeneration:
    """The loader started another iteration: skip requests of older ones."""

    generation: int


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


@dataclass(frozen=True)
class Scored:
    """The selection of a request, and the weights it was scored with.

    Attributes:
        generation (int): Of the request.
        request_id (int): Of the request.
        slot (int): The ring slot it read (no longer in use by this request).
        selected (np.ndarray): int64 indices, in selection order.
        scores (np.ndarray | None): float32 self-scores of the candidates.
        n_candidates (int): Candidates chosen from.
        score_s (float): Seconds spent scoring.
        select_s (float): Seconds spent selecting.
        score_flops (int | None): FLOPs of scoring, when counted.
        short (bool): The super-batch had fewer than ``b`` rows.
        version (int): Weight updates included in the weights it was scored with.
        load_s (float): Seconds spent copying weights before scoring.
    """

    generation: int
    request_id: int
    slot: int
    selected: np.ndarray
    scores: np.ndarray | None
    n_candidates: int
    score_s: float
    select_s: float
    score_flops: int | None
    short: bool
    version: int
    load_s: float

    @classmethod
    def of(cls, request: ScoreRequest, selection: Selection, *, version: int, load_s: float
           ) -> Scored:
        scores = None if selection.scores is None else selection.scores.numpy()
        return cls(generation=request.generation, request_id=request.request_id,
                   slot=request.slot.slot, selected=selection.selected.numpy(), scores=scores,
                   n_candidates=selection.n_candidates, score_s=selection.score_s,
                   select_s=selection.select_s, score_flops=selection.score_flops,
                   short=selection.short, version=version, load_s=load_s)

    def selection(self) -> Selection:
        """The :class:`~jest_stream.step.Selection` this reply carries."""
        scores = None if self.scores is None else torch.from_numpy(self.scores)
        return Selection(selected=torch.from_numpy(self.selected), scores=scores,
                         n_candidates=self.n_candidates, score_s=self.score_s,
                         select_s=self.select_s, score_flops=self.score_flops, short=self.short)


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


Request = ScoreRequest | NewGeneration | Stop
Reply = Ready | Fatal | Scored | Failed | Skipped

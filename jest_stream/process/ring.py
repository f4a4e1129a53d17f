"""Reusable super-batch buffers shared with the scorer process.

The trainer copies each super-batch into a *slot* of a ring of preallocated
buffers, and the scorer process reads it there: on the CPU the buffers are in
shared memory, on CUDA they are device memory shared by CUDA IPC (the copy from
pinned host memory runs on a side stream). A slot's buffers cross the process
boundary once, when they are allocated; after that a request names the slot.

A slot is in use while the trainer holds it (until it has gathered its sub-batch)
and while a scoring request that reads it is unanswered; only a free slot is
filled again. A partial super-batch fills the first ``n`` rows. A slot is
reallocated only when a batch's per-sample shapes or dtypes change.

Batches keep their structure (dicts, lists, tuples): tensor columns become
:class:`Column` placeholders that point at the slot's buffers, and the other
columns (lists of strings, say) travel as they are, pickled with the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jest_stream.batch import Batch, flatten_columns, unflatten_columns
from jest_stream.errors import DataError, SettingError, UsageError

__all__ = ['BatchRing', 'Column', 'SlotCache', 'SlotRequest', 'split_batch', 'join_batch']


@dataclass(frozen=True)
class Column:
    """Placeholder for the ``index``-th tensor column of a batch."""

    index: int


def split_batch(batch: Batch) -> tuple[Any, list[Tensor]]:
    """``batch``'s structure with every tensor column replaced by a :class:`Column`, and the
    tensors in order. The structure pickles: it carries the non-tensor columns."""
    columns, spec = flatten_columns(batch)
    tensors: list[Tensor] = []
    placed = []
    for column in columns:
        if isinstance(column, Tensor):
            placed.append(Column(len(tensors)))
            tensors.append(column)
        else:
            placed.append(column)
    return (spec, placed), tensors


def join_batch(structure: Any, tensors: Sequence[Tensor]) -> Batch:
    """The inverse of :func:`split_batch`: placeholders replaced by ``tensors``."""
    spec, placed = structure
    return unflatten_columns([tensors[c.index] if isinstance(c, Column) else c for c in placed],
                             spec)


@dataclass
class SlotRequest:
    """What the scorer process needs to read one slot.

    Attributes:
        slot (int): Slot id.
        allocation (int): Which allocation of the slot holds the batch.
        n (int): Rows filled.
        structure (Any): The batch with :class:`Column` placeholders and its other columns.
        buffers (list[Tensor] | None): The slot's buffers, sent once per allocation.
    """

    slot: int
    allocation: int
    n: int
    structure: Any
    buffers: list[Tensor] | None = None


@dataclass
class _Slot:
    buffers: list[Tensor] = field(default_factory=list)
    specs: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()
    allocation: int = 0
    users: int = 0
    n: int = 0
    structure: Any = None
    ready: Any = None
    released: Any = None


class BatchRing:
    """``n_slots`` super-batch buffers of ``capacity`` rows on ``device``.

    Args:
        n_slots (int): Super-batches that can be loaded ahead of the trainer at once.
        capacity (int): Rows per slot (the super-batch size ``B``).
        device (torch.device): ``cpu`` (shared memory) or ``cuda`` (CUDA IPC).
    """

    def __init__(self, n_slots: int, capacity: int, device: torch.device) -> None:
        if device.type not in ('cpu', 'cuda'):
            raise SettingError(f'a batch ring lives on the cpu or a cuda device, not {device}')
        self.device = device
        self.capacity = capacity
        self.slots = [_Slot() for _ in range(n_slots)]
        self.stream = torch.cuda.Stream(device) if device.type == 'cuda' else None
        self._allocations = 0

    # Use counts: the trainer's hold and each unanswered request

    def acquire(self) -> int | None:
        """A free slot, now held by the trainer; None if every slot is in use."""
        for slot_id, slot in enumerate(self.slots):
            if slot.users == 0:
                slot.users = 1
                return slot_id
        return None

    def add_user(self, slot_id: int) -> None:
        """A request that reads the slot was sent."""
        self.slots[slot_id].users += 1

    def drop_user(self, slot_id: int) -> None:
        """The trainer let go of the slot, or a request that read it was answered."""
        slot = self.slots[slot_id]
        if slot.users <= 0:
            raise UsageError(f'slot {slot_id} of the batch ring was released twice')
        slot.users -= 1

    # Data

    def fill(self, slot_id: int, batch: Batch) -> None:
        """Copy ``batch`` (``n <= capacity`` rows) into the slot; on CUDA on the side stream."""
        structure, tensors = split_batch(batch)
        if not tensors:
            raise DataError('a super-batch without tensor columns cannot be scored')
        n = int(tensors[0].shape[0])
        for column, tensor in enumerate(tensors):
            if tensor.dim() == 0 or tensor.shape[0] != n:
                raise DataError(
                    f'tensor column {column} of the batch has shape {tuple(tensor.shape)}; every '
                    f'tensor of a super-batch must have its {n} examples on the first dimension')
        if n > self.capacity:
            raise DataError(f'a super-batch of {n} rows does not fit slots of {self.capacity}')
        slot = self.slots[slot_id]
        specs = tuple((tuple(t.shape[1:]), t.dtype) for t in tensors)
        if specs != slot.specs:
            self._allocate(slot, specs)
        if self.stream is None:
            for buffer, tensor in zip(slot.buffers, tensors, strict=True):
                buffer[:n].copy_(tensor)
        else:
            # A batch already on the device may still be written by the trainer's stream.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                if slot.released is not None:
                    # The trainer's gather from this slot's previous batch must be done.
                    self.stream.wait_event(slot.released)
                for buffer, tensor in zip(slot.buffers, tensors, strict=True):
                    buffer[:n].copy_(tensor, non_blocking=True)
                slot.ready.record(self.stream)
        slot.n = n
        slot.structure = structure

    def _allocate(self, slot: _Slot, specs: tuple) -> None:
        if self.stream is not None and slot.buffers:
            # Old buffers may still be read by queued kernels; this happens only when the
            # batch's shapes change.
            torch.cuda.synchronize(self.device)
        buffers = [torch.empty((self.capacity, *shape), dtype=dtype, device=self.device)
                   for shape, dtype in specs]
        if self.device.type == 'cpu':
            buffers = [buffer.share_memory_() for buffer in buffers]
        else:
            slot.ready = torch.cuda.Event()
            slot.released = None
        self._allocations += 1
        slot.buffers = buffers
        slot.specs = specs
        slot.allocation = self._allocations

    def wait_ready(self, slot_id: int) -> None:
        """Block until the slot's copy is complete (before another process reads it)."""
        slot = self.slots[slot_id]
        if slot.ready is not None:
            slot.ready.synchronize()

    def request(self, slot_id: int, *, with_buffers: bool) -> SlotRequest:
        """The message that lets the scorer process read the slot."""
        slot = self.slots[slot_id]
        return SlotRequest(slot=slot_id, allocation=slot.allocation, n=slot.n,
                           structure=slot.structure,
                           buffers=list(slot.buffers) if with_buffers else None)

    def allocation(self, slot_id: int) -> int:
        return self.slots[slot_id].allocation

    def batch(self, slot_id: int) -> Batch:
        """The slot's batch for the trainer (views of the buffers); on CUDA the trainer's
        current stream waits for the slot's copy."""
        slot = self.slots[slot_id]
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        return join_batch(slot.structure, [buffer[:slot.n] for buffer in slot.buffers])

    def release(self, slot_id: int) -> None:
        """The trainer has gathered from the slot (its kernels are queued on the current
        stream) and lets go of it."""
        slot = self.slots[slot_id]
        if self.stream is not None:
            slot.released = torch.cuda.Event()
            slot.released.record(torch.cuda.current_stream(self.device))
        slot.structure = None
        self.drop_user(slot_id)

    def nbytes(self) -> int:
        """Bytes held by the slots' buffers."""
        return sum(b.numel() * b.element_size() for slot in self.slots for b in slot.buffers)


class SlotCache:
    """The scorer process's side: the slots' buffers it has received, by slot id."""

    def __init__(self) -> None:
        self._slots: dict[int, tuple[int, list[Tensor]]] = {}

    def receive(self, request: SlotRequest) -> None:
        """Keep the buffers a request carries (the first request after an allocation)."""
        if request.buffers is not None:
            self._slots[request.slot] = (request.allocation, request.buffers)

    def batch(self, request: SlotRequest) -> Batch:
        """The batch a request names (views of the shared buffers)."""
        self.receive(request)
        allocation, buffers = self._slots.get(request.slot, (None, []))
        if allocation != request.allocation:
            raise UsageError(
                f'slot {request.slot} allocation {request.allocation} was never received '
                f'(the scorer process has allocation {allocation})')
        return join_batch(request.structure, [buffer[:request.n] for buffer in buffers])

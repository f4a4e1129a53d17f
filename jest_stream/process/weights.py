"""The learner's weights, shared with a scorer process: a versioned double buffer.

The trainer *publishes* the learner's state (parameters and buffers) into one of
two preallocated slots: shared memory on the CPU, device memory shared by CUDA IPC
on a GPU. The scorer process copies the *active* slot into its own replica of the
learner. Publishing never waits for the reader and the reader never sees torn
weights (half one version, half another):

- the writer always fills the slot that is not active, then makes it active;
- each slot has a sequence number that is odd while the slot is being written (a
  seqlock); the reader notes it, copies, and notes it again, and copies again if
  it changed (the writer came round to that slot twice during the copy);
- sequence numbers and the active index live in a small shared control block read
  and written under a cross-process lock (:class:`ProcessLock`) held only for a few
  integer reads or writes, never during a copy. The lock's acquire and release order
  the copies against the control block on any CPU (the copies themselves are plain
  stores);
- on CUDA, the writer waits for its copy stream before marking a slot complete and
  the reader waits for its copy before checking the sequence again.

Every wait for the lock or for a consistent copy is bounded: it calls the caller's
``give_up`` hook while it waits (which raises when the other process is gone) and raises
:class:`WeightsTimeout` once ``timeout`` seconds have passed.

Each publish carries a *version*: the trainer's count of weight updates (optimizer
steps) when the weights were taken. :class:`StepCounter` keeps that count, and
:class:`WeightSync` decides when to publish and how far ahead batches may be scored
(the staleness policy).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from jest_stream.errors import JestStreamError, SettingError

__all__ = ['ProcessLock', 'SharedWeights', 'StepCounter', 'TensorSpec', 'WeightSync',
           'WeightsTimeout', 'state_tensors']

# Control block: the active slot, then per slot its sequence, version and publish number.
_ACTIVE = 0
_SEQ = (1, 2)
_VERSION = (3, 4)
_PUBLISH = (5, 6)
_CONTROL_SIZE = 7

# How often a wait for the control lock runs the caller's give_up hook.
_GIVE_UP_EVERY_S = 0.1


class WeightsTimeout(JestStreamError, TimeoutError):
    """A wait on the other process for the shared weights lasted longer than ``timeout``."""


class ProcessLock:
    """A lock two processes share, that leaves nothing named behind and dies with its holder.

    It is a POSIX record lock (``fcntl.lockf``) on an anonymous file (a ``memfd`` where the
    system has one, else an unlinked temporary file). Such locks belong to a process: the
    kernel releases them when the holder exits, even when it is killed, and the file has no
    name to leak in ``/dev/shm`` or the temp dir (a ``multiprocessing.Lock`` of a spawned
    process is a named semaphore, which a killed run leaves behind). The descriptor travels
    to a spawned process with the ``Process`` arguments (``multiprocessing.reduction.DupFd``).

    Acquiring polls with a growing sleep (from 50 microseconds to 1 millisecond): the lock is
    held only for a few integer reads and writes, so it is almost never contended.
    """

    def __init__(self) -> None:
        if hasattr(os, 'memfd_create'):
            self._fd = os.memfd_create('jest_stream-weights-lock', os.MFD_CLOEXEC)
        else:  # pragma: no cover - systems without memfd
            with tempfile.TemporaryFile() as file:
                self._fd = os.dup(file.fileno())
        weakref.finalize(self, os.close, self._fd)

    def __getstate__(self) -> dict[str, Any]:
        # Only while a process is being spawned: the descriptor is duplicated for the child.
        return {'fd': reduction.DupFd(self._fd)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._fd = state['fd'].detach()
        weakref.finalize(self, os.close, self._fd)

    def acquire(self, *, timeout: float, give_up: Callable[[], None] | None = None,
                what: str = 'the shared weights lock') -> None:
        """Take the lock, waiting at most ``timeout`` seconds.

        Args:
            timeout (float): Seconds to wait at most.
            give_up (Callable, optional): Called about every 0.1 s while waiting; raise from
                it to stop waiting (when the other process is gone, say).
            what (str): What is waited for, named in the error.

        Raises:
            WeightsTimeout: The lock was not free within ``timeout`` (the other process holds
                it and is stopped or stuck).
        """
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + _GIVE_UP_EVERY_S
        pause = 5e-5
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                pass
            now = time.monotonic()
            if now >= deadline:
                raise WeightsTimeout(
                    f'waited {timeout:g} s (timeout=) for {what}, which the other process '
                    f'holds: it is stopped (SIGSTOP, a debugger, a frozen container) or stuck')
            if give_up is not None and now >= next_check:
                give_up()
                next_check = now + _GIVE_UP_EVERY_S
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def release(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape, dtype and device of one tensor of the learner's state."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    is_parameter: bool
    requires_grad: bool

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> TensorSpec:
        return cls(name, tuple(tensor.shape), tensor.dtype, tensor.device,
                   isinstance(tensor, nn.Parameter), tensor.requires_grad)

    def empty(self) -> Tensor:
        """An uninitialised tensor like the one described (a Parameter if it was one)."""
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.is_parameter:
            return nn.Parameter(tensor, requires_grad=self.requires_grad)
        return tensor


def state_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The learner's state as ``(name, tensor)``: every parameter, then every buffer."""
    return [*module.named_parameters(), *module.named_buffers()]


def _layout(specs: Sequence[TensorSpec]) -> tuple[dict[tuple[torch.device, torch.dtype], int],
                                                 list[int]]:
    """Elements per (device, dtype) group, and each spec's offset in its group."""
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    offsets = []
    for spec in specs:
        key = (spec.device, spec.dtype)
        offsets.append(sizes.get(key, 0))
        sizes[key] = offsets[-1] + _numel(spec.shape)
    return sizes, offsets


def _allocate(specs: Sequence[TensorSpec]) -> dict[tuple[torch.device, torch.dtype], Tensor]:
    """One flat buffer per (device, dtype) group: shared memory on the CPU.

    A few flat buffers instead of one per tensor keep the handles that cross the process
    boundary (file descriptors on the CPU) to a handful, whatever the model's size. CUDA
    buffers are shared by CUDA IPC when they are sent to the other process.
    """
    sizes, _ = _layout(specs)
    flats = {}
    for (device, dtype), size in sizes.items():
        flat = torch.empty(max(size, 1), dtype=dtype, device=device)
        flats[(device, dtype)] = flat.share_memory_() if flat.device.type == 'cpu' else flat
    return flats


def _views(flats: dict[tuple[torch.device, torch.dtype], Tensor],
           specs: Sequence[TensorSpec]) -> list[Tensor]:
    _, offsets = _layout(specs)
    return [flats[(spec.device, spec.dtype)][offset:offset + _numel(spec.shape)].view(spec.shape)
            for spec, offset in zip(specs, offsets, strict=True)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


class SharedWeights:
    """A versioned double buffer of a module's state, shared between two processes.

    Create it in the trainer from the learner's state, hand it to the scorer process as an
    argument of ``Process`` (its tensors travel as shared-memory or CUDA IPC handles, its
    lock as a file descriptor), then :meth:`publish` in the trainer and :meth:`read_into`
    in the scorer.

    Args:
        specs (Sequence[TensorSpec]): The tensors of the state, in a fixed order.
        timeout (float): Seconds any wait on the other process may last (the lock, a
            consistent copy) before :class:`WeightsTimeout`.

    Attributes:
        on_locked (Callable | None): Called right after the control lock is taken (a test
            hook: stopping the process there holds the lock).
    """

    on_locked: Callable[[], None] | None = None

    def __init__(self, specs: Sequence[TensorSpec], *, timeout: float) -> None:
        if not timeout > 0:
            raise SettingError(f'timeout={timeout!r} must be a positive number of seconds')
        self.specs = list(specs)
        self.timeout = float(timeout)
        self._lock = ProcessLock()
        self._flats = [_allocate(self.specs) for _ in range(2)]
        self._slots = [_views(flats, self.specs) for flats in self._flats]
        self._control = torch.zeros(_CONTROL_SIZE, dtype=torch.int64).share_memory_()
        self._publishes = 0
        self._copy_streams: dict[torch.device, Any] = {}
        self.retries = 0

    @classmethod
    def for_module(cls, module: nn.Module, *, timeout: float) -> SharedWeights:
        """Buffers shaped like ``module``'s parameters and buffers (nothing published yet)."""
        return cls([TensorSpec.of(name, t) for name, t in state_tensors(module)],
                   timeout=timeout)

    def __getstate__(self) -> dict[str, Any]:
        # Only the flat buffers cross the process boundary; the views are rebuilt there.
        state = dict(self.__dict__)
        state['_copy_streams'] = {}
        del state['_slots']
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._slots = [_views(flats, self.specs) for flats in self._flats]

    def _locked(self, give_up: Callable[[], None] | None) -> _Held:
        self._lock.acquire(timeout=self.timeout, give_up=give_up,
                           what='the control lock of the shared weights')
        hook = type(self).on_locked
        if hook is not None:
            hook()
        return _Held(self._lock)

    def _read(self, index: int) -> int:
        return int(self._control[index])

    # Writer (trainer)

    def publish(self, tensors: Sequence[Tensor], version: int, *,
                give_up: Callable[[], None] | None = None) -> None:
        """Copy ``tensors`` (in the order of ``specs``) into the inactive slot and activate it.

        Args:
            tensors (Sequence[Tensor]): The current state, shaped like ``specs``.
            version (int): Weight updates (optimizer steps) the state includes.
            give_up (Callable, optional): Called while waiting for the control lock; raise
                from it to stop waiting (e.g. when the reader died).

        Raises:
            SettingError: The tensors no longer match ``specs`` (the model changed shape).
            WeightsTimeout: The reader held the control lock for ``timeout`` seconds.
        """
        if len(tensors) != len(self.specs):
            raise SettingError(f'publish got {len(tensors)} tensors; the shared weights hold '
                               f'{len(self.specs)}')
        for tensor, spec in zip(tensors, self.specs, strict=True):
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise SettingError(
                    f'the learner tensor {spec.name!r} is now {tuple(tensor.shape)} '
                    f'{tensor.dtype}, not {spec.shape} {spec.dtype} as when the scorer process '
                    f'started; a scorer process cannot follow a change of the model\'s '
                    f'structure: close() the loader and iterate it again to start a new one')
        with self._locked(give_up):
            slot = 1 - self._read(_ACTIVE)
            self._control[_SEQ[slot]] += 1
        self._copy(self._slots[slot], tensors)
        self._publishes += 1
        with self._locked(give_up):
            self._control[_VERSION[slot]] = int(version)
            self._control[_PUBLISH[slot]] = self._publishes
            self._control[_SEQ[slot]] += 1
            self._control[_ACTIVE] = slot

    def differs(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` differ from the last published state (trainer side only: the
        trainer is the only writer, so the active slot cannot change meanwhile)."""
        active = self._slots[self._read(_ACTIVE)]
        with torch.no_grad():
            # One flag per device, read once: a single synchronisation on a GPU.
            flags: dict[torch.device, Tensor] = {}
            for tensor, published in zip(tensors, active, strict=True):
                flag = flags.setdefault(tensor.device, torch.zeros(
                    (), dtype=torch.bool, device=tensor.device))
                flag |= (tensor != published).any()
            return any(bool(flag) for flag in flags.values())

    def _copy(self, destination: list[Tensor], source: Sequence[Tensor]) -> None:
        cuda_devices = {t.device for t in destination if t.is_cuda}
        streams = {}
        for device in cuda_devices:
            stream = self._copy_streams.get(device)
            if stream is None:
                stream = self._copy_streams[device] = torch.cuda.Stream(device)
            # The copy must see the optimizer step that the trainer's stream has queued.
            stream.wait_stream(torch.cuda.current_stream(device))
            streams[device] = stream
        with torch.no_grad():
            for dst, src in zip(destination, source, strict=True):
                if dst.is_cuda:
                    with torch.cuda.stream(streams[dst.device]):
                        dst.copy_(src, non_blocking=True)
                else:
                    dst.copy_(src)
        # The slot is marked complete only once its copy is done.
        for stream in streams.values():
            stream.synchronize()

    # Reader (scorer process)

    def latest(self, *, give_up: Callable[[], None] | None = None) -> tuple[int, int]:
        """``(version, publish number)`` of the active slot, without copying anything.

        Raises:
            WeightsTimeout: The writer held the control lock for ``timeout`` seconds.
        """
        with self._locked(give_up):
            slot = self._read(_ACTIVE)
            return self._read(_VERSION[slot]), self._read(_PUBLISH[slot])

    def read_into(self, tensors: Sequence[Tensor], *,
                  give_up: Callable[[], None] | None = None) -> tuple[int, int]:
        """Copy the active slot into ``tensors``: one consistent published state, never torn.

        Args:
            tensors (Sequence[Tensor]): The replica's tensors, in the order of ``specs``.
            give_up (Callable, optional): As for :meth:`publish`.

        Returns:
            tuple[int, int]: The version and publish number of what was copied.

        Raises:
            WeightsTimeout: No consistent copy could be made within ``timeout`` seconds (the
                writer stopped in the middle of a publish).
        """
        deadline = time.monotonic() + self.timeout
        while True:
            with self._locked(give_up):
                slot = self._read(_ACTIVE)
                before = self._read(_SEQ[slot])
                version = self._read(_VERSION[slot])
                number = self._read(_PUBLISH[slot])
            if before % 2 == 0:
                with torch.no_grad():
                    for dst, src in zip(tensors, self._slots[slot], strict=True):
                        dst.copy_(src)
                for device in {t.device for t in tensors if t.is_cuda}:
                    torch.cuda.current_stream(device).synchronize()
                with self._locked(give_up):
                    after = self._read(_SEQ[slot])
                if after == before:
                    return version, number
            self.retries += 1
            if time.monotonic() > deadline:
                raise WeightsTimeout(
                    f'no consistent copy of the shared weights within {self.timeout:g} s '
                    f'(timeout=): the trainer stopped in the middle of a publish')
            time.sleep(1e-4)


class _Held:
    def __init__(self, lock: ProcessLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class StepCounter:
    """Counts the updates of a module's state: optimizer steps, or other changes.

    Every ``torch.optim`` optimizer step that updates one of the module's parameters counts
    one (a global optimizer step hook sees them all, including fused optimizers, which do
    not bump the parameters' version counters). Without an optimizer step since the last
    :meth:`poll`, any other in-place change of a parameter (a hand-written update under
    ``torch.no_grad()``, ``load_state_dict``; seen through the version counters) or of a
    buffer (batch-norm statistics moved by a training forward, as in gradient accumulation;
    seen by comparing the buffers with their values at the last poll) counts one.
    Changes of parameters through ``param.data`` leave no trace here; :class:`WeightSync`
    sees them by comparing the parameters with the last published copy.

    Args:
        module (nn.Module): The learner.
    """

    def __init__(self, module: nn.Module) -> None:
        self._params = list(module.parameters())
        self._ids = frozenset(id(p) for p in self._params)
        self._buffers = list(module.buffers())
        self._snapshot = [b.detach().clone() for b in self._buffers]
        self._hooked = 0
        self._versions = self._read_versions()
        self.steps = 0
        self._handle = register_optimizer_step_post_hook(_StepHook(weakref.ref(self)))
        weakref.finalize(self, self._handle.remove)

    def _read_versions(self) -> list[int]:
        return [p._version for p in self._params]

    def _optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            if any(id(p) in self._ids for p in group['params']):
                self._hooked += 1
                return

    def _buffers_changed(self) -> bool:
        """Whether a buffer differs from the snapshot, which then takes the new values."""
        if not self._buffers:
            return False
        with torch.no_grad():
            # One flag per device, read once: a single synchronisation on a GPU.
            flags: dict[torch.device, Tensor] = {}
            for buffer, old in zip(self._buffers, self._snapshot, strict=True):
                flag = flags.setdefault(buffer.device, torch.zeros((), dtype=torch.bool,
                                                                   device=buffer.device))
                flag |= (buffer != old).any()
            changed = any(bool(flag) for flag in flags.values())
            if changed:
                for buffer, old in zip(self._buffers, self._snapshot, strict=True):
                    old.copy_(buffer)
        return changed

    def poll(self) -> int:
        """Updates so far (call at each batch boundary)."""
        versions = self._read_versions()
        buffers_changed = self._buffers_changed()
        if self._hooked:
            self.steps += self._hooked
        elif versions != self._versions or buffers_changed:
            self.steps += 1
        self._hooked = 0
        self._versions = versions
        return self.steps

    def bump(self) -> int:
        """Count one update that nothing else could see; returns the new count."""
        self.steps += 1
        return self.steps

    def close(self) -> None:
        """Stop counting optimizer steps (removes the global hook)."""
        self._handle.remove()


class _StepHook:
    """The global optimizer hook; holds its counter weakly so the counter can be collected."""

    def __init__(self, counter_ref: weakref.ref) -> None:
        self._ref = counter_ref

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        counter = self._ref()
        if counter is not None:
            counter._optimizer_stepped(optimizer)


class WeightSync:
    """The trainer's side of weight sharing, and the staleness policy.

    Counts the learner's updates at each batch boundary, publishes the weights every
    ``sync_every`` of them, and says how many super-batches may be scored ahead so that
    none is staler than ``max_staleness`` updates when it is handed over.

    Updates are seen whatever makes them: optimizer steps (plain, ``foreach`` and fused,
    through a global step hook), in-place writes and ``load_state_dict`` (version counters),
    buffers moved by a forward (compared with a snapshot), and writes through ``param.data``
    (compared with the last published copy when nothing else was seen since it).

    Args:
        learner (nn.Module): The module whose weights the scorer process mirrors.
        sync_every (int): Publish every this many updates.
        max_staleness (int): Most updates a handed-over batch's weights may lag.
        prefetch_depth (int): Super-batches in flight.
        timeout (float): Seconds any wait on the scorer process may last.
    """

    def __init__(self, learner: nn.Module, *, sync_every: int, max_staleness: int,
                 prefetch_depth: int, timeout: float) -> None:
        self.learner = learner
        self.sync_every = sync_every
        self.max_staleness = max_staleness
        self.prefetch_depth = prefetch_depth
        self.shared = SharedWeights.for_module(learner, timeout=timeout)
        self.counter = StepCounter(learner)
        self.published = 0
        self.recent: deque[int] = deque(maxlen=8)
        self.last_steps: int | None = None
        self.shared.publish(self._tensors(), 0)

    def _tensors(self) -> list[Tensor]:
        return [tensor.detach() for _, tensor in state_tensors(self.learner)]

    def poll(self, give_up: Callable[[], None] | None = None) -> int:
        """At a batch boundary: count updates, publish when ``sync_every`` have accumulated.

        Returns:
            int: Updates so far.
        """
        steps = self.counter.poll()
        if steps == self.published and self.shared.differs(self._tensors()):
            steps = self.counter.bump()  # a write through .data
        if self.last_steps is not None:
            self.recent.append(steps - self.last_steps)
        self.last_steps = steps
        if steps - self.published >= self.sync_every:
            self.publish(steps, give_up)
        return steps

    def publish(self, steps: int, give_up: Callable[[], None] | None = None) -> None:
        """Publish the current weights as version ``steps``."""
        self.shared.publish(self._tensors(), steps, give_up=give_up)
        self.published = steps

    def publish_now(self, give_up: Callable[[], None] | None = None) -> None:
        """Publish now, counting one update if none was seen since the last publish."""
        steps = self.counter.poll()
        if steps == self.published:
            steps = self.counter.bump()
        self.publish(steps, give_up)

    def lookahead(self) -> int:
        """Super-batches that may be scored ahead of the one handed over next.

        A batch submitted ``k`` batches before its hand-over is ``k`` times the updates per
        batch (plus up to ``sync_every - 1`` unpublished ones) stale by then.
        """
        # Updates per batch, recently; before any are seen, one (a training loop).
        per_batch = max(self.recent) if self.recent else 1
        if per_batch == 0:
            return self.prefetch_depth
        budget = self.max_staleness - (self.sync_every - 1)
        return min(self.prefetch_depth, budget // per_batch)

    def close(self) -> None:
        """Stop counting optimizer steps."""
        self.counter.close()

"""Host-to-device copies of super-batches, overlapped with scoring on CUDA.

On a CUDA device the next super-batch is copied on a side stream while the
current one is scored (double buffering); the consumer's stream waits on the
copy before use. On the CPU there is nothing to copy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from jest_stream.batch import Batch, move_to_device, record_stream

__all__ = ['DevicePrefetcher']


class DevicePrefetcher:
    """Iterates ``(host_batch, device_batch, timings)`` with the copy of the next batch overlapped.

    Args:
        batches (Iterator[Batch]): Host batches (pinned memory for truly asynchronous copies).
        device (torch.device): Where the batches go.
    """

    def __init__(self, batches: Iterator[Batch], device: torch.device) -> None:
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == 'cuda' else None

    def _next_host(self) -> tuple[Batch | None, float]:
        start = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            batch = None
        return batch, time.perf_counter() - start

    def __iter__(self) -> Iterator[tuple[Batch, Batch, dict[str, float]]]:
        if self.stream is None:
            while True:
                host, wait_s = self._next_host()
                if host is None:
                    return
                start = time.perf_counter()
                device_batch = move_to_device(host, self.device)
                yield host, device_batch, {'wait_s': wait_s,
                                           'transfer_s': time.perf_counter() - start}
            return
        host, wait_s = self._next_host()
        pending = self._copy(host) if host is not None else None
        while pending is not None:
            host, device_batch, event, issue_s = pending
            start = time.perf_counter()
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            # The caching allocator must not reuse the copy's memory while the consumer's
            # stream still reads it.
            record_stream(device_batch, consumer)
            sync_s = time.perf_counter() - start
            next_host, next_wait_s = self._next_host()
            pending = self._copy(next_host) if next_host is not None else None
            yield host, device_batch, {'wait_s': wait_s, 'transfer_s': issue_s + sync_s}
            wait_s = next_wait_s

    def _copy(self, host: Batch) -> tuple[Batch, Batch, torch.cuda.Event, float]:
        start = time.perf_counter()
        with torch.cuda.stream(self.stream):
            device_batch = move_to_device(host, self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, device_batch, event, time.perf_counter() - start

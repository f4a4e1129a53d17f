"""Ctrl-C while DataLoader workers start: held back until they have started, never lost.

A multi-process DataLoader forks its workers when it is iterated, every epoch unless its
workers persist. After each fork, the parent runs the hooks registered with
``os.register_at_fork`` (logging registers one), and a Python signal handler can run inside
such a hook; CPython reports an exception raised there as unraisable and drops it. A
SIGINT that arrives at that moment therefore loses its ``KeyboardInterrupt`` and training
goes on. ``interrupts_deferred`` records SIGINT during the block instead and delivers it
to the previous handler once the block is over.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ['interrupts_deferred']


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds SIGINT back for the block and delivers it afterwards (main thread only: Python
    runs signal handlers there, and only the main thread may install them)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (
            signal.SIG_IGN, None):
        yield
        return
    received: list[object] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            else:  # SIG_DFL: die of the signal, as the process would have.
                signal.raise_signal(signal.SIGINT)

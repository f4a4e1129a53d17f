"""One writer per cache folder: an exclusive, bounded, self-describing lock.

Two annotations into one folder (one started on every rank, or a requeued job that overlaps
the old one) would remove each other's temporary files and write every part twice. The
writer therefore holds an exclusive ``flock`` (through the ``filelock`` package) on
``<cache>/.writer.lock`` for as long as it writes. A second writer waits at most
``timeout`` seconds (0: not at all) and then raises :class:`CacheLocked` naming the folder
and the holder, which records itself (pid, host, start time, command) in
``<cache>/.writer.json`` while it holds the lock.

The kernel drops the lock when its holder exits, however it exits, so a killed writer never
blocks the next one. The lock file stays in the folder (waiters must share one inode);
:data:`LOCK_FILES` lists the names that a cache folder may hold besides the cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from jest_stream.cache.errors import CacheLocked
from jest_stream.cache.format import write_atomically
from jest_stream.errors import SettingError

__all__ = ['LOCK_FILE', 'OWNER_FILE', 'LOCK_FILES', 'WriterLock', 'check_timeout']

logger = logging.getLogger(__name__)

LOCK_FILE = '.writer.lock'
OWNER_FILE = '.writer.json'
LOCK_FILES = frozenset({LOCK_FILE, OWNER_FILE})
_POLL_SECONDS = 0.1


def check_timeout(timeout: Any, setting: str = 'lock_timeout') -> float:
    """``timeout`` as seconds to wait, refusing anything but a finite number >= 0.

    Raises:
        SettingError: ``timeout`` is negative, infinite, NaN or not a number.
    """
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout < 0):
        raise SettingError(f'{setting}={timeout!r} must be a finite number of seconds >= 0 '
                           f'(0: refuse at once when another writer holds the cache)')
    return float(timeout)


class WriterLock:
    """The exclusive right to write the cache folder ``folder``.

    Args:
        folder (Path): The cache folder; it must exist.
        timeout (float): Seconds to wait for another writer to let go (0: do not wait).

    Raises:
        SettingError: ``timeout`` is not a finite number >= 0.
    """

    def __init__(self, folder: Path, *, timeout: float = 0.0) -> None:
        self.folder = Path(folder)
        self.timeout = check_timeout(timeout)
        self._lock = FileLock(str(self.folder / LOCK_FILE), thread_local=False)
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._held

    def acquire(self) -> None:
        """Take the lock, waiting at most ``timeout`` seconds.

        Raises:
            CacheLocked: Another writer held it for the whole wait.
        """
        started = time.monotonic()
        try:
            self._lock.acquire(timeout=self.timeout, poll_interval=_POLL_SECONDS)
        except Timeout:
            waited = (f'waited for {time.monotonic() - started:.1f} s' if self.timeout
                      else 'was told not to wait')
            raise CacheLocked(
                f'{self.folder} is being written by another annotation ({self.describe_owner()}); '
                f'this one {waited}. Run one annotation per cache folder (in a job of several '
                f'ranks: on rank 0 only, then a barrier), or let the other one finish and run '
                f'this again (finished parts are kept), or pass lock_timeout= (--lock-timeout '
                f'SECONDS) to wait for it') from None
        self._held = True
        owner = {'pid': os.getpid(), 'host': socket.gethostname(),
                 'since': time.strftime('%Y-%m-%d %H:%M:%S %z'),
                 'command': ' '.join(sys.argv)[:300]}
        write_atomically(self.folder / OWNER_FILE, json.dumps(owner).encode())
        logger.debug('%s: writer lock taken by pid %d', self.folder, owner['pid'])

    def release(self) -> None:
        """Let go of the lock (nothing happens when it is not held)."""
        if not self._held:
            return
        try:
            (self.folder / OWNER_FILE).unlink(missing_ok=True)
        finally:
            self._held = False
            self._lock.release()
        logger.debug('%s: writer lock released', self.folder)

    def describe_owner(self) -> str:
        """The holder as its record gives it: pid, host, start time and command."""
        try:
            owner = json.loads((self.folder / OWNER_FILE).read_text())
            return (f'pid {int(owner["pid"])} on {owner["host"]}, since {owner["since"]}, '
                    f'running {owner["command"]!r}')
        except (OSError, ValueError, KeyError, TypeError):
            return f'a process that has not recorded itself in {OWNER_FILE} yet'

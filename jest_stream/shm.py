"""Removing the shared memory that killed streaming jobs left behind, and nothing else.

mosaicml-streaming keeps each ``StreamingDataset``'s state in ``/dev/shm`` segments named
``NNNNNN_<name>`` (a six-digit prefix per dataset) and unlinks them when the process exits
normally. A killed process (SIGKILL, an out-of-memory kill, a process-group kill) cannot,
so its segments stay. streaming's own ``clean_stale_shared_memory()`` unlinks every
segment it finds, those of live jobs on the same machine included, which breaks them.

:func:`remove_stale_shared_memory` removes a prefix's segments only when no live process
maps or holds open any of them and they belong to the current user: the segments of
running jobs are always in use (streaming keeps them mapped for the dataset's life), so
they are left alone. Call it once at program start, before any dataset exists, on every
node; it is safe to call from every rank at once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ['SHM_DIR', 'stale_shared_memory', 'remove_stale_shared_memory']

logger = logging.getLogger(__name__)

SHM_DIR = Path('/dev/shm')
_SEGMENT = re.compile(r'^(\d{6})_\w+$')


def _paths_in_use(shm_dir: Path) -> set[str]:
    """Paths under ``shm_dir`` that some process maps or holds open (those we can inspect)."""
    prefix = str(shm_dir) + '/'
    used: set[str] = set()
    for entry in os.scandir('/proc'):
        if not entry.name.isdigit():
            continue
        try:
            with open(f'/proc/{entry.name}/maps') as maps:
                for line in maps:
                    path = line.rstrip('\n').split(maxsplit=5)[-1]
                    if path.startswith(prefix):
                        used.add(path.removesuffix(' (deleted)'))
            for fd in os.scandir(f'/proc/{entry.name}/fd'):
                target = os.readlink(fd.path)
                if target.startswith(prefix):
                    used.add(target)
        except OSError:
            continue  # gone meanwhile, or another user's: such segments are not removed
    return used


def stale_shared_memory(shm_dir: Path | str = SHM_DIR) -> list[Path]:
    """Streaming segments of dead jobs: their whole prefix unused, owned by this user.

    Args:
        shm_dir (Path | str): Where POSIX shared memory lives (``/dev/shm`` on Linux).

    Returns:
        list[Path]: The segments, sorted; empty where the system has no such folder.
    """
    shm_dir = Path(shm_dir)
    if not sys.platform.startswith('linux') or not shm_dir.is_dir():
        return []
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in shm_dir.iterdir():
        match = _SEGMENT.match(path.name)
        if match:
            groups[match.group(1)].append(path)
    if not groups:
        return []
    used = _paths_in_use(shm_dir)
    uid = os.getuid()
    stale = []
    for paths in groups.values():
        try:
            mine = all(path.stat().st_uid == uid for path in paths)
        except FileNotFoundError:
            continue  # its owner is removing it now
        if mine and not any(str(path) in used for path in paths):
            stale.extend(paths)
    return sorted(stale)


def remove_stale_shared_memory(shm_dir: Path | str = SHM_DIR) -> list[str]:
    """Unlink the segments of :func:`stale_shared_memory`; live jobs' segments are kept.

    Args:
        shm_dir (Path | str): Where POSIX shared memory lives (``/dev/shm`` on Linux).

    Returns:
        list[str]: The names removed.
    """
    removed = []
    for path in stale_shared_memory(shm_dir):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass  # removed by another rank meanwhile
    if removed:
        logger.info('removed %d shared-memory segments of dead streaming jobs: %s',
                    len(removed), ', '.join(removed))
    return removed

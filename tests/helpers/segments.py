"""Streaming's shared-memory segments of one dataset folder (for tests that SIGKILL a job)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def segments_of(directory: Path) -> set[str]:
    """Streaming's shared-memory segments of the datasets over ``directory``.

    Each dataset's ``<prefix>_locals`` segment names its local folders; the other
    segments of the same prefix belong to the same dataset.
    """
    prefixes = set()
    for name in os.listdir('/dev/shm'):
        match = re.fullmatch(r'(\d{6})_locals', name)
        try:
            if match and str(directory).encode() in Path('/dev/shm', name).read_bytes():
                prefixes.add(match.group(1))
        except FileNotFoundError:  # released meanwhile
            continue
    return {name for name in os.listdir('/dev/shm') if name[:6] in prefixes and name[6] == '_'}

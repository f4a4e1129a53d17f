"""Writing benchmark records: JSON whose paths inside the repository are relative to it.

Committed results then say where their data came from without naming the machine that
produced them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_relative(value: Any) -> Any:
    """``value`` with every string that is a path under the repository made relative to it
    (recursively through dicts, lists and tuples)."""
    if isinstance(value, str):
        root = str(REPO_ROOT)
        if value == root:
            return '.'
        if value.startswith(root + os.sep):
            return value[len(root) + 1:]
        return value
    if isinstance(value, dict):
        return {key: repo_relative(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [repo_relative(item) for item in value]
    return value


def write_record(path: Path, record: dict[str, Any], *, indent: int = 2) -> None:
    """Writes ``record`` as JSON at ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(repo_relative(record), indent=indent) + '\n')
    os.replace(tmp, path)

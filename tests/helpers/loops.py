"""Training loops of the tests: the sub-batches a trainer would take from a loader."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any


def sub_batch_ids(loader: Iterable[Any], steps: int, key: str | int = 'sample_id', *,
                  breaks: Collection[int] = (),
                  after_step: Callable[[int], None] | None = None) -> list[list[int]]:
    """Sample ids (column or field ``key``) of the next ``steps`` sub-batches, crossing epochs
    as a trainer would; leaves the epoch early after the step counts in ``breaks``, and calls
    ``after_step(steps_taken)`` after each step."""
    out: list[list[int]] = []
    while len(out) < steps:
        for batch in loader:
            out.append(batch[key].tolist())
            if after_step is not None:
                after_step(len(out))
            if len(out) == steps or len(out) in breaks:
                break
    return out

"""Composer algorithm passes that put JEST selection first."""

from __future__ import annotations

from collections.abc import Sequence

from composer.core import Algorithm, Event

__all__ = ['jest_first']


def jest_first(algorithms: Sequence[Algorithm], event: Event) -> Sequence[Algorithm]:
    """Algorithm pass: :class:`~jest_stream.integrations.composer.JESTAlgorithm` runs first
    on ``Event.AFTER_DATALOADER``.

    Composer runs ``AFTER_*`` events in reverse order of the ``algorithms`` list, so without
    this pass an algorithm listed after ``JESTAlgorithm`` (MixUp, say) would change the
    super-batch before it is scored. Pass it to the trainer:
    ``Trainer(..., algorithm_passes=jest_first)``.

    Args:
        algorithms (Sequence[Algorithm]): The algorithms that match ``event``, in run order.
        event (Event): The event.

    Returns:
        Sequence[Algorithm]: The same algorithms, ``JESTAlgorithm`` first on
        ``AFTER_DATALOADER``; unchanged on every other event.
    """
    from jest_stream.integrations.composer.algorithm import JESTAlgorithm

    if event != Event.AFTER_DATALOADER:
        return algorithms
    return sorted(algorithms, key=lambda algorithm: not isinstance(algorithm, JESTAlgorithm))

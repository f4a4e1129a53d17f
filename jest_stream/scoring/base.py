"""What every scorer shares: the protocol, scoring mode, chunking, and naming sample ids.

A scorer is any callable ``scorer(batch, sample_ids, criterion) -> BatchScores | Tensor[B]``
with a ``learner`` attribute (the module whose weights it reads, or None): a scorer process
mirrors the learner's weights from the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from jest_stream.batch import Batch, gather
from jest_stream.checks import check_int
from jest_stream.criteria import Criterion
from jest_stream.errors import SettingError

__all__ = ['Scorer', 'LearningScorer', 'ModelScorer', 'scoring_mode', 'iter_chunks', 'describe_ids',
           'check_chunk_size', 'check_transform']


@runtime_checkable
class Scorer(Protocol):
    """The scorer protocol.

    Attributes:
        learner (nn.Module | None): The model whose weights the scorer reads; a scorer
            process mirrors these weights from the trainer.
    """

    learner: nn.Module | None

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> Any:
        ...


@runtime_checkable
class LearningScorer(Protocol):
    """A scorer with a model of its own that learns from the selected rows (a proxy learner).

    The selection step calls :meth:`learn` after each selection, where the scorer runs (the
    scorer process, with ``scoring='process'``); its state is part of the loader's state.
    """

    def learn(self, batch: Batch, sample_ids: Tensor, rows: Tensor, *,
              count_flops: bool = False, seed: int | None = None) -> int | None:
        """Learn from ``rows`` of the super-batch (the rows just selected); the FLOPs of it
        when ``count_flops``. ``seed`` seeds the random draws of this update (dropout); the
        step derives it from the super-batch's position, so resumed runs and the scorer
        process learn exactly as an uninterrupted inline run."""

    def state_dict(self) -> dict[str, Any]:
        """Its state (copies)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@contextlib.contextmanager
def scoring_mode(*models: nn.Module | None) -> Iterator[None]:
    """No gradients and eval mode (batch-norm statistics untouched), restored afterwards."""
    modes = [(m, m.training) for m in models if m is not None]
    try:
        for model, _ in modes:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, training in modes:
            model.train(training)


def iter_chunks(batch: Batch, n: int, chunk_size: int | None) -> Iterator[Batch]:
    """``batch`` in consecutive chunks of ``chunk_size`` rows (whole when None)."""
    if chunk_size is None or chunk_size >= n:
        yield batch
        return
    for start in range(0, n, chunk_size):
        yield gather(batch, torch.arange(start, min(start + chunk_size, n)))


def describe_ids(sample_ids: Tensor, bad: Tensor) -> str:
    """The sample ids where ``bad`` (BoolTensor[B]) holds, at most eight of them, and a count."""
    ids = sample_ids[bad.cpu()].tolist()
    shown = ids[:8]
    return f'{shown}{" ..." if len(ids) > 8 else ""} ({len(ids)} of {len(sample_ids)})'


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size``: a positive int, or None for whole super-batches."""
    if chunk_size is None:
        return None
    return check_int(chunk_size, 'chunk_size', low=1, hint='examples per scoring forward, or '
                     'None for the whole super-batch at once')


def check_transform(forward: Callable | None, input_transform: Callable | None) -> None:
    """Refuse ``input_transform`` beside a custom ``forward``, which would ignore it."""
    if forward is not None and input_transform is not None:
        raise SettingError(
            'input_transform applies to the default forward only; with forward=... apply the '
            'transform inside it (jest_stream.flexi.FlexiForward does, for the learner only)')


class ModelScorer:
    """What the built-in scorers share: a learner, a reference, a scoring forward, chunks.

    Args:
        learner (nn.Module): The model being trained.
        reference (Any): A frozen reference model, a table of stored outputs, or None.
        forward (Callable, optional): ``forward(model, batch) -> outputs``.
        chunk_size (int, optional): Examples per scoring forward, to bound memory.
        input_transform (Callable, optional): Applied to the learner's scoring inputs only.

    Raises:
        SettingError: ``chunk_size`` is not positive, or ``input_transform`` is given beside
            ``forward``.
    """

    def __init__(self, learner: nn.Module, reference: Any, *, forward: Callable | None,
                 chunk_size: int | None, input_transform: Callable | None) -> None:
        check_transform(forward, input_transform)
        self.learner = learner
        self.reference = reference
        self.forward = forward
        self.chunk_size = check_chunk_size(chunk_size)
        self.input_transform = input_transform

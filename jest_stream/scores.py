"""What a scorer hands to the selector, and the selection methods over it.

A scorer returns :class:`BatchScores` for one super-batch of ``B`` candidates:
per-example scores (classification, language modelling), pair scores of the
sigmoid loss, or the conditional scores of the softmax loss. The selection
methods of :mod:`jest_stream.selection` (``joint``, ``topk``, ``sample``, ``uniform``)
take any of them through the :class:`~jest_stream.selection.BatchScores` protocol.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from jest_stream.criteria import Criterion
from jest_stream.errors import SettingError
from jest_stream.losses import InfoNCEConditional, sigmoid_pair_losses
from jest_stream.selection import (
    BatchScores,
    CombinedConditional,
    Constraint,
    joint_select_incremental,
    joint_select_softmax,
)

__all__ = [
    'BatchScores',
    'PerExampleScores',
    'SigmoidPairScores',
    'SoftmaxScores',
    'Embeddings',
]


class _IncrementalJoint:
    """Joint selection for scores that are a :class:`~jest_stream.selection.PairScores`."""

    def select_jointly(self, n_select: int, *, n_chunks: int, temperature: float,
                       generator: torch.Generator, constraint: Constraint | None = None
                       ) -> Tensor:
        return joint_select_incremental(self, n_select, n_chunks=n_chunks,
                                        temperature=temperature, generator=generator,
                                        constraint=constraint)


class PerExampleScores(_IncrementalJoint):
    """Per-example scores ``Tensor[B]``: the batch score is their sum.

    Joint selection has no pair terms to condition on here, so it is blocked
    sampling from the softmax of the scores, the same distribution as ``sample``.

    Args:
        scores (Tensor[B]): The combined score of every candidate.
        excluded (BoolTensor[B], optional): Candidates whose loss means nothing (every
            target ignored by the loss, say): the selection step never prefers them; they
            are chosen only when fewer than ``b`` others remain, and then uniformly.
        learner (Tensor[B], optional): The learner's per-example loss, for logs.
        reference (Tensor[B], optional): The reference's per-example loss, for logs.
    """

    def __init__(self, scores: Tensor, *, excluded: Tensor | None = None,
                 learner: Tensor | None = None, reference: Tensor | None = None) -> None:
        self.scores = scores
        self.size = int(scores.shape[0])
        self.excluded = excluded
        self.learner = learner
        self.reference = reference

    def self_scores(self) -> Tensor:
        return self.scores

    def per_example(self) -> Tensor:
        return self.scores

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> PerExampleScores:
        """The same scores with ``fn`` applied to every per-candidate tensor (reorder, gather)."""
        def apply(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else fn(tensor)

        return PerExampleScores(fn(self.scores), excluded=apply(self.excluded),
                                learner=apply(self.learner), reference=apply(self.reference))

    # PairScores view of a diagonal matrix, so the joint sampler runs unchanged.
    def diagonal(self) -> Tensor:
        return self.scores

    def columns(self, idx: Tensor) -> Tensor:
        return self.scores.new_zeros(self.size, len(idx))

    def rows(self, idx: Tensor) -> Tensor:
        return self.scores.new_zeros(len(idx), self.size)

    def materialise(self) -> Tensor:
        return torch.diag(self.scores)


class Embeddings:
    """Two-tower outputs for ``B`` pairs.

    Args:
        image (Tensor[B, d]): L2-normalised image embeddings.
        text (Tensor[B, d]): L2-normalised text embeddings.
        temperature (float | Tensor): Learned temperature ``t`` (a scale, not its log).
        bias (float | Tensor): Learned bias ``c`` (sigmoid loss only; 0 for softmax).
    """

    def __init__(self, image: Tensor, text: Tensor, temperature: float | Tensor,
                 bias: float | Tensor = 0.0) -> None:
        self.image = image
        self.text = text
        self.temperature = float(temperature)
        self.bias = float(bias)

    def to(self, dtype: torch.dtype) -> Embeddings:
        return Embeddings(self.image.to(dtype), self.text.to(dtype), self.temperature, self.bias)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Embeddings:
        return Embeddings(fn(self.image), fn(self.text), self.temperature, self.bias)


def _map(embeddings: Embeddings | None, fn: Callable[[Tensor], Tensor]) -> Embeddings | None:
    return None if embeddings is None else embeddings.map_rows(fn)


def _weighted_terms(learner: Embeddings | None, reference: Embeddings | None,
                    criterion: Criterion) -> list[tuple[float, Embeddings]]:
    """``(weight, embeddings)`` of the models the criterion weighs (learner, reference)."""
    terms = [(w, e) for w, e in ((criterion.learner_weight, learner),
                                 (criterion.reference_weight, reference)) if w != 0.0]
    if any(e is None for _, e in terms):
        raise SettingError(f'criterion {criterion.name!r} needs embeddings it was not given')
    return terms


class SigmoidPairScores(_IncrementalJoint):
    """Pair scores ``A = w_l * l(learner) + w_r * l(reference)`` of the sigmoid loss.

    Blocks of ``A`` are computed from the embeddings on demand, so the joint
    sampler needs ``O(B c)`` memory per chunk and never the ``B x B`` matrix.

    Args:
        learner (Embeddings | None): Learner embeddings (None when the criterion ignores it).
        reference (Embeddings | None): Reference embeddings (None when ignored).
        criterion (Criterion): How to combine the two.
        block_size (int): Rows per block when computing ``per_example`` scores.
    """

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 criterion: Criterion, *, block_size: int = 1024) -> None:
        self.terms = _weighted_terms(learner, reference, criterion)
        self.size = int(self.terms[0][1].image.shape[0])
        self.block_size = block_size
        self.learner, self.reference, self.criterion = learner, reference, criterion

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> SigmoidPairScores:
        """The same scores over candidates rearranged by ``fn`` (reorder, gather)."""
        return SigmoidPairScores(_map(self.learner, fn), _map(self.reference, fn), self.criterion,
                                 block_size=self.block_size)

    def _block(self, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        total = None
        for weight, emb in self.terms:
            block = sigmoid_pair_losses(emb.image, emb.text, emb.temperature, emb.bias,
                                        rows=rows, cols=cols) * weight
            total = block if total is None else total + block
        return total

    def diagonal(self) -> Tensor:
        total = None
        for weight, emb in self.terms:
            logits = emb.temperature * (emb.image * emb.text).sum(-1) + emb.bias
            term = torch.nn.functional.softplus(-logits) * weight
            total = term if total is None else total + term
        return total

    def columns(self, idx: Tensor) -> Tensor:
        return self._block(None, idx)

    def rows(self, idx: Tensor) -> Tensor:
        return self._block(idx, None)

    def materialise(self) -> Tensor:
        return self._block(None, None)

    def self_scores(self) -> Tensor:
        return self.diagonal()

    def per_example(self) -> Tensor:
        """Each candidate's share of the super-batch loss: its row and column of ``A``."""
        device = self.terms[0][1].image.device
        total = torch.zeros(self.size, dtype=self.terms[0][1].image.dtype, device=device)
        for start in range(0, self.size, self.block_size):
            idx = torch.arange(start, min(start + self.block_size, self.size), device=device)
            total[idx] += self.rows(idx).sum(1) + self.columns(idx).sum(0)
        return total - self.diagonal()


class SoftmaxScores:
    """Scores of the softmax (InfoNCE) loss, which does not split into pair terms.

    A candidate is scored by its InfoNCE loss (both directions) against the
    already-selected set as negatives, learner minus reference. Its independent
    score uses the whole super-batch as negatives.
    """

    def __init__(self, learner: Embeddings | None, reference: Embeddings | None,
                 criterion: Criterion) -> None:
        self.terms = _weighted_terms(learner, reference, criterion)
        self.size = int(self.terms[0][1].image.shape[0])
        self.learner, self.reference, self.criterion = learner, reference, criterion

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> SoftmaxScores:
        """The same scores over candidates rearranged by ``fn`` (reorder, gather)."""
        return SoftmaxScores(_map(self.learner, fn), _map(self.reference, fn), self.criterion)

    def _conditional(self) -> CombinedConditional:
        return CombinedConditional([
            (weight, InfoNCEConditional(emb.image, emb.text, emb.temperature))
            for weight, emb in self.terms])

    def self_scores(self) -> Tensor:
        return self.per_example()

    def per_example(self) -> Tensor:
        conditional = self._conditional()
        device = self.terms[0][1].image.device
        conditional.add(torch.arange(self.size, device=device))
        return conditional.current()

    def select_jointly(self, n_select: int, *, n_chunks: int, temperature: float,
                       generator: torch.Generator, constraint: Constraint | None = None
                       ) -> Tensor:
        return joint_select_softmax(self._conditional(), n_select, n_chunks=n_chunks,
                                    temperature=temperature, generator=generator,
                                    constraint=constraint)

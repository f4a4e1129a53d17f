"""Scorers: a super-batch in, :class:`~jest_stream.scores.BatchScores` out.

A scorer runs the learner (no gradients, eval mode, in chunks) and gets the
reference's outputs (a live frozen model or a table of stored values), then
applies the criterion. Write your own by following :class:`Scorer`: any
callable ``scorer(batch, sample_ids, criterion) -> BatchScores | Tensor[B]``
with a ``learner`` attribute (the module whose weights it reads, or None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from jest_stream.batch import Batch, batch_length, gather, get_column
from jest_stream.criteria import Criterion
from jest_stream.losses import per_example_cross_entropy
from jest_stream.reference import require_output, resolve_reference
from jest_stream.scores import (
    BatchScores,
    Embeddings,
    PerExampleScores,
    SigmoidPairScores,
    SoftmaxScores,
)

__all__ = [
    'Scorer',
    'ScoreError',
    'ClassificationScorer',
    'ContrastiveScorer',
    'scoring_mode',
    'check_per_example',
    'check_embeddings',
    'as_batch_scores',
]


class ScoreError(ValueError):
    """A scorer returned something the selector cannot use (shape, dtype, NaN or inf)."""


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


def _check_transform(forward: Callable | None, input_transform: Callable | None) -> None:
    if forward is not None and input_transform is not None:
        raise ValueError(
            'input_transform applies to the default forward only; with forward=... apply the '
            'transform inside it (jest_stream.flexi.FlexiForward does, for the learner only)')


def _chunks(batch: Batch, n: int, chunk_size: int | None) -> Iterator[Batch]:
    if chunk_size is None or chunk_size >= n:
        yield batch
        return
    for start in range(0, n, chunk_size):
        yield gather(batch, torch.arange(start, min(start + chunk_size, n)))


def _describe_ids(sample_ids: Tensor, bad: Tensor) -> str:
    ids = sample_ids[bad.cpu()].tolist()
    shown = ids[:8]
    return f'{shown}{" ..." if len(ids) > 8 else ""} ({len(ids)} of {len(sample_ids)})'


def check_per_example(scores: Any, n: int, sample_ids: Tensor, *, what: str) -> Tensor:
    """``scores`` as a finite floating ``Tensor[n]``, or a :class:`ScoreError` that says why not."""
    if not isinstance(scores, Tensor):
        raise ScoreError(f'{what} must be a Tensor[{n}], got {type(scores).__name__}')
    if scores.dim() != 1 or scores.shape[0] != n:
        raise ScoreError(
            f'{what} has shape {tuple(scores.shape)} but the super-batch has {n} examples: return '
            f'one score per example, Tensor[{n}] (use reduction="none" for the loss)')
    if not scores.is_floating_point():
        raise ScoreError(f'{what} has dtype {scores.dtype}; return floating-point scores')
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        raise ScoreError(
            f'{what} has NaN or inf for sample ids {_describe_ids(sample_ids, bad)}; such scores '
            f'are never selected. Check the model for divergence and the inputs of those samples.')
    return scores


def check_embeddings(emb: Embeddings, n: int, sample_ids: Tensor, *, what: str) -> Embeddings:
    """Shapes ``[n, d]``, floating, finite; a :class:`ScoreError` otherwise."""
    for name, tensor in (('image', emb.image), ('text', emb.text)):
        if tensor.dim() != 2 or tensor.shape[0] != n or tensor.shape != emb.image.shape:
            raise ScoreError(
                f'{what} {name} embeddings have shape {tuple(tensor.shape)}; expected [{n}, d] '
                f'for both towers')
        if not tensor.is_floating_point():
            raise ScoreError(f'{what} {name} embeddings have dtype {tensor.dtype}')
        bad = ~torch.isfinite(tensor).all(dim=1)
        if bool(bad.any()):
            raise ScoreError(f'{what} {name} embeddings have NaN or inf for sample ids '
                             f'{_describe_ids(sample_ids, bad)}')
    for name, value in (('temperature', emb.temperature), ('bias', emb.bias)):
        if not torch.isfinite(torch.tensor(value)):
            raise ScoreError(f'{what} {name} is {value}')
    return emb


def as_batch_scores(result: Any, n: int, sample_ids: Tensor) -> BatchScores:
    """A scorer's result as :class:`BatchScores`; plain tensors are per-example scores."""
    if isinstance(result, Tensor):
        return PerExampleScores(check_per_example(result, n, sample_ids, what='scorer output'))
    if isinstance(result, PerExampleScores):
        check_per_example(result.scores, n, sample_ids, what='scorer output')
        return result
    if isinstance(result, BatchScores):
        if result.size != n:
            raise ScoreError(f'scorer output scores {result.size} candidates, not {n}')
        return result
    raise ScoreError(
        f'a scorer must return a Tensor[{n}] of per-example scores or BatchScores, got '
        f'{type(result).__name__}')


class ClassificationScorer:
    """Per-example losses of a classifier (or anything with a per-example loss).

    Args:
        learner (nn.Module): The model being trained.
        reference (nn.Module | ReferenceTable | None): A frozen reference model (its
            per-example loss is computed live), a table with a ``loss`` output, or
            None for ``hard_learner``.
        input_key (str | int): Column (dict batches) or field (tuple batches) of the inputs.
        target_key (str | int): Column or field of the targets.
        forward (Callable, optional): ``forward(model, batch) -> logits``; by default
            ``model(batch[input_key])``.
        loss_fn (Callable): ``loss_fn(logits, targets) -> Tensor[B]``; cross-entropy by default.
        chunk_size (int, optional): Examples per scoring forward, to bound memory.
        input_transform (Callable, optional): Applied to the learner's scoring inputs only
            (e.g. a cheaper, lower resolution).
    """

    def __init__(self, learner: nn.Module, reference: Any = None, *,
                 input_key: str | int = 0, target_key: str | int = 1,
                 forward: Callable[[nn.Module, Batch], Tensor] | None = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = per_example_cross_entropy,
                 chunk_size: int | None = None,
                 input_transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f'chunk_size={chunk_size} must be positive or None')
        _check_transform(forward, input_transform)
        self.learner = learner
        self.reference = reference
        self.input_key = input_key
        self.target_key = target_key
        self.forward = forward
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.input_transform = input_transform

    def _losses(self, model: nn.Module, batch: Batch, n: int, transform: Callable | None) -> Tensor:
        losses = []
        for chunk in _chunks(batch, n, self.chunk_size):
            if self.forward is not None:
                logits = self.forward(model, chunk)
            else:
                inputs = get_column(chunk, self.input_key, setting='input_key')
                logits = model(transform(inputs) if transform is not None else inputs)
            targets = get_column(chunk, self.target_key, setting='target_key')
            losses.append(self.loss_fn(logits, targets.to(logits.device)))
        return torch.cat(losses).float()

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> PerExampleScores:
        n = batch_length(batch)
        reference = resolve_reference(self.reference, needed=criterion.needs_reference)
        learner_loss = reference_loss = None
        with scoring_mode(self.learner if criterion.needs_learner else None):
            if criterion.needs_learner:
                learner_loss = check_per_example(
                    self._losses(self.learner, batch, n, self.input_transform), n, sample_ids,
                    what='learner loss')
            if criterion.needs_reference:
                if isinstance(reference, nn.Module):
                    reference_loss = self._losses(reference, batch, n, None)
                else:
                    reference_loss = torch.as_tensor(require_output(
                        reference.outputs(batch, sample_ids), 'loss', source=reference))
                reference_loss = check_per_example(
                    reference_loss.float(), n, sample_ids, what='reference loss')
                if learner_loss is not None:
                    reference_loss = reference_loss.to(learner_loss.device)
        return PerExampleScores(criterion.combine(learner_loss, reference_loss))


class ContrastiveScorer:
    """Two-tower (image, text) contrastive models, sigmoid or softmax loss.

    Args:
        learner (nn.Module): Two-tower model being trained.
        reference (nn.Module | ReferenceTable | None): Frozen two-tower reference, or a
            table with ``image_emb``, ``text_emb``, ``temperature`` and ``bias``.
        loss (str): ``sigmoid`` (SigLIP pair terms; joint selection over pair scores) or
            ``softmax`` (InfoNCE against the selected set).
        image_key (str | int): Column or field of the images.
        text_key (str | int): Column or field of the texts (token ids, features...).
        forward (Callable, optional): ``forward(model, batch) -> (image_emb, text_emb,
            temperature, bias)`` or :class:`Embeddings`; by default
            ``model(batch[image_key], batch[text_key])`` must return that.
        chunk_size (int, optional): Examples per scoring forward.
        input_transform (Callable, optional): Applied to the learner's images when scoring.
        dtype (torch.dtype): Precision of the scores (embeddings are cast to it).
    """

    def __init__(self, learner: nn.Module, reference: Any = None, *, loss: str = 'sigmoid',
                 image_key: str | int = 'image', text_key: str | int = 'text',
                 forward: Callable[[nn.Module, Batch], Any] | None = None,
                 chunk_size: int | None = None,
                 input_transform: Callable[[Tensor], Tensor] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if loss not in ('sigmoid', 'softmax'):
            raise ValueError(f'loss={loss!r} is not known; choose "sigmoid" or "softmax"')
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f'chunk_size={chunk_size} must be positive or None')
        _check_transform(forward, input_transform)
        self.learner = learner
        self.reference = reference
        self.loss = loss
        self.image_key = image_key
        self.text_key = text_key
        self.forward = forward
        self.chunk_size = chunk_size
        self.input_transform = input_transform
        self.dtype = dtype

    def _embed(self, model: nn.Module, batch: Batch, n: int, transform: Callable | None
               ) -> Embeddings:
        parts = []
        for chunk in _chunks(batch, n, self.chunk_size):
            if self.forward is not None:
                out = self.forward(model, chunk)
            else:
                images = get_column(chunk, self.image_key, setting='image_key')
                texts = get_column(chunk, self.text_key, setting='text_key')
                out = model(transform(images) if transform is not None else images, texts)
            parts.append(out if isinstance(out, Embeddings) else Embeddings(*out))
        return Embeddings(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]),
                          parts[0].temperature, parts[0].bias).to(self.dtype)

    def _reference(self, reference: Any, batch: Batch, n: int, sample_ids: Tensor) -> Embeddings:
        if isinstance(reference, nn.Module):
            return self._embed(reference, batch, n, None)
        out = reference.outputs(batch, sample_ids)
        return Embeddings(
            torch.as_tensor(require_output(out, 'image_emb', source=reference)),
            torch.as_tensor(require_output(out, 'text_emb', source=reference)),
            require_output(out, 'temperature', source=reference),
            out.get('bias', 0.0) if self.loss == 'softmax'
            else require_output(out, 'bias', source=reference)).to(self.dtype)

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> BatchScores:
        n = batch_length(batch)
        reference = resolve_reference(self.reference, needed=criterion.needs_reference)
        learner_emb = reference_emb = None
        with scoring_mode(self.learner if criterion.needs_learner else None):
            if criterion.needs_learner:
                learner_emb = check_embeddings(
                    self._embed(self.learner, batch, n, self.input_transform), n, sample_ids,
                    what='learner')
            if criterion.needs_reference:
                reference_emb = check_embeddings(
                    self._reference(reference, batch, n, sample_ids), n, sample_ids,
                    what='reference')
                if learner_emb is not None:
                    device = learner_emb.image.device
                    reference_emb = Embeddings(reference_emb.image.to(device),
                                               reference_emb.text.to(device),
                                               reference_emb.temperature, reference_emb.bias)
        if self.loss == 'sigmoid':
            return SigmoidPairScores(learner_emb, reference_emb, criterion)
        return SoftmaxScores(learner_emb, reference_emb, criterion)

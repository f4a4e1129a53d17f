"""Checks of what scorers and their models return: count, shape, dtype, norms, finiteness.

Every super-batch's outputs are checked before selection sees them, so a model that
returns the wrong thing fails on the first super-batch with an error that names the
setting to change and the sample ids concerned, instead of selecting silently wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jest_stream.errors import DataError, ScoreError
from jest_stream.scores import Embeddings, PerExampleScores
from jest_stream.scoring.base import describe_ids
from jest_stream.selection import BatchScores

__all__ = ['check_per_example', 'check_embeddings', 'as_embeddings', 'as_batch_scores',
           'check_class_targets', 'NORM_TOLERANCE']

# How far an embedding's L2 norm may be from 1: float16 storage rounds norms by about 1e-3.
NORM_TOLERANCE = 1e-2


def check_per_example(scores: Any, n: int, sample_ids: Tensor, *, what: str) -> Tensor:
    """``scores`` as a finite floating ``Tensor[n]``.

    Raises:
        ScoreError: It is not a tensor, has another shape, an integer dtype, NaN or inf (the
            message names the sample ids).
    """
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
            f'{what} has NaN or inf for sample ids {describe_ids(sample_ids, bad)}; such scores '
            f'are never selected. Check the model for divergence and the inputs of those samples.')
    return scores


def as_embeddings(out: Any, *, loss: str, what: str, setting: str) -> Embeddings:
    """A two-tower model's outputs as :class:`Embeddings`.

    Args:
        out (Any): ``Embeddings``, or ``(image_emb, text_emb, temperature, bias)``; the
            softmax loss has no bias, so ``(image_emb, text_emb, temperature)`` is accepted
            for it.
        loss (str): ``sigmoid`` or ``softmax``.
        what (str): Whose outputs (``learner``, ``reference``), for the message.
        setting (str): The setting that produced them (``forward=``...), for the message.

    Raises:
        ScoreError: Another count or type of outputs.
    """
    if isinstance(out, Embeddings):
        return out
    wanted = '(image_emb, text_emb, temperature, bias)'
    if not isinstance(out, (tuple, list)):
        raise ScoreError(f'the {what} returned a {type(out).__name__}; {setting} must return '
                         f'Embeddings or a tuple {wanted}')
    if len(out) == 3 and loss == 'softmax':
        return Embeddings(*out)
    if len(out) != 4:
        missing = ' (the sigmoid loss needs the bias c: return it too)' \
            if len(out) == 3 and loss == 'sigmoid' else ''
        raise ScoreError(f'the {what} returned {len(out)} outputs; {setting} must return '
                         f'{wanted}{missing}')
    return Embeddings(*out)


def check_embeddings(emb: Embeddings, n: int, sample_ids: Tensor, *, what: str,
                     setting: str = 'forward') -> Embeddings:
    """Embeddings of shape ``[n, d]``, floating, finite, L2-normalised; finite constants.

    Raises:
        ScoreError: A shape, dtype, NaN or inf, a norm off 1 by more than
            :data:`NORM_TOLERANCE` (naming the sample ids), or a temperature or bias that is
            not a finite scalar.
    """
    for name, tensor in (('image', emb.image), ('text', emb.text)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.shape[0] != n \
                or tensor.shape != emb.image.shape:
            raise ScoreError(
                f'{what} {name} embeddings have shape {tuple(getattr(tensor, "shape", ()))}; '
                f'expected [{n}, d] for both towers')
        if not tensor.is_floating_point():
            raise ScoreError(f'{what} {name} embeddings have dtype {tensor.dtype}')
        bad = ~torch.isfinite(tensor).all(dim=1)
        if bool(bad.any()):
            raise ScoreError(f'{what} {name} embeddings have NaN or inf for sample ids '
                             f'{describe_ids(sample_ids, bad)}')
        norms = tensor.float().norm(dim=1)
        off = (norms - 1).abs() > NORM_TOLERANCE
        if bool(off.any()):
            raise ScoreError(
                f'{what} {name} embeddings are not L2-normalised (norms from '
                f'{float(norms.min()):.3g} to {float(norms.max()):.3g}) for sample ids '
                f'{describe_ids(sample_ids, off)}: the pair scores assume unit vectors. '
                f'Normalise them in the model or in {setting} (F.normalize(x, dim=-1))')
    for name, value in (('temperature', emb.temperature), ('bias', emb.bias)):
        if not torch.isfinite(torch.tensor(value)):
            raise ScoreError(f'{what} {name} is {value}')
    return emb


def check_class_targets(targets: Tensor, n_classes: int, sample_ids: Tensor, *, setting: str,
                        ignore_index: int | None) -> Tensor | None:
    """Check integer class targets against the logits' classes; find the ignored ones.

    Args:
        targets (LongTensor[n]): Class indices.
        n_classes (int): Classes of the logits.
        sample_ids (LongTensor[n]): Named in the error.
        setting (str): The setting that names the target column (``target_key='label'``).
        ignore_index (int | None): The target the loss ignores (-100 for cross-entropy).

    Returns:
        BoolTensor[n] | None: Rows whose target is ``ignore_index``, None if there are none.

    Raises:
        DataError: A target outside ``[0, n_classes)`` that is not ``ignore_index``.
    """
    targets = targets.detach()
    ignored = targets == ignore_index if ignore_index is not None \
        else torch.zeros_like(targets, dtype=torch.bool)
    bad = ((targets < 0) | (targets >= n_classes)) & ~ignored
    if bool(bad.any()):
        values = sorted(set(targets[bad].tolist()))[:8]
        raise DataError(
            f'{setting} holds class indices {values} outside [0, {n_classes}) for sample ids '
            f'{describe_ids(sample_ids, bad.cpu())}: the model has {n_classes} classes. Fix the '
            f'labels of those samples, or the model\'s number of classes')
    return ignored.cpu() if bool(ignored.any()) else None


def as_batch_scores(result: Any, n: int, sample_ids: Tensor) -> BatchScores:
    """A scorer's result as :class:`BatchScores`; plain tensors are per-example scores.

    Raises:
        ScoreError: The result is neither, or scores another number of candidates.
    """
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

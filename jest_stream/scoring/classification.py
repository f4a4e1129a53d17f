"""Per-example losses of a classifier, or of anything with a per-example loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from jest_stream.batch import Batch, batch_length, check_key, get_column
from jest_stream.checks import check_int
from jest_stream.criteria import Criterion
from jest_stream.errors import ScoreError, SettingTypeError
from jest_stream.losses import per_example_cross_entropy
from jest_stream.scores import PerExampleScores
from jest_stream.scoring.base import ModelScorer, iter_chunks, scoring_mode
from jest_stream.scoring.checks import check_class_targets, check_per_example
from jest_stream.scoring.reference import require_output, resolve_reference

__all__ = ['ClassificationScorer']


class ClassificationScorer(ModelScorer):
    """Per-example losses of a classifier (or anything with a per-example loss).

    Targets. With integer targets and logits ``[n, C]`` the targets are checked against the
    ``C`` classes: an index outside ``[0, C)`` raises a ``DataError`` naming ``target_key``
    and the sample ids. Rows whose target is ``ignore_index`` (as ``F.cross_entropy``
    ignores -100) have no loss to score: selection never prefers them (they are excluded,
    and chosen only when fewer than ``b`` other rows remain).

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
        ignore_index (int | None): The target value the loss ignores; None if none is.

    Raises:
        SettingError: ``chunk_size`` is not positive, or ``input_transform`` is given beside
            ``forward``.
        SettingTypeError: A key is neither a str nor an int, or ``loss_fn`` is not callable.
    """

    def __init__(self, learner: nn.Module, reference: Any = None, *,
                 input_key: str | int = 'image', target_key: str | int = 'label',
                 forward: Callable[[nn.Module, Batch], Tensor] | None = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = per_example_cross_entropy,
                 chunk_size: int | None = None,
                 input_transform: Callable[[Tensor], Tensor] | None = None,
                 ignore_index: int | None = -100) -> None:
        super().__init__(learner, reference, forward=forward, chunk_size=chunk_size,
                         input_transform=input_transform)
        check_key(input_key, 'input_key')
        check_key(target_key, 'target_key')
        if not callable(loss_fn):
            raise SettingTypeError(f'loss_fn={loss_fn!r} must be callable: '
                                   f'loss_fn(logits, targets) -> Tensor[B]')
        if ignore_index is not None:
            check_int(ignore_index, 'ignore_index')
        self.input_key = input_key
        self.target_key = target_key
        self.loss_fn = loss_fn
        self.ignore_index = ignore_index

    def _logits(self, model: nn.Module, chunk: Batch, transform: Callable | None) -> Tensor:
        if self.forward is not None:
            logits = self.forward(model, chunk)
        else:
            inputs = get_column(chunk, self.input_key, setting='input_key')
            logits = model(transform(inputs) if transform is not None else inputs)
        logits = getattr(logits, 'logits', logits)  # Hugging Face-style output objects
        if not isinstance(logits, Tensor):
            raise ScoreError(f'the model returned a {type(logits).__name__}; the scoring '
                             f'forward (forward=, or the model on input_key=) must return '
                             f'a Tensor of logits [n, classes]')
        return logits

    def _losses(self, model: nn.Module, batch: Batch, sample_ids: Tensor,
                transform: Callable | None) -> tuple[Tensor, Tensor | None]:
        losses, ignored = [], []
        start = 0
        for chunk in iter_chunks(batch, len(sample_ids), self.chunk_size):
            logits = self._logits(model, chunk, transform)
            targets = torch.as_tensor(get_column(chunk, self.target_key, setting='target_key'))
            targets = targets.to(logits.device)
            rows = sample_ids[start:start + batch_length(chunk)]
            start += len(rows)
            if logits.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1:
                ignored.append(check_class_targets(
                    targets, logits.shape[1], rows, setting=f'target_key={self.target_key!r}',
                    ignore_index=self.ignore_index))
            losses.append(self.loss_fn(logits, targets))
        mask = None
        if any(part is not None for part in ignored):
            mask = torch.cat([torch.zeros(len(loss), dtype=torch.bool) if part is None else part
                              for part, loss in zip(ignored, losses, strict=True)])
        return torch.cat(losses).float(), mask

    def _reference_losses(self, reference: Any, batch: Batch, sample_ids: Tensor
                          ) -> tuple[Tensor, Tensor | None]:
        if isinstance(reference, nn.Module):
            return self._losses(reference, batch, sample_ids, None)
        return torch.as_tensor(require_output(reference.outputs(batch, sample_ids), 'loss',
                                              source=reference)), None

    def losses(self, model: nn.Module, batch: Batch, sample_ids: Tensor) -> Tensor:
        """Every example's loss under ``model``, as this scorer computes a live reference's
        (``loss_fn`` on ``forward`` or the model's logits, no ``input_transform``): what
        ``annotate(losses=scorer.losses)`` stores in a reference cache.

        Args:
            model (nn.Module): The model (the reference, when annotating).
            batch (Batch): ``B`` examples.
            sample_ids (LongTensor[B]): Their global ids (named in errors).

        Returns:
            Tensor[B]: float32 losses (0 where the target is ``ignore_index``).

        Raises:
            DataError, MissingColumnError, ScoreError: As :meth:`__call__`.
        """
        return self._losses(model, batch, sample_ids, None)[0]

    def training_loss(self, model: nn.Module, batch: Batch, sample_ids: Tensor) -> Tensor:
        """The mean per-example loss of ``model`` on ``batch``, with gradients (what a proxy
        learner trains on: :class:`~jest_stream.scoring.proxy.ProxyScorer`).

        Returns:
            Tensor: A scalar.
        """
        return self._losses(model, batch, sample_ids, self.input_transform)[0].mean()

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> PerExampleScores:
        """Score a super-batch.

        Args:
            batch (Batch): ``B`` examples on the scoring device.
            sample_ids (LongTensor[B]): Their global ids (named in errors, keys of caches).
            criterion (Criterion): How the two losses combine.

        Returns:
            PerExampleScores: The combined scores (and each model's loss, for logs).

        Raises:
            ScoreError: A loss of the wrong shape or dtype, NaN or inf.
            DataError: A class index out of range.
            MissingColumnError: ``input_key`` or ``target_key`` names no column.
        """
        n = len(sample_ids)
        reference = resolve_reference(self.reference, needed=criterion.needs_reference)
        learner_loss = reference_loss = excluded = None
        with scoring_mode(self.learner if criterion.needs_learner else None):
            if criterion.needs_learner:
                learner_loss, excluded = self._losses(self.learner, batch, sample_ids,
                                                      self.input_transform)
                check_per_example(learner_loss, n, sample_ids, what='learner loss')
            if criterion.needs_reference:
                reference_loss, ignored = self._reference_losses(reference, batch, sample_ids)
                excluded = ignored if excluded is None else excluded
                reference_loss = check_per_example(reference_loss.float(), n, sample_ids,
                                                   what='reference loss')
                if learner_loss is not None:
                    reference_loss = reference_loss.to(learner_loss.device)
        return PerExampleScores(criterion.combine(learner_loss, reference_loss),
                                excluded=excluded, learner=learner_loss,
                                reference=reference_loss)

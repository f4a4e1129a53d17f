"""Per-sequence losses of causal language models: which token sequences are worth training on.

A sequence's score is its loss under the learner and under the reference, combined by the
criterion (``learnability``: learner minus reference). This is RHO-LOSS's reducible holdout
loss (Mindermann et al., 2022, "Prioritized training on points that are learnable, worth
learning, and not yet learnt") applied to whole sequences: the loss of a batch of sequences is
a sum over sequences, so selection picks sequences independently. RHO-1 (Lin et al., 2024,
"Not all tokens are what you need") selects *tokens* within sequences by the same excess loss;
this scorer is per-sequence, and a token-level selection would weight the training loss
instead of choosing rows.

The loss (:func:`sequence_losses`, a pure function that an annotation job can call to store a
reference's per-sequence losses) follows the causal-LM convention: the logits at position
``t`` predict token ``t + 1``. A target token counts when it is not padding, the token that
predicts it is not padding, and its label (when labels are given) is not -100.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jest_stream.batch import Batch, check_key, gather, get_column
from jest_stream.checks import check_bool, check_choice, check_int
from jest_stream.criteria import Criterion
from jest_stream.errors import DataError, ScoreError, SettingError, SettingTypeError
from jest_stream.scores import PerExampleScores
from jest_stream.scoring.base import ModelScorer, describe_ids, scoring_mode
from jest_stream.scoring.checks import check_per_example
from jest_stream.scoring.reference import require_output, resolve_reference

__all__ = ['LanguageModelScorer', 'sequence_losses', 'next_token_targets', 'check_token_ids',
           'IGNORE_INDEX', 'REDUCTIONS']

# The label a loss ignores, as in torch's cross-entropy and Hugging Face's causal-LM labels.
IGNORE_INDEX = -100
REDUCTIONS = ('mean', 'sum')

# How columns are named in messages: the argument names of sequence_losses by default.
_ARGUMENTS = ('input_ids', 'attention_mask', 'labels')


def check_token_ids(ids: Tensor, vocab_size: int | None, sample_ids: Tensor | None = None, *,
                    setting: str = 'input_ids', ignore_index: int | None = None) -> None:
    """Raise unless every token id of ``ids`` is in ``[0, vocab_size)``.

    Args:
        ids (LongTensor[n, T]): Token ids (or labels).
        vocab_size (int | None): The vocabulary size ``V``; None checks only that ids are not
            negative (what can be checked before a model shows its ``V``).
        sample_ids (LongTensor[n], optional): Named in the error; rows are named by their
            position when None.
        setting (str): The column or setting that holds ``ids``, for the message.
        ignore_index (int, optional): A value allowed anywhere (-100 for labels).

    Raises:
        DataError: A token id out of range; the message names ``setting``, the values and
            the sample ids of the rows that hold them.
    """
    bad = ids < 0
    if ignore_index is not None:
        bad &= ids != ignore_index
    if vocab_size is not None:
        bad |= ids >= vocab_size
    if not bool(bad.any()):
        return
    values = sorted(set(ids[bad].tolist()))[:8]
    problem = f'token ids {values} outside [0, {vocab_size})' if vocab_size is not None \
        else f'negative token ids {values}'
    extra = f' (only {ignore_index} may be, where ignored)' if ignore_index is not None else ''
    rows = bad.any(dim=1).cpu()
    where = f'rows {describe_ids(torch.arange(ids.shape[0]), rows)}' if sample_ids is None \
        else f'sample ids {describe_ids(sample_ids, rows)}'
    raise DataError(f'{setting} holds {problem}{extra} for {where}: fix the tokenisation of '
                    f'those samples, or use a model whose vocabulary holds them')


def _check_columns(input_ids: Any, attention_mask: Any, labels: Any, *,
                   names: tuple[str, str, str] = _ARGUMENTS) -> None:
    """``input_ids`` an integer ``[n, T]``; ``attention_mask`` and ``labels`` of its shape."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 \
            or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        shape = tuple(getattr(input_ids, 'shape', ()))
        raise DataError(f'{names[0]} must hold integer token ids, LongTensor[n, T] (one row of '
                        f'T tokens per sequence); got {type(input_ids).__name__} '
                        f'{getattr(input_ids, "dtype", "")} of shape {shape}')
    for name, column in ((names[1], attention_mask), (names[2], labels)):
        if column is None:
            continue
        if not isinstance(column, Tensor) or column.shape != input_ids.shape:
            raise DataError(f'{name} has shape {tuple(getattr(column, "shape", ()))} but the '
                            f'token ids have {tuple(input_ids.shape)}: it needs one value per '
                            f'token')
        if name == names[2] and (column.is_floating_point() or column.dtype == torch.bool):
            raise DataError(f'{name} must hold integer token ids (-100 where ignored), not '
                            f'{column.dtype}')


def _check_logits(logits: Any, shape: tuple[int, int], *, setting: str) -> Tensor:
    """``logits`` as a floating ``Tensor[n, T, V]`` for token ids of ``shape`` ``(n, T)``."""
    logits = getattr(logits, 'logits', logits)  # Hugging Face-style output objects
    wanted = f'[{shape[0]}, {shape[1]}, V]'
    if not isinstance(logits, Tensor):
        raise ScoreError(f'{setting} returned a {type(logits).__name__}; it must return logits '
                         f'Tensor{wanted} (or an object with .logits), one row of vocabulary '
                         f'logits per token')
    if logits.dim() != 3 or tuple(logits.shape[:2]) != shape:
        raise ScoreError(f'{setting} returned logits of shape {tuple(logits.shape)}; expected '
                         f'{wanted}: one row of vocabulary logits per token of the '
                         f'{shape[0]} sequences of {shape[1]} tokens')
    if not logits.is_floating_point():
        raise ScoreError(f'{setting} returned logits of dtype {logits.dtype}; return '
                         f'floating-point logits')
    return logits


def next_token_targets(input_ids: Tensor, *, attention_mask: Tensor | None = None,
                       labels: Tensor | None = None) -> Tensor:
    """The target of every position: the next token, or ``IGNORE_INDEX`` where none counts.

    Position ``t`` predicts token ``t + 1`` of ``labels`` (when given; Hugging Face's
    convention: labels aligned with ``input_ids``, not shifted) or of ``input_ids``. The last
    position predicts nothing. With ``attention_mask``, a target counts only when it and the
    token before it are real (mask not 0): padding on either side is never a target, and is
    never used to predict one.

    Args:
        input_ids (LongTensor[n, T]): Token ids.
        attention_mask (Tensor[n, T], optional): 0 at padding, anything else at real tokens.
        labels (LongTensor[n, T], optional): Target ids, -100 where ignored.

    Returns:
        LongTensor[n, T]: Targets, ``IGNORE_INDEX`` where nothing is counted.
    """
    source = labels if labels is not None else input_ids
    targets = torch.full(source.shape, IGNORE_INDEX, dtype=torch.long, device=source.device)
    targets[:, :-1] = source[:, 1:]
    if attention_mask is not None:
        real = attention_mask.to(source.device) != 0
        targets[:, :-1].masked_fill_(~(real[:, 1:] & real[:, :-1]), IGNORE_INDEX)
    return targets


def _reduce(logits: Tensor, targets: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """Per-sequence loss and counted-token count from checked logits and targets."""
    n, length, vocab = logits.shape
    # A view of contiguous logits (no copy of the n x T x V block); the up-cast copies only
    # what is below float32, and cross-entropy accumulates in that dtype.
    flat = logits.reshape(n * length, vocab).to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.to(logits.device)
    tokens = F.cross_entropy(flat, targets.reshape(-1), reduction='none',
                             ignore_index=IGNORE_INDEX).view(n, length)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    total = tokens.sum(dim=1)
    if reduction == 'mean':
        total = total / counts.clamp(min=1)
    return total, counts


def sequence_losses(logits: Tensor, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                    labels: Tensor | None = None, reduction: str = 'mean'
                    ) -> tuple[Tensor, Tensor]:
    """Per-sequence next-token cross-entropy of a causal language model.

    The logits at position ``t`` predict token ``t + 1`` (see :func:`next_token_targets` for
    which tokens count: not padding, not -100). The token losses are computed in float32 at
    least (float64 logits stay float64) by one ``F.cross_entropy(..., reduction='none',
    ignore_index=-100)`` over the flattened block, then summed per sequence.

    Args:
        logits (Tensor[n, T, V]): The model's logits for every position.
        input_ids (LongTensor[n, T]): The token ids the model read.
        attention_mask (Tensor[n, T], optional): 0 at padding.
        labels (LongTensor[n, T], optional): Targets aligned with ``input_ids``, -100 where
            ignored; the targets are ``input_ids`` shifted when not given.
        reduction (str): ``mean`` (nats per counted token, default) or ``sum`` (nats per
            sequence).

    Returns:
        tuple[Tensor[n], BoolTensor[n]]: Each sequence's loss (in nats; 0 where no token
        counts) and whether any of its tokens counts. A sequence with no counted token has no
        loss: selection should exclude it.

    Raises:
        ScoreError: ``logits`` is not a floating ``Tensor[n, T, V]`` for ``n x T`` token ids.
        DataError: ``input_ids`` is not an integer ``[n, T]``; ``attention_mask`` or ``labels``
            has another shape; a token id (or label other than -100) is outside ``[0, V)``.
        SettingError: ``reduction`` is neither ``mean`` nor ``sum``.
    """
    check_choice(reduction, 'reduction', REDUCTIONS)
    _check_columns(input_ids, attention_mask, labels)
    logits = _check_logits(logits, tuple(input_ids.shape), setting='the model')
    vocab = logits.shape[-1]
    check_token_ids(input_ids, vocab, setting='input_ids')
    if labels is not None:
        check_token_ids(labels, vocab, setting='labels', ignore_index=IGNORE_INDEX)
    targets = next_token_targets(input_ids, attention_mask=attention_mask, labels=labels)
    losses, counts = _reduce(logits, targets, reduction)
    return losses, counts > 0


class LanguageModelScorer(ModelScorer):
    """Per-sequence losses of a causal language model, for the learner and the reference.

    Each sequence gets its next-token cross-entropy (:func:`sequence_losses`: the logits at
    position ``t`` predict token ``t + 1``; padding and labels of -100 are not counted), as
    the mean over its counted tokens (nats per token, default) or their sum (nats per
    sequence). The criterion combines the learner's and the reference's losses;
    ``learnability`` is RHO-LOSS's reducible holdout loss per sequence (Mindermann et al.,
    2022). Token-level selection (RHO-1, Lin et al., 2024) is not what this scorer does: it
    chooses whole sequences.

    A sequence with no counted token (all padding, or every label -100) has no loss: it is
    reported with loss 0 and marked excluded, so selection never prefers it (it is chosen
    only when fewer than ``b`` other sequences remain).

    Models. Any ``nn.Module`` whose output is logits ``Tensor[n, T, V]``, or an object with
    ``.logits`` (Hugging Face models). It is called as ``model(input_ids)``, as
    ``model(input_ids, attention_mask=mask)`` with ``pass_attention_mask=True``, or through
    ``forward(model, batch) -> logits`` for anything else (the targets are still read from
    ``input_key`` and ``labels_key``).

    Memory. Scoring runs ``chunk_size`` sequences at a time (the whole super-batch when
    None). Besides the model's own activations, a chunk holds its logits,
    ``chunk_size x T x V`` floats (4 bytes each in float32), and cross-entropy's log-softmax
    of the same size: about ``8 x chunk_size x T x V`` bytes at the peak (another
    ``4 x chunk_size x T x V`` when the model returns half-precision logits, up-cast to
    float32). At T = 2048 and V = 50,257 that is 0.8 GB per sequence: choose ``chunk_size``
    from it.

    Args:
        learner (nn.Module): The model being trained.
        reference (nn.Module | ReferenceTable | None): A frozen reference model (its losses
            are computed live, with the same settings), a table whose ``outputs`` give
            ``loss`` ``Tensor[B]`` (a ``ColumnReference`` or a ``ReferenceCache`` of
            per-sequence losses computed with :func:`sequence_losses` and the same
            ``reduction``), or None for ``hard_learner``.
        input_key (str | int): Column (dict batches) or field (tuple batches) of the token ids,
            ``LongTensor[B, T]``.
        attention_mask_key (str | int, optional): Column of the attention mask
            ``Tensor[B, T]``, 0 at padding; None when sequences are not padded.
        labels_key (str | int, optional): Column of the labels ``LongTensor[B, T]``, aligned
            with the token ids (Hugging Face's convention), -100 where ignored; None uses the
            token ids as targets.
        reduction (str): ``mean`` (default) or ``sum`` of the counted tokens' losses.
        forward (Callable, optional): ``forward(model, batch) -> logits`` (or an object with
            ``.logits``) for a chunk of the batch.
        pass_attention_mask (bool): Call ``model(input_ids, attention_mask=mask)``; needs
            ``attention_mask_key``.
        chunk_size (int, optional): Sequences per scoring forward, to bound memory.
        vocab_size (int, optional): Token ids must be below it. Given, token ids are checked
            before the forward (an id the embedding cannot take then fails with a
            ``DataError``, not inside the model, where on CUDA it is a device-side assert);
            otherwise they are checked against the logits' ``V`` after it.

    Raises:
        SettingError: ``chunk_size`` or ``vocab_size`` is not positive, ``reduction`` is not
            known, or ``pass_attention_mask`` is set without ``attention_mask_key`` or beside
            ``forward``.
        SettingTypeError: A key is neither a str nor an int, ``forward`` is not callable, or
            ``pass_attention_mask`` is not a bool.
    """

    def __init__(self, learner: nn.Module, reference: Any = None, *,
                 input_key: str | int = 'input_ids', attention_mask_key: str | int | None = None,
                 labels_key: str | int | None = None, reduction: str = 'mean',
                 forward: Callable[[nn.Module, Batch], Any] | None = None,
                 pass_attention_mask: bool = False, chunk_size: int | None = None,
                 vocab_size: int | None = None) -> None:
        super().__init__(learner, reference, forward=forward, chunk_size=chunk_size,
                         input_transform=None)
        check_key(input_key, 'input_key')
        check_key(attention_mask_key, 'attention_mask_key', optional=True)
        check_key(labels_key, 'labels_key', optional=True)
        check_choice(reduction, 'reduction', REDUCTIONS)
        check_bool(pass_attention_mask, 'pass_attention_mask')
        if forward is not None and not callable(forward):
            raise SettingTypeError(f'forward={forward!r} must be callable: '
                                   f'forward(model, batch) -> logits [n, T, V]')
        if pass_attention_mask and attention_mask_key is None:
            raise SettingError('pass_attention_mask=True needs attention_mask_key=... (the '
                               'column of the attention mask to pass)')
        if pass_attention_mask and forward is not None:
            raise SettingError('pass_attention_mask applies to the default model call only; '
                               'with forward=... pass the mask inside it')
        if vocab_size is not None:
            check_int(vocab_size, 'vocab_size', low=1, hint='the size of the vocabulary')
        self.input_key = input_key
        self.attention_mask_key = attention_mask_key
        self.labels_key = labels_key
        self.reduction = reduction
        self.pass_attention_mask = pass_attention_mask
        self.vocab_size = vocab_size

    @property
    def _names(self) -> tuple[str, str, str]:
        return (f'input_key={self.input_key!r}', f'attention_mask_key={self.attention_mask_key!r}',
                f'labels_key={self.labels_key!r}')

    @property
    def _setting(self) -> str:
        if self.forward is not None:
            return 'forward='
        call = 'model(input_ids, attention_mask=...)' if self.pass_attention_mask \
            else 'model(input_ids)'
        return f'the model (called as {call} on input_key={self.input_key!r})'

    def _columns(self, batch: Batch, sample_ids: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Token ids, mask and labels of the batch, checked as far as no model is needed."""
        input_ids = torch.as_tensor(get_column(batch, self.input_key, setting='input_key'))
        mask = labels = None
        if self.attention_mask_key is not None:
            mask = torch.as_tensor(get_column(batch, self.attention_mask_key,
                                              setting='attention_mask_key'))
        if self.labels_key is not None:
            labels = torch.as_tensor(get_column(batch, self.labels_key, setting='labels_key'))
        _check_columns(input_ids, mask, labels, names=self._names)
        if input_ids.shape[0] != len(sample_ids):
            raise DataError(f'input_key={self.input_key!r} has {input_ids.shape[0]} rows but the '
                            f'super-batch has {len(sample_ids)} sample ids')
        self._check_vocab(input_ids, labels, self.vocab_size, sample_ids)
        return input_ids, mask, labels

    def _check_vocab(self, input_ids: Tensor, labels: Tensor | None, vocab_size: int | None,
                     sample_ids: Tensor) -> None:
        check_token_ids(input_ids, vocab_size, sample_ids, setting=self._names[0])
        if labels is not None:
            check_token_ids(labels, vocab_size, sample_ids, setting=self._names[2],
                            ignore_index=IGNORE_INDEX)

    def _logits(self, model: nn.Module, batch: Batch, rows: Tensor, whole: bool,
                input_ids: Tensor, mask: Tensor | None) -> Tensor:
        if self.forward is not None:
            out = self.forward(model, batch if whole else gather(batch, rows))
        elif self.pass_attention_mask:
            out = model(input_ids, attention_mask=mask)
        else:
            out = model(input_ids)
        logits = _check_logits(out, tuple(input_ids.shape), setting=self._setting)
        if self.vocab_size is not None and logits.shape[-1] < self.vocab_size:
            raise ScoreError(f'{self._setting} returned logits over {logits.shape[-1]} tokens, '
                             f'fewer than vocab_size={self.vocab_size}')
        return logits

    def _losses(self, model: nn.Module, batch: Batch, sample_ids: Tensor,
                columns: tuple[Tensor, Tensor | None, Tensor | None]) -> Tensor:
        """``Tensor[B]`` float32: every sequence's loss under ``model``, chunk by chunk."""
        input_ids, mask, labels = columns
        n = len(sample_ids)
        step = self.chunk_size or n
        losses = []
        for start in range(0, n, step):
            rows = torch.arange(start, min(start + step, n))
            part = slice(start, start + len(rows))
            ids = input_ids[part]
            chunk_mask = None if mask is None else mask[part]
            chunk_labels = None if labels is None else labels[part]
            logits = self._logits(model, batch, rows, len(rows) == n, ids, chunk_mask)
            self._check_vocab(ids, chunk_labels, logits.shape[-1], sample_ids[part])
            targets = next_token_targets(ids, attention_mask=chunk_mask, labels=chunk_labels)
            losses.append(_reduce(logits, targets, self.reduction)[0].float())
        return torch.cat(losses)

    def _reference_losses(self, reference: Any, batch: Batch, sample_ids: Tensor,
                          columns: tuple[Tensor, Tensor | None, Tensor | None]) -> Tensor:
        if isinstance(reference, nn.Module):
            return self._losses(reference, batch, sample_ids, columns)
        stored = require_output(reference.outputs(batch, sample_ids), 'loss', source=reference)
        return torch.as_tensor(stored)

    def losses(self, model: nn.Module, batch: Batch, sample_ids: Tensor) -> Tensor:
        """Every sequence's loss under ``model``, as this scorer computes a live reference's:
        what ``annotate(losses=scorer.losses)`` stores in a reference cache.

        Args:
            model (nn.Module): The model (the reference, when annotating).
            batch (Batch): ``B`` sequences.
            sample_ids (LongTensor[B]): Their global ids (named in errors).

        Returns:
            Tensor[B]: float32, nats per token (``mean``) or per sequence (``sum``); 0 for a
            sequence with no counted token.

        Raises:
            DataError, MissingColumnError, ScoreError: As :meth:`__call__`.
        """
        return self._losses(model, batch, sample_ids, self._columns(batch, sample_ids))

    def training_loss(self, model: nn.Module, batch: Batch, sample_ids: Tensor) -> Tensor:
        """The mean per-sequence loss of ``model`` on ``batch``, with gradients (what a proxy
        learner trains on: :class:`~jest_stream.scoring.proxy.ProxyScorer`).

        Returns:
            Tensor: A scalar.
        """
        return self.losses(model, batch, sample_ids).mean()

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> PerExampleScores:
        """Score a super-batch of ``B`` sequences.

        Args:
            batch (Batch): ``B`` sequences of ``T`` tokens on the scoring device.
            sample_ids (LongTensor[B]): Their global ids (named in errors, keys of caches).
            criterion (Criterion): How the two losses combine.

        Returns:
            PerExampleScores: The combined scores, ``excluded`` where a sequence has no
            counted token, and each model's per-sequence loss (float32, nats per token or per
            sequence), for logs.

        Raises:
            ScoreError: Logits of the wrong type, rank or shape (naming ``forward=`` or the
                model); a loss of the wrong shape, NaN or inf.
            DataError: A token id or label outside ``[0, V)`` (naming the column and the sample
                ids), or columns of the wrong shape or dtype.
            MissingColumnError: ``input_key``, ``attention_mask_key`` or ``labels_key`` names
                no column; a reference table gives no ``loss``.
            SettingError: The criterion needs a reference and there is none.
        """
        n = len(sample_ids)
        reference = resolve_reference(self.reference, needed=criterion.needs_reference)
        columns = self._columns(batch, sample_ids)
        input_ids, mask, labels = columns
        counted = (next_token_targets(input_ids, attention_mask=mask, labels=labels)
                   != IGNORE_INDEX).any(dim=1).cpu()
        learner_loss = reference_loss = None
        with scoring_mode(self.learner if criterion.needs_learner else None):
            if criterion.needs_learner:
                learner_loss = check_per_example(
                    self._losses(self.learner, batch, sample_ids, columns), n, sample_ids,
                    what='learner loss')
            if criterion.needs_reference:
                reference_loss = check_per_example(
                    self._reference_losses(reference, batch, sample_ids, columns).float(), n,
                    sample_ids, what='reference loss')
                if learner_loss is not None:
                    reference_loss = reference_loss.to(learner_loss.device)
        excluded = None if bool(counted.all()) else ~counted
        return PerExampleScores(criterion.combine(learner_loss, reference_loss),
                                excluded=excluded, learner=learner_loss,
                                reference=reference_loss)

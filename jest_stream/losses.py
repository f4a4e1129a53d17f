"""Per-pair and per-example losses, as pure functions over tensors.

The sigmoid (SigLIP) loss of a batch is a sum of pair terms, so any block of the
pair-loss matrix can be computed on its own: :func:`sigmoid_pair_losses` returns
the block for given rows and columns without building the ``B x B`` matrix.

The softmax (InfoNCE) loss does not split into pair terms. A candidate is scored
by its InfoNCE loss against an already-selected set as negatives:
:func:`infonce_conditional_losses` is the direct form, :class:`InfoNCEConditional`
the incremental one the joint sampler uses, which grows the set chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'InfoNCEConditional',
    'infonce_conditional_losses',
    'per_example_cross_entropy',
    'sigmoid_pair_losses',
]


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    # Reference embeddings are often cached in half precision; the pair logits and the
    # log-sum-exps are accumulated in at least float32 so that selection does not hinge
    # on half-precision rounding.
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_embeddings(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f'image_emb and text_emb must both be Tensor[B, d] of the same shape, got '
            f'{tuple(image_emb.shape)} and {tuple(text_emb.shape)}')


def _check_index(index: Tensor, name: str, size: int, device: torch.device) -> Tensor:
    index = torch.as_tensor(index, device=device)
    if index.ndim != 1 or index.dtype == torch.bool or index.is_floating_point():
        raise ValueError(f'{name} must be a 1-D LongTensor of indices into the batch of {size}, '
                         f'got dtype {index.dtype} and shape {tuple(index.shape)}')
    return index.long()


def sigmoid_pair_losses(image_emb: Tensor, text_emb: Tensor, temperature: float | Tensor,
                        bias: float | Tensor, *, rows: Tensor | None = None,
                        cols: Tensor | None = None) -> Tensor:
    """Per-pair sigmoid (SigLIP) losses, or a block of them.

    ``l_ij = -log sigmoid(z_ij * (t * <x_i, y_j> + c))`` with ``z_ij = +1`` when ``i == j``
    (a matching pair) and ``-1`` otherwise. The signs come from the global indices, so a
    block is exactly the matching slice of the full matrix.

    Args:
        image_emb (Tensor[B, d]): L2-normalised image embeddings ``x`` (not renormalised here).
        text_emb (Tensor[B, d]): L2-normalised text embeddings ``y``.
        temperature (float | Tensor): The model's temperature ``t`` (a scale; 0-dim if a tensor).
        bias (float | Tensor): The model's bias ``c`` (0-dim if a tensor).
        rows (LongTensor[R], optional): Image indices of the block; None for all ``B``.
        cols (LongTensor[C], optional): Text indices of the block; None for all ``B``.

    Returns:
        Tensor[R, C]: ``l_ij`` for ``i`` in ``rows`` and ``j`` in ``cols``, in at least float32.
    """
    _check_embeddings(image_emb, text_emb)
    size, device = image_emb.shape[0], image_emb.device
    dtype = _compute_dtype(image_emb)
    row_idx = (torch.arange(size, device=device) if rows is None
               else _check_index(rows, 'rows', size, device))
    col_idx = (torch.arange(size, device=device) if cols is None
               else _check_index(cols, 'cols', size, device))
    x = image_emb if rows is None else image_emb[row_idx]
    y = text_emb if cols is None else text_emb[col_idx]
    # Scaling the [R, d] factor rather than the [R, C] product saves a pass over the block.
    logits = (temperature * x.to(dtype)) @ y.to(dtype).T + bias
    matching = row_idx[:, None] == col_idx[None, :]
    # logsigmoid, not log(sigmoid): the latter is -inf for confident wrong pairs.
    return -F.logsigmoid(torch.where(matching, logits, -logits))


def infonce_conditional_losses(image_emb: Tensor, text_emb: Tensor, temperature: float | Tensor,
                               selected: Tensor) -> Tensor:
    """InfoNCE loss of every candidate against the selected set as negatives.

    For candidate ``k`` with ``s_ij = t * <x_i, y_j>``, the image-to-text term is
    ``-log(exp(s_kk) / (exp(s_kk) + sum_{j in S, j != k} exp(s_kj)))`` and the
    text-to-image term the same with ``s_jk``; the loss is their sum. With ``S`` empty
    every loss is 0. This is the direct ``O(B |S| d)`` form; :class:`InfoNCEConditional`
    computes the same values while ``S`` grows.

    Args:
        image_emb (Tensor[B, d]): L2-normalised image embeddings.
        text_emb (Tensor[B, d]): L2-normalised text embeddings.
        temperature (float | Tensor): The model's temperature ``t`` (a scale).
        selected (LongTensor[S]): Distinct indices of the selected set.

    Returns:
        Tensor[B]: The loss of every candidate, in at least float32.
    """
    _check_embeddings(image_emb, text_emb)
    size, device = image_emb.shape[0], image_emb.device
    dtype = _compute_dtype(image_emb)
    selected = _check_index(selected, 'selected', size, device)
    x, y = image_emb.to(dtype), text_emb.to(dtype)
    positive = temperature * (x * y).sum(-1)
    # A candidate in S is not its own negative: its positive is already counted once.
    is_self = torch.arange(size, device=device)[:, None] == selected[None, :]
    image_to_text = (temperature * (x @ y[selected].T)).masked_fill(is_self, -torch.inf)
    text_to_image = (temperature * (y @ x[selected].T)).masked_fill(is_self, -torch.inf)
    losses = positive.new_zeros(size)
    for negatives in (image_to_text, text_to_image):
        logits = torch.cat([positive[:, None], negatives], dim=1)
        losses = losses + torch.logsumexp(logits, dim=1) - positive
    return losses


class InfoNCEConditional:
    """:func:`infonce_conditional_losses` against a selected set that grows chunk by chunk.

    Keeps, for every candidate, the running log-sum-exp of its logits against the
    selected texts (image-to-text) and the selected images (text-to-image), so adding a
    chunk ``J`` costs ``O(B |J| d)`` time and ``O(B |J|)`` memory. It is a
    ``ConditionalScores`` for the blocked sampler of :mod:`jest_stream.selection`.

    Args:
        image_emb (Tensor[B, d]): L2-normalised image embeddings.
        text_emb (Tensor[B, d]): L2-normalised text embeddings.
        temperature (float | Tensor): The model's temperature ``t`` (a scale).
    """

    def __init__(self, image_emb: Tensor, text_emb: Tensor,
                 temperature: float | Tensor) -> None:
        _check_embeddings(image_emb, text_emb)
        dtype = _compute_dtype(image_emb)
        self.size = int(image_emb.shape[0])
        self.image = image_emb.to(dtype)
        self.text = text_emb.to(dtype)
        self.temperature = temperature
        self.positive = temperature * (self.image * self.text).sum(-1)
        # Both running log-sum-exps start at the positive logit: the empty-set loss is 0.
        self.image_to_text = self.positive.clone()
        self.text_to_image = self.positive.clone()
        self.added = torch.zeros(self.size, dtype=torch.bool, device=image_emb.device)

    def add(self, chunk: Tensor) -> None:
        """Add the candidates ``chunk`` (LongTensor[c], not added before) to the selected set."""
        chunk = _check_index(chunk, 'chunk', self.size, self.image.device)
        # Adding a candidate twice would count it twice as a negative.
        if self.added[chunk].any() or chunk.unique().numel() != chunk.numel():
            raise ValueError('chunk repeats a candidate that is already in the selected set')
        self.added[chunk] = True
        is_self = torch.arange(self.size, device=chunk.device)[:, None] == chunk[None, :]
        image_to_text = self.temperature * (self.image @ self.text[chunk].T)
        text_to_image = self.temperature * (self.text @ self.image[chunk].T)
        self.image_to_text = torch.logaddexp(
            self.image_to_text, torch.logsumexp(image_to_text.masked_fill(is_self, -torch.inf), 1))
        self.text_to_image = torch.logaddexp(
            self.text_to_image, torch.logsumexp(text_to_image.masked_fill(is_self, -torch.inf), 1))

    def losses(self) -> Tensor:
        """Tensor[B]: every candidate's loss against the chunks added so far."""
        return (self.image_to_text - self.positive) + (self.text_to_image - self.positive)

    def current(self) -> Tensor:
        """Tensor[B]: the conditional scores for the blocked sampler, i.e. :meth:`losses`."""
        return self.losses()


def per_example_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every example, unreduced.

    Args:
        logits (Tensor[B, C]): Class logits, any floating dtype.
        targets (LongTensor[B]): Class indices.

    Returns:
        Tensor[B]: Per-example losses in float32 (or float64 for float64 logits), so that
        half-precision scoring does not round the scores the selector compares.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f'per_example_cross_entropy expects logits Tensor[B, C] and targets LongTensor[B], '
            f'got {tuple(logits.shape)} and {tuple(targets.shape)}')
    return F.cross_entropy(logits.to(_compute_dtype(logits)), targets, reduction='none')

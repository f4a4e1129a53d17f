"""Two-tower (image, text) contrastive models: pair scores of the sigmoid loss, or
conditional scores of the softmax loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jest_stream.batch import Batch, check_key, get_column
from jest_stream.checks import check_choice
from jest_stream.criteria import Criterion
from jest_stream.errors import SettingTypeError
from jest_stream.losses import sigmoid_pair_losses
from jest_stream.scores import Embeddings, SigmoidPairScores, SoftmaxScores
from jest_stream.scoring.base import ModelScorer, iter_chunks, scoring_mode
from jest_stream.scoring.checks import as_embeddings, check_embeddings
from jest_stream.scoring.reference import require_output, resolve_reference
from jest_stream.selection import BatchScores

__all__ = ['ContrastiveScorer', 'CONTRASTIVE_LOSSES']

CONTRASTIVE_LOSSES = ('sigmoid', 'softmax')


class ContrastiveScorer(ModelScorer):
    """Two-tower (image, text) contrastive models, sigmoid or softmax loss.

    The model's outputs are checked on every super-batch: the count of outputs (the
    sigmoid loss needs the bias), the shapes ``[B, d]`` of both towers, their dtype,
    finiteness and L2 norms (within :data:`~jest_stream.scoring.checks.NORM_TOLERANCE`).

    Args:
        learner (nn.Module): Two-tower model being trained.
        reference (nn.Module | ReferenceTable | None): Frozen two-tower reference, or a
            table with ``image_emb``, ``text_emb``, ``temperature`` and ``bias``.
        loss (str): ``sigmoid`` (SigLIP pair terms; joint selection over pair scores) or
            ``softmax`` (InfoNCE against the selected set).
        image_key (str | int): Column or field of the images.
        text_key (str | int): Column or field of the texts (token ids, features...).
        forward (Callable, optional): ``forward(model, batch) -> (image_emb, text_emb,
            temperature, bias)`` or :class:`Embeddings` (the softmax loss may omit the bias);
            by default ``model(batch[image_key], batch[text_key])`` must return that.
        chunk_size (int, optional): Examples per scoring forward.
        input_transform (Callable, optional): Applied to the learner's images when scoring.
        dtype (torch.dtype): Precision of the scores (embeddings are cast to it).

    Raises:
        SettingError: An unknown ``loss``, a non-positive ``chunk_size``, or
            ``input_transform`` beside ``forward``.
        SettingTypeError: A key that is neither str nor int, or ``dtype`` not floating.
    """

    def __init__(self, learner: nn.Module, reference: Any = None, *, loss: str = 'sigmoid',
                 image_key: str | int = 'image', text_key: str | int = 'text',
                 forward: Callable[[nn.Module, Batch], Any] | None = None,
                 chunk_size: int | None = None,
                 input_transform: Callable[[Tensor], Tensor] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(learner, reference, forward=forward, chunk_size=chunk_size,
                         input_transform=input_transform)
        check_choice(loss, 'loss', CONTRASTIVE_LOSSES)
        check_key(image_key, 'image_key')
        check_key(text_key, 'text_key')
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise SettingTypeError(f'dtype={dtype!r} must be a floating torch.dtype')
        self.loss = loss
        self.image_key = image_key
        self.text_key = text_key
        self.dtype = dtype

    def _embed(self, model: nn.Module, batch: Batch, n: int, transform: Callable | None,
               what: str) -> Embeddings:
        setting = 'forward=' if self.forward is not None else \
            'the model (called on image_key and text_key)'
        parts = []
        for chunk in iter_chunks(batch, n, self.chunk_size):
            if self.forward is not None:
                out = self.forward(model, chunk)
            else:
                images = get_column(chunk, self.image_key, setting='image_key')
                texts = get_column(chunk, self.text_key, setting='text_key')
                out = model(transform(images) if transform is not None else images, texts)
            parts.append(as_embeddings(out, loss=self.loss, what=what, setting=setting))
        return Embeddings(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]),
                          parts[0].temperature, parts[0].bias).to(self.dtype)

    def _reference(self, reference: Any, batch: Batch, n: int, sample_ids: Tensor) -> Embeddings:
        if isinstance(reference, nn.Module):
            return self._embed(reference, batch, n, None, 'reference')
        out = reference.outputs(batch, sample_ids)
        return Embeddings(
            torch.as_tensor(require_output(out, 'image_emb', source=reference)),
            torch.as_tensor(require_output(out, 'text_emb', source=reference)),
            require_output(out, 'temperature', source=reference),
            out.get('bias', 0.0) if self.loss == 'softmax'
            else require_output(out, 'bias', source=reference)).to(self.dtype)

    def training_loss(self, model: nn.Module, batch: Batch, sample_ids: Tensor) -> Tensor:
        """The contrastive loss of ``model`` on ``batch``, with gradients (what a proxy learner
        trains on: :class:`~jest_stream.scoring.proxy.ProxyScorer`): the sigmoid loss summed
        over all pairs divided by the batch size (SigLIP), or the symmetric InfoNCE loss.

        Returns:
            Tensor: A scalar.
        """
        n = len(sample_ids)
        if self.forward is not None:
            out = self.forward(model, batch)
        else:
            images = get_column(batch, self.image_key, setting='image_key')
            texts = get_column(batch, self.text_key, setting='text_key')
            transform = self.input_transform
            out = model(transform(images) if transform is not None else images, texts)
        checked = as_embeddings(out, loss=self.loss, what='proxy learner', setting='forward=')
        # The raw outputs keep a learned temperature and bias in the graph.
        image, text, temperature, bias = (checked.image, checked.text, checked.temperature,
                                          checked.bias) if isinstance(out, Embeddings) \
            else (*out, 0.0)[:4]
        if self.loss == 'sigmoid':
            return sigmoid_pair_losses(image, text, temperature, bias).sum() / n
        logits = temperature * image @ text.T
        targets = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    def __call__(self, batch: Batch, sample_ids: Tensor, criterion: Criterion) -> BatchScores:
        """Score a super-batch.

        Args:
            batch (Batch): ``B`` pairs on the scoring device.
            sample_ids (LongTensor[B]): Their global ids.
            criterion (Criterion): How learner and reference losses combine.

        Returns:
            BatchScores: :class:`SigmoidPairScores` or :class:`SoftmaxScores`.

        Raises:
            ScoreError: Outputs of the wrong count, shape or dtype, unnormalised, NaN or inf.
            MissingColumnError: ``image_key`` or ``text_key`` names no column.
        """
        n = len(sample_ids)
        reference = resolve_reference(self.reference, needed=criterion.needs_reference)
        learner_emb = reference_emb = None
        with scoring_mode(self.learner if criterion.needs_learner else None):
            if criterion.needs_learner:
                learner_emb = check_embeddings(
                    self._embed(self.learner, batch, n, self.input_transform, 'learner'), n,
                    sample_ids, what='learner')
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

"""FLOPs, counted rather than guessed, with ``torch.utils.flop_counter.FlopCounterMode``.

What is counted is what ``FlopCounterMode`` knows: matrix products (``mm``, ``addmm``,
``bmm``, ``baddbmm``), convolutions and the fused attention kernels of CUDA, forward and
backward, at 2 FLOPs per multiply-add. Elementwise operations, normalisation, pooling,
resizing and softmax are not counted; in the networks of interest they are a small share.
Two cases to know:

- On the CPU, ``F.scaled_dot_product_attention`` runs a fused kernel that the counter
  does not know (torch 2.7): write attention as two matrix products to have it counted.
- The loader reports the FLOPs of every scoring pass as ``score_flops`` in its telemetry
  when built with ``count_flops=True``; :func:`score_flops` counts one pass the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from jest_stream.batch import Batch, batch_length
from jest_stream.criteria import Criterion, get_criterion
from jest_stream.errors import SettingError
from jest_stream.scoring.base import scoring_mode

__all__ = ['count_flops', 'forward_flops', 'score_flops', 'train_step_flops']


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Call ``fn(*args, **kwargs)`` and count its FLOPs.

    Args:
        fn (Callable): Anything that runs tensor operations.
        *args: Its positional arguments.
        **kwargs: Its keyword arguments.

    Returns:
        tuple[Any, int]: What ``fn`` returned, and the FLOPs it ran.
    """
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


def forward_flops(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one forward pass as a scorer runs it: eval mode, no gradients.

    The model's training mode is restored afterwards.

    Args:
        model (nn.Module): The model.
        *args: Its inputs, e.g. images ``Tensor[B, C, H, W]``.
        **kwargs: Keyword inputs, e.g. ``patch_size=7`` for a FlexiViT.

    Returns:
        int: FLOPs of ``model(*args, **kwargs)``.
    """
    with scoring_mode(model):
        return count_flops(model, *args, **kwargs)[1]


def train_step_flops(model: nn.Module, batch: Batch,
                     loss_fn: Callable[[nn.Module, Batch], Tensor]) -> int:
    """FLOPs of one training step's forward and backward pass (the optimizer excluded).

    The model's gradients are left as they were: the counted backward pass does not
    accumulate into them.

    Args:
        model (nn.Module): The model, in the mode it trains in.
        batch (Batch): One training batch.
        loss_fn (Callable): ``loss_fn(model, batch) -> Tensor`` (a scalar loss), e.g.
            ``lambda m, b: mixed_resolution_loss(m, b, F.cross_entropy)``.

    Returns:
        int: FLOPs of the forward and the backward pass.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for param in params:
        param.grad = None
    try:
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise SettingError(f'loss_fn must return a scalar Tensor, got '
                                 f'{getattr(loss, "shape", type(loss).__name__)}')
            loss.backward()
        return int(counter.get_total_flops())
    finally:
        for param, grad in zip(params, saved, strict=True):
            param.grad = grad


def score_flops(scorer: Any, batch: Batch, *, criterion: str | Criterion = 'learnability',
                sample_ids: Tensor | None = None) -> int:
    """FLOPs of one scoring pass over a super-batch, counted as the loader counts them.

    Args:
        scorer (Scorer): A scorer, e.g. :class:`~jest_stream.ClassificationScorer`.
        batch (Batch): A super-batch of ``B`` examples.
        criterion (str | Criterion): The criterion to score with (``hard_learner`` runs the
            learner only; ``learnability`` also runs a live reference).
        sample_ids (LongTensor[B], optional): Global ids; ``arange(B)`` by default.

    Returns:
        int: FLOPs of the learner's and the reference's forward passes.
    """
    if sample_ids is None:
        sample_ids = torch.arange(batch_length(batch))
    return count_flops(scorer, batch, sample_ids, get_criterion(criterion))[1]

"""How the Composer integration calls and finds models: the default scoring forward, the
model inside a DDP wrapper, and its device."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jest_stream.batch import Batch

__all__ = ['call_model', 'unwrap_model', 'model_device', 'canonical_device']


def call_model(model: nn.Module, batch: Batch) -> Tensor:
    """The default scoring forward: ``model(batch)``, as Composer calls a ``ComposerModel``.

    Args:
        model (nn.Module): A ``ComposerModel`` (or any module that takes the whole batch).
        batch (Batch): A chunk of the super-batch, on the device.

    Returns:
        Tensor[n, C]: The model's outputs (class logits for the default loss).
    """
    return model(batch)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (itself otherwise).

    Scoring runs without gradients on one rank's super-batch; calling the DDP wrapper would
    broadcast buffers, a collective call the other ranks are not making at that moment.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter, None for a model without parameters."""
    for param in model.parameters():
        return param.device
    return None


def canonical_device(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current index>``, so that equal devices compare equal."""
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device())
    return device

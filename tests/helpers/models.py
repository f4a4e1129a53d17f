"""Small models for the toy task of :mod:`helpers.data`."""

from __future__ import annotations

import torch
from torch import nn

from helpers.data import N_CLASSES, N_FEATURES


def tiny_classifier(seed: int = 0) -> nn.Module:
    """A linear classifier with weights drawn from a private generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(N_FEATURES, N_CLASSES)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator) * 0.5)
        model.bias.zero_()
    return model

"""Composer set-up shared by the Composer tests: a dict-batch model, a recording callback,
a one-thread fixture and a trainer builder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback
from composer.models import ComposerModel
from torch import nn

# 300 samples read in super-batches of B = 50 (6 per epoch), sub-batches of b = 10.
N, B, SUB = 300, 50, 10


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for the test: the toy models gain nothing from intra-op threads, and
    on a busy machine with two cores threads that wait for each other make them many times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DictClassifier(ComposerModel):
    """A linear classifier over dict batches ``{'x', 'y', 'sample_id'}``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module(batch['x'])

    def loss(self, outputs, batch, *args, **kwargs):
        return F.cross_entropy(outputs, batch['y'])


class TrainedBatches(Callback):
    """The sample ids of every batch the model trains on and, when the train dataloader is a
    SelectiveLoader, its position ``(epoch, super_batch)`` after each batch."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []
        self.positions: list[tuple[int, int]] = []

    def batch_start(self, state, logger):
        self.ids.append(state.batch['sample_id'].tolist())

    def batch_end(self, state, logger):
        metrics = getattr(state.train_dataloader, 'metrics', None)
        if metrics is not None:
            self.positions.append((metrics['epoch'], metrics['super_batch']))


def make_trainer(loader, model: nn.Module, *, max_duration='4ba', **kwargs) -> Trainer:
    """A CPU Trainer with SGD, seed 3, no progress bar and no console logging."""
    return Trainer(model=model, train_dataloader=loader, max_duration=max_duration,
                   optimizers=torch.optim.SGD(model.parameters(), lr=0.5), progress_bar=False,
                   log_to_console=False, seed=3, device='cpu', **kwargs)


def fit(trainer: Trainer) -> Trainer:
    """``trainer.fit()`` then ``trainer.close()``; returns the trainer."""
    trainer.fit()
    trainer.close()
    return trainer

"""What the two Composer examples share: the model, a recording callback, the trainer and
the resume check. The examples import it inside their functions, so that a scorer process
(which imports the example's main module) does not import Composer for nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch import nn

__all__ = ['ToyClassifier', 'TrainedExamples', 'check_resume', 'close', 'fit', 'weights']


class ToyClassifier(ComposerModel):
    """A ``ComposerModel`` over dict batches ``{'x', 'y', 'sample_id'}``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(batch['x'])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any,
             **kwargs: Any) -> torch.Tensor:
        return F.cross_entropy(outputs, batch['y'])


class TrainedExamples(Callback):
    """Records the sample ids of every batch the model trains on (after selection)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def batch_start(self, state: Any, logger: Any) -> None:
        self.ids.extend(state.batch['sample_id'].tolist())


def fit(model: ToyClassifier, loader: Any, workdir: Path, *, max_duration: str,
        load_path: str | None, save_interval: str | None, seed: int,
        **trainer_kwargs: Any) -> tuple[Trainer, TrainedExamples, InMemoryLogger]:
    """Train with Composer on the CPU: SGD, checkpoints every ``save_interval`` into
    ``workdir/checkpoints`` when given; returns the trainer, what it trained on, the log."""
    trained, memory = TrainedExamples(), InMemoryLogger()
    saving = {'save_folder': str(workdir / 'checkpoints'), 'save_interval': save_interval,
              'save_overwrite': True} if save_interval else {}
    callbacks = [*trainer_kwargs.pop('callbacks', []), trained]
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=max_duration,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                      callbacks=callbacks, loggers=[memory], load_path=load_path,
                      progress_bar=False, log_to_console=False, seed=seed, device='cpu',
                      **saving, **trainer_kwargs)
    trainer.fit()
    return trainer, trained, memory


def close(trainer: Trainer, *objects: Any) -> None:
    """Close the trainer and let its datasets go (their shared memory with them)."""
    trainer.close()
    del objects
    gc.collect()


def check_resume(full: dict[str, Any], resumed: dict[str, Any], *, batch_size: int,
                 at: int, exact: bool = True) -> str:
    """Compare a run resumed at step ``at`` with the uninterrupted one; raise if an exact
    setting diverged. Returns a sentence saying what matched."""
    same_batches = full['trained_ids'][at * batch_size:] == resumed['trained_ids']
    same_weights = all(torch.equal(a, b) for a, b in zip(full['weights'], resumed['weights'],
                                                          strict=True))
    if exact and not (same_batches and same_weights):
        raise SystemExit('the resumed run diverged from the uninterrupted one')
    return (f'same batches as the uninterrupted run: {same_batches}; same final weights: '
            f'{same_weights}')


def weights(model: nn.Module) -> Sequence[torch.Tensor]:
    """Copies of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]

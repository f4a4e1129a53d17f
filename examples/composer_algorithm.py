"""JEST selection in a Composer ``Trainer`` with :class:`JESTAlgorithm`, then an exact resume.

Run it from the repository root (small defaults: about a minute on two CPU cores)::

    python examples/composer_algorithm.py
    python examples/composer_algorithm.py --criterion uniform    # the baseline

The toy task of ``examples/pytorch_loop.py`` (a pool of 4,000 examples, 30% of them with a
wrong label, a reference trained on 500 clean ones). The train dataloader is a plain
``DataLoader`` over a ``StreamingDataset`` that reads super-batches of ``B = 160``;
``JESTAlgorithm`` scores each with the learner (``state.model``) and the reference at
``Event.AFTER_DATALOADER`` and hands the trainer the 32 most learnable rows.

Then the example checks the resume guarantee: a second ``Trainer`` loads the checkpoint
saved mid-epoch (batch 20 of 25), with a fresh dataset and dataloader, trains to the end,
and must end with the same weights as the uninterrupted run.
"""

from __future__ import annotations

import argparse
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
from jest_stream.integrations.composer import JESTAlgorithm, jest_first
from pytorch_loop import REPO_ROOT, accuracy, make_model, prepare_data, train_reference
from torch import nn
from torch.utils.data import DataLoader

from jest_stream import SampleIdStreamingDataset, collate_samples, super_batch_size_for

__all__ = ['ToyClassifier', 'TrainedExamples', 'main', 'run']

DEFAULT_WORKDIR = REPO_ROOT / 'results' / 'examples' / 'composer_algorithm'
BATCH_SIZE = 32
FILTER_RATIO = 0.8


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


def run(workdir: Path, *, criterion: str = 'learnability', max_duration: str = '2ep',
        load_path: str | None = None, save_interval: str | None = None, seed: int = 0
        ) -> dict[str, Any]:
    """One Composer run with JEST selection; returns what it trained on and the model."""
    data = prepare_data(workdir, seed=seed)
    super_batch = super_batch_size_for(BATCH_SIZE, FILTER_RATIO)
    dataset = SampleIdStreamingDataset(local=str(data.pool_dir), batch_size=super_batch,
                                       shuffle=True, shuffle_seed=seed, num_canonical_nodes=1)
    loader = DataLoader(dataset, batch_size=super_batch, collate_fn=collate_samples)
    model = ToyClassifier(make_model(seed + 10))
    reference = ToyClassifier(train_reference(data.reference_x, data.reference_y,
                                              seed=seed + 20))
    algorithm = JESTAlgorithm(filter_ratio=FILTER_RATIO, reference=reference, target_key='y',
                              criterion=criterion, seed=seed)
    trained = TrainedExamples()
    memory = InMemoryLogger()
    saving = {'save_folder': str(workdir / 'checkpoints'), 'save_interval': save_interval,
              'save_overwrite': True} if save_interval else {}
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=max_duration,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                      algorithms=[algorithm], algorithm_passes=jest_first,
                      callbacks=[trained], loggers=[memory], load_path=load_path,
                      progress_bar=False, log_to_console=False, seed=seed, device='cpu',
                      **saving)
    trainer.fit()
    result = {
        'steps': int(trainer.state.timestamp.batch),
        'raw_samples': int(trainer.state.timestamp.sample),
        'trained_ids': trained.ids,
        'noisy_fraction': float(data.noisy[trained.ids].mean()) if trained.ids else 0.0,
        'test_accuracy': accuracy(model.module, data.test_x, data.test_y),
        'weights': [p.detach().clone() for p in model.parameters()],
        'mean_score_ms': 1e3 * sum(v for _, v in memory.data.get('jest/score_s', [])) /
        max(len(memory.data.get('jest/score_s', [])), 1),
    }
    trainer.close()
    del trainer, loader, dataset
    gc.collect()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from streaming.base.util import clean_stale_shared_memory

    # Once, before any dataset exists: segments left by a killed run would collide with ours.
    clean_stale_shared_memory()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument('--criterion', default='learnability')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads; the toy model is too small to gain from more')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    full = run(args.workdir, criterion=args.criterion, save_interval='20ba')
    print(f'{args.criterion}: {full["steps"]} steps, {full["raw_samples"]} raw samples read '
          f'(Composer counts raw samples with JESTAlgorithm), {len(full["trained_ids"])} '
          f'trained on; wrong labels among them {full["noisy_fraction"]:.0%} (30% of the '
          f'pool); clean test accuracy {full["test_accuracy"]:.1%}; scoring '
          f'{full["mean_score_ms"]:.1f} ms per super-batch')
    checkpoint = args.workdir / 'checkpoints' / 'ep0-ba20-rank0.pt'
    resumed = run(args.workdir, criterion=args.criterion, load_path=str(checkpoint))
    same_batches = full['trained_ids'][20 * BATCH_SIZE:] == resumed['trained_ids']
    same_weights = all(torch.equal(a, b) for a, b in zip(full['weights'], resumed['weights'],
                                                          strict=True))
    print(f'resumed from {checkpoint.name}: trained {resumed["steps"] - 20} more steps; same '
          f'batches as the uninterrupted run: {same_batches}; same final weights: '
          f'{same_weights}')
    if not (same_batches and same_weights):
        raise SystemExit('the resumed run diverged from the uninterrupted one')


if __name__ == '__main__':
    main()

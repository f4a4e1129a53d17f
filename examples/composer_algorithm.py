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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_loop import REPO_ROOT, accuracy, make_model, prepare_data, train_reference
from torch.utils.data import DataLoader

from jest_stream import (
    SampleIdStreamingDataset,
    collate_samples,
    remove_stale_shared_memory,
    super_batch_size_for,
)

__all__ = ['main', 'run']

DEFAULT_WORKDIR = REPO_ROOT / 'results' / 'examples' / 'composer_algorithm'
BATCH_SIZE = 32
FILTER_RATIO = 0.8


def run(workdir: Path, *, criterion: str = 'learnability', max_duration: str = '2ep',
        load_path: str | None = None, save_interval: str | None = None, seed: int = 0
        ) -> dict[str, Any]:
    """One Composer run with JEST selection; returns what it trained on and the model."""
    from composer_parts import ToyClassifier, close, fit, weights

    from jest_stream.integrations.composer import JESTAlgorithm, jest_first

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
    trainer, trained, memory = fit(model, loader, workdir, max_duration=max_duration,
                                   load_path=load_path, save_interval=save_interval, seed=seed,
                                   algorithms=[algorithm], algorithm_passes=jest_first)
    scores = [v for _, v in memory.data.get('jest/score_s', [])]
    result = {
        'steps': int(trainer.state.timestamp.batch),
        'raw_samples': int(trainer.state.timestamp.sample),
        'trained_ids': trained.ids,
        'noisy_fraction': float(data.noisy[trained.ids].mean()) if trained.ids else 0.0,
        'test_accuracy': accuracy(model.module, data.test_x, data.test_y),
        'weights': weights(model),
        'mean_score_ms': 1e3 * sum(scores) / max(len(scores), 1),
    }
    close(trainer, loader, dataset)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from composer_parts import check_resume

    # Once, before any dataset exists: the shared memory of killed runs (only theirs).
    remove_stale_shared_memory()
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
    print(f'resumed from {checkpoint.name}: trained {resumed["steps"] - 20} more steps; '
          + check_resume(full, resumed, batch_size=BATCH_SIZE, at=20))


if __name__ == '__main__':
    main()

"""A :class:`~jest_stream.SelectiveLoader` as a Composer ``Trainer``'s train dataloader.

Run it from the repository root (small defaults: about a minute on two CPU cores)::

    python examples/composer_loader.py                       # scoring in the trainer's process
    python examples/composer_loader.py --scoring process     # in a co-located scorer process

The toy task of ``examples/pytorch_loop.py``. The loader reads super-batches of 160 and
hands Composer the 32 most learnable; Composer counts what it trains on (selected samples).
:class:`JESTLoaderCallback` checks the set-up, logs the loader's metrics and, with
``--scoring process``, stops the scorer process at the end of ``fit``; the loader publishes
the learner's weights to that process by itself after every optimizer step.

Then the example checks the resume guarantee: a second ``Trainer`` loads the checkpoint
saved mid-epoch (batch 20 of 25) into a fresh dataset and loader. Composer restores the
loader's position through ``train_dataloader.dataset.load_state_dict`` and does not spin it,
so no super-batch is drawn or scored twice, and the run ends with the same weights as the
uninterrupted one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from composer_algorithm import BATCH_SIZE, FILTER_RATIO
from pytorch_loop import REPO_ROOT, accuracy, make_model, prepare_data, train_reference

from jest_stream import (
    ClassificationScorer,
    SampleIdStreamingDataset,
    SelectiveLoader,
    remove_stale_shared_memory,
    super_batch_size_for,
)

__all__ = ['main', 'run']

DEFAULT_WORKDIR = REPO_ROOT / 'results' / 'examples' / 'composer_loader'


def run(workdir: Path, *, scoring: str = 'inline', max_staleness: int = 0,
        max_duration: str = '2ep', load_path: str | None = None,
        save_interval: str | None = None, seed: int = 0) -> dict[str, Any]:
    """One Composer run with the loader as train dataloader; what it trained on, the model."""
    from composer_parts import ToyClassifier, close, fit, weights

    from jest_stream.integrations.composer import JESTLoaderCallback

    data = prepare_data(workdir, seed=seed)
    dataset = SampleIdStreamingDataset(
        local=str(data.pool_dir), batch_size=super_batch_size_for(BATCH_SIZE, FILTER_RATIO),
        shuffle=True, shuffle_seed=seed, num_canonical_nodes=1)
    model = ToyClassifier(make_model(seed + 10))
    reference = train_reference(data.reference_x, data.reference_y, seed=seed + 20)
    # The scorer reads the weights of the module the trainer trains (not a copy).
    scorer = ClassificationScorer(model.module, reference, input_key='x', target_key='y')
    process = {'sync_every': 1, 'max_staleness': max_staleness} if scoring == 'process' else {}
    loader = SelectiveLoader(dataset, batch_size=BATCH_SIZE, filter_ratio=FILTER_RATIO,
                             scorer=scorer, seed=seed, scoring=scoring, **process)
    trainer, trained, memory = fit(model, loader, workdir, max_duration=max_duration,
                                   load_path=load_path, save_interval=save_interval, seed=seed,
                                   callbacks=[JESTLoaderCallback()])
    staleness = [v for _, v in memory.data.get('jest/staleness', [])]
    result = {
        'steps': int(trainer.state.timestamp.batch),
        'samples': int(trainer.state.timestamp.sample),
        'scored': int(loader.telemetry.totals['batches']),
        'trained_ids': trained.ids,
        'noisy_fraction': float(data.noisy[trained.ids].mean()) if trained.ids else 0.0,
        'test_accuracy': accuracy(model.module, data.test_x, data.test_y),
        'weights': weights(model),
        'max_staleness': max(staleness) if staleness else 0,
    }
    close(trainer, loader, dataset)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from composer_parts import check_resume

    # Once, before any dataset exists: the shared memory of killed runs (only theirs).
    remove_stale_shared_memory()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument('--scoring', choices=('inline', 'process'), default='inline')
    parser.add_argument('--max-staleness', type=int, default=0,
                        help='process scoring: 0 selects exactly what inline scoring selects; '
                             '1 or more lets the scorer work ahead of the trainer')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads; the toy model is too small to gain from more')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    settings = {'scoring': args.scoring, 'max_staleness': args.max_staleness}
    full = run(args.workdir, save_interval='20ba', **settings)
    print(f'{args.scoring} scoring: {full["steps"]} steps, {full["samples"]} samples counted by '
          f'Composer (selected ones), {full["scored"]} super-batches scored; wrong labels '
          f'among trained examples {full["noisy_fraction"]:.0%} (30% of the pool); clean test '
          f'accuracy {full["test_accuracy"]:.1%}; largest weight staleness '
          f'{full["max_staleness"]:g} steps')
    checkpoint = args.workdir / 'checkpoints' / 'ep0-ba20-rank0.pt'
    resumed = run(args.workdir, load_path=str(checkpoint), **settings)
    # Scoring ahead with stale weights depends on timing, so only exact settings must match.
    exact = args.scoring == 'inline' or args.max_staleness == 0
    print(f'resumed from {checkpoint.name}: {resumed["scored"]} super-batches scored for '
          f'{resumed["steps"] - 20} steps (no spinning); '
          + check_resume(full, resumed, batch_size=BATCH_SIZE, at=20, exact=exact))


if __name__ == '__main__':
    main()

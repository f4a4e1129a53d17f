"""JEST selection in a plain PyTorch training loop, with checkpoints and an exact resume.

Run it from the repository root (small defaults: well under a minute on two CPU cores)::

    python examples/pytorch_loop.py                   # 60 steps, a checkpoint every 20
    python examples/pytorch_loop.py --stop-after 30   # stop after step 30, as if killed
    python examples/pytorch_loop.py --resume          # continue from the last checkpoint

The task is a toy one, so the example runs anywhere: 16 features, 4 classes, a pool of
4,000 examples written once as MDS shards, 30% of them with a wrong label. A small
reference model trains first on 500 clean examples. The learner then trains through a
:class:`~jest_stream.SelectiveLoader` that reads super-batches of 160 and hands over the 32
most learnable (``loss(learner) - loss(reference)``). Learnability skips most of the wrong
labels, which the log shows as the fraction of noisy examples trained on.

Resuming: the checkpoint holds ``loader.state_dict()`` next to the model and the optimizer.
A resumed run builds a *fresh* dataset and loader, loads the state before iterating, and
then trains on exactly the batches the uninterrupted run would have trained on: the loader
counts only super-batches handed to the trainer, and derives each selection's randomness
from the super-batch's position.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jest_stream import ClassificationScorer, SelectiveLoader, super_batch_size_for

__all__ = [
    'LoopConfig',
    'N_CLASSES',
    'N_FEATURES',
    'RunResult',
    'ToyData',
    'accuracy',
    'main',
    'make_model',
    'make_toy_data',
    'prepare_data',
    'train',
    'train_reference',
]

N_FEATURES = 16
N_CLASSES = 4
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO_ROOT / 'results' / 'examples' / 'pytorch_loop'


@dataclass(frozen=True)
class ToyData:
    """The pool (as MDS shards) and two clean in-memory splits.

    Attributes:
        pool_dir (Path): MDS shards with columns ``x`` (float32[16]) and ``y`` (int).
        noisy (np.ndarray[bool]): Whether each pool sample (by global sample id) has a wrong
            label.
        reference_x, reference_y: The clean split the reference model trains on.
        test_x, test_y: A clean test split.
    """

    pool_dir: Path
    noisy: np.ndarray
    reference_x: torch.Tensor
    reference_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def make_toy_data(n: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """``n`` examples of a learnable task, a ``noise`` fraction of them with a wrong label.

    Returns:
        tuple: ``x`` (float32[n, 16]), labels ``y`` (int64[n]) and the ``noisy`` mask.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = (x[:, :N_CLASSES] + 0.5 * x[:, N_CLASSES:2 * N_CLASSES]).argmax(1).astype(np.int64)
    noisy = rng.random(n) < noise
    y[noisy] = (y[noisy] + rng.integers(1, N_CLASSES, noisy.sum())) % N_CLASSES
    return x, y, noisy


def prepare_data(workdir: Path, *, seed: int = 0, pool_size: int = 4000,
                 noise: float = 0.3) -> ToyData:
    """Write the pool as MDS shards under ``workdir/pool`` (once) and build the clean splits."""
    from streaming import MDSWriter

    x, y, noisy = make_toy_data(pool_size, seed, noise)
    pool_dir = Path(workdir) / 'pool'
    if not (pool_dir / 'index.json').exists():
        columns = {'x': f'ndarray:float32:{N_FEATURES}', 'y': 'int'}
        with MDSWriter(out=str(pool_dir), columns=columns, size_limit=1 << 16) as writer:
            for i in range(pool_size):
                writer.write({'x': x[i], 'y': int(y[i])})
    ref_x, ref_y, _ = make_toy_data(500, seed + 1)
    test_x, test_y, _ = make_toy_data(2000, seed + 2)
    return ToyData(pool_dir=pool_dir, noisy=noisy,
                   reference_x=torch.from_numpy(ref_x), reference_y=torch.from_numpy(ref_y),
                   test_x=torch.from_numpy(test_x), test_y=torch.from_numpy(test_y))


def make_model(seed: int) -> nn.Module:
    """A small MLP, initialised from ``seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))


def train_reference(x: torch.Tensor, y: torch.Tensor, *, seed: int, steps: int = 300
                    ) -> nn.Module:
    """The reference: the same MLP trained on the small clean split (full batches, Adam)."""
    model = make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    training = model.training
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(training)
    return correct


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the training loop.

    Attributes:
        steps (int): Optimizer steps in all (the run may cross epochs).
        batch_size (int): Sub-batch size ``b`` the model trains on.
        filter_ratio (float): Fraction of each super-batch left out (0.8: ``B = 5 b``).
        criterion (str): Selection criterion (``uniform`` for the baseline).
        checkpoint_every (int): Save a checkpoint every this many steps.
        stop_after (int, optional): Stop after this step (a stand-in for a killed job).
        num_workers (int): DataLoader workers reading super-batches.
        seed (int): Seed of the model, the reference, the shuffle and the selection.
        lr (float): SGD learning rate.
    """

    steps: int = 60
    batch_size: int = 32
    filter_ratio: float = 0.8
    criterion: str = 'learnability'
    checkpoint_every: int = 20
    stop_after: int | None = None
    num_workers: int = 0
    seed: int = 0
    lr: float = 0.2


@dataclass
class RunResult:
    """What one invocation of :func:`train` did.

    Attributes:
        records (list[dict]): Per step: ``step``, ``epoch``, ``super_batch``, ``loss``,
            ``sample_ids`` (the examples trained on).
        model (nn.Module): The learner after the last step.
        start_step (int): The step the run started from (0, or the checkpoint's).
        test_accuracy (float): Accuracy on the clean test split at the end.
        noisy_fraction (float): Fraction of wrong labels among the examples trained on, over
            the whole run (a resumed run continues the counts of its checkpoint).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None
    start_step: int = 0
    test_accuracy: float = 0.0
    noisy_fraction: float = 0.0


def _checkpoint_path(workdir: Path) -> Path:
    return Path(workdir) / 'checkpoint.pt'


def _save(path: Path, **state: Any) -> None:
    # Write, then rename: a job killed while saving leaves the previous checkpoint intact.
    partial = path.with_suffix('.partial')
    torch.save(state, partial)
    os.replace(partial, path)


def train(workdir: Path, config: LoopConfig, *, resume: bool = False,
          log_every: int = 0) -> RunResult:
    """Train (or resume training) the learner with JEST selection.

    Args:
        workdir (Path): Holds the pool shards and ``checkpoint.pt``.
        config (LoopConfig): The settings; a resumed run must use the same ``seed``,
            ``batch_size`` and ``filter_ratio`` (the loader refuses others).
        resume (bool): Continue from ``workdir/checkpoint.pt``.
        log_every (int): Print a line every this many steps (0: silent).

    Returns:
        RunResult: The steps this invocation trained, and the model.
    """
    from jest_stream import SampleIdStreamingDataset

    workdir = Path(workdir)
    data = prepare_data(workdir, seed=config.seed)
    super_batch = super_batch_size_for(config.batch_size, config.filter_ratio)
    model = make_model(config.seed + 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    checkpoint = None
    if resume:
        checkpoint = torch.load(_checkpoint_path(workdir), weights_only=False)
        reference = make_model(config.seed + 20)
        reference.load_state_dict(checkpoint['reference'])
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
    else:
        reference = train_reference(data.reference_x, data.reference_y, seed=config.seed + 20)

    # A fresh dataset for every run: a StreamingDataset resumes only at its next epoch.
    dataset = SampleIdStreamingDataset(local=str(data.pool_dir), batch_size=super_batch,
                                       shuffle=True, shuffle_seed=config.seed,
                                       num_canonical_nodes=1)
    scorer = ClassificationScorer(model, reference, input_key='x', target_key='y')
    loader = SelectiveLoader(dataset, batch_size=config.batch_size,
                             filter_ratio=config.filter_ratio, scorer=scorer,
                             criterion=config.criterion, num_workers=config.num_workers,
                             seed=config.seed)
    step = trained_noisy = trained = 0
    if checkpoint is not None:
        loader.load_state_dict(checkpoint['loader'])
        step = checkpoint['step']
        # Counts over the whole run, not only this invocation.
        trained_noisy, trained = checkpoint['trained_noisy'], checkpoint['trained']
    result = RunResult(model=model, start_step=step)
    while step < config.steps:
        for batch in loader:
            loss = F.cross_entropy(model(batch['x']), batch['y'])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            ids = batch['sample_id'].tolist()
            trained_noisy += int(data.noisy[ids].sum())
            trained += len(ids)
            metrics = loader.metrics
            result.records.append({'step': step, 'epoch': metrics['epoch'],
                                   'super_batch': metrics['super_batch'],
                                   'loss': loss.item(), 'sample_ids': ids})
            if step % config.checkpoint_every == 0:
                _save(_checkpoint_path(workdir), step=step, model=model.state_dict(),
                      optimizer=optimizer.state_dict(), loader=loader.state_dict(),
                      reference=reference.state_dict(), config=asdict(config),
                      trained_noisy=trained_noisy, trained=trained)
            if log_every and step % log_every == 0:
                print(f'step {step:4d}  epoch {metrics["epoch"]}  loss {loss.item():.3f}  '
                      f'noisy trained {trained_noisy / trained:.0%}  '
                      f'score {metrics["score_s"] * 1e3:.1f} ms  '
                      f'select {metrics["select_s"] * 1e3:.1f} ms')
            if step == config.stop_after or step >= config.steps:
                break
        if step == config.stop_after:
            break
    result.test_accuracy = accuracy(model, data.test_x, data.test_y)
    result.noisy_fraction = trained_noisy / max(trained, 1)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument('--steps', type=int, default=LoopConfig.steps)
    parser.add_argument('--checkpoint-every', type=int, default=LoopConfig.checkpoint_every)
    parser.add_argument('--stop-after', type=int, default=None)
    parser.add_argument('--resume', action='store_true')
    parser.add_argument('--criterion', default=LoopConfig.criterion)
    parser.add_argument('--num-workers', type=int, default=LoopConfig.num_workers)
    parser.add_argument('--seed', type=int, default=LoopConfig.seed)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads; the toy model is too small to gain from more')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> RunResult:
    from jest_stream import remove_stale_shared_memory

    # Once, before any dataset exists: the shared memory of killed runs (only theirs).
    remove_stale_shared_memory()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = LoopConfig(steps=args.steps, checkpoint_every=args.checkpoint_every,
                        stop_after=args.stop_after, criterion=args.criterion,
                        num_workers=args.num_workers, seed=args.seed)
    if args.resume and not _checkpoint_path(args.workdir).exists():
        raise SystemExit(f'--resume: no checkpoint at {_checkpoint_path(args.workdir)}; run '
                         f'without --resume first')
    result = train(args.workdir, config, resume=args.resume, log_every=10)
    end = result.start_step + len(result.records)
    print(f'steps {result.start_step}..{end} ({"resumed" if args.resume else "from scratch"}); '
          f'clean test accuracy {result.test_accuracy:.1%}; wrong labels among trained '
          f'examples {result.noisy_fraction:.0%} (30% of the pool)')
    if end < config.steps:
        saved = end - end % config.checkpoint_every
        print(f'stopped early at step {end}; the last checkpoint is at step {saved}, so a resume '
              f'redoes {end - saved} step(s) (the same ones, exactly). Continue with: python '
              f'examples/pytorch_loop.py --resume --workdir {args.workdir}')
    return result


if __name__ == '__main__':
    main()

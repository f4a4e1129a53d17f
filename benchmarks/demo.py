"""Fashion-MNIST with 40% label noise: uniform sampling against learnability selection.

Run it from the repository root::

    python -m benchmarks.demo            # a few minutes on two CPU cores
    python -m benchmarks.demo --quick    # a smoke run of well under a minute

What happens:

1. The train split becomes a noisy pool of 57,000 images (40% of the labels replaced
   by another class) and a clean split of 3,000, both as MDS shards (built once,
   under ``data/fashion-mnist``).
2. A reference CNN trains on the clean split only.
3. For each seed, the same learner (same initialisation, same step budget) trains
   twice on the pool through a ``jest_stream.SelectiveLoader`` that draws super-batches
   of 320 and hands over 64: once picked uniformly at random, once by learnability
   (learner loss minus reference loss).
4. Clean test accuracy is measured at checkpoints, with the fraction of corrupted
   labels among the examples each run trained on.

Results go to ``results/demo/`` (``demo.json`` and ``demo.png``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.fashion_mnist import PreparedData, batch_logits, prepare, read_columns
from benchmarks.models import count_parameters, evaluate, make_cnn, train_classifier
from jest_stream import (
    ClassificationScorer,
    SampleIdStreamingDataset,
    SelectiveLoader,
    super_batch_size_for,
)

__all__ = ['DemoConfig', 'RunResult', 'main', 'parse_args', 'run_selection', 'summarise']

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ('uniform', 'learnability')


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo (written into the results file)."""

    steps: int = 500
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 64
    filter_ratio: float = 0.8
    method: str = 'topk'
    temperature: float = 1.0
    lr: float = 1e-3
    eval_every: int = 50
    eval_size: int | None = None
    noise_rate: float = 0.4
    clean_fraction: float = 0.05
    data_seed: int = 0
    reference_steps: int = 500
    reference_lr: float = 2e-3
    reference_seed: int = 0
    num_workers: int = 1
    threads: int = 1
    data_dir: Path = REPO_ROOT / 'data' / 'fashion-mnist'
    out_dir: Path = REPO_ROOT / 'results' / 'demo'

    @property
    def super_batch_size(self) -> int:
        """Examples drawn per step, ``batch_size / (1 - filter_ratio)``."""
        return round(self.batch_size / (1.0 - self.filter_ratio))


@dataclass
class RunResult:
    """One training run of one mode and seed.

    Attributes:
        mode (str): ``uniform`` or ``learnability``.
        seed (int): Seed of the learner's initialisation, the data order and the selection.
        steps (list[int]): Checkpoints, starting at 0.
        accuracy (list[float]): Clean test accuracy at each checkpoint.
        corrupted (list[float]): Fraction of corrupted labels among the examples trained on
            since the previous checkpoint (one entry per checkpoint after 0).
        corrupted_overall (float): The same over the whole run.
        seconds (float): Wall time of the training loop, evaluation excluded.
        loader (dict): The loader's telemetry totals.
    """

    mode: str
    seed: int
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    corrupted: list[float] = field(default_factory=list)
    corrupted_overall: float = 0.0
    seconds: float = 0.0
    loader: dict[str, float] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The configuration from the command line."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.demo',
        description='Fashion-MNIST with noisy labels: uniform sampling against learnability '
                    'selection by jest_stream, same step budget, clean test accuracy.')
    parser.add_argument('--steps', type=int, default=None,
                        help=f'optimizer steps per run (default {defaults.steps})')
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help=f'seeds, one run per mode each (default {list(defaults.seeds)})')
    parser.add_argument('--method', choices=('topk', 'joint', 'sample'), default=defaults.method,
                        help=f'selection method of the learnability runs (default '
                             f'{defaults.method})')
    parser.add_argument('--filter-ratio', type=float, default=defaults.filter_ratio,
                        help=f'fraction of each super-batch left out (default '
                             f'{defaults.filter_ratio}: super-batches of 5x the batch)')
    parser.add_argument('--lr', type=float, default=defaults.lr,
                        help=f'Adam learning rate of the learner (default {defaults.lr})')
    parser.add_argument('--noise-rate', type=float, default=defaults.noise_rate,
                        help=f'fraction of pool labels corrupted (default {defaults.noise_rate})')
    parser.add_argument('--eval-size', type=int, default=None,
                        help='evaluate on a fixed random subset of this many test images '
                             '(default: all 10,000)')
    parser.add_argument('--num-workers', type=int, default=defaults.num_workers,
                        help=f'DataLoader workers reading super-batches (default '
                             f'{defaults.num_workers})')
    parser.add_argument('--threads', type=int, default=defaults.threads,
                        help=f'torch threads of the training process (default '
                             f'{defaults.threads}: the data worker has the other core)')
    parser.add_argument('--data-dir', type=Path, default=defaults.data_dir,
                        help='where the MDS shards are built once (default: data/fashion-mnist '
                             'under the repository root)')
    parser.add_argument('--out-dir', type=Path, default=defaults.out_dir,
                        help='where demo.json and demo.png go (default: results/demo under the '
                             'repository root)')
    parser.add_argument('--quick', action='store_true',
                        help='a smoke run: 120 steps, one seed, 2,000 test images')
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (120 if args.quick else defaults.steps)
    seeds = tuple(args.seeds) if args.seeds is not None else (
        defaults.seeds[:1] if args.quick else defaults.seeds)
    eval_size = args.eval_size if args.eval_size is not None else (2000 if args.quick else None)
    if steps <= 0:
        parser.error(f'--steps={steps} must be positive')
    if args.threads <= 0:
        parser.error(f'--threads={args.threads} must be positive')
    return DemoConfig(
        steps=steps, seeds=seeds, method=args.method, filter_ratio=args.filter_ratio,
        lr=args.lr, noise_rate=args.noise_rate, eval_size=eval_size,
        eval_every=max(1, steps // 10), num_workers=args.num_workers, threads=args.threads,
        reference_steps=200 if args.quick else defaults.reference_steps,
        data_dir=args.data_dir, out_dir=args.out_dir)


def evaluation_set(data: PreparedData, size: int | None, *, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The test split, or a fixed random subset of ``size`` of it (the same for every run)."""
    if size is None or size >= len(data.test_labels):
        return data.test_images, data.test_labels
    rows = np.sort(np.random.default_rng(seed).choice(len(data.test_labels), size, replace=False))
    return data.test_images[rows], data.test_labels[rows]


def train_reference(data: PreparedData, config: DemoConfig) -> nn.Module:
    """A CNN trained on the clean split only."""
    clean = read_columns(data.clean_dir, ['image', 'label'])
    model = make_cnn(config.reference_seed)
    train_classifier(model, clean['image'], clean['label'], steps=config.reference_steps,
                     batch_size=config.batch_size, lr=config.reference_lr,
                     seed=config.reference_seed, progress=True, desc='reference')
    return model


def run_selection(mode: str, seed: int, config: DemoConfig, data: PreparedData,
                  reference: nn.Module, eval_images: np.ndarray, eval_labels: np.ndarray
                  ) -> RunResult:
    """Train a fresh learner on the noisy pool through a SelectiveLoader.

    Args:
        mode (str): ``uniform`` or ``learnability``.
        seed (int): Seed of the learner's initialisation, the data order and the selection.
        config (DemoConfig): Settings.
        data (PreparedData): The prepared pool.
        reference (nn.Module): The reference model (frozen by the scorer).
        eval_images (np.ndarray): uint8 ``[N, 28, 28]`` evaluation images.
        eval_labels (np.ndarray): int64 ``[N]`` their clean labels.

    Returns:
        RunResult: Accuracy curve, noise among the trained-on examples, timings.
    """
    learner = make_cnn(seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    dataset = SampleIdStreamingDataset(
        local=str(data.pool_dir), batch_size=super_batch_size_for(config.batch_size,
                                                                  config.filter_ratio),
        shuffle=True, shuffle_seed=seed, num_canonical_nodes=1)
    if mode == 'uniform':
        scorer, method = None, 'uniform'
    else:
        scorer = ClassificationScorer(learner, reference, forward=batch_logits,
                                      target_key='label')
        method = config.method
    loader = SelectiveLoader(
        dataset, batch_size=config.batch_size, filter_ratio=config.filter_ratio, scorer=scorer,
        criterion=mode, method=method, temperature=config.temperature, seed=seed,
        num_workers=config.num_workers)

    result = RunResult(mode=mode, seed=seed)
    result.steps.append(0)
    result.accuracy.append(evaluate(learner, eval_images, eval_labels))
    step = corrupted_window = seen_window = corrupted_total = 0
    train_seconds = 0.0
    bar = tqdm(total=config.steps, desc=f'{mode:>12} seed {seed}', unit='step', leave=False)
    started = time.perf_counter()
    while step < config.steps:
        for batch in loader:
            loss = F.cross_entropy(batch_logits(learner, batch), batch['label'])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            corrupted = int(batch['corrupted'].sum())
            corrupted_window += corrupted
            corrupted_total += corrupted
            seen_window += len(batch['label'])
            bar.update()
            if step % config.eval_every == 0 or step == config.steps:
                train_seconds += time.perf_counter() - started
                result.steps.append(step)
                result.accuracy.append(evaluate(learner, eval_images, eval_labels))
                result.corrupted.append(corrupted_window / seen_window)
                corrupted_window = seen_window = 0
                bar.set_postfix(acc=f'{result.accuracy[-1]:.3f}',
                                noisy=f'{result.corrupted[-1]:.2f}')
                started = time.perf_counter()
            if step == config.steps:
                break
    bar.close()
    result.corrupted_overall = corrupted_total / (config.steps * config.batch_size)
    result.seconds = train_seconds
    result.loader = loader.telemetry.summary()
    # A StreamingDataset holds shared memory until it is collected: release it before the
    # next run opens the same pool.
    del loader, dataset, scorer
    gc.collect()
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(results: list[RunResult]) -> dict[str, Any]:
    """Means over seeds per mode and checkpoint, and steps to uniform's final accuracy.

    Args:
        results (list[RunResult]): Runs of every mode and seed, with the same checkpoints.

    Returns:
        dict: ``steps``, and per mode ``accuracy_mean``/``accuracy_std`` per checkpoint,
        ``corrupted_mean``, ``seconds_mean``; plus ``target_accuracy`` (uniform's final
        mean) and ``learnability_steps_to_target`` (None when it was not reached).
    """
    steps = results[0].steps
    summary: dict[str, Any] = {'steps': steps, 'modes': {}}
    for mode in MODES:
        runs = [r for r in results if r.mode == mode]
        if any(r.steps != steps for r in runs):
            raise ValueError('runs of the demo must share their checkpoints')
        stats = [_mean_std([r.accuracy[i] for r in runs]) for i in range(len(steps))]
        summary['modes'][mode] = {
            'accuracy_mean': [m for m, _ in stats],
            'accuracy_std': [s for _, s in stats],
            'corrupted_mean': _mean_std([r.corrupted_overall for r in runs])[0],
            'corrupted_curve_mean': [
                _mean_std([r.corrupted[i] for r in runs])[0] for i in range(len(steps) - 1)],
            'seconds_mean': _mean_std([r.seconds for r in runs])[0],
        }
    target = summary['modes']['uniform']['accuracy_mean'][-1]
    reached = [s for s, a in zip(steps, summary['modes']['learnability']['accuracy_mean'],
                                 strict=True) if a >= target]
    summary['target_accuracy'] = target
    summary['learnability_steps_to_target'] = reached[0] if reached else None
    return summary


def format_report(summary: dict[str, Any], reference_accuracy: float, config: DemoConfig,
                  n_seeds: int) -> str:
    """The table of clean test accuracy against steps, and the selection diagnostics."""
    uniform, learn = summary['modes']['uniform'], summary['modes']['learnability']
    spread = n_seeds > 1
    width = 17 if spread else 10
    lines = [
        f'Clean test accuracy (mean{" ± std" if spread else ""} over {n_seeds} '
        f'seed{"s" if spread else ""}); reference trained on the clean split: '
        f'{reference_accuracy:.4f}',
        f'{"step":>6}  {"uniform":>{width}}  {"learnability":>{width}}  {"difference":>10}',
    ]

    def cell(mean: float, std: float) -> str:
        return f'{mean:.4f} ± {std:.4f}' if spread else f'{mean:.4f}'

    for i, step in enumerate(summary['steps']):
        lines.append(
            f'{step:>6}  {cell(uniform["accuracy_mean"][i], uniform["accuracy_std"][i]):>{width}}'
            f'  {cell(learn["accuracy_mean"][i], learn["accuracy_std"][i]):>{width}}'
            f'  {learn["accuracy_mean"][i] - uniform["accuracy_mean"][i]:>+10.4f}')
    lines.append('')
    lines.append(f'Corrupted labels among the examples trained on (the pool has '
                 f'{config.noise_rate:.0%}):')
    lines.append(f'  uniform      {uniform["corrupted_mean"]:.4f}')
    lines.append(f'  learnability {learn["corrupted_mean"]:.4f}  '
                 f'({uniform["corrupted_mean"] / max(learn["corrupted_mean"], 1e-12):.1f}x fewer)')
    lines.append('')
    lines.append(f'Training time per run (evaluation excluded): uniform '
                 f'{uniform["seconds_mean"]:.1f} s, learnability {learn["seconds_mean"]:.1f} s '
                 f'({learn["seconds_mean"] / uniform["seconds_mean"]:.2f}x: scoring '
                 f'{config.super_batch_size} examples with two '
                 f'models per step)')
    reached = summary['learnability_steps_to_target']
    final = summary['steps'][-1]
    if reached is None:
        lines.append(f'Learnability did not reach uniform\'s final accuracy '
                     f'({summary["target_accuracy"]:.4f}) within {final} steps.')
    else:
        lines.append(f'Learnability reached uniform\'s final accuracy '
                     f'({summary["target_accuracy"]:.4f} at step {final}) at step {reached}: '
                     f'{final / max(reached, 1):.1f}x fewer steps (at checkpoint resolution).')
    return '\n'.join(lines)


def plot(summary: dict[str, Any], reference_accuracy: float, config: DemoConfig,
         path: Path) -> None:
    """Accuracy against steps, and corrupted labels among the trained-on examples."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    steps = np.asarray(summary['steps'])
    colours = {'uniform': 'tab:gray', 'learnability': 'tab:blue'}
    fig, (ax_acc, ax_noise) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        stats = summary['modes'][mode]
        mean = np.asarray(stats['accuracy_mean'])
        std = np.asarray(stats['accuracy_std'])
        label = mode if mode == 'uniform' else f'{mode} ({config.method})'
        ax_acc.plot(steps, mean, marker='o', ms=3, color=colours[mode], label=label)
        ax_acc.fill_between(steps, mean - std, mean + std, color=colours[mode], alpha=0.2)
        ax_noise.plot(steps[1:], stats['corrupted_curve_mean'], marker='o', ms=3,
                      color=colours[mode], label=label)
    ax_acc.axhline(reference_accuracy, color='tab:green', ls='--',
                   label='reference (clean split only)')
    ax_acc.set(xlabel='optimizer step', ylabel='clean test accuracy',
               title=f'Fashion-MNIST, {config.noise_rate:.0%} label noise, batch '
                     f'{config.batch_size} of {config.super_batch_size}')
    ax_acc.set_ylim(bottom=max(0.0, float(np.min(
        [summary['modes'][m]['accuracy_mean'][1] for m in MODES])) - 0.1))
    ax_acc.legend(loc='lower right')
    ax_acc.grid(alpha=0.3)
    ax_noise.axhline(config.noise_rate, color='black', ls=':', label='pool')
    ax_noise.set(xlabel='optimizer step', ylabel='fraction of corrupted labels',
                 title='Noise among the examples trained on', ylim=(0, 1))
    ax_noise.legend()
    ax_noise.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    config = parse_args(argv)
    # Before any StreamingDataset exists: segments of a killed earlier run would collide.
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    # On a small machine the training threads share cores with the data worker; OpenMP
    # threads that wait at a barrier for a descheduled sibling spin, and were measured
    # several times slower than one thread when cores were busy.
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    data = prepare(config.data_dir, noise_rate=config.noise_rate,
                   clean_fraction=config.clean_fraction, seed=config.data_seed)
    print(f'Pool: {data.n_pool} images, {data.n_corrupted} with corrupted labels; clean split: '
          f'{data.n_clean}; test: {len(data.test_labels)} ({data.root})')
    eval_images, eval_labels = evaluation_set(data, config.eval_size, seed=config.data_seed)

    reference = train_reference(data, config)
    reference_accuracy = evaluate(reference, eval_images, eval_labels)
    print(f'Reference CNN ({count_parameters(reference):,} parameters) trained on the clean '
          f'split: test accuracy {reference_accuracy:.4f}')

    results = [run_selection(mode, seed, config, data, reference, eval_images, eval_labels)
               for seed in config.seeds for mode in MODES]
    summary = summarise(results)
    report = format_report(summary, reference_accuracy, config, len(config.seeds))
    print()
    print(report)

    config.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        'config': {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        'data': data.summary(),
        'evaluation_images': len(eval_labels),
        'reference_accuracy': reference_accuracy,
        'summary': summary,
        'runs': [asdict(r) for r in results],
        'wall_seconds': time.perf_counter() - started,
        'platform': {'python': platform.python_version(), 'torch': torch.__version__,
                     'threads': torch.get_num_threads()},
    }
    (config.out_dir / 'demo.json').write_text(json.dumps(record, indent=2) + '\n')
    plot(summary, reference_accuracy, config, config.out_dir / 'demo.png')
    print(f'\nWrote {config.out_dir / "demo.json"} and {config.out_dir / "demo.png"} '
          f'({record["wall_seconds"]:.0f} s in all)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

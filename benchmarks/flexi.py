"""Flexi-JEST on Fashion-MNIST: how well does cheap scoring pick the same examples?

Run it from the repository root::

    python -m benchmarks.flexi            # about 4 minutes on two idle CPU cores
    python -m benchmarks.flexi --quick    # under 3 minutes

What happens:

1. The train split becomes a clean split (for the references) and a pool whose labels
   are 40% noisy, as in the demo; the learners train briefly on part of the pool.
2. Two model families, each with a reference trained at full resolution on the clean
   split: a CNN that ends in global average pooling (so it accepts any resolution;
   cheap scoring downsamples 28x28 to 14x14) and a small FlexiViT (trained at patch 4,
   49 tokens; cheap scoring uses patch 7, 16 tokens, with PI-resized patch embeddings).
   Each learner trains twice from the same initialisation: at full resolution only,
   and at mixed resolution (half of every batch at each resolution, as Flexi-JEST does).
3. On held-out super-batches of 320 from the pool, every learner scores learnability
   (learner loss minus reference loss, the reference always at full resolution) at full
   and at low resolution. Reported: the Spearman rank correlation of the two scorings,
   the overlap of the top-64 sets (filter ratio 0.8; two random sets overlap 0.2 on
   average), the share of corrupted labels in each selected set, and the scoring and
   training FLOPs, counted with ``FlopCounterMode``.

Results go to ``benchmarks/results/flexi/`` (``flexi.json`` and ``flexi.png``;
``flexi_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor, nn

from benchmarks.common import report, stats
from benchmarks.common.data import (
    load_fashion_mnist,
    split_clean,
    symmetric_label_noise,
    to_float_images,
)
from benchmarks.common.models import count_parameters, make_pooled_cnn, make_vit
from benchmarks.common.training import evaluate, train_on_arrays
from jest_stream import (
    ClassificationScorer,
    FlexiForward,
    get_criterion,
    mixed_resolution_loss,
    score_flops,
    topk_select,
    train_step_flops,
)
from jest_stream.flexi import LowResolution, MixedResolution

__all__ = ['FlexiConfig', 'QUICK', 'main', 'parse_args', 'run']


@dataclass(frozen=True)
class FlexiConfig:
    """Settings of one benchmark run.

    Attributes:
        seed (int): Seed of the split, the noise, the initialisations and the batch order.
        noise_rate (float): Fraction of pool labels corrupted.
        clean_fraction (float): Fraction of the train split kept clean for the references.
        n_train (int): Pool examples the learners train on.
        cnn_steps (int): Optimizer steps of each CNN (learners and reference).
        vit_steps (int): Optimizer steps of each ViT.
        batch_size (int): Training batch size and sub-batch size ``b`` of the selection.
        super_batch_size (int): Candidates ``B`` per held-out super-batch.
        n_super_batches (int): Held-out super-batches scored.
        n_test (int): Test images for the accuracies.
        cnn_factor (int): Downsampling factor of the CNN's cheap scoring.
        vit_patch_sizes (tuple[int, int]): ViT patch sizes (full, cheap).
        low_fraction (float): Share of each training batch at low resolution in mixed training.
        cnn_lr (float): Adam learning rate of the CNNs.
        vit_lr (float): AdamW learning rate of the ViTs.
        vit_size (tuple[int, int, int]): ViT width, depth and heads.
    """

    seed: int = 0
    noise_rate: float = 0.4
    clean_fraction: float = 0.1
    n_train: int = 40_000
    cnn_steps: int = 1000
    vit_steps: int = 1000
    batch_size: int = 64
    super_batch_size: int = 320
    n_super_batches: int = 30
    n_test: int = 10_000
    cnn_factor: int = 2
    vit_patch_sizes: tuple[int, int] = (4, 7)
    low_fraction: float = 0.5
    cnn_lr: float = 5e-3
    vit_lr: float = 3e-3
    vit_size: tuple[int, int, int] = (48, 3, 3)

    @property
    def filter_ratio(self) -> float:
        return 1.0 - self.batch_size / self.super_batch_size


QUICK = FlexiConfig(n_train=20_000, cnn_steps=300, vit_steps=300, n_super_batches=10,
                    n_test=2_000)


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    # Rows marked by MixedResolution run at their resolution; other batches at full.
    return mixed_resolution_loss(model, batch, F.cross_entropy, preprocess=to_float_images)


def _train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int,
           config: FlexiConfig, lr: float, seed: int, mixed: MixedResolution | None,
           desc: str) -> list[float]:
    """Adam on in-memory arrays, at full or (``mixed``) at mixed resolution.

    Every batch is split by ``mixed`` when given and run through ``mixed_resolution_loss``:
    the loop a user of ``SelectiveLoader(batch_transform=MixedResolution(...))`` writes.
    """
    return train_on_arrays(model, {'image': images, 'label': labels}, _loss, steps=steps,
                           batch_size=config.batch_size, lr=lr, seed=seed, transform=mixed,
                           progress=True, desc=desc)


@dataclass(frozen=True)
class _Family:
    name: str
    make: Callable[[int], nn.Module]
    steps: int
    lr: float
    mixed: MixedResolution
    low_label: str
    cheap_forward: Callable[[nn.Module], FlexiForward]
    full_call: Callable[[nn.Module, Tensor], Tensor]
    low_call: Callable[[nn.Module, Tensor], Tensor]


def _families(config: FlexiConfig) -> list[_Family]:
    factor = config.cnn_factor
    full_patch, low_patch = config.vit_patch_sizes
    dim, depth, heads = config.vit_size
    low_resolution = LowResolution(factor)
    return [
        _Family(
            name='cnn', make=make_pooled_cnn, steps=config.cnn_steps, lr=config.cnn_lr,
            mixed=MixedResolution(key='image', low_fraction=config.low_fraction,
                                  factor=factor),
            low_label=f'{28 // factor}x{28 // factor} (factor {factor})',
            cheap_forward=lambda learner: FlexiForward(
                input_key='image', preprocess=to_float_images, input_transform=low_resolution,
                learner=learner),
            full_call=lambda m, x: m(to_float_images(x)),
            low_call=lambda m, x: m(low_resolution(to_float_images(x)))),
        _Family(
            name='vit', make=lambda seed: make_vit(seed, base_patch_size=full_patch, dim=dim,
                                                   depth=depth, heads=heads),
            steps=config.vit_steps, lr=config.vit_lr,
            mixed=MixedResolution(key='image', low_fraction=config.low_fraction,
                                  patch_sizes=(full_patch, low_patch)),
            low_label=f'patch {low_patch} ({(28 // low_patch) ** 2} tokens, '
                      f'not {(28 // full_patch) ** 2})',
            cheap_forward=lambda learner: FlexiForward(
                input_key='image', preprocess=to_float_images, patch_size=low_patch,
                learner=learner),
            full_call=lambda m, x: m(to_float_images(x), patch_size=full_patch),
            low_call=lambda m, x: m(to_float_images(x), patch_size=low_patch)),
    ]


def _score(scorer: ClassificationScorer, batch: dict[str, Tensor], criterion: str) -> np.ndarray:
    ids = torch.arange(batch['label'].shape[0])
    return scorer(batch, ids, get_criterion(criterion)).scores.numpy().astype(np.float64)


def _compare_scorings(learner: nn.Module, reference: nn.Module, family: _Family,
                      super_batches: list[dict[str, Tensor]], corrupted: list[np.ndarray],
                      k: int) -> dict[str, Any]:
    full = ClassificationScorer(learner, reference, input_key='image', target_key='label',
                                forward=_full_forward(family))
    low = ClassificationScorer(learner, reference, input_key='image', target_key='label',
                               forward=family.cheap_forward(learner))
    rows: dict[str, list[float]] = {key: [] for key in (
        'spearman_learnability', 'spearman_learner_loss', 'topk_overlap',
        'corrupted_selected_full', 'corrupted_selected_low', 'corrupted_all')}
    example = None
    for batch, bad in zip(super_batches, corrupted, strict=True):
        learn_full, learn_low = _score(full, batch, 'learnability'), _score(low, batch,
                                                                             'learnability')
        loss_full, loss_low = _score(full, batch, 'hard_learner'), _score(low, batch,
                                                                          'hard_learner')
        top_full = topk_select(torch.from_numpy(learn_full), k).numpy()
        top_low = topk_select(torch.from_numpy(learn_low), k).numpy()
        rows['spearman_learnability'].append(stats.spearman(learn_full, learn_low))
        rows['spearman_learner_loss'].append(stats.spearman(loss_full, loss_low))
        rows['topk_overlap'].append(len(np.intersect1d(top_full, top_low)) / k)
        rows['corrupted_selected_full'].append(float(bad[top_full].mean()))
        rows['corrupted_selected_low'].append(float(bad[top_low].mean()))
        rows['corrupted_all'].append(float(bad.mean()))
        if example is None:
            example = {'learnability_full': learn_full.tolist(),
                       'learnability_low': learn_low.tolist(),
                       'selected_full': top_full.tolist(), 'selected_low': top_low.tolist()}
    summary = {key: {'mean': float(np.mean(v)), 'std': float(np.std(v))}
               for key, v in rows.items()}
    batch = super_batches[0]
    flops = {
        'learner_full': score_flops(full, batch, criterion='hard_learner'),
        'learner_low': score_flops(low, batch, criterion='hard_learner'),
        'with_live_reference_full': score_flops(full, batch, criterion='learnability'),
        'with_live_reference_low': score_flops(low, batch, criterion='learnability'),
    }
    flops['learner_ratio'] = flops['learner_low'] / flops['learner_full']
    flops['with_live_reference_ratio'] = (flops['with_live_reference_low']
                                          / flops['with_live_reference_full'])
    return {'metrics': summary, 'score_flops_per_super_batch': flops, 'example': example}


def _full_forward(family: _Family) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """The full-resolution scoring ``forward`` of a family (learner and reference alike)."""
    return lambda model, batch: family.full_call(model, batch['image'])


def _train_flops(model: nn.Module, family: _Family, images: Tensor, labels: Tensor
                 ) -> dict[str, float]:
    batch = {'image': images, 'label': labels}
    full = train_step_flops(model, batch, _loss)
    mixed = train_step_flops(model, family.mixed(batch), _loss)
    return {'full': full, 'mixed': mixed, 'ratio': mixed / full}


def _data(config: FlexiConfig) -> dict[str, Any]:
    """Clean split, noisy training rows, held-out super-batches and the test images."""
    images, labels = load_fashion_mnist('train')
    test_images, test_labels = load_fashion_mnist('test', limit=config.n_test)
    pool, clean = split_clean(len(labels), config.clean_fraction,
                              seed=np.random.SeedSequence([config.seed, 0]))
    noisy, corrupted = symmetric_label_noise(labels[pool], config.noise_rate,
                                             seed=np.random.SeedSequence([config.seed, 1]))
    order = np.random.default_rng(np.random.SeedSequence([config.seed, 2])).permutation(len(pool))
    train_rows, held_out = order[:config.n_train], order[config.n_train:]
    n_held = config.n_super_batches * config.super_batch_size
    if len(held_out) < n_held:
        raise ValueError(f'{len(held_out)} held-out pool examples cannot fill '
                         f'{config.n_super_batches} super-batches of {config.super_batch_size}; '
                         f'lower n_train or n_super_batches')
    pool_images, pool_labels = torch.as_tensor(images[pool]), torch.as_tensor(noisy)
    chunks = held_out[:n_held].reshape(config.n_super_batches, config.super_batch_size)
    return {
        'clean': (images[clean], labels[clean]),
        'train': (images[pool][train_rows], noisy[train_rows]),
        'test': (test_images, test_labels),
        'super_batches': [{'image': pool_images[torch.from_numpy(rows)],
                           'label': pool_labels[torch.from_numpy(rows)]} for rows in chunks],
        'corrupted': [corrupted[rows] for rows in chunks],
    }


def _run_family(family: _Family, data: dict[str, Any], config: FlexiConfig,
                say: Callable[[str], None]) -> dict[str, Any]:
    """A family's reference, its learners trained at full and mixed resolution, compared."""
    started = time.perf_counter()
    reference = family.make(config.seed + 1000)
    _train(reference, *data['clean'], steps=family.steps, config=config, lr=family.lr,
           seed=config.seed + 1, mixed=None, desc=f'{family.name} reference')
    reference.eval()
    test = data['test']
    entry: dict[str, Any] = {'low_resolution': family.low_label,
                             'parameters': count_parameters(reference),
                             'reference_test_accuracy': evaluate(reference, *test,
                                                                 forward=family.full_call),
                             'learners': {}}
    for training in ('full', 'mixed'):
        learner = family.make(config.seed)
        losses = _train(learner, *data['train'], steps=family.steps, config=config,
                        lr=family.lr, seed=config.seed + 2,
                        mixed=family.mixed if training == 'mixed' else None,
                        desc=f'{family.name} learner ({training})')
        compared = _compare_scorings(learner, reference, family, data['super_batches'],
                                     data['corrupted'], config.batch_size)
        compared['test_accuracy_full'] = evaluate(learner, *test, forward=family.full_call)
        compared['test_accuracy_low'] = evaluate(learner, *test, forward=family.low_call)
        compared['final_train_loss'] = float(np.mean(losses[-20:]))
        entry['learners'][training] = compared
        m = compared['metrics']
        say(f'{family.name} trained at {training} resolution: spearman '
            f'{m["spearman_learnability"]["mean"]:.3f}, top-k overlap '
            f'{m["topk_overlap"]["mean"]:.3f}')
    first = data['super_batches'][0]
    entry['train_flops_per_step'] = _train_flops(learner, family,
                                                 first['image'][:config.batch_size],
                                                 first['label'][:config.batch_size])
    entry['seconds'] = time.perf_counter() - started
    return entry


def run(config: FlexiConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train the models, compare full and cheap scoring, and return every number.

    Args:
        config (FlexiConfig): The settings.
        progress (bool): Print progress.

    Returns:
        dict: JSON-ready results.
    """
    say = print if progress else (lambda *_: None)
    started = time.perf_counter()
    data = _data(config)
    say(f'data: {len(data["clean"][1])} clean, {config.n_train} noisy training, '
        f'{config.n_super_batches * config.super_batch_size} held out '
        f'({time.perf_counter() - started:.1f} s)')
    return {
        'config': asdict(config),
        'random_topk_overlap': config.batch_size / config.super_batch_size,
        'models': {family.name: _run_family(family, data, config, say)
                   for family in _families(config)},
    }


def _table(results: dict[str, Any]) -> str:
    head = (f'{"model":<5} {"trained":<7} {"cheap scoring":<30} {"spearman":>9} '
            f'{"loss rho":>9} {"overlap":>8} {"noise sel full/low":>19} '
            f'{"score FLOPs":>12} {"acc full/low":>13}')
    lines = [head, '-' * len(head)]
    for name, entry in results['models'].items():
        for training, learner in entry['learners'].items():
            m = learner['metrics']
            flops = learner['score_flops_per_super_batch']
            lines.append(
                f'{name:<5} {training:<7} {entry["low_resolution"]:<30} '
                f'{m["spearman_learnability"]["mean"]:>9.3f} '
                f'{m["spearman_learner_loss"]["mean"]:>9.3f} '
                f'{m["topk_overlap"]["mean"]:>8.3f} '
                f'{m["corrupted_selected_full"]["mean"]:>9.3f}/'
                f'{m["corrupted_selected_low"]["mean"]:<9.3f} '
                f'{flops["learner_ratio"]:>11.3f}x '
                f'{learner["test_accuracy_full"]:>6.3f}/{learner["test_accuracy_low"]:<6.3f}')
    lines.append('')
    lines.append(f'spearman: rank correlation of learnability scored at full and at low '
                 f'resolution; loss rho: the same for the learner loss alone; overlap: of the '
                 f'top-{results["config"]["batch_size"]} of '
                 f'{results["config"]["super_batch_size"]} (random sets: '
                 f'{results["random_topk_overlap"]:.2f}); noise sel: corrupted share of the '
                 f'selected set (pool: {results["config"]["noise_rate"]:.2f}); score FLOPs: '
                 f'learner scoring FLOPs at low over full resolution (measured).')
    for name, entry in results['models'].items():
        train = entry['train_flops_per_step']
        live = entry['learners']['mixed']['score_flops_per_super_batch']
        lines.append(f'{name}: training FLOPs per step, mixed over full resolution: '
                     f'{train["ratio"]:.3f} ({train["mixed"]:.3g} / {train["full"]:.3g}); '
                     f'scoring FLOPs with a live full-resolution reference: '
                     f'{live["with_live_reference_ratio"]:.3f}; reference test accuracy '
                     f'{entry["reference_test_accuracy"]:.3f}')
    return '\n'.join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = report.pyplot()
    models = results['models']
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4.5))
    for ax, (name, entry) in zip(axes, models.items(), strict=False):
        example = entry['learners']['mixed']['example']
        # Ranks, not raw scores: the reference's large losses on noisy labels would
        # otherwise squeeze the candidates that matter, the top ones, into a corner.
        full = rankdata(np.asarray(example['learnability_full']))
        low = rankdata(np.asarray(example['learnability_low']))
        chosen_full = np.isin(np.arange(len(full)), example['selected_full'])
        chosen_low = np.isin(np.arange(len(full)), example['selected_low'])
        both = chosen_full & chosen_low
        for mask, colour, label in ((~chosen_full & ~chosen_low, '0.7', 'neither'),
                                    (chosen_full & ~chosen_low, 'tab:blue', 'full only'),
                                    (chosen_low & ~chosen_full, 'tab:orange', 'low only'),
                                    (both, 'tab:green', 'both')):
            ax.scatter(full[mask], low[mask], s=8, c=colour, label=label)
        metrics = entry['learners']['mixed']['metrics']
        ax.set_title(f'{name} (mixed-resolution learner), low: {entry["low_resolution"]}\n'
                     f'Spearman {metrics["spearman_learnability"]["mean"]:.3f}, top-k overlap '
                     f'{metrics["topk_overlap"]["mean"]:.3f} (means over super-batches)',
                     fontsize=9)
        ax.set_xlabel('rank of learnability at full resolution (one super-batch)')
        ax.set_ylabel('rank of learnability at low resolution')
        ax.legend(fontsize=7, title='selected (top-k)', title_fontsize=7)
    ax = axes[-1]
    labels, bars = [], {'Spearman, learnability': [], 'Spearman, learner loss': [],
                        'top-k overlap': [], 'scoring FLOPs, low / full': []}
    for name, entry in models.items():
        for training, learner in entry['learners'].items():
            labels.append(f'{name}\ntrained {training}')
            bars['Spearman, learnability'].append(
                learner['metrics']['spearman_learnability']['mean'])
            bars['Spearman, learner loss'].append(
                learner['metrics']['spearman_learner_loss']['mean'])
            bars['top-k overlap'].append(learner['metrics']['topk_overlap']['mean'])
            bars['scoring FLOPs, low / full'].append(
                learner['score_flops_per_super_batch']['learner_ratio'])
    x = np.arange(len(labels))
    width = 0.2
    for i, (label, values) in enumerate(bars.items()):
        ax.bar(x + (i - 1.5) * width, values, width, label=label)
    ax.axhline(results['random_topk_overlap'], color='k', lw=0.8, ls=':',
               label='overlap of random sets')
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7, ncol=2, loc='upper center')
    ax.set_title('cheap scoring: agreement and cost', fontsize=9)
    report.save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> tuple[FlexiConfig, Any]:
    """The configuration and the other arguments (``out``)."""
    parser = report.benchmark_parser('flexi', __doc__.split('\n\n')[0], threads=1,
                              quick='20,000 training images, 300 steps per model, 10 '
                                    'super-batches, 2,000 test images')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the split, the noise, the initialisations and the order')
    args = parser.parse_args(argv)
    return replace(QUICK if args.quick else FlexiConfig(), seed=args.seed), args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``flexi.json`` and ``flexi.png``."""
    config, args = parse_args(argv)
    run_record = report.start_run('flexi', argv, threads=args.threads or 1)
    results = {**run(config), 'quick': bool(args.quick)}
    results['run'] = report.finish_run(run_record)
    print(_table(results))
    report.write_report(results, *report.report_paths(args.out, 'flexi', args.quick), _plot)
    return results


if __name__ == '__main__':
    main()

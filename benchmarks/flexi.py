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

Results go to ``results/flexi/`` (``flexi.json`` and ``flexi.png``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmarks.fashion_mnist import (
    load_fashion_mnist,
    split_clean,
    symmetric_label_noise,
    to_float_images,
)
from benchmarks.models import count_parameters
from benchmarks.vit import make_vit
from jest_stream.criteria import get_criterion
from jest_stream.flexi import (
    FlexiForward,
    LowResolution,
    MixedResolution,
    mixed_resolution_loss,
)
from jest_stream.flops import score_flops, train_step_flops
from jest_stream.scoring import ClassificationScorer
from jest_stream.selection import topk_select

__all__ = [
    'FlexiConfig',
    'PooledCNN',
    'accuracy',
    'main',
    'make_pooled_cnn',
    'parse_args',
    'rankdata',
    'run',
    'spearman',
    'train_mixed',
]

REPO_ROOT = Path(__file__).resolve().parents[1]


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


class PooledCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels), global average pooling, one linear layer.

    The global pooling makes it accept any resolution, so it can score (and train) on
    downsampled images.

    Args:
        n_classes (int): Number of outputs.
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images.

        Args:
            x (Tensor[B, 1, H, W]): Normalised float images, any size from 4x4.

        Returns:
            Tensor[B, n_classes]: Logits.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


def make_pooled_cnn(seed: int) -> PooledCNN:
    """A :class:`PooledCNN` initialised from a private generator seeded with ``seed``."""
    model = PooledCNN()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
                nn.init.zeros_(module.bias)
        model.head.weight.mul_(0.1)
    return model


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing the mean of their ranks.

    Args:
        values (np.ndarray): ``[n]`` numbers.

    Returns:
        np.ndarray: float64 ``[n]`` ranks.
    """
    values = np.asarray(values)
    order = np.argsort(values, kind='stable')
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of the ranks (ties averaged).

    Args:
        a (np.ndarray): ``[n]`` numbers.
        b (np.ndarray): ``[n]`` numbers.

    Returns:
        float: In ``[-1, 1]``.
    """
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def train_mixed(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int,
                batch_size: int, lr: float, seed: int, mixed: MixedResolution | None,
                desc: str) -> list[float]:
    """Train with AdamW on in-memory arrays, at full or at mixed resolution.

    Every batch is a dict ``{'image': uint8[b, 28, 28], 'label': int64[b]}``, split by
    ``mixed`` when given and run through :func:`mixed_resolution_loss`: the loop a user of
    ``SelectiveLoader(batch_transform=MixedResolution(...))`` writes.

    Args:
        model (nn.Module): Trained in place.
        images (np.ndarray): uint8 ``[N, 28, 28]``.
        labels (np.ndarray): int64 ``[N]``.
        steps (int): Optimizer steps.
        batch_size (int): Examples per step.
        lr (float): Learning rate.
        seed (int): Seed of the private batch order.
        mixed (MixedResolution | None): The mixed-resolution split, or None for full resolution.
        desc (str): Progress-bar label.

    Returns:
        list[float]: The loss of every step.
    """
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    images_t, labels_t = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    order, position, losses = rng.permutation(len(labels)), 0, []
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(labels)), 0
        rows = torch.from_numpy(order[position:position + batch_size])
        position += batch_size
        batch = {'image': images_t[rows], 'label': labels_t[rows]}
        if mixed is not None:
            batch = mixed(batch)
        loss = mixed_resolution_loss(model, batch, F.cross_entropy, preprocess=to_float_images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(forward: Callable[[Tensor], Tensor], model: nn.Module, images: np.ndarray,
             labels: np.ndarray, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``forward(uint8 images) -> logits``, the model in eval mode.

    Args:
        forward (Callable): Maps uint8 ``[n, 28, 28]`` to logits ``[n, classes]``.
        model (nn.Module): The model ``forward`` runs (put in eval mode, then restored).
        images (np.ndarray): uint8 ``[N, 28, 28]``.
        labels (np.ndarray): int64 ``[N]``.
        batch_size (int): Images per forward pass.

    Returns:
        float: Fraction correct.
    """
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(labels), batch_size):
            logits = forward(torch.as_tensor(images[start:start + batch_size]))
            target = torch.as_tensor(labels[start:start + batch_size])
            correct += int((logits.argmax(1) == target).sum())
        return correct / len(labels)
    finally:
        model.train(was_training)


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
        rows['spearman_learnability'].append(spearman(learn_full, learn_low))
        rows['spearman_learner_loss'].append(spearman(loss_full, loss_low))
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

    def step(mixed: MixedResolution | None) -> int:
        data = batch if mixed is None else mixed(batch)
        return train_step_flops(model, data, lambda m, b: mixed_resolution_loss(
            m, b, F.cross_entropy, preprocess=to_float_images))

    full, mixed = step(None), step(family.mixed)
    return {'full': full, 'mixed': mixed, 'ratio': mixed / full}


def run(config: FlexiConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train the models, compare full and cheap scoring, and return every number.

    Args:
        config (FlexiConfig): The settings.
        progress (bool): Print progress.

    Returns:
        dict: JSON-ready results.
    """
    say = print if progress else (lambda *_: None)
    start = time.perf_counter()
    images, labels = load_fashion_mnist('train')
    test_images, test_labels = load_fashion_mnist('test', limit=config.n_test)
    pool, clean = split_clean(len(labels), config.clean_fraction,
                              seed=np.random.SeedSequence([config.seed, 0]))
    noisy, corrupted = symmetric_label_noise(labels[pool], config.noise_rate,
                                             seed=np.random.SeedSequence([config.seed, 1]))
    order = np.random.default_rng(np.random.SeedSequence([config.seed, 2])).permutation(len(pool))
    train_rows = order[:config.n_train]
    held_out = order[config.n_train:]
    n_held = config.n_super_batches * config.super_batch_size
    if len(held_out) < n_held:
        raise ValueError(f'{len(held_out)} held-out pool examples cannot fill '
                         f'{config.n_super_batches} super-batches of {config.super_batch_size}; '
                         f'lower n_train or n_super_batches')
    pool_images = torch.as_tensor(images[pool])
    pool_labels = torch.as_tensor(noisy)
    super_batches, bad = [], []
    for i in range(config.n_super_batches):
        rows = torch.from_numpy(held_out[i * config.super_batch_size:
                                         (i + 1) * config.super_batch_size])
        super_batches.append({'image': pool_images[rows], 'label': pool_labels[rows]})
        bad.append(corrupted[rows.numpy()])
    say(f'data: {len(clean)} clean, {config.n_train} noisy training, {n_held} held out '
        f'({time.perf_counter() - start:.1f} s)')

    results: dict[str, Any] = {}
    train_images, train_labels = images[pool][train_rows], noisy[train_rows]
    for family in _families(config):
        family_start = time.perf_counter()
        reference = family.make(config.seed + 1000)
        train_mixed(reference, images[clean], labels[clean], steps=family.steps,
                    batch_size=config.batch_size, lr=family.lr, seed=config.seed + 1,
                    mixed=None, desc=f'{family.name} reference')
        reference.eval()
        ref_acc = accuracy(lambda x, m=reference, f=family: f.full_call(m, x), reference,
                           test_images, test_labels)
        entry: dict[str, Any] = {'low_resolution': family.low_label,
                                 'parameters': count_parameters(reference),
                                 'reference_test_accuracy': ref_acc, 'learners': {}}
        for training in ('full', 'mixed'):
            learner = family.make(config.seed)
            losses = train_mixed(learner, train_images, train_labels,
                                 steps=family.steps, batch_size=config.batch_size,
                                 lr=family.lr, seed=config.seed + 2,
                                 mixed=family.mixed if training == 'mixed' else None,
                                 desc=f'{family.name} learner ({training})')
            compared = _compare_scorings(learner, reference, family, super_batches, bad,
                                         config.batch_size)
            compared['test_accuracy_full'] = accuracy(
                lambda x, m=learner, f=family: f.full_call(m, x), learner, test_images,
                test_labels)
            compared['test_accuracy_low'] = accuracy(
                lambda x, m=learner, f=family: f.low_call(m, x), learner, test_images,
                test_labels)
            compared['final_train_loss'] = float(np.mean(losses[-20:]))
            entry['learners'][training] = compared
            m = compared['metrics']
            say(f'{family.name} trained at {training} resolution: spearman '
                f'{m["spearman_learnability"]["mean"]:.3f}, top-k overlap '
                f'{m["topk_overlap"]["mean"]:.3f}')
        entry['train_flops_per_step'] = _train_flops(
            learner, family, super_batches[0]['image'][:config.batch_size],
            super_batches[0]['label'][:config.batch_size])
        entry['seconds'] = time.perf_counter() - family_start
        results[family.name] = entry
    return {
        'config': asdict(config),
        'environment': {'torch': torch.__version__, 'threads': torch.get_num_threads(),
                        'python': platform.python_version(), 'machine': platform.machine()},
        'random_topk_overlap': config.batch_size / config.super_batch_size,
        'models': results,
        'seconds': time.perf_counter() - start,
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
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='a run of under 3 minutes')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', type=Path, default=REPO_ROOT / 'benchmarks' / 'results' / 'flexi')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (1 is fastest for these small matrices '
                             'on a shared machine)')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``flexi.json`` and ``flexi.png``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FlexiConfig()
    config = FlexiConfig(**{**asdict(base), 'seed': args.seed})
    results = run(config)
    results['quick'] = bool(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'flexi.json').write_text(json.dumps(results, indent=2) + '\n')
    _plot(results, args.out / 'flexi.png')
    print(_table(results))
    print(f'\n{results["seconds"]:.0f} s; wrote {args.out / "flexi.json"} and '
          f'{args.out / "flexi.png"}')
    return results


if __name__ == '__main__':
    main()

"""Learning efficiency: steps and FLOPs to reach uniform sampling's final accuracy.

Run it from the repository root::

    python -m benchmarks.learning_efficiency --quick     # ratio 0.8, 3 seeds, 200 steps: ~3 min
    python -m benchmarks.learning_efficiency             # ratios 0.8, 0.9, 0.5, 400 steps: ~20 min
    python -m benchmarks.learning_efficiency --task contrastive --ratios 0.9 --seeds 0 1 2

Two tasks on real Fashion-MNIST, each read through ``jest_stream.SelectiveLoader`` over a
``SampleIdStreamingDataset`` of MDS shards (super-batches of ``B = b / (1 - f)``, sub-batches
of ``b``), each with a reference model trained only on a clean 5% split:

- **classification**: the pool has 40% symmetric label noise; the learner is a small CNN;
  methods ``uniform``, ``hard_learner``, ``easy_reference`` and ``learnability`` (criteria of
  jest_stream, all selected with the same method, ``joint`` by default: for per-example
  losses that is blocked sampling from the softmax of the scores). Metric: clean test
  accuracy.
- **contrastive**: a two-tower image-text model (:mod:`benchmarks.contrastive`) with the
  sigmoid loss on a pool whose captions are 40% mismatched; methods ``uniform``,
  ``independent`` (learnability, ``method='sample'`` on the per-example marginals of the
  pair scores), ``joint`` (learnability, ``method='joint'``: JEST) and ``flexi_joint``
  (joint, with the learner scored at half resolution and half of every sub-batch trained
  at half resolution). Metric: zero-shot test accuracy.

Every method of a seed starts from the same initialisation and reads the same sequence of
super-batches; only the selection differs. The reference's outputs over the pool are
computed once and looked up by sample id (the role of jest_stream's offline reference
cache), so a step costs the learner's scoring forward, the selection and the training
step; the FLOPs of each are counted once per configuration with
``torch.utils.flop_counter`` (:mod:`jest_stream.flops`). The FLOPs with a live reference
forward are reported beside them.

Results go to ``benchmarks/results/learning_efficiency/`` (``learning_efficiency.json`` and
``.png``, or ``learning_efficiency_quick.*``); the JSON is rewritten after every finished
run, so an interrupted run leaves usable results, and ``--resume`` continues one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmarks.contrastive import (
    CaptionData,
    ConvTrunk,
    TwoTower,
    make_two_tower,
    pool_captions,
    prepare_captions,
    sigmoid_loss,
    train_two_tower,
    zero_shot_accuracy,
)
from benchmarks.fashion_mnist import (
    N_CLASSES,
    PreparedData,
    batch_logits,
    prepare,
    read_columns,
    to_float_images,
)
from benchmarks.models import count_parameters, evaluate, train_classifier
from benchmarks.records import write_record
from jest_stream import (
    ClassificationScorer,
    ContrastiveScorer,
    SampleIdStreamingDataset,
    SelectiveLoader,
    get_criterion,
    super_batch_size_for,
)
from jest_stream.flexi import LowResolution, MixedResolution, mixed_resolution_forward
from jest_stream.flops import count_flops, forward_flops, score_flops, train_step_flops
from jest_stream.scores import select

__all__ = [
    'Config',
    'MethodSpec',
    'METHODS',
    'QUICK',
    'StoredReference',
    'TASKS',
    'TinyClassifier',
    'main',
    'make_classifier',
    'parse_args',
    'run_benchmark',
    'steps_to_target',
    'summarise',
]

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ('classification', 'contrastive')
# Joint learnability is blue in both tasks.
COLOURS = {'uniform': 'tab:gray', 'hard_learner': 'tab:red', 'easy_reference': 'tab:orange',
           'learnability': 'tab:blue', 'independent': 'tab:orange', 'joint': 'tab:blue',
           'flexi_joint': 'tab:purple'}


@dataclass(frozen=True)
class MethodSpec:
    """How one compared method selects and trains.

    Attributes:
        criterion (str): jest_stream criterion (``uniform`` scores nothing).
        method (str | None): Selection method; None takes the task's default.
        flexi (bool): Score the learner at low resolution and train half of every
            sub-batch at low resolution.
        label (str): Legend text.
    """

    criterion: str
    method: str | None
    flexi: bool
    label: str


METHODS: dict[str, dict[str, MethodSpec]] = {
    'classification': {
        'uniform': MethodSpec('uniform', 'uniform', False, 'uniform'),
        'hard_learner': MethodSpec('hard_learner', None, False, 'hard learner'),
        'easy_reference': MethodSpec('easy_reference', None, False, 'easy reference'),
        'learnability': MethodSpec('learnability', None, False, 'learnability'),
    },
    'contrastive': {
        'uniform': MethodSpec('uniform', 'uniform', False, 'uniform'),
        'independent': MethodSpec('learnability', 'sample', False,
                                  'independent learnability (sample)'),
        'joint': MethodSpec('learnability', 'joint', False, 'joint learnability (JEST)'),
        'flexi_joint': MethodSpec('learnability', 'joint', True,
                                  'joint, Flexi (low-res scoring, mixed-res training)'),
    },
}


@dataclass(frozen=True)
class Config:
    """Every setting of a benchmark run (written into the results file).

    Attributes:
        tasks (tuple[str, ...]): ``classification`` and/or ``contrastive``.
        ratios (tuple[float, ...]): Filter ratios, run in this order.
        seeds (tuple[int, ...]): Seeds of the learners' initialisation, the data order and
            the selection; every method of a seed shares them.
        steps (int): Optimizer steps per run (the same budget for every method).
        eval_every (int): Steps between evaluations.
        eval_size (int | None): Test images evaluated (a fixed random subset); None: all.
        batch_size (int): Sub-batch size ``b``.
        lr (float): Adam learning rate of the learners (constant).
        temperature (float): Softmax temperature of the sampled selections.
        n_chunks (int): Chunks of the joint sampler.
        classification_method (str): Selection method of the scored classification criteria.
        flexi_factor (int): Downsampling factor of Flexi scoring and of low-res training rows.
        low_fraction (float): Share of each Flexi sub-batch trained at low resolution.
        reference_steps (int): Optimizer steps of each reference on the clean split.
        reference_lr (float): Adam learning rate of the references.
        reference_batch_size (int): Batch size of the references' training.
        noise_rate (float): Label noise of the pool (and so the mismatched captions).
        clean_fraction (float): Share of the train split kept clean for the references.
        data_seed (int): Seed of the split, the noise, the captions and the test subset.
        num_workers (int): DataLoader workers reading super-batches.
        threads (int): torch intra-op threads of the training process.
        quick (bool): The short configuration (:data:`QUICK`).
        data_dir (str): Where the MDS shards are built once.
    """

    tasks: tuple[str, ...] = TASKS
    ratios: tuple[float, ...] = (0.8, 0.9, 0.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    eval_every: int = 20
    eval_size: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    temperature: float = 1.0
    n_chunks: int = 16
    classification_method: str = 'joint'
    flexi_factor: int = 2
    low_fraction: float = 0.5
    reference_steps: int = 1000
    reference_lr: float = 2e-3
    reference_batch_size: int = 64
    noise_rate: float = 0.4
    clean_fraction: float = 0.05
    data_seed: int = 0
    num_workers: int = 1
    threads: int = 1
    quick: bool = False
    data_dir: str = str(REPO_ROOT / 'data' / 'fashion-mnist')

    def super_batch_size(self, ratio: float) -> int:
        """``B`` of a filter ratio."""
        return super_batch_size_for(self.batch_size, ratio)

    def method(self, task: str, name: str) -> MethodSpec:
        """The spec of a method, with the task's default selection method filled in."""
        spec = METHODS[task][name]
        if spec.method is None:
            spec = replace(spec, method=self.classification_method)
        return spec

    def checkpoints(self) -> list[int]:
        """Steps at which accuracy is measured: 0, every ``eval_every``, and the last."""
        return sorted({0, *range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


QUICK = Config(ratios=(0.8,), steps=200, eval_every=10, eval_size=2000, reference_steps=600,
               quick=True)


# Models and references


class TinyClassifier(nn.Module):
    """:class:`benchmarks.contrastive.ConvTrunk`, a hidden layer and the class logits.

    About 40k parameters; a forward pass over 320 images takes a few milliseconds on one
    CPU core, so scoring super-batches stays cheap next to reading them.

    Args:
        hidden (int): Width of the hidden layer.
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = ConvTrunk()
        self.fc1 = nn.Linear(self.trunk.out_features, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``Tensor[B, 10]`` of normalised images ``Tensor[B, 1, H, W]``."""
        return self.fc2(F.relu(self.fc1(self.trunk(x))))


def make_classifier(seed: int) -> TinyClassifier:
    """A :class:`TinyClassifier` whose initial weights depend only on ``seed``."""
    model = TinyClassifier()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
                nn.init.zeros_(module.bias)
        # Small initial logits: every example starts near loss log(10).
        model.fc2.weight.mul_(0.1)
    return model


class StoredReference:
    """Reference outputs computed once over the pool, looked up by global sample id.

    What jest_stream's offline reference cache provides, held in memory: with it the
    reference costs nothing per step. Each lookup checks that the batch's
    ``train_index`` column matches the stored one, so a misaligned table fails loudly
    instead of scoring with another sample's outputs.

    Args:
        outputs (dict[str, Tensor]): Per-sample outputs, pool order (``loss``, or
            ``image_emb`` and ``text_emb``).
        train_index (Tensor): int64 ``[N]`` the ``train_index`` column in pool order.
        constants (dict): Outputs that are not per sample (``temperature``, ``bias``).
    """

    def __init__(self, outputs: dict[str, Tensor], train_index: Tensor,
                 constants: dict[str, float] | None = None) -> None:
        self.table = outputs
        self.train_index = train_index
        self.constants = dict(constants or {})

    def outputs(self, batch: dict[str, Any], sample_ids: Tensor) -> dict[str, Any]:
        ids = sample_ids.cpu()
        if not torch.equal(self.train_index[ids], batch['train_index'].cpu()):
            raise RuntimeError('stored reference outputs are not aligned with the pool: the '
                               'sample ids of the StreamingDataset do not follow the stored order')
        return {**self.constants, **{name: values[ids] for name, values in self.table.items()}}


@dataclass
class TaskData:
    """What one task needs: the pool, the reference, evaluation and FLOPs probes."""

    task: str
    pool_dir: Path
    reference: nn.Module
    stored: StoredReference
    reference_accuracy: float
    evaluate: Callable[[nn.Module], float]
    probe: dict[str, Tensor]
    one_off_flops: dict[str, int]
    summary: dict[str, Any] = field(default_factory=dict)


def _evaluation_rows(n: int, size: int | None, seed: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(np.random.SeedSequence([seed, 5])).choice(
        n, size, replace=False))


def _probe(pool: dict[str, np.ndarray], rows: int, text: np.ndarray | None) -> dict[str, Tensor]:
    """The first ``rows`` pool samples as a collated batch, for counting FLOPs."""
    batch = {'image': torch.as_tensor(pool['image'][:rows]),
             'label': torch.as_tensor(pool['label'][:rows]),
             'train_index': torch.as_tensor(pool['train_index'][:rows])}
    if text is not None:
        batch['text'] = torch.as_tensor(text[:rows])
    return batch


@torch.no_grad()
def _in_chunks(fn: Callable[[slice], dict[str, Tensor]], n: int, size: int = 2000
               ) -> dict[str, Tensor]:
    parts = [fn(slice(start, start + size)) for start in range(0, n, size)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def prepare_classification(config: Config, data: PreparedData, pool: dict[str, np.ndarray],
                           eval_rows: np.ndarray, say: Callable[[str], None]) -> TaskData:
    """Train the classification reference on the clean split and store its pool losses."""
    clean = read_columns(data.clean_dir, ['image', 'label'])
    reference = make_classifier(10_000 + config.data_seed)
    train_classifier(reference, clean['image'], clean['label'], steps=config.reference_steps,
                     batch_size=config.reference_batch_size, lr=config.reference_lr,
                     seed=config.data_seed, progress=True, desc='classification reference')
    reference.eval()
    images, labels = data.test_images[eval_rows], data.test_labels[eval_rows]
    accuracy = evaluate(reference, images, labels)
    pool_images, pool_labels = torch.as_tensor(pool['image']), torch.as_tensor(pool['label'])
    losses = _in_chunks(lambda rows: {'loss': F.cross_entropy(
        reference(to_float_images(pool_images[rows])), pool_labels[rows], reduction='none')},
        len(pool_labels))
    probe = _probe(pool, config.reference_batch_size, None)
    one_off = {
        'reference_training': config.reference_steps * train_step_flops(
            reference, probe, lambda m, b: F.cross_entropy(batch_logits(m, b), b['label'])),
        'reference_annotation': len(pool_labels) * forward_flops(
            reference, to_float_images(probe['image'][:1])),
    }
    say(f'classification reference ({count_parameters(reference):,} parameters, clean split of '
        f'{len(clean["label"])}): test accuracy {accuracy:.4f}')
    return TaskData(
        task='classification', pool_dir=data.pool_dir, reference=reference,
        stored=StoredReference(losses, torch.as_tensor(pool['train_index'])),
        reference_accuracy=accuracy, evaluate=lambda model: evaluate(model, images, labels),
        probe=_probe(pool, max(config.super_batch_size(r) for r in config.ratios), None),
        one_off_flops=one_off,
        summary={'pool': data.summary(), 'learner_parameters': count_parameters(reference)})


def prepare_contrastive(config: Config, data: PreparedData, pool: dict[str, np.ndarray],
                        eval_rows: np.ndarray, say: Callable[[str], None]) -> TaskData:
    """Caption the pool (once), train the two-tower reference, store its pool embeddings."""
    captions: CaptionData = prepare_captions(
        data, Path(config.data_dir).with_name(Path(config.data_dir).name + '-captions'))
    text = pool_captions(pool['label'], data.seed)
    reference = make_two_tower(10_000 + config.data_seed)
    train_two_tower(reference, captions.clean_images, captions.clean_text,
                    steps=config.reference_steps, batch_size=config.reference_batch_size,
                    lr=config.reference_lr, seed=config.data_seed, progress=True,
                    desc='contrastive reference')
    reference.eval()
    images, labels = data.test_images[eval_rows], data.test_labels[eval_rows]
    accuracy = zero_shot_accuracy(reference, images, labels)
    pool_images, pool_text = torch.as_tensor(pool['image']), torch.as_tensor(text)

    def embed(rows: slice) -> dict[str, Tensor]:
        image_emb, text_emb, _, _ = reference(pool_images[rows], pool_text[rows])
        return {'image_emb': image_emb, 'text_emb': text_emb}

    table = _in_chunks(embed, len(pool_text))
    constants = {'temperature': float(reference.log_temperature.exp()),
                 'bias': float(reference.bias)}
    probe = _probe(pool, config.reference_batch_size, text)
    one_off = {
        'reference_training': config.reference_steps * train_step_flops(
            reference, probe, lambda m, b: sigmoid_loss(*m(b['image'], b['text']))),
        'reference_annotation': len(pool_text) * count_flops(
            reference, probe['image'][:1], probe['text'][:1])[1],
    }
    say(f'contrastive reference ({count_parameters(reference):,} parameters, clean split of '
        f'{len(captions.clean_labels)} captioned pairs): zero-shot accuracy {accuracy:.4f}; '
        f'pool {captions.n_pool} pairs, {captions.n_mismatched} mismatched')
    return TaskData(
        task='contrastive', pool_dir=captions.pool_dir, reference=reference,
        stored=StoredReference(table, torch.as_tensor(pool['train_index']), constants),
        reference_accuracy=accuracy,
        evaluate=lambda model: zero_shot_accuracy(model, images, labels),
        probe=_probe(pool, max(config.super_batch_size(r) for r in config.ratios), text),
        one_off_flops=one_off,
        summary={'captions': captions.summary(),
                 'learner_parameters': count_parameters(reference),
                 'reference_temperature': constants['temperature'],
                 'reference_bias': constants['bias']})


# One run


def _make_learner(task: str, seed: int) -> nn.Module:
    return make_classifier(seed) if task == 'classification' else make_two_tower(seed)


def _make_scorer(task: str, learner: nn.Module, reference: Any, spec: MethodSpec,
                 config: Config) -> Any:
    if spec.criterion == 'uniform':
        return None
    if task == 'classification':
        return ClassificationScorer(learner, reference, forward=batch_logits, target_key='label')
    return ContrastiveScorer(learner, reference, loss='sigmoid', image_key='image',
                             text_key='text',
                             input_transform=LowResolution(config.flexi_factor) if spec.flexi
                             else None)


def _training_loss(task: str) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    if task == 'classification':
        return lambda model, batch: F.cross_entropy(batch_logits(model, batch), batch['label'])

    def contrastive(model: TwoTower, batch: dict[str, Tensor]) -> Tensor:
        # Rows marked by MixedResolution run at their resolution; other batches at full.
        image_emb = mixed_resolution_forward(model.image, batch, key='image',
                                             preprocess=to_float_images)
        return sigmoid_loss(image_emb, model.text(batch['text']), model.log_temperature.exp(),
                            model.bias)

    return contrastive


def _mixed(spec: MethodSpec, config: Config) -> MixedResolution | None:
    if not spec.flexi:
        return None
    return MixedResolution(key='image', low_fraction=config.low_fraction,
                           factor=config.flexi_factor)


def configuration_flops(task: TaskData, name: str, ratio: float, config: Config) -> dict[str, int]:
    """FLOPs of one step of a configuration, counted once on real pool samples.

    Returns:
        dict: ``train`` (forward and backward of a sub-batch, at mixed resolution for
        Flexi), ``learner_scoring`` (the learner's scoring forward over the super-batch),
        ``selection`` (pair or per-example scores and the sampler), ``reference_forward``
        (what a live reference would cost over the super-batch; 0 with stored outputs),
        ``per_step`` (train + learner_scoring + selection: the stored reference) and
        ``per_step_live_reference``.
    """
    spec = config.method(task.task, name)
    big = config.super_batch_size(ratio)
    learner = _make_learner(task.task, 0)
    super_batch = {key: value[:big] for key, value in task.probe.items()}
    sub_batch = {key: value[:config.batch_size] for key, value in super_batch.items()}
    mixed = _mixed(spec, config)
    counts = {'train': train_step_flops(learner, mixed(sub_batch) if mixed else sub_batch,
                                        _training_loss(task.task))}
    if spec.criterion == 'uniform':
        counts.update(learner_scoring=0, selection=0, reference_forward=0)
    else:
        criterion = get_criterion(spec.criterion)
        scorer = _make_scorer(task.task, learner, task.stored, spec, config)
        counts['learner_scoring'] = score_flops(scorer, super_batch, criterion='hard_learner')
        ids = torch.arange(big)
        scores = scorer(super_batch, ids, criterion)
        counts['selection'] = count_flops(
            select, scores, big, config.batch_size, method=spec.method,
            n_chunks=config.n_chunks, temperature=config.temperature,
            generator=torch.Generator().manual_seed(0))[1]
        live = _make_scorer(task.task, learner, task.reference, spec, config)
        with_reference = score_flops(live, super_batch, criterion=spec.criterion)
        counts['reference_forward'] = (with_reference if not criterion.needs_learner
                                       else with_reference - counts['learner_scoring'])
        if not criterion.needs_learner:
            counts['learner_scoring'] = 0
    counts['per_step'] = counts['train'] + counts['learner_scoring'] + counts['selection']
    counts['per_step_live_reference'] = counts['per_step'] + counts['reference_forward']
    return counts


def run_one(task: TaskData, name: str, ratio: float, seed: int, config: Config
            ) -> dict[str, Any]:
    """Train a fresh learner for ``config.steps`` on sub-batches chosen by method ``name``.

    Returns:
        dict: ``task``, ``method``, ``ratio``, ``seed``, ``steps`` (checkpoints),
        ``accuracy`` (at each checkpoint), ``noisy_fraction`` (corrupted labels or
        mismatched captions among the examples trained on, per interval between
        checkpoints), ``noisy_fraction_overall``, ``train_seconds`` (the loop, evaluation
        excluded), ``seconds_per_step`` and ``loader`` (telemetry totals).
    """
    spec = config.method(task.task, name)
    learner = _make_learner(task.task, seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    big = config.super_batch_size(ratio)
    dataset = SampleIdStreamingDataset(local=str(task.pool_dir), batch_size=big, shuffle=True,
                                       shuffle_seed=seed, num_canonical_nodes=1)
    scorer = _make_scorer(task.task, learner, task.stored, spec, config)
    loader = SelectiveLoader(dataset, batch_size=config.batch_size, filter_ratio=ratio,
                             scorer=scorer, criterion=spec.criterion, method=spec.method,
                             n_chunks=config.n_chunks, temperature=config.temperature,
                             seed=seed, num_workers=config.num_workers,
                             batch_transform=_mixed(spec, config))
    loss_fn = _training_loss(task.task)
    noisy_key = 'corrupted' if task.task == 'classification' else 'mismatched'
    checkpoints = set(config.checkpoints())
    record: dict[str, Any] = {'task': task.task, 'method': name, 'ratio': ratio, 'seed': seed,
                              'steps': [0], 'accuracy': [task.evaluate(learner)],
                              'noisy_fraction': []}
    step = noisy_window = seen_window = noisy_total = 0
    train_seconds = 0.0
    bar = tqdm(total=config.steps, desc=f'{task.task[:5]} f={ratio} {name} s{seed}',
               unit='step', leave=False)
    started = time.perf_counter()
    while step < config.steps:
        for batch in loader:
            loss = loss_fn(learner, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            noisy = int(batch[noisy_key].sum())
            noisy_window, noisy_total = noisy_window + noisy, noisy_total + noisy
            seen_window += config.batch_size
            bar.update()
            if step in checkpoints:
                train_seconds += time.perf_counter() - started
                record['steps'].append(step)
                record['accuracy'].append(task.evaluate(learner))
                record['noisy_fraction'].append(noisy_window / seen_window)
                noisy_window = seen_window = 0
                bar.set_postfix(acc=f'{record["accuracy"][-1]:.3f}')
                started = time.perf_counter()
            if step == config.steps:
                break
    bar.close()
    record['noisy_fraction_overall'] = noisy_total / (config.steps * config.batch_size)
    record['train_seconds'] = train_seconds
    record['seconds_per_step'] = train_seconds / config.steps
    record['loader'] = loader.telemetry.summary()
    # A StreamingDataset holds shared memory until it is collected: release it before the
    # next run opens the same pool.
    del loader, dataset, scorer
    gc.collect()
    return record


# Summaries


def steps_to_target(steps: Sequence[int], accuracy: Sequence[float], target: float
                    ) -> int | None:
    """The first checkpoint at which ``accuracy`` reaches ``target``; None if none does."""
    for step, value in zip(steps, accuracy, strict=True):
        if value >= target:
            return int(step)
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], flops: dict[str, Any], config: Config
              ) -> dict[str, Any]:
    """Per task and ratio: curves over seeds, steps and FLOPs to uniform's final accuracy.

    A task and ratio is summarised once its uniform runs exist; only seeds whose uniform
    run finished count, and each method over the seeds it has finished.

    Returns:
        dict: ``{task: {ratio: {...}}}``, see the schema in ``benchmarks/README.md``.
    """
    out: dict[str, Any] = {}
    for task in config.tasks:
        for ratio in config.ratios:
            group = [r for r in runs if r['task'] == task and r['ratio'] == ratio]
            uniform = {r['seed']: r for r in group if r['method'] == 'uniform'}
            if not uniform:
                continue
            budget = config.steps
            target = _mean_std([r['accuracy'][-1] for r in uniform.values()])[0]
            entry: dict[str, Any] = {'target_accuracy': target, 'budget_steps': budget,
                                     'super_batch_size': config.super_batch_size(ratio),
                                     'methods': {}}
            for name in METHODS[task]:
                mine = [r for r in group if r['method'] == name and r['seed'] in uniform]
                if not mine:
                    continue
                steps = mine[0]['steps']
                curves = np.asarray([r['accuracy'] for r in mine])
                mean = curves.mean(0)
                std = curves.std(0, ddof=1) if len(mine) > 1 else np.zeros_like(mean)
                reached = steps_to_target(steps, mean.tolist(), target)
                per_seed = {}
                for r in mine:
                    own_target = uniform[r['seed']]['accuracy'][-1]
                    seed_steps = steps_to_target(steps, r['accuracy'], own_target)
                    per_seed[str(r['seed'])] = {
                        'target_accuracy': own_target, 'steps_to_target': seed_steps,
                        'speedup_steps': budget / seed_steps if seed_steps else None}
                per_step = flops[task][str(ratio)][name]['per_step']
                per_step_live = flops[task][str(ratio)][name]['per_step_live_reference']
                uniform_flops = budget * flops[task][str(ratio)]['uniform']['per_step']
                speedups = [s['speedup_steps'] for s in per_seed.values()]
                finite = [s for s in speedups if s is not None]
                entry['methods'][name] = {
                    'seeds': [r['seed'] for r in mine],
                    'steps': steps,
                    'accuracy_mean': mean.tolist(),
                    'accuracy_std': std.tolist(),
                    'final_accuracy_mean': float(mean[-1]),
                    'final_accuracy_std': float(std[-1]),
                    'steps_to_target': reached,
                    'first_checkpoint': reached is not None and reached == steps[1],
                    'speedup_steps': budget / reached if reached else None,
                    'flops_per_step': per_step,
                    'flops_to_target': reached * per_step if reached else None,
                    'speedup_flops': uniform_flops / (reached * per_step) if reached else None,
                    'flops_to_target_live_reference': reached * per_step_live if reached
                    else None,
                    'speedup_flops_live_reference': uniform_flops / (reached * per_step_live)
                    if reached else None,
                    'per_seed': per_seed,
                    'speedup_steps_per_seed_mean': (_mean_std(finite)[0] if finite else None),
                    'speedup_steps_per_seed_std': (_mean_std(finite)[1] if finite else None),
                    'seeds_reaching_target': len(finite),
                    'noisy_fraction_mean': _mean_std(
                        [r['noisy_fraction_overall'] for r in mine])[0],
                    'seconds_per_step_mean': _mean_std([r['seconds_per_step'] for r in mine])[0],
                }
            uniform_entry = entry['methods']['uniform']
            entry['uniform_first_reach_steps'] = uniform_entry['steps_to_target']
            out.setdefault(task, {})[str(ratio)] = entry
    return out


def _cell(value: float | None, fmt: str, missing: str = '-') -> str:
    return missing if value is None else format(value, fmt)


def format_table(results: dict[str, Any]) -> str:
    """The summary as a text table, one block per task and ratio."""
    lines = []
    for task, by_ratio in results['summary'].items():
        for ratio, entry in sorted(by_ratio.items(), key=lambda kv: float(kv[0])):
            n_seeds = len(entry['methods']['uniform']['seeds'])
            lines.append(
                f'{task}, filter ratio {ratio} (b={results["config"]["batch_size"]}, '
                f'B={entry["super_batch_size"]}), {n_seeds} seed(s): target = uniform final '
                f'{entry["target_accuracy"]:.4f} at {entry["budget_steps"]} steps; reference '
                f'{results["tasks"][task]["reference_accuracy"]:.4f}')
            head = (f'  {"method":<15} {"final acc":>15} {"steps→tgt":>9} {"speedup":>8} '
                    f'{"per seed":>17} {"GFLOP/step":>10} {"FLOP spdup":>10} {"live ref":>8} '
                    f'{"noisy":>6} {"s/step":>7}')
            lines.append(head)
            for name, m in entry['methods'].items():
                reached = m['steps_to_target']
                if name == 'uniform':
                    # Its steps→tgt is where its own mean curve first touches its final value.
                    speed = 'base'
                elif reached is None:
                    speed = 'n/r'
                else:
                    speed = f'{"≥" if m["first_checkpoint"] else ""}{m["speedup_steps"]:.1f}x'

                if name == 'uniform':
                    per_seed = 'base'
                elif m['seeds_reaching_target']:
                    per_seed = (f'{m["speedup_steps_per_seed_mean"]:.1f}±'
                                f'{m["speedup_steps_per_seed_std"]:.1f}x '
                                f'({m["seeds_reaching_target"]}/{len(m["seeds"])})')
                else:
                    per_seed = f'n/r (0/{len(m["seeds"])})'

                flop_speedups = ['base', 'base'] if name == 'uniform' else [
                    f'{_cell(m[key], ".2f")}x'
                    for key in ('speedup_flops', 'speedup_flops_live_reference')]
                lines.append(
                    f'  {name:<15} {m["final_accuracy_mean"]:.4f}±{m["final_accuracy_std"]:.4f}'
                    f' {_cell(reached, "d", "n/r"):>9} {speed:>8} {per_seed:>17} '
                    f'{m["flops_per_step"] / 1e9:>10.3f} '
                    f'{flop_speedups[0]:>10} {flop_speedups[1]:>8} '
                    f'{m["noisy_fraction_mean"]:>6.3f} {m["seconds_per_step_mean"]:>7.3f}')
            lines.append('')
    lines.append('steps→tgt: first checkpoint where the mean curve over seeds reaches the target '
                 '(n/r: not reached within the budget); speedup: budget / steps→tgt (≥: reached at '
                 'the first checkpoint); per seed: the same against each seed\'s own uniform final '
                 'accuracy, mean±std over the seeds that reach it (count in brackets); FLOP spdup: '
                 'uniform FLOPs over the method\'s FLOPs to the target, reference outputs stored; '
                 'live ref: the same with a live reference forward every step; noisy: corrupted '
                 'labels / mismatched captions among the examples trained on (pool: 0.40).')
    return '\n'.join(lines)


def plot(results: dict[str, Any], path: Path, *, x_axis: str = 'steps') -> None:
    """Learning curves, one panel per task and ratio (``x_axis``: ``steps`` or ``flops``)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    summary = results['summary']
    tasks = [t for t in results['config']['tasks'] if t in summary]
    ratios = sorted({float(r) for t in tasks for r in summary[t]})
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), len(ratios), figsize=(5.2 * len(ratios),
                                                                4.2 * len(tasks)),
                             squeeze=False)
    for row, task in enumerate(tasks):
        for col, ratio in enumerate(ratios):
            ax = axes[row][col]
            entry = summary[task].get(str(ratio))
            if entry is None:
                ax.set_visible(False)
                continue
            for name, m in entry['methods'].items():
                colour = COLOURS[name]
                steps = np.asarray(m['steps'], dtype=np.float64)
                x = steps if x_axis == 'steps' else steps * m['flops_per_step'] / 1e12
                mean, std = np.asarray(m['accuracy_mean']), np.asarray(m['accuracy_std'])
                label = METHODS[task][name].label
                if name != 'uniform' and m['speedup_steps']:
                    label += f' ({m["speedup_steps"]:.1f}x fewer steps)'
                ax.plot(x, mean, color=colour, lw=1.5, label=label)
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15)
            ax.axhline(entry['target_accuracy'], color='k', ls=':', lw=1,
                       label='target: uniform final')
            ax.axhline(results['tasks'][task]['reference_accuracy'], color='tab:olive', ls='--',
                       lw=1, label='reference (clean 5%)')
            metric = 'clean test accuracy' if task == 'classification' else 'zero-shot accuracy'
            ax.set(xlabel='optimizer step' if x_axis == 'steps' else 'TFLOPs (stored reference)',
                   ylabel=metric, title=f'{task}, filter ratio {ratio} '
                                        f'(B={entry["super_batch_size"]})')
            low = min(min(m['accuracy_mean'][1:]) for m in entry['methods'].values())
            ax.set_ylim(max(0.0, low - 0.05), None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc='lower right')
    fig.suptitle(f'Fashion-MNIST, 40% noisy labels / mismatched captions, sub-batch '
                 f'{results["config"]["batch_size"]}\nmean ± std over seeds; speedup = budget / '
                 f'steps to reach the target', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Driver


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The configuration and the other arguments (``out``, ``resume``, ``replot``)."""
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.learning_efficiency',
        description='Steps and FLOPs to reach uniform sampling\'s final accuracy, for jest_stream '
                    'selection on noisy Fashion-MNIST (classification and two-tower contrastive).')
    parser.add_argument('--quick', action='store_true',
                        help='ratio 0.8, 3 seeds, 200 steps, 2,000 test images (about 3 minutes '
                             'on two idle CPU cores)')
    parser.add_argument('--task', choices=(*TASKS, 'both'), default='both')
    parser.add_argument('--seeds', type=int, nargs='+', default=None)
    parser.add_argument('--ratios', type=float, nargs='+', default=None,
                        help='filter ratios (default 0.8 0.9 0.5; --quick: 0.8)')
    parser.add_argument('--steps', type=int, default=None, help='optimizer steps per run')
    parser.add_argument('--eval-every', type=int, default=None)
    parser.add_argument('--eval-size', type=int, default=None,
                        help='test images per evaluation (default: all; --quick: 2000)')
    parser.add_argument('--batch-size', type=int, default=None, help='sub-batch size b')
    parser.add_argument('--num-workers', type=int, default=None)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default 1)')
    parser.add_argument('--data-dir', type=Path, default=None)
    parser.add_argument('--out', type=Path, default=REPO_ROOT / 'benchmarks' / 'results'
                        / 'learning_efficiency')
    parser.add_argument('--replot', action='store_true',
                        help='only redraw the plots and print the table of the existing results '
                             'file of this configuration (finished or not)')
    parser.add_argument('--clean-shm', action='store_true',
                        help="run streaming's clean_stale_shared_memory() first: it unlinks the "
                             'streaming segments of every process on the machine, so use it only '
                             'when no other streaming job runs (a killed run of this benchmark '
                             'does not need it: its local datasets skip stale segments)')
    parser.add_argument('--resume', action='store_true',
                        help='keep the finished runs of an existing results file of the same '
                             'configuration and run only the missing ones')
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Config()
    overrides: dict[str, Any] = {
        'tasks': TASKS if args.task == 'both' else (args.task,),
        'seeds': tuple(args.seeds) if args.seeds else None,
        'ratios': tuple(args.ratios) if args.ratios else None,
        'steps': args.steps, 'eval_every': args.eval_every, 'eval_size': args.eval_size,
        'batch_size': args.batch_size, 'num_workers': args.num_workers, 'threads': args.threads,
        'data_dir': str(args.data_dir) if args.data_dir else None,
    }
    config = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if config.steps <= 0 or config.eval_every <= 0:
        parser.error('--steps and --eval-every must be positive')
    for ratio in config.ratios:
        try:
            config.super_batch_size(ratio)
        except ValueError as error:
            parser.error(f'--ratios {ratio}: {error}')
    return config, args


def _stem(config: Config) -> str:
    return 'learning_efficiency_quick' if config.quick else 'learning_efficiency'


def _write_json(path: Path, record: dict[str, Any]) -> None:
    write_record(path, record, indent=1)


def run_benchmark(config: Config, out: Path, *, resume: bool = False, clean_shm: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Run every configuration, rewriting the results file after each run.

    Args:
        config (Config): The settings.
        out (Path): Output folder.
        resume (bool): Keep the runs of an existing results file with the same ``config``.
        clean_shm (bool): Run streaming's ``clean_stale_shared_memory()`` first; it unlinks
            the streaming segments of every process on the machine, live ones included.
        progress (bool): Print progress.

    Returns:
        dict: The results (what the JSON file holds).
    """
    say = print if progress else (lambda *_: None)
    if clean_shm:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(config)
    json_path = out / f'{stem}.json'
    config_record = asdict(config)
    previous: list[dict[str, Any]] = []
    earlier_seconds = 0.0
    if resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get('config') == json.loads(json.dumps(config_record)):
            previous = old['runs']
            earlier_seconds = float(old.get('wall_seconds', 0.0))
            say(f'resuming: {len(previous)} finished runs kept from {json_path}')
        else:
            say(f'{json_path} holds another configuration: starting afresh')

    data = prepare(config.data_dir, noise_rate=config.noise_rate,
                   clean_fraction=config.clean_fraction, seed=config.data_seed,
                   progress=progress)
    eval_rows = _evaluation_rows(len(data.test_labels), config.eval_size, config.data_seed)
    pool = read_columns(data.pool_dir, ['image', 'label', 'train_index'])
    tasks = {}
    for task in config.tasks:
        prepare_task = prepare_classification if task == 'classification' else prepare_contrastive
        tasks[task] = prepare_task(config, data, pool, eval_rows, say)
    del pool

    flops: dict[str, Any] = {}
    for task in config.tasks:
        for ratio in config.ratios:
            flops.setdefault(task, {})[str(ratio)] = {
                name: configuration_flops(tasks[task], name, ratio, config)
                for name in METHODS[task]}
    record: dict[str, Any] = {
        'schema': 'jest_stream.learning_efficiency/1',
        'config': config_record,
        'environment': {'python': platform.python_version(), 'torch': torch.__version__,
                        'threads': torch.get_num_threads(), 'machine': platform.machine(),
                        'cpus': os.cpu_count(), 'load_average_at_start': os.getloadavg()},
        'methods': {task: {name: asdict(config.method(task, name)) for name in METHODS[task]}
                    for task in config.tasks},
        'tasks': {task: {'reference_accuracy': t.reference_accuracy,
                         'one_off_flops': t.one_off_flops, **t.summary}
                  for task, t in tasks.items()},
        'evaluation_images': int(len(eval_rows)),
        'flops': flops,
        'runs': list(previous),
        'complete': False,
    }
    setup_seconds = time.perf_counter() - started
    say(f'set-up (data, references, FLOPs): {setup_seconds:.0f} s')

    def save() -> None:
        record['summary'] = summarise(record['runs'], flops, config)
        # Over every invocation that contributed runs (a resumed run adds its time).
        record['wall_seconds'] = time.perf_counter() - started + earlier_seconds
        record['setup_seconds'] = setup_seconds
        _write_json(json_path, record)

    done = {(r['task'], r['ratio'], r['seed'], r['method']) for r in previous}
    todo = [(task, ratio, seed, name) for ratio in config.ratios for task in config.tasks
            for seed in config.seeds for name in METHODS[task]
            if (task, ratio, seed, name) not in done]
    for i, (task, ratio, seed, name) in enumerate(todo, 1):
        run = run_one(tasks[task], name, ratio, seed, config)
        record['runs'].append(run)
        save()
        say(f'[{i}/{len(todo)}] {task} f={ratio} seed {seed} {name}: final accuracy '
            f'{run["accuracy"][-1]:.4f}, {run["seconds_per_step"] * 1000:.0f} ms/step '
            f'({time.perf_counter() - started:.0f} s elapsed)')
        last_of_group = i == len(todo) or todo[i][:2] != (task, ratio)
        if last_of_group:
            plot(record, out / f'{stem}.png')
    record['complete'] = True
    save()
    plot(record, out / f'{stem}.png')
    plot(record, out / f'{stem}_flops.png', x_axis='flops')
    say('')
    say(format_table(record))
    say(f'\n{record["wall_seconds"]:.0f} s in all (set-up {setup_seconds:.0f} s); wrote '
        f'{json_path}, {stem}.png and {stem}_flops.png')
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; returns the exit status."""
    config, args = parse_args(argv)
    if args.replot:
        path = args.out / f'{_stem(config)}.json'
        if not path.is_file():
            print(f'{path} does not exist: run the benchmark first')
            return 1
        results = json.loads(path.read_text())
        plot(results, args.out / f'{_stem(config)}.png')
        plot(results, args.out / f'{_stem(config)}_flops.png', x_axis='flops')
        print(format_table(results))
        print(f'\n{len(results["runs"])} runs, complete: {results["complete"]}; redrew '
              f'{_stem(config)}.png and {_stem(config)}_flops.png')
        return 0
    run_benchmark(config, args.out, resume=args.resume, clean_shm=args.clean_shm)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

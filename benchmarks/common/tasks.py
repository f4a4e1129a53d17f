"""The two selection tasks on noisy Fashion-MNIST, with their references stored as users store them.

- ``classification``: the pool with 40% symmetric label noise, a :class:`TinyClassifier`
  learner, per-example cross-entropy; metric: clean test accuracy.
- ``contrastive``: the captioned pool (40% mismatched pairs), a :class:`TwoTower`
  learner, the sigmoid loss over pairs; metric: zero-shot test accuracy.

:func:`prepare_task` trains each task's reference on the clean split only and stores its
outputs over the pool the way a user of jest_stream does: ``jest_stream.annotate`` (the
function behind ``jest-stream annotate``) writes per-example losses (classification) or
embeddings (contrastive) into a reference cache, and the scorers read them through
``jest_stream.ReferenceCache``. The cache is kept beside the data, named by the pool's
and the reference's fingerprints, so a rerun with the same reference reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common.captions import prepare_captions
from benchmarks.common.data import (
    MEAN,
    STD,
    PreparedData,
    batch_logits,
    read_columns,
    to_float_images,
)
from benchmarks.common.models import (
    TwoTower,
    count_parameters,
    make_classifier,
    make_two_tower,
    sigmoid_loss,
)
from benchmarks.common.training import (
    LossFn,
    evaluate,
    train_on_arrays,
    zero_shot_accuracy,
)
from jest_stream import (
    ClassificationScorer,
    ContrastiveScorer,
    LowResolution,
    ReferenceCache,
    annotate,
    dataset_fingerprint,
    forward_flops,
    mixed_resolution_forward,
    model_checksum,
    train_step_flops,
)

__all__ = [
    'ReferenceSettings',
    'TASKS',
    'Task',
    'TaskSetup',
    'classification_scorer',
    'prepare_task',
]


def classification_scorer(learner: nn.Module, reference: Any = None, *,
                          low_resolution: int | None = None) -> ClassificationScorer:
    """The scorer of the Fashion-MNIST pool: logits of ``batch['image']``, labels ``label``.

    Args:
        learner (nn.Module): The classifier being trained.
        reference (nn.Module | ReferenceCache | None): Live reference, or its stored losses.
        low_resolution (int, optional): Not supported for classification (no Flexi method).

    Returns:
        ClassificationScorer: Per-example cross-entropy scores.
    """
    if low_resolution is not None:
        raise ValueError('the classification task has no low-resolution scoring; '
                         'use a Flexi method of the contrastive task')
    return ClassificationScorer(learner, reference, forward=batch_logits, target_key='label')


def _contrastive_scorer(learner: nn.Module, reference: Any = None, *,
                        low_resolution: int | None = None) -> ContrastiveScorer:
    transform = LowResolution(low_resolution) if low_resolution else None
    return ContrastiveScorer(learner, reference, loss='sigmoid', image_key='image',
                             text_key='text', input_transform=transform)


def _classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(batch_logits(model, batch), batch['label'])


def _contrastive_loss(model: TwoTower, batch: dict[str, Tensor]) -> Tensor:
    # Rows marked by MixedResolution run at their resolution; other batches at full.
    image_emb = mixed_resolution_forward(model.image, batch, key='image',
                                         preprocess=to_float_images)
    return sigmoid_loss(image_emb, model.text(batch['text']), model.log_temperature.exp(),
                        model.bias)


@dataclass(frozen=True)
class ReferenceSettings:
    """How a task's reference is trained on the clean split.

    Attributes:
        steps (int): Adam steps.
        lr (float): Learning rate.
        batch_size (int): Examples per step.
        seed (int): Seed of the order of the examples; the weights start from ``10_000 + seed``.
    """

    steps: int
    lr: float
    batch_size: int
    seed: int


@dataclass
class TaskSetup:
    """A prepared task: the pool, the reference and its cache, evaluation and FLOP probes.

    Attributes:
        task (Task): What the task is.
        pool_dir (Path): MDS pool the learners read.
        reference (nn.Module): The frozen reference model; scorers do not run it, it is
            kept to count what a live reference would cost.
        cache (ReferenceCache): The reference's stored outputs over the pool: the scorers'
            reference.
        reference_accuracy (float): The reference's test metric.
        evaluate (Callable): ``evaluate(model) -> float`` on the fixed evaluation images.
        validate (Callable): ``validate(model) -> float``, the same metric on the clean split
            (held out from every learner, which trains on the pool only): the held-out
            metric a policy may read during training without seeing the test split.
        probe (dict[str, Tensor]): The first pool samples, collated (sample ids ``0..n-1``):
            FLOPs are counted on them.
        one_off_flops (dict[str, int]): ``reference_training`` and ``reference_annotation``.
        summary (dict): JSON-ready facts about the pool, the reference and the cache.
    """

    task: Task
    pool_dir: Path
    reference: nn.Module
    cache: ReferenceCache
    reference_accuracy: float
    evaluate: Callable[[nn.Module], float]
    validate: Callable[[nn.Module], float]
    probe: dict[str, Tensor]
    one_off_flops: dict[str, int]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One task: how its learners are built, scored, trained and evaluated.

    Attributes:
        name (str): ``classification`` or ``contrastive``.
        metric (str): What ``evaluate`` measures.
        noisy_key (str): Column marking corrupted examples of the pool.
        outputs (str): What the reference cache stores (``loss`` or ``embeddings``).
        transform_id (str): The reference's input transform, as the cache records it.
        make_learner (Callable): ``make_learner(seed) -> nn.Module``.
        make_scorer (Callable): ``make_scorer(learner, reference, *, low_resolution)``.
        loss (Callable): The training loss ``loss(model, batch) -> Tensor``.
        probe_columns (tuple[str, ...]): Pool columns a scorer and the training step read.
    """

    name: str
    metric: str
    noisy_key: str
    outputs: str
    transform_id: str
    make_learner: Callable[[int], nn.Module]
    make_scorer: Callable[..., Any]
    loss: LossFn
    probe_columns: tuple[str, ...]


TASKS: dict[str, Task] = {
    'classification': Task(
        name='classification', metric='clean test accuracy', noisy_key='corrupted',
        outputs='loss', transform_id=f'fashion-mnist uint8 -> (x/255 - {MEAN}) / {STD}',
        make_learner=make_classifier, make_scorer=classification_scorer,
        loss=_classification_loss, probe_columns=('image', 'label', 'corrupted')),
    'contrastive': Task(
        name='contrastive', metric='zero-shot test accuracy', noisy_key='mismatched',
        outputs='embeddings',
        transform_id=f'fashion-mnist uint8 -> (x/255 - {MEAN}) / {STD}; caption token ids',
        make_learner=make_two_tower, make_scorer=_contrastive_scorer,
        loss=_contrastive_loss, probe_columns=('image', 'text', 'mismatched')),
}


def _train_reference(task: Task, data: PreparedData, settings: ReferenceSettings,
                     progress: bool) -> tuple[nn.Module, dict[str, np.ndarray], Path, dict]:
    """The reference trained on the clean split; the split's arrays, the pool, facts."""
    if task.name == 'classification':
        clean = read_columns(data.clean_dir, ['image', 'label'])
        pool_dir, facts = data.pool_dir, {'pool': data.summary()}
    else:
        captions = prepare_captions(data, data.root.with_name(data.root.name + '-captions'),
                                    progress=progress)
        clean = {'image': captions.clean_images, 'text': captions.clean_text}
        pool_dir, facts = captions.pool_dir, {'captions': captions.summary()}
    reference = task.make_learner(10_000 + settings.seed)
    train_on_arrays(reference, clean, task.loss, steps=settings.steps,
                    batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                    progress=progress, desc=f'{task.name} reference')
    reference.eval()
    return reference, clean, pool_dir, facts


def _annotate(task: Task, reference: nn.Module, pool_dir: Path, root: Path, num_workers: int,
              progress: bool) -> ReferenceCache:
    """Store the reference's outputs over the pool, as ``jest-stream annotate`` does."""
    checksum = model_checksum(reference)
    out = root / f'{task.name}-{dataset_fingerprint(pool_dir)[:12]}-{checksum[:12]}'
    keys: dict[str, Any] = ({'forward': batch_logits, 'target_key': 'label'}
                            if task.outputs == 'loss' else {})
    annotate(out=out, model=reference, transform_id=task.transform_id, outputs=task.outputs,
             local=pool_dir, batch_size=512, num_workers=num_workers, progress=progress,
             info={'benchmark': f'learning_efficiency/{task.name}'}, **keys)
    return ReferenceCache(out, dataset=pool_dir, model_checksum=checksum,
                          transform=task.transform_id)


@torch.no_grad()
def _check_cache(task: Task, cache: ReferenceCache, reference: nn.Module,
                 probe: dict[str, Tensor]) -> None:
    """Fail loudly when the stored outputs are not the reference's own on the probe rows."""
    stored = cache.outputs(probe, torch.arange(len(probe[task.noisy_key])))
    if task.outputs == 'loss':
        live = {'loss': F.cross_entropy(batch_logits(reference, probe), probe['label'],
                                        reduction='none')}
    else:
        image, text, _, _ = reference(probe['image'], probe['text'])
        live = {'image_emb': image, 'text_emb': text}
    # Embeddings are stored in float16 (unit vectors: rounding below 1e-3), losses in float32.
    tolerance = 1e-4 if task.outputs == 'loss' else 2e-3
    for kind, values in live.items():
        gap = (stored[kind].float() - values).abs().max().item()
        if gap > tolerance:
            raise RuntimeError(
                f'the reference cache {cache.path} disagrees with the reference model by '
                f'{gap:.3g} in {kind} on the first pool samples (tolerance {tolerance}): it '
                f'was annotated for another model or pool')


def _metric(name: str, images: np.ndarray, labels: np.ndarray
            ) -> Callable[[nn.Module], float]:
    """The task's metric on these images: top-1 accuracy, or zero-shot accuracy."""
    if name == 'classification':
        return lambda m: evaluate(m, images, labels)
    return lambda m: zero_shot_accuracy(m, images, labels)


def prepare_task(name: str, *, data: PreparedData, reference: ReferenceSettings,
                 eval_rows: np.ndarray, probe_rows: int, num_workers: int = 1,
                 progress: bool = True) -> TaskSetup:
    """Train a task's reference, annotate the pool with it, and load what runs need.

    Args:
        name (str): A key of :data:`TASKS`.
        data (PreparedData): The prepared Fashion-MNIST pool and clean split.
        reference (ReferenceSettings): How the reference trains.
        eval_rows (np.ndarray): Rows of the test split every evaluation uses.
        probe_rows (int): Pool samples to keep for counting FLOPs (the largest ``B``).
        num_workers (int): DataLoader workers of the annotation.
        progress (bool): Show progress bars.

    Returns:
        TaskSetup: The prepared task.
    """
    task = TASKS[name]
    model, clean, pool_dir, facts = _train_reference(task, data, reference, progress)
    score = _metric(name, data.test_images[eval_rows], data.test_labels[eval_rows])
    held_out = read_columns(data.clean_dir, ['image', 'label'])
    validate = _metric(name, held_out['image'], held_out['label'])
    cache = _annotate(task, model, pool_dir, data.root.with_name(data.root.name + '-references'),
                      num_workers, progress)
    probe = {key: torch.as_tensor(value) for key, value in
             read_columns(pool_dir, list(task.probe_columns), limit=probe_rows).items()}
    _check_cache(task, cache, model, probe)
    one_sample = {key: value[:1] for key, value in probe.items()}
    batch = {key: torch.as_tensor(value[:reference.batch_size]) for key, value in clean.items()}
    one_off = {
        'reference_training': reference.steps * train_step_flops(model, batch, task.loss),
        'reference_annotation': cache.num_samples * forward_flops(
            model, *((to_float_images(one_sample['image']),) if name == 'classification'
                     else (one_sample['image'], one_sample['text']))),
    }
    return TaskSetup(
        task=task, pool_dir=pool_dir, reference=model, cache=cache,
        reference_accuracy=score(model), evaluate=score, validate=validate, probe=probe,
        one_off_flops=one_off,
        summary={**facts, 'learner_parameters': count_parameters(model),
                 'reference_cache': str(cache.path), 'reference_checksum': model_checksum(model),
                 'reference_fingerprint': cache.fingerprint.digest()})

"""Training loops and evaluation shared by the benchmarks.

- :func:`train_on_arrays`: Adam over in-memory arrays (the references, the Flexi
  learners), reshuffled every pass with a private generator.
- :func:`train_selective`: the selective training loop: a learner trained on the
  sub-batches a ``SelectiveLoader`` hands over, evaluated at checkpoints, with the
  wall-clock cost of every step split into the trainer's own work and the loader's
  (``wait_s``, ``transfer_s``, ``score_s``, ``select_s`` from ``loader.metrics``).
- :func:`evaluate` (top-1 accuracy) and :func:`zero_shot_accuracy` (two towers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmarks.common.captions import class_prompt_tokens
from benchmarks.common.data import batch_logits, to_float_images
from jest_stream.batch import batch_length

__all__ = [
    'LOADER_TIMINGS',
    'LossFn',
    'STEP_COSTS',
    'evaluate',
    'synchronize',
    'train_classifier',
    'train_on_arrays',
    'train_selective',
    'zero_shot_accuracy',
]

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
# Seconds per super-batch that the loader reports in ``loader.metrics``.
LOADER_TIMINGS = ('wait_s', 'transfer_s', 'score_s', 'select_s')
# Where the seconds of a training step go: the trainer's own work, the loader's timings, the rest.
STEP_COSTS = ('train_s', *LOADER_TIMINGS, 'other_s')


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads finished work."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def train_on_arrays(model: nn.Module, arrays: dict[str, np.ndarray], loss_fn: LossFn, *,
                    steps: int, batch_size: int, lr: float, seed: int,
                    transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                    progress: bool = False, desc: str = 'train') -> list[float]:
    """Train with Adam on in-memory arrays, reshuffling each pass with a private generator.

    Args:
        model (nn.Module): Trained in place.
        arrays (dict[str, np.ndarray]): Aligned columns, samples on the first axis.
        loss_fn (Callable): ``loss_fn(model, batch) -> Tensor`` (a scalar), the batch a dict
            of the columns' rows as tensors.
        steps (int): Optimizer steps.
        batch_size (int): Examples per step (at most the number of samples).
        lr (float): Adam learning rate.
        seed (int): Seed of the order in which examples are drawn.
        transform (Callable, optional): Applied to every batch first (e.g. a
            ``MixedResolution`` split).
        progress (bool): Show a progress bar.
        desc (str): Its label.

    Returns:
        list[float]: The training loss of every step.
    """
    tensors = {key: torch.as_tensor(value) for key, value in arrays.items()}
    n = len(next(iter(tensors.values())))
    if any(len(value) != n for value in tensors.values()):
        raise ValueError(f'columns of different lengths: '
                         f'{ {key: len(value) for key, value in tensors.items()} }')
    if not 0 < batch_size <= n:
        raise ValueError(f'batch_size={batch_size} must be in 1..{n} (the number of examples)')
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    order, position, losses = rng.permutation(n), 0, []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0):
        if position + batch_size > n:
            order, position = rng.permutation(n), 0
        rows = torch.from_numpy(order[position:position + batch_size])
        position += batch_size
        batch = {key: value[rows] for key, value in tensors.items()}
        loss = loss_fn(model, transform(batch) if transform is not None else batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int,
                     batch_size: int, lr: float, seed: int, progress: bool = False,
                     desc: str = 'train') -> list[float]:
    """:func:`train_on_arrays` with the cross-entropy of uint8 images and integer labels.

    Args:
        model (nn.Module): Classifier of normalised ``[B, 1, 28, 28]`` images.
        images (np.ndarray): uint8 ``[N, 28, 28]``.
        labels (np.ndarray): int ``[N]``.
        steps (int): Optimizer steps.
        batch_size (int): Examples per step.
        lr (float): Adam learning rate.
        seed (int): Seed of the order of the examples.
        progress (bool): Show a progress bar.
        desc (str): Its label.

    Returns:
        list[float]: The training loss of every step.
    """
    return train_on_arrays(
        model, {'image': images, 'label': np.asarray(labels, dtype=np.int64)},
        lambda m, b: F.cross_entropy(batch_logits(m, b), b['label']), steps=steps,
        batch_size=batch_size, lr=lr, seed=seed, progress=progress, desc=desc)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
             forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy; the model's training mode is restored afterwards.

    Args:
        model (nn.Module): The classifier.
        images (np.ndarray): uint8 ``[N, 28, 28]``.
        labels (np.ndarray): Integer targets ``[N]``.
        forward (Callable, optional): ``forward(model, uint8 images) -> logits``; by default
            the model on :func:`~benchmarks.common.data.to_float_images` of the pixels.
        batch_size (int): Examples per forward pass.

    Returns:
        float: Fraction of ``labels`` predicted correctly.
    """
    was_training = model.training
    model.eval()
    try:
        images_t = torch.as_tensor(images)
        labels_t = torch.as_tensor(labels, dtype=torch.long)
        correct = 0
        for start in range(0, len(labels_t), batch_size):
            pixels = images_t[start:start + batch_size]
            logits = forward(model, pixels) if forward else model(to_float_images(pixels))
            correct += int((logits.argmax(1) == labels_t[start:start + batch_size]).sum())
        return correct / len(labels_t)
    finally:
        model.train(was_training)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, images: np.ndarray | Tensor,
                       labels: np.ndarray | Tensor, *, batch_size: int = 2000) -> float:
    """Accuracy of a two-tower model classifying images by the nearest class embedding.

    A class embedding is the normalised mean of the text embeddings of all its prompts
    (:func:`~benchmarks.common.captions.class_prompt_tokens`). The model's training mode
    is restored afterwards.

    Args:
        model (TwoTower): Has ``text(tokens)`` and ``embed_images(uint8 pixels)``.
        images (np.ndarray | Tensor): uint8 ``[N, 28, 28]``.
        labels (np.ndarray | Tensor): int ``[N]`` true classes.
        batch_size (int): Images per forward pass.

    Returns:
        float: Fraction classified correctly.
    """
    was_training = model.training
    model.eval()
    try:
        prompts = class_prompt_tokens()
        text = model.text(prompts.flatten(0, 1)).reshape(*prompts.shape[:2], -1)
        classes = F.normalize(text.mean(1), dim=-1)
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        correct = 0
        for start in range(0, len(labels), batch_size):
            emb = model.embed_images(images[start:start + batch_size])
            correct += int(((emb @ classes.T).argmax(1) == labels[start:start + batch_size]).sum())
        return correct / len(labels)
    finally:
        model.train(was_training)


def _endless(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``batches``, epoch after epoch."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError('the loader yielded no batch in a whole epoch')


class _StepCosts:
    """Sums of the seconds of every step, by where they went."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(STEP_COSTS, 0.0)
        self.fetch_s = 0.0
        self.steps = 0
        self.drawn = 0

    def add(self, fetch_s: float, train_s: float, metrics: dict[str, Any], rows: int) -> None:
        self.drawn += int(metrics.get('drawn', rows))
        self.fetch_s += fetch_s
        self.totals['train_s'] += train_s
        for key in LOADER_TIMINGS:
            self.totals[key] += float(metrics.get(key, 0.0))
        self.steps += 1

    def means(self) -> dict[str, float]:
        totals = dict(self.totals)
        # What fetching batches cost beyond the loader's own timings: hand-over, telemetry,
        # the batch transform; for loaders without metrics, everything. Over the whole run,
        # as a loader may time work for one batch while handing over another.
        totals['other_s'] = max(0.0, self.fetch_s - sum(totals[k] for k in LOADER_TIMINGS))
        return {key: value / max(self.steps, 1) for key, value in totals.items()}


class _Scoring:
    """Rows scored so far, and the mean selection pressure and learnability per interval.

    A step scored its candidates when the loader reports more of them (``candidates``)
    than it handed over; at pressure 0 a ``SelectiveLoader`` scores nothing and reports
    ``b``.
    """

    def __init__(self) -> None:
        self.scored = 0
        self.window: dict[str, list[float]] = {'pressure': [], 'learnability': []}
        self.curves: dict[str, list[float | None]] = {'scored': [0], 'pressure': [],
                                                      'learnability': []}

    def add(self, metrics: dict[str, Any], rows: int) -> None:
        candidates = int(metrics.get('candidates', 0))
        if candidates > rows:
            self.scored += candidates
        for key, metric in (('pressure', 'pressure'), ('learnability', 'score_all_mean')):
            if metric in metrics:
                self.window[key].append(float(metrics[metric]))

    def checkpoint(self) -> None:
        self.curves['scored'].append(self.scored)
        for key, values in self.window.items():
            self.curves[key].append(float(np.mean(values)) if values else None)
            values.clear()


class _NoiseCounter:
    """Share of corrupted examples among those trained on, per checkpoint interval."""

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.window = [0, 0]
        self.total = [0, 0]
        self.curve: list[float] = []

    def add(self, batch: dict[str, Any]) -> None:
        if self.key is not None:
            noisy, seen = int(batch[self.key].sum()), len(batch[self.key])
            self.window = [self.window[0] + noisy, self.window[1] + seen]
            self.total = [self.total[0] + noisy, self.total[1] + seen]

    def checkpoint(self) -> None:
        if self.key is not None:
            self.curve.append(self.window[0] / max(self.window[1], 1))
            self.window = [0, 0]

    def summary(self) -> dict[str, Any]:
        if self.key is None:
            return {}
        return {'noisy_fraction': self.curve,
                'noisy_fraction_overall': self.total[0] / max(self.total[1], 1)}


def train_selective(learner: nn.Module, loader: Iterable[dict[str, Any]], *, steps: int,
                    loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                    checkpoints: Sequence[int], evaluate: Callable[[nn.Module], float],
                    noisy_key: str | None = None,
                    after_step: Callable[[dict[str, Any]], None] | None = None,
                    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
                    desc: str = 'train', progress: bool = True) -> dict[str, Any]:
    """Train ``learner`` for ``steps`` optimizer steps on the batches ``loader`` yields.

    The clock runs while batches are fetched (waiting for data, scoring, selection) and
    while the trainer works (forward, backward, optimizer step, ``after_step``); it stops
    for evaluation, which costs every method the same and is not part of training. The
    loader is iterated epoch after epoch until the budget is spent. The progress bar stays
    on screen when the run ends.

    Args:
        learner (nn.Module): Trained in place.
        loader (Iterable): Sub-batches; a ``SelectiveLoader`` also reports ``metrics``.
        steps (int): Optimizer steps.
        loss_fn (Callable): ``loss_fn(learner, batch) -> Tensor`` (a scalar).
        optimizer (torch.optim.Optimizer): Over the learner's parameters.
        checkpoints (Sequence[int]): Steps at which to evaluate (0 included, ``steps`` last).
        evaluate (Callable): ``evaluate(learner) -> accuracy``.
        noisy_key (str, optional): Column marking corrupted examples (1) in each batch.
        after_step (Callable, optional): ``after_step(batch)`` after each optimizer step
            (e.g. a proxy learner's own update); timed with the step.
        on_checkpoint (Callable, optional): ``on_checkpoint(step, learner)`` after each
            evaluation, with the clock stopped (e.g. a held-out metric reported to the
            loader's adaptive policy).
        desc (str): Label of the progress bar.
        progress (bool): Show the progress bar.

    Returns:
        dict: ``steps`` (the checkpoints), ``accuracy`` and ``seconds`` (wall-clock training
        time so far, evaluation excluded) at each; ``noisy_fraction`` (per interval between
        checkpoints) and ``noisy_fraction_overall`` when ``noisy_key`` is given;
        ``train_seconds``, ``seconds_per_step`` and ``step_costs``: mean seconds per step of
        ``train_s`` (the trainer's work), ``wait_s``, ``transfer_s``, ``score_s``,
        ``select_s`` (the loader's ``metrics``) and ``other_s`` (the rest of fetching a
        batch); they add up to ``seconds_per_step``. ``drawn_per_step``: examples read per
        step (the loader's ``drawn``; the batch's rows for a loader without metrics).
        ``scored``: candidates scored up to each checkpoint (from the loader's
        ``candidates``: those of the steps that scored more rows than they handed over);
        ``pressure`` and ``learnability``: per interval between checkpoints, the mean of the
        loader's selection pressure and of the candidates' mean score (None where the
        loader reports none).
    """
    marks = set(checkpoints) | {steps}
    record: dict[str, Any] = {'steps': [0], 'accuracy': [evaluate(learner)], 'seconds': [0.0]}
    noise = _NoiseCounter(noisy_key)
    costs = _StepCosts()
    scoring = _Scoring()
    elapsed = 0.0
    batches = _endless(loader)
    with tqdm(total=steps, desc=desc, unit='step', mininterval=0.5, disable=not progress) as bar:
        for step in range(1, steps + 1):
            started = time.perf_counter()
            batch = next(batches)
            fetched = time.perf_counter()
            loss = loss_fn(learner, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(batch)
            done = time.perf_counter()
            elapsed += done - started
            metrics = getattr(loader, 'metrics', {})
            costs.add(fetched - started, done - fetched, metrics, batch_length(batch))
            scoring.add(metrics, batch_length(batch))
            noise.add(batch)
            bar.update()
            if step in marks:
                record['steps'].append(step)
                record['accuracy'].append(evaluate(learner))
                record['seconds'].append(elapsed)
                noise.checkpoint()
                scoring.checkpoint()
                if on_checkpoint is not None:
                    on_checkpoint(step, learner)
                bar.set_postfix(acc=f'{record["accuracy"][-1]:.3f}')
    record.update(noise.summary())
    record.update(scoring.curves)
    record['train_seconds'] = elapsed
    record['seconds_per_step'] = elapsed / steps
    record['step_costs'] = costs.means()
    record['drawn_per_step'] = costs.drawn / steps
    return record

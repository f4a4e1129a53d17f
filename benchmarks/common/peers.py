"""Peer methods of the learning-efficiency benchmark, as iterables of sub-batches.

- :class:`SelectiveBackpropLoader`: Composer's SelectiveBackprop (Jiang et al., 2019,
  "Accelerating Deep Learning by Focusing on the Biggest Losers"), run through Composer's
  own functions: ``should_selective_backprop`` decides which steps select, and
  ``select_using_loss`` keeps ``keep`` of a batch of ``b / keep`` examples, sampled by the
  rank of their loss under the learner. It draws from NumPy's global generator, which the
  loader seeds once per run so that runs repeat.
- :class:`RepeatedRandomSubsets`: RS2 without replacement (Okanovic et al., 2023,
  "Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning"): each round
  trains on a fresh random ``fraction`` of the pool, drawn without replacement across
  rounds until every example has been used, in a new random order.

Both read the same MDS pool as every other method, through a ``jest_stream.SelectiveLoader``
with the uniform criterion, and report the loader's timings in ``metrics`` (with
``candidates``: the examples scored in the step, for the FLOP count), as the benchmark's
training loop expects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from composer.algorithms.selective_backprop.selective_backprop import (
    select_using_loss,
    should_selective_backprop,
)
from torch import Tensor, nn

from benchmarks.common.data import open_streaming, to_float_images
from jest_stream import (
    SampleIdStreamingDataset,
    SampleSubset,
    SelectiveLoader,
    gather,
    sigmoid_pair_losses,
)

__all__ = [
    'RepeatedRandomSubsets',
    'SelectiveBackprop',
    'SelectiveBackpropLoader',
    'SelectiveBackpropSettings',
]


@dataclass(frozen=True)
class SelectiveBackpropSettings:
    """The hyper-parameters of Composer's ``SelectiveBackprop`` (its defaults).

    Attributes:
        start (float): Fraction of training at which selection starts.
        end (float): Fraction of training at which it stops.
        keep (float): Fraction of each batch kept.
        scale_factor (float): Resolution of the selecting forward pass (1: full).
        interrupt (int): Every ``interrupt``-th step in the window trains on a plain batch
            (0: none).
    """

    start: float = 0.5
    end: float = 0.9
    keep: float = 0.5
    scale_factor: float = 1.0
    interrupt: int = 2

    def drawn(self, batch_size: int) -> int:
        """Examples read per step: ``b / keep``."""
        return round(batch_size / self.keep)


class SelectiveBackprop:
    """Per-example losses of the learner and Composer's ``select_using_loss`` over them.

    Classification: the cross-entropy of each image. Contrastive: each pair's row of the
    sigmoid loss over the batch (the pair's own term and its image against every other
    caption), which is what the pair adds to the batch's loss on the image side.

    Args:
        learner (nn.Module): The learner (a classifier, or a ``TwoTower``).
        task (str): ``classification`` or ``contrastive``.
        settings (SelectiveBackpropSettings): Composer's hyper-parameters.
        batch_size (int): Examples kept, ``b``.
        drawn (int): Examples per selecting batch, ``b / keep``.
    """

    def __init__(self, learner: nn.Module, task: str, settings: SelectiveBackpropSettings, *,
                 batch_size: int, drawn: int) -> None:
        self.learner = learner
        self.task = task
        self.settings = settings
        self.batch_size = batch_size
        self.drawn = drawn

    def _model(self) -> Callable[[Tensor], Tensor]:
        if self.task == 'classification':
            return self.learner
        return self.learner.image

    def _loss(self, batch: dict[str, Tensor]) -> Callable[..., Tensor]:
        if self.task == 'classification':
            labels = batch['label']

            def loss(out: Tensor, rows: Tensor, reduction: str = 'none') -> Tensor:
                return F.cross_entropy(out, labels[rows], reduction=reduction)

            return loss
        text = self.learner.text(batch['text'])
        temperature, bias = self.learner.log_temperature.exp(), self.learner.bias

        def pair_rows(out: Tensor, rows: Tensor, reduction: str = 'none') -> Tensor:
            if reduction != 'none':
                raise ValueError(f'per-pair losses only (reduction="none"), not {reduction!r}')
            return sigmoid_pair_losses(out, text[rows], temperature, bias).sum(1)

        return pair_rows

    @torch.no_grad()
    def select(self, batch: dict[str, Tensor]) -> Tensor:
        """Rows of ``batch`` (``drawn`` of them) that ``select_using_loss`` keeps.

        Returns:
            LongTensor[b]: The kept rows.
        """
        rows = torch.arange(len(batch['image']))
        was_training = self.learner.training
        self.learner.eval()
        try:
            _, kept = select_using_loss(to_float_images(batch['image']), rows, self._model(),
                                        self._loss(batch), keep=self.batch_size / len(rows),
                                        scale_factor=self.settings.scale_factor)
        finally:
            self.learner.train(was_training)
        return kept


class SelectiveBackpropLoader:
    """Sub-batches of ``b``: selected by SelectiveBackprop in its window, else uniform.

    Every step reads ``b / keep`` examples (a ``SelectiveLoader`` with the uniform criterion
    hands them over whole, in random order); steps that Composer's
    ``should_selective_backprop`` picks keep the ``b`` that ``select_using_loss`` samples,
    the others the first ``b`` (a uniform sample). Composer would train those other steps on
    the whole batch; here every step of every method trains on ``b`` examples, so that the
    step budgets compare.

    Args:
        source (SelectiveLoader): Batches of ``b / keep`` examples.
        selector (SelectiveBackprop): The selection.
        steps (int): The run's step budget (Composer's ``max_duration``).
        seed (int): Seeds NumPy's global generator, which ``select_using_loss`` draws from.
    """

    def __init__(self, source: SelectiveLoader, selector: SelectiveBackprop, *, steps: int,
                 seed: int) -> None:
        self.source = source
        self.selector = selector
        self.steps = steps
        self.step = 0
        self.metrics: dict[str, Any] = {}
        np.random.seed(seed)  # select_using_loss samples with np.random.choice

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        settings, b = self.selector.settings, self.selector.batch_size
        for batch in self.source:
            active = should_selective_backprop(
                current_duration=min(self.step / self.steps, 1.0), batch_idx=self.step,
                start=settings.start, end=settings.end, interrupt=settings.interrupt)
            started = time.perf_counter()
            rows = self.selector.select(batch) if active else torch.arange(b)
            score_s = time.perf_counter() - started
            inner = self.source.metrics
            self.metrics = {'wait_s': inner.get('wait_s', 0.0),
                            'transfer_s': inner.get('transfer_s', 0.0), 'score_s': score_s,
                            'select_s': inner.get('select_s', 0.0),
                            'drawn': inner.get('drawn', b),
                            'candidates': inner.get('drawn', b) if active else b}
            self.step += 1
            yield gather(batch, rows)

    def close(self) -> None:
        """Stop the source's workers."""
        self.source.close()


class RepeatedRandomSubsets:
    """RS2 without replacement: one round (an epoch of this iterable) per random subset.

    Round ``k`` trains on ``fraction`` of the pool's samples, drawn from a random permutation
    of the pool (a private generator seeded with ``seed``) so that no sample repeats until
    every one has been used; its order within the round is shuffled by the round's loader.

    Args:
        pool_dir (str): The MDS pool.
        fraction (float): Share of the pool per round (RS2's selection ratio ``r``).
        batch_size (int): Sub-batch size ``b``.
        seed (int): Seed of the subsets and of their order.
        num_workers (int): DataLoader workers of each round's loader.
    """

    def __init__(self, pool_dir: str, *, fraction: float, batch_size: int, seed: int,
                 num_workers: int) -> None:
        self.dataset = open_streaming(lambda: SampleIdStreamingDataset(
            local=pool_dir, batch_size=batch_size, shuffle=False))
        self.n = int(self.dataset.num_samples)
        self.round_size = max(batch_size, round(fraction * self.n))
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 2023]))
        self.unused = self.rng.permutation(self.n)
        self.rounds = 0
        self.metrics: dict[str, Any] = {}
        self._loader: SelectiveLoader | None = None

    def next_subset(self) -> np.ndarray:
        """The sample ids of the next round: unused ones first, then a fresh permutation."""
        if len(self.unused) < self.round_size:
            rest = self.unused
            fresh = self.rng.permutation(self.n)
            fresh = fresh[~np.isin(fresh, rest)]
            self.unused = np.concatenate([rest, fresh])
        ids, self.unused = self.unused[:self.round_size], self.unused[self.round_size:]
        return ids

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        ids = self.next_subset()
        self.close()
        self._loader = SelectiveLoader(
            SampleSubset(self.dataset, ids), batch_size=self.batch_size,
            super_batch_size=self.batch_size, criterion='uniform',
            seed=self.seed * 1_000 + self.rounds, num_workers=self.num_workers)
        self.rounds += 1
        for batch in self._loader:
            self.metrics = self._loader.metrics
            yield batch

    def close(self) -> None:
        """Stop the current round's workers."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None

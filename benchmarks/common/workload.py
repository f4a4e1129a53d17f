"""The loader workload the data-path benchmarks time: b of B from the Fashion-MNIST pool.

``data_path`` times it against a plain ``DataLoader``; ``selection_log`` times it without
and with a selection log. Both read ``warmup`` super-batches untimed, then ``batches``
(``scored_batches`` where the benchmarks' small CNNs score learnability), in ``rounds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import report
from benchmarks.common.data import open_streaming
from benchmarks.common.models import make_cnn
from benchmarks.common.tasks import classification_scorer
from jest_stream import SampleIdStreamingDataset, SelectiveLoader

__all__ = ['LoaderWorkload', 'selective_loader']


@dataclass(frozen=True)
class LoaderWorkload:
    """The settings of the workload (benchmarks add their own and write all into results).

    ``batch_size`` is b and ``super_batch_size`` B, in rows; ``warmup``, ``batches`` and
    ``scored_batches`` count super-batches; ``hidden`` is the CNNs' width.
    """

    batch_size: int = 64
    super_batch_size: int = 320
    num_workers: int = 2
    warmup: int = 5
    batches: int = 150
    scored_batches: int = 30
    rounds: int = 5
    hidden: int = 48
    seed: int = 0
    quick: bool = False
    data_dir: str = str(report.REPO_ROOT / 'data' / 'fashion-mnist')

    @property
    def filter_ratio(self) -> float:
        return 1.0 - self.batch_size / self.super_batch_size

    def timed_batches(self, mode: str) -> int:
        """How many super-batches a run of ``mode`` times (scoring ones are slower)."""
        return self.scored_batches if mode == 'learnability' else self.batches


def selective_loader(mode: str, pool: Path, workload: LoaderWorkload, *, device: str = 'cpu',
                     num_canonical_nodes: int | None = 1, **loader_kwargs: Any
                     ) -> SelectiveLoader:
    """A fresh ``SelectiveLoader`` over the pool's MDS shards.

    Args:
        mode (str): ``uniform`` (no scoring) or ``learnability`` (two CNNs, seeds ``seed``
            and ``seed + 1``, as learner and live reference).
        pool (Path): Local MDS dataset of the pool (``image`` uint8[28, 28], ``label``).
        workload (LoaderWorkload): Sizes, workers and seed.
        device (str): Where the CNNs score.
        num_canonical_nodes (int | None): streaming's setting (None: streaming's default).
        **loader_kwargs: Further ``SelectiveLoader`` arguments (a selection log, say).
    """
    dataset = open_streaming(lambda: SampleIdStreamingDataset(
        local=str(pool), batch_size=workload.super_batch_size, shuffle=True,
        shuffle_seed=workload.seed, num_canonical_nodes=num_canonical_nodes))
    scoring: dict[str, Any] = {'criterion': 'uniform'}
    if mode == 'learnability':
        scoring = {'criterion': 'learnability', 'scorer': classification_scorer(
            make_cnn(workload.seed, hidden=workload.hidden).to(device),
            make_cnn(workload.seed + 1, hidden=workload.hidden).to(device))}
    return SelectiveLoader(dataset, batch_size=workload.batch_size,
                           super_batch_size=workload.super_batch_size, seed=workload.seed,
                           num_workers=workload.num_workers, device=device, **scoring,
                           **loader_kwargs)

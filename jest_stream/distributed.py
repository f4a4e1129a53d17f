"""Selection across ranks over ``torch.distributed``: the ``global`` selection scope.

With ``selection_scope='rank'`` each rank selects from its own super-batch and no
collective runs. With ``selection_scope='global'`` every rank scores its own
super-batch, the ranks all-gather what selection needs (per-example scores, or the
embeddings of contrastive scores), and every rank runs the same selection over the
global super-batch of ``world_size x B`` candidates, in a canonical order (sorted by
sample id) so that the result depends on which samples were drawn, not on which rank
drew them. Rank ``r`` then trains the ``r``-th ``b`` of the ``world_size x b`` selected
examples, gathered from the ranks that hold them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from jest_stream.batch import Batch, batch_length, gather
from jest_stream.pipeline import SelectionConfig
from jest_stream.randomness import SELECTION, derive_generator
from jest_stream.scores import BatchScores, select
from jest_stream.scoring import as_batch_scores

__all__ = ['SELECTION_SCOPES', 'CommStats', 'all_gather_rows', 'global_score_and_select',
           'exchange_rows', 'rank_and_world']

SELECTION_SCOPES = ('rank', 'global')


@dataclass
class CommStats:
    """Bytes all-gathered by this rank and seconds spent in collectives."""

    bytes: int = 0
    seconds: float = 0.0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_for_collectives(tensor: Tensor) -> torch.device:
    # NCCL needs device tensors; gloo works on the CPU.
    backend = dist.get_backend()
    return tensor.device if backend != 'nccl' else torch.device('cuda', torch.cuda.current_device())


def all_gather_rows(tensor: Tensor, stats: CommStats) -> Tensor:
    """Rows of every rank's ``tensor``, concatenated in rank order (sizes may differ).

    Args:
        tensor (Tensor[n_r, ...]): This rank's rows.
        stats (CommStats): Bytes and seconds are added here.

    Returns:
        Tensor[sum of n_r, ...]: On ``tensor``'s device.
    """
    _, world = rank_and_world()
    if world == 1:
        return tensor
    start = time.perf_counter()
    device = _device_for_collectives(tensor)
    local = tensor.to(device).contiguous()
    sizes = torch.tensor([local.shape[0]], device=device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    stats.bytes += padded.numel() * padded.element_size() * world
    stats.seconds += time.perf_counter() - start
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]).to(tensor.device)


def _gather_objects(values: list[Any], stats: CommStats) -> list[Any]:
    _, world = rank_and_world()
    start = time.perf_counter()
    out: list[Any] = [None] * world
    dist.all_gather_object(out, values)
    stats.seconds += time.perf_counter() - start
    return [v for part in out for v in part]


def exchange_rows(batch: Batch, rows: Tensor, stats: CommStats) -> Batch:
    """Every rank's ``batch[rows]``, concatenated in rank order, on every rank.

    Args:
        batch (Batch): This rank's super-batch.
        rows (LongTensor[k_r]): The rows of it that some rank needs.
        stats (CommStats): Bytes and seconds are added here.

    Returns:
        Batch: The same structure holding ``sum of k_r`` rows.
    """
    if isinstance(batch, Tensor):
        return all_gather_rows(batch.index_select(0, rows.to(batch.device)), stats)
    if isinstance(batch, Mapping):
        return {key: exchange_rows(value, rows, stats) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        if batch and not isinstance(batch[0], (Tensor, Mapping, tuple, list)):
            return _gather_objects([batch[i] for i in rows.tolist()], stats)
        return type(batch)(exchange_rows(value, rows, stats) for value in batch)
    raise TypeError(f'cannot exchange a batch of type {type(batch).__name__}')


def _gather_scores(scores: BatchScores, stats: CommStats) -> BatchScores:
    if not hasattr(scores, 'map_rows'):
        raise TypeError(
            f'selection_scope="global" all-gathers the scores, but {type(scores).__name__} has '
            f'no map_rows(fn); return per-example scores or the built-in pair scores, or use '
            f'selection_scope="rank"')
    return scores.map_rows(lambda rows: all_gather_rows(rows, stats))


def global_score_and_select(config: SelectionConfig, scorer, batch: Batch, sample_ids: Tensor,
                            epoch: int, index: int, stats: CommStats
                            ) -> tuple[Batch, Tensor, Tensor | None, float, float]:
    """Select ``world_size x b`` examples from the global super-batch; return this rank's share.

    Every rank must call this for the same ``(epoch, index)``.

    Args:
        config (SelectionConfig): Criterion, method and sizes (``batch_size`` per rank).
        scorer (Scorer | None): Scores this rank's super-batch.
        batch (Batch): This rank's super-batch, on the scoring device.
        sample_ids (LongTensor[B]): Its global sample ids.
        epoch (int): Epoch of the super-batch.
        index (int): Its position in the epoch.
        stats (CommStats): Bytes and seconds of communication are added here.

    Returns:
        tuple: This rank's sub-batch of ``b`` rows; the indices of all ``world_size x b``
        selected candidates in the canonical order (``LongTensor``); the self-scores of the
        global candidates in that order (or None); the seconds spent scoring and selecting.
    """
    rank, world = rank_and_world()
    n = batch_length(batch)
    start = time.perf_counter()
    scores = None
    if config.criterion.scores:
        scores = as_batch_scores(scorer(batch, sample_ids, config.criterion), n, sample_ids)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    all_ids = all_gather_rows(sample_ids.cpu(), stats)
    order = torch.argsort(all_ids)
    canonical_ids = all_ids[order]
    if scores is not None:
        scores = _gather_scores(scores, stats).map_rows(lambda rows: rows[order.to(rows.device)])
    selected = select(scores, len(canonical_ids), config.batch_size * world,
                      method=config.method, n_chunks=config.n_chunks,
                      temperature=config.temperature,
                      generator=derive_generator(config.seed, SELECTION, epoch, index))
    share = canonical_ids[selected[rank * config.batch_size:(rank + 1) * config.batch_size]]
    # Each rank sends the rows of its super-batch that any rank selected.
    chosen = set(canonical_ids[selected].tolist())
    mine = torch.tensor([i for i, s in enumerate(sample_ids.tolist()) if s in chosen],
                        dtype=torch.long)
    pooled = exchange_rows(batch, mine, stats)
    pooled_ids = all_gather_rows(sample_ids.cpu()[mine], stats)
    position = {int(s): i for i, s in enumerate(pooled_ids.tolist())}
    sub = gather(pooled, torch.tensor([position[int(s)] for s in share.tolist()]))
    self_scores = None if scores is None else scores.self_scores().detach().float().cpu()
    select_s = time.perf_counter() - start
    return sub, selected, self_scores, score_s, select_s

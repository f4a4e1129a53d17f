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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

from jest_stream.batch import Batch, gather, map_columns
from jest_stream.errors import DataError, StateError
from jest_stream.selection import BatchScores
from jest_stream.step import Selection

__all__ = ['CommStats', 'GlobalScope', 'RANKS', 'all_gather_rows', 'device_for_collectives',
           'exchange_rows', 'gather_rank_states', 'own_rank_state', 'rank_and_world']


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


def device_for_collectives(tensor: Tensor) -> torch.device:
    """Where a collective over ``tensor`` runs: the current CUDA device under NCCL (which
    needs device tensors), the tensor's own device otherwise (gloo works on the CPU)."""
    backend = dist.get_backend()
    return tensor.device if backend != 'nccl' else torch.device('cuda', torch.cuda.current_device())


#: The key of a state that holds every rank's (:func:`gather_rank_states`).
RANKS = 'ranks'


def gather_rank_states(state: Any) -> Any:
    """``state`` for a checkpoint that one rank writes for all: every rank's, in rank order.

    Composer writes rank 0's algorithm and dataset states and every rank loads them, while
    some of a rank's state is its own (a policy steered by the rank's scores, a proxy learning
    from the rank's sub-batches, the rank's selection log). A collective: every rank must call
    it at once, as Composer does when it saves (a call on one rank alone waits until the
    process group's timeout). Tensors are gathered as CPU copies, so no rank maps another's
    GPU; each rank then holds every rank's state (``world`` times its own, in host memory).

    Returns:
        ``state`` itself without a process group or with one rank; else
        ``{'ranks': [state of rank 0, ..., state of rank w-1]}``.
    """
    world = rank_and_world()[1]
    if world == 1:
        return state
    states: list[Any] = [None] * world
    dist.all_gather_object(states, pytree.tree_map_only(
        Tensor, lambda tensor: tensor.detach().cpu(), state))
    return {RANKS: states}


def own_rank_state(saved: Any, what: str) -> Any:
    """This rank's state from :func:`gather_rank_states`'s result (other states pass through).

    Saved on as many ranks, each rank takes its own. Saved on another number of ranks, the
    states are taken only when all are equal (nothing per rank to split or merge).

    Raises:
        StateError: ``saved`` holds differing states of another number of ranks.
    """
    if not (isinstance(saved, dict) and set(saved) == {RANKS} and isinstance(saved[RANKS], list)
            and saved[RANKS]):
        return saved
    states = saved[RANKS]
    rank, world = rank_and_world()
    if len(states) == world:
        return states[rank]
    if all(_equal(states[0], other) for other in states[1:]):
        return states[0]
    raise StateError(f'{what} was saved on {len(states)} ranks, each with a state of its own '
                     f'(its policy, proxy or selection log), and cannot be split over '
                     f'{world}: resume on {len(states)} ranks')


def _equal(first: Any, second: Any) -> bool:
    """Whether two states hold the same structure and values (tensors compared exactly)."""
    leaves, spec = pytree.tree_flatten(first)
    other_leaves, other_spec = pytree.tree_flatten(second)
    if spec != other_spec:
        return False
    for a, b in zip(leaves, other_leaves, strict=True):
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            same = isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
        elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            same = bool(np.array_equal(a, b))
        else:
            same = type(a) is type(b) and a == b
        if not same:
            return False
    return True


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
    device = device_for_collectives(tensor)
    # Not every backend gathers bools (gloo does not): they travel as bytes.
    local = tensor.to(device, torch.uint8 if tensor.dtype == torch.bool else None).contiguous()
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
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
    return gathered.to(tensor.device, tensor.dtype)


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
    def exchange(column: Any) -> Any:
        if isinstance(column, Tensor):
            return all_gather_rows(column.index_select(0, rows.to(column.device)), stats)
        if isinstance(column, (list, tuple)):
            return _gather_objects([column[i] for i in rows.tolist()], stats)
        raise DataError(f'cannot exchange a batch column of type {type(column).__name__} '
                        f'between ranks; columns must be tensors or lists')

    return map_columns(exchange, batch)


class GlobalScope:
    """Selection over the global super-batch of every rank (``selection_scope='global'``).

    Every rank must run the step for the same ``(epoch, index)``: the scores (or
    embeddings) are all-gathered and put in a canonical order (sorted by sample id), every
    rank selects the same ``world_size x b`` candidates, and rank ``r`` trains the ``r``-th
    ``b`` of them, whose rows it gets from the ranks that hold them.
    """

    def __init__(self) -> None:
        self.comm = CommStats()
        self._last = CommStats()
        self._canonical_ids: Tensor | None = None
        self._order: Tensor | None = None

    def candidates(self, scores: BatchScores | None, sample_ids: Tensor, batch_size: int
                   ) -> tuple[BatchScores | None, int, int]:
        self._last = CommStats(self.comm.bytes, self.comm.seconds)
        _, world = rank_and_world()
        all_ids = all_gather_rows(sample_ids.cpu(), self.comm)
        self._order = torch.argsort(all_ids)
        self._canonical_ids = all_ids[self._order]
        if scores is not None:
            scores = scores.map_rows(self.align)
        return scores, len(self._canonical_ids), batch_size * world

    def align(self, values: Tensor) -> Tensor:
        """Every rank's ``values`` (one per candidate), in the canonical candidate order."""
        gathered = all_gather_rows(values, self.comm)
        return gathered[self._order.to(gathered.device)]

    def rows(self, batch: Batch, sample_ids: Tensor, selection: Selection, batch_size: int
             ) -> Batch:
        canonical = self._canonical_ids
        selected = selection.selected
        share = canonical[selected[self.share(batch_size)]]
        # Each rank sends the rows of its super-batch that any rank selected.
        chosen = set(canonical[selected].tolist())
        mine = torch.tensor([i for i, s in enumerate(sample_ids.tolist()) if s in chosen],
                            dtype=torch.long)
        pooled = exchange_rows(batch, mine, self.comm)
        pooled_ids = all_gather_rows(sample_ids.cpu()[mine], self.comm)
        position = {int(s): i for i, s in enumerate(pooled_ids.tolist())}
        return gather(pooled, torch.tensor([position[int(s)] for s in share.tolist()]))

    def share(self, batch_size: int) -> slice:
        rank, _ = rank_and_world()
        return slice(rank * batch_size, (rank + 1) * batch_size)

    def stats(self) -> dict[str, float]:
        return {'comm_bytes': self.comm.bytes - self._last.bytes,
                'comm_s': self.comm.seconds - self._last.seconds}

"""Quotas on the composition of a sub-batch: how many rows each group may, and must, get.

A group is a stream, a class, a concept or a domain: any integer per candidate. A quota
gives each group a number of rows in ``[low, high]``; :class:`GroupQuota` then picks rows
in the order of their keys (scores, perturbed scores, or random keys) while keeping every
bound reachable: a row whose group is full is skipped, and once the rows left to pick are
only just enough for the groups still short of their minimum, only those groups are taken.
Every selection method (joint, top-k, sampling, uniform) picks through it, so the bounds
hold exactly in every sub-batch.

Bounds are counts, made from shares of the sub-batch (CABS-style per-concept quotas) or
from the groups' shares of the super-batch (``proportional``), with the largest-remainder
rule so that they add up to the sub-batch size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from jest_stream.errors import DataError, SettingError

__all__ = ['GroupQuota', 'proportional_counts', 'share_bounds']


def proportional_counts(groups: Tensor, n_select: int) -> dict[int, int]:
    """Rows per group proportional to the groups' shares of the candidates.

    Largest-remainder rounding: the counts add up to ``n_select`` exactly, and each is
    within one of ``n_select * n_g / n``.

    Args:
        groups (LongTensor[n]): The group of every candidate.
        n_select (int): Rows to select.

    Returns:
        dict[int, int]: Rows for each group present.
    """
    values, counts = np.unique(groups.cpu().numpy(), return_counts=True)
    exact = counts * (n_select / counts.sum())
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind='stable')
    base[order[:n_select - int(base.sum())]] += 1
    return {int(g): int(c) for g, c in zip(values, base, strict=True)}


def share_bounds(groups: Tensor, n_select: int, *, min_share: float | Mapping[int, float],
                 max_share: float | Mapping[int, float]) -> tuple[dict[int, int],
                                                                  dict[int, int]]:
    """``[low, high]`` rows per group from shares of the sub-batch.

    ``low = ceil(min_share * n_select)``, capped by the group's candidates; ``high =
    floor(max_share * n_select)``.

    Args:
        groups (LongTensor[n]): The group of every candidate.
        n_select (int): Rows to select.
        min_share (float | Mapping[int, float]): Least share of each group (one for all, or
            per group; groups not named get 0).
        max_share (float | Mapping[int, float]): Largest share (groups not named get 1).

    Returns:
        tuple[dict, dict]: ``low`` and ``high`` for each group present.
    """
    values, counts = np.unique(groups.cpu().numpy(), return_counts=True)
    low, high = {}, {}
    for group, available in zip(values.tolist(), counts.tolist(), strict=True):
        lo = min_share.get(group, 0.0) if isinstance(min_share, Mapping) else min_share
        hi = max_share.get(group, 1.0) if isinstance(max_share, Mapping) else max_share
        low[group] = min(math.ceil(lo * n_select - 1e-9), available)
        high[group] = math.floor(hi * n_select + 1e-9)
    return low, high


@dataclass
class GroupQuota:
    """Picks rows by key under per-group bounds.

    Args:
        groups (LongTensor[n]): The group of every candidate.
        total (int): Rows that will be picked in all (through one or several :meth:`pick`).
        low (dict[int, int]): Least rows per group (missing groups: 0).
        high (dict[int, int]): Most rows per group (missing groups: no limit).

    When the maximums leave fewer rows than ``total`` among the candidates (a small or
    one-sided super-batch), they give way for this selection (``relaxed`` is then True);
    the minimums still hold.

    Raises:
        SettingError: The bounds contradict each other (minimums above ``total``, a maximum
            below its minimum).
    """

    groups: Tensor
    total: int
    low: dict[int, int]
    high: dict[int, int]
    counts: dict[int, int] = field(default_factory=dict)
    picked: int = 0
    relaxed: bool = False

    def __post_init__(self) -> None:
        self.groups = self.groups.cpu().long()
        present, available = np.unique(self.groups.numpy(), return_counts=True)
        room = 0
        for group, count in zip(present.tolist(), available.tolist(), strict=True):
            lo, hi = self.low.get(group, 0), self.high.get(group, self.total)
            if lo > hi:
                raise SettingError(f'the quota asks at least {lo} rows of group {group} but '
                                   f'allows at most {hi}: min_share must not exceed max_share')
            room += min(hi, count)
        if sum(self.low.get(g, 0) for g in present.tolist()) > self.total:
            raise SettingError(f'the quota minimums add up to more than the {self.total} rows '
                               f'selected: lower min_share')
        self.relaxed = room < self.total
        if self.relaxed:
            # Too few candidates in the allowed groups (a small or one-sided super-batch):
            # the maximums give way for this sub-batch, the minimums still hold.
            self.high = {}

    def _deficit(self) -> int:
        return sum(max(0, lo - self.counts.get(g, 0)) for g, lo in self.low.items())

    def pick(self, keys: Tensor, k: int) -> Tensor:
        """The ``k`` rows of highest key that keep every bound reachable, in key order.

        Args:
            keys (Tensor[n]): Keys of the candidates; ``-inf`` marks rows not to pick.
            k (int): Rows to pick now.

        Returns:
            LongTensor[k]: The rows, on ``keys.device``.

        Raises:
            DataError: Fewer than ``k`` pickable rows fit the bounds.
        """
        order = torch.argsort(keys.detach().cpu().double(), descending=True, stable=True)
        finite = torch.isfinite(keys.detach().cpu())
        groups = self.groups.tolist()
        taken: list[int] = []
        deficit = self._deficit()
        for row in order.tolist():
            if len(taken) == k:
                break
            if not finite[row]:
                break
            group = groups[row]
            count = self.counts.get(group, 0)
            if count >= self.high.get(group, self.total):
                continue
            short = count < self.low.get(group, 0)
            # The rows still to pick must cover what the short groups still need.
            if not short and self.total - self.picked <= deficit:
                continue
            taken.append(row)
            self.counts[group] = count + 1
            self.picked += 1
            deficit -= int(short)
        if len(taken) < k:
            raise DataError(
                f'only {len(taken)} of the {k} rows to pick fit the quota: too few candidates '
                f'with a finite key (rows without a loss cannot be picked) in the groups whose '
                f'shares it bounds ({self.shares_asked()}). Lower min_share or raise max_share, '
                f'or draw larger super-batches (a lower filter_ratio keeps fewer per candidate)')
        return torch.tensor(taken, dtype=torch.long, device=keys.device)

    def shares_asked(self) -> str:
        """The bounds per group, in rows of ``total``, as text for messages."""
        groups = sorted(set(self.low) | set(self.high))
        return ', '.join(f'group {g}: {self.low.get(g, 0)} to {self.high.get(g, self.total)} '
                         f'of {self.total}' for g in groups) or 'no bounds'

    def shares(self) -> dict[int, float]:
        """Each group's share of the rows picked so far."""
        return {g: c / max(self.picked, 1) for g, c in sorted(self.counts.items())}

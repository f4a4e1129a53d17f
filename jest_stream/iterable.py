"""Super-batches from an ``IterableDataset``: Hugging Face ``datasets`` in streaming mode,
torchdata's stateful datasets, WebDataset or LitData pipelines, any iterable of samples.

Resumption. A dataset with the state protocol (``state_dict()`` / ``load_state_dict()``,
as Hugging Face ``datasets.IterableDataset`` and torchdata's stateful datasets have)
resumes exactly: the source notes the dataset's state right after drawing each
super-batch, and the loader's state holds the one after the last super-batch handed over
(super-batches read ahead are drawn again). A dataset without it is accepted with a
warning: a resumed epoch reads its first super-batches again and discards them, which is
exact only when the iterable yields the same samples in the same order every time.
A Hugging Face dataset with a shuffle buffer (``.shuffle(buffer_size=...)``) does not save
the buffer's contents in its state, so its resumed order differs from the uninterrupted one.

Reading. The samples are drawn in the trainer's process (a dataset's state follows its own
iterator; DataLoader workers would each hold a part of it), collated ``B`` at a time.

Ranks. Under ``torch.distributed`` a Hugging Face dataset is split with
``datasets.distributed.split_dataset_by_node``; other iterables must yield each rank its own
part. Every rank must draw the same number of super-batches (collectives wait for all), so
after each super-batch the ranks agree whether all of them have a full one, and an epoch
ends for every rank when one runs out (a partial last super-batch is then left out; with
one rank it is selected from, or is a short one).

Sample ids. From a column of the samples (``id_key``), or, when the samples lack it, a
running count of the samples this rank drew in the epoch (``count * world_size + rank``):
such ids name positions in the stream, not samples, so a reference cache needs a real id
column.
"""

from __future__ import annotations

import copy
import itertools
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from jest_stream.batch import Batch, collate_samples
from jest_stream.distributed import device_for_collectives
from jest_stream.errors import StateError
from jest_stream.interrupts import interrupts_deferred

__all__ = ['IterableSource', 'has_state_protocol']

logger = logging.getLogger(__name__)

# How many recent super-batches' dataset states are kept: more than any read-ahead.
_KEPT_STATES = 64


def has_state_protocol(dataset: Any) -> bool:
    """Whether ``dataset`` saves and restores its position (``state_dict``/``load_state_dict``)."""
    return callable(getattr(dataset, 'state_dict', None)) \
        and callable(getattr(dataset, 'load_state_dict', None))


def _split_for_rank(dataset: Any, rank: int, world_size: int) -> Any:
    """A Hugging Face dataset's part for this rank; other iterables as they are."""
    if world_size == 1:
        return dataset
    try:
        from datasets import IterableDataset as HuggingFaceIterable
        from datasets.distributed import split_dataset_by_node
    except ImportError:
        return dataset
    if isinstance(dataset, HuggingFaceIterable):
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset


class IterableSource:
    """Super-batches of ``B`` samples from an iterable dataset (see the module's notes).

    Args:
        dataset (IterableDataset): The samples (dicts or tuples).
        super_batch_size (int): ``B``, per rank.
        rank (int): This rank.
        world_size (int): Ranks.
        id_key (str | int): Column (or field) of the sample ids, or where the counted ids go.
    """

    kind = 'iterable'

    def __init__(self, dataset: IterableDataset, *, super_batch_size: int, rank: int,
                 world_size: int, id_key: str | int) -> None:
        self.dataset = _split_for_rank(dataset, rank, world_size)
        self.super_batch_size = super_batch_size
        self.rank = rank
        self.world_size = world_size
        self.id_key = id_key
        self.stateful = has_state_protocol(self.dataset)
        if not self.stateful:
            warnings.warn(
                f'{type(dataset).__name__} has no state_dict()/load_state_dict(): a resumed '
                f'epoch reads its first super-batches again and discards them, which is exact '
                f'only if the dataset yields the same samples in the same order every time',
                stacklevel=3)
        self._states: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._resume: Any = None

    def samples_per_rank(self) -> int | None:
        """Samples per rank and epoch when the dataset knows its length; None otherwise."""
        try:
            return len(self.dataset)
        except TypeError:
            return None

    def iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        """Super-batches of ``epoch`` from super-batch ``start`` on."""
        if callable(getattr(self.dataset, 'set_epoch', None)):
            self.dataset.set_epoch(epoch)
        skip = start
        if self.stateful:
            before = self._states.get((epoch, start - 1)) if start else None
            state = self._resume if self._resume is not None else before
            if state is not None:
                self.dataset.load_state_dict(state)
                skip = 0
            self._resume = None
        with interrupts_deferred():
            samples = iter(self.dataset)
        count = start * self.super_batch_size
        index = 0
        while True:
            rows = list(itertools.islice(samples, self.super_batch_size))
            if not self._all_ranks_have(len(rows) == self.super_batch_size, rows):
                return
            if index < skip:  # a stateless dataset is read again up to the position
                index += 1
                continue
            batch = collate_samples([self._with_id(row, count + i) for i, row in
                                     enumerate(rows)])
            count += len(rows)
            if self.stateful:  # a copy: some datasets hand out their live state
                self._keep((epoch, start + index - skip), copy.deepcopy(self.dataset.state_dict()))
            index += 1
            yield batch

    def _all_ranks_have(self, full: bool, rows: list[Any]) -> bool:
        """Whether every rank drew a full super-batch (a lone rank: whether it drew any)."""
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return bool(rows)
        flag = torch.tensor([1 if full else 0])
        flag = flag.to(device_for_collectives(flag))  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _with_id(self, sample: Any, count: int) -> Any:
        sample_id = count * self.world_size + self.rank
        if isinstance(sample, Mapping):
            if self.id_key in sample:
                return sample
            return {**sample, self.id_key: sample_id}
        if isinstance(sample, (tuple, list)):
            return sample if isinstance(self.id_key, int) else (*sample, sample_id)
        return (sample, sample_id)

    def _keep(self, position: tuple[int, int], state: Any) -> None:
        self._states[position] = state
        while len(self._states) > _KEPT_STATES:
            self._states.popitem(last=False)

    def dataset_state(self, epoch: int, consumed: int) -> dict[str, Any]:
        """The dataset's state after super-batch ``consumed - 1`` of ``epoch``, on this rank.

        Raises:
            StateError: That state is no longer kept (more than 64 super-batches ago).
        """
        where = {'rank': self.rank, 'world_size': self.world_size,
                 'position': [epoch, consumed]}
        if not self.stateful:
            return {'stateful': False, **where}
        state = self._states.get((epoch, consumed - 1))
        if state is None and consumed:
            raise StateError(f'the dataset state after super-batch {consumed - 1} of epoch '
                             f'{epoch} is no longer kept (the last {_KEPT_STATES} are)')
        # At the start of an epoch there is nothing to restore: it starts afresh.
        return {'stateful': True, 'state': state, **where}

    def check_dataset_state(self, state: Any) -> None:
        """Raise a :class:`StateError` unless ``state`` came from an iterable source like this,
        on this rank of as many ranks (each rank's dataset state is its own part of the
        stream: it cannot move to another rank or be split over another number of them).

        Raises:
            StateError: Another kind of state, one with (or without) a state protocol this
                dataset lacks (or has), or one saved on another rank or world size.
        """
        if not isinstance(state, Mapping) or 'stateful' not in state:
            raise StateError(f'the loader state holds {type(state).__name__} for the dataset, '
                             f'not an iterable source\'s state: it was saved by a loader over '
                             f'another kind of dataset')
        if bool(state['stateful']) != self.stateful:
            raise StateError('the state was saved from an iterable dataset with'
                             + ('out' if not state['stateful'] else '')
                             + ' a state protocol, but this one '
                             + ('has one' if self.stateful else 'has none'))
        world, rank = state.get('world_size', 1), state.get('rank', 0)
        if world != self.world_size:
            raise StateError(f'the state was saved on {world} rank(s), this run has '
                             f'{self.world_size}: an iterable dataset\'s position is per rank, '
                             f'so resume it on {world} rank(s)')
        if rank != self.rank:
            raise StateError(f'the state was saved by rank {rank}, this is rank {self.rank}: '
                             f'with an iterable dataset every rank saves its own loader state '
                             f'and loads it back (a checkpoint per rank)')

    def load_dataset_state(self, state: dict[str, Any] | None) -> None:
        """Resume the dataset at its next epoch from the state checked by
        :meth:`check_dataset_state` (a dataset without the state protocol is read again up
        to the position instead)."""
        if state is not None and self.stateful:
            self._resume = state.get('state')
            epoch, consumed = state.get('position', (None, 0))
            if consumed:  # so that a checkpoint before the next hand-over saves it again
                self._keep((epoch, consumed - 1), self._resume)

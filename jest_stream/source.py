"""Super-batches with global sample ids, from a StreamingDataset or a map-style Dataset.

A source reads one epoch at a time in super-batches of ``B`` samples (per rank)
through a ``torch.utils.data.DataLoader`` with workers, and knows how to resume
an epoch after a given number of super-batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader, Dataset, IterableDataset

from jest_stream.batch import Batch, collate_samples
from jest_stream.errors import SettingError, SettingTypeError, StateError, UsageError
from jest_stream.interrupts import interrupts_deferred
from jest_stream.iterable import IterableSource
from jest_stream.randomness import SHUFFLE, derive_generator

__all__ = [
    'ID_KEY',
    'SampleIdStreamingDataset',
    'SuperBatchSource',
    'StreamingSource',
    'MapSource',
    'ReadSettings',
    'make_source',
]

ID_KEY = 'sample_id'


class SampleIdStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose samples carry their global sample id.

    The id is the sample's index in the whole dataset (all streams, all shards), the key
    of the reference cache. It is added under ``sample_id``; a dataset that already
    has a column of that name is refused rather than overwritten.

    Built with ``validate_hash``, it also checks shards that are already local (streaming
    checks only what it downloads): the index must record that hash for every shard
    (checked at construction), and each process hashes a local shard before it reads it
    the first time. A sample that does not decode raises a
    :class:`~jest_stream.shards.ShardError` naming the shard file, the sample and the fix.

    Args:
        **kwargs: Keyword arguments of ``StreamingDataset``.

    Raises:
        NoShardHashes: ``validate_hash`` names a hash that the index does not record.
    """

    def __init__(self, **kwargs: Any) -> None:
        from jest_stream.shards import require_hashes

        super().__init__(**kwargs)
        self._checked_shards: set[int] = set()
        require_hashes(self)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The sample ``sample_id`` with its id under ``sample_id``.

        Raises:
            ShardError: Its local shard fails its hash (with ``validate_hash``), or the
                sample does not decode.
            DataError: The dataset already has a ``sample_id`` column.
        """
        from jest_stream import shards
        from jest_stream.errors import DataError, JestStreamError

        shard_id, index = (int(i) for i in self.spanner[sample_id])
        if shard_id not in self._checked_shards:
            shards.check_local_shard(self, shard_id)
            self._checked_shards.add(shard_id)
        try:
            sample = super().get_item(sample_id, retry)
        except (JestStreamError, RuntimeError):  # streaming's own: a download or a thread failed
            raise
        except Exception as error:
            raise shards.sample_error(self, shard_id, index, sample_id, error) from error
        if ID_KEY in sample:
            raise DataError(
                f'the dataset already has a column named {ID_KEY!r}; use a plain StreamingDataset '
                f'and pass id_key={ID_KEY!r} to the loader to use that column as the sample id')
        sample = dict(sample)
        sample[ID_KEY] = sample_id
        return sample


class SuperBatchSource(ABC):
    """Base of the sources: one epoch of super-batches, resumable after ``start`` of them."""

    super_batch_size: int
    rank: int
    world_size: int
    #: ``streaming`` or ``map``: recorded in the loader's state, checked when it is loaded.
    kind: str

    @abstractmethod
    def samples_per_rank(self) -> int | None:
        """Samples this rank reads per epoch (None when unknown: an iterable source)."""

    @abstractmethod
    def iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        """Super-batches of ``epoch``, skipping the first ``start`` of them."""

    def dataset_state(self, epoch: int, consumed: int) -> dict[str, Any] | None:
        """What the dataset needs to resume ``epoch`` after ``consumed`` super-batches."""
        return None

    def check_dataset_state(self, state: Any) -> None:
        """Raise a :class:`StateError` unless ``state`` can resume this source's dataset."""
        if state is not None:
            raise StateError(f'a {self.kind} dataset keeps no state of its own, but the loader '
                             f'state holds {type(state).__name__}: it was saved by a loader over '
                             f'another kind of dataset')

    def load_dataset_state(self, state: dict[str, Any] | None) -> None:
        """Prepare the underlying dataset to resume from ``state`` at its next epoch."""
        return None


@dataclass(frozen=True)
class ReadSettings:
    """How a source's inner ``DataLoader`` reads super-batches.

    Attributes:
        num_workers (int): Worker processes that read and collate.
        pin_memory (bool): Page-locked host batches.
        prefetch_factor (int | None): Super-batches each worker reads ahead.
        timeout (float): Seconds to wait for a worker's batch (0: no limit).
    """

    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int | None = 2
    timeout: float = 0.0

    def loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over ``dataset`` that collates with :func:`collate_samples`."""
        workers = self.num_workers
        return DataLoader(dataset, num_workers=workers, collate_fn=collate_samples,
                          pin_memory=self.pin_memory,
                          prefetch_factor=self.prefetch_factor if workers else None,
                          timeout=self.timeout if workers else 0, **kwargs)


class StreamingSource(SuperBatchSource):
    """Super-batches from a ``StreamingDataset`` built with ``batch_size=B``.

    Streaming partitions each epoch into chunks of its ``batch_size`` dealt
    round-robin to the workers, so the inner DataLoader must read the same ``B``;
    resumption is then exact at any super-batch boundary.
    """

    kind = 'streaming'

    def __init__(self, dataset: StreamingDataset, *, super_batch_size: int,
                 read: ReadSettings) -> None:
        if dataset.batch_size != super_batch_size:
            raise SettingError(
                f'StreamingDataset(batch_size={dataset.batch_size}) must equal the super-batch '
                f'size B = batch_size / (1 - filter_ratio) = {super_batch_size}: streaming deals '
                f'chunks of its batch_size to the workers, and a different read size breaks exact '
                f'resumption. Build the dataset with batch_size={super_batch_size}.')
        self.dataset = dataset
        self.super_batch_size = super_batch_size
        world = dataset._parallel_rank_world  # noqa: SLF001 - streaming's own view of the ranks
        self.rank = world.rank
        self.world_size = world.num_ranks
        self._loader = read.loader(dataset, batch_size=super_batch_size, drop_last=False)

    def samples_per_rank(self) -> int:
        return len(self.dataset)

    def iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        first = True
        with interrupts_deferred():  # iter() forks the workers
            batches = iter(self._loader)
        for batch in batches:
            if first:
                streaming_epoch = self.dataset.next_epoch - 1
                if streaming_epoch != epoch:
                    raise UsageError(
                        f'the StreamingDataset is in epoch {streaming_epoch} but the loader '
                        f'expected epoch {epoch}: every iter() of a StreamingDataset starts a '
                        f'new epoch, so only the jest_stream loader may iterate it. Give the '
                        f'loader a dataset nothing else reads, and load resume state into a '
                        f'fresh one.')
                first = False
            yield batch

    def dataset_state(self, epoch: int, consumed: int) -> dict[str, Any]:
        raw = consumed * self.super_batch_size * self.world_size
        state = self.dataset.state_dict(num_samples=raw, from_beginning=True)
        state['epoch'] = epoch
        state['sample_in_epoch'] = raw
        return state

    def check_dataset_state(self, state: Any) -> None:
        """The saved streaming state must fit this dataset: its shuffle seed and canonical
        nodes (streaming would silently take the saved ones, and replay another order)."""
        if not isinstance(state, Mapping) or not {'epoch', 'sample_in_epoch'} <= set(state):
            raise StateError(f'the loader state holds {type(state).__name__} for the dataset, '
                             f'not a StreamingDataset state: it was saved by a loader over '
                             f'another kind of dataset')
        for key in ('shuffle_seed', 'num_canonical_nodes'):
            saved, mine = state.get(key), getattr(self.dataset, key, None)
            if saved is not None and mine is not None and saved != mine:
                raise StateError(
                    f'the saved loader read a StreamingDataset with {key}={saved} but this one '
                    f'has {key}={mine}: the resumed epoch would read another order. Build the '
                    f'dataset with {key}={saved} to resume')

    def load_dataset_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.dataset.load_state_dict(state)


class _IndexedDataset(Dataset):
    """A map-style dataset whose samples carry a sample id: their own, or their index.

    A dict sample that has an ``id_key`` column, a namedtuple with an ``id_key`` field, or a
    tuple sample when ``id_key`` is a field position, keeps its ids. Otherwise the sample's
    index is the id: added as the column ``id_key`` to a dict, appended as the last field of
    a tuple (a namedtuple then becomes a plain tuple).
    """

    def __init__(self, dataset: Dataset, id_key: str | int) -> None:
        self.dataset = dataset
        self.id_key = id_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, Mapping):
            if self.id_key in sample:
                return sample
            sample = dict(sample)
            sample[self.id_key] = index
            return sample
        if isinstance(sample, (tuple, list)):
            if isinstance(self.id_key, int) or self.id_key in getattr(sample, '_fields', ()):
                return sample
            return (*sample, index)
        return (sample, index)


@dataclass
class MapSource(SuperBatchSource):
    """Super-batches from a map-style ``Dataset``, shuffled per epoch by a derived generator.

    Each epoch is a permutation of the indices cut into global super-batches of
    ``B * world_size``; rank ``r`` reads the ``r``-th of ``world_size`` equal parts of each,
    so every rank reads the same number of super-batches of the same sizes.

    Attributes:
        dataset (Dataset): The dataset, its samples carrying their ids.
        super_batch_size (int): ``B`` per rank.
        shuffle (bool): Shuffle each epoch.
        seed (int): Seed of the shuffles (derived per epoch).
        rank (int): This rank.
        world_size (int): Ranks.
        read (ReadSettings): How the inner DataLoader reads.
    """

    dataset: Dataset
    super_batch_size: int
    shuffle: bool
    seed: int
    rank: int
    world_size: int
    read: ReadSettings

    kind = 'map'

    def samples_per_rank(self) -> int:
        return len(self.dataset) // self.world_size

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=derive_generator(self.seed, SHUFFLE, epoch))
        else:
            order = torch.arange(n)
        global_size = self.super_batch_size * self.world_size
        batches = []
        for chunk in order.split(global_size):
            # Equal shares keep the ranks in step: the few samples of a partial last chunk
            # that do not divide among the ranks are left out of this epoch.
            share = len(chunk) // self.world_size
            batches.append(chunk[self.rank * share:(self.rank + 1) * share].tolist())
        return batches

    def iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        batches = [b for b in self._rank_batches(epoch)[start:] if b]
        loader = self.read.loader(self.dataset, batch_sampler=batches)
        with interrupts_deferred():  # iter() forks the workers
            batches = iter(loader)
        yield from batches


def make_source(dataset: Dataset | StreamingDataset, *, super_batch_size: int, shuffle: bool,
                seed: int, rank: int, world_size: int, read: ReadSettings,
                id_key: str | int) -> SuperBatchSource:
    """The source that fits ``dataset``: streaming, iterable, or map-style with ``__len__``.

    Raises:
        SettingTypeError: ``dataset`` is none of them.
        SettingError: Workers asked for an iterable dataset.
    """
    if isinstance(dataset, StreamingDataset):
        return StreamingSource(dataset, super_batch_size=super_batch_size, read=read)
    if isinstance(dataset, IterableDataset):
        if read.num_workers:
            raise SettingError(
                f'num_workers={read.num_workers}: an iterable dataset is read in the trainer\'s '
                f'process, where its state follows the position exactly; use num_workers=0 '
                f'(or write the data as MDS shards with streaming.MDSWriter to read it with '
                f'workers)')
        return IterableSource(dataset, super_batch_size=super_batch_size, rank=rank,
                              world_size=world_size, id_key=id_key)
    if not hasattr(dataset, '__len__') or not hasattr(dataset, '__getitem__'):
        raise SettingTypeError(
            f'dataset must be a StreamingDataset, a map-style torch Dataset with __len__, or '
            f'a torch IterableDataset; got {type(dataset).__name__}')
    return MapSource(_IndexedDataset(dataset, id_key), super_batch_size=super_batch_size,
                     shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, read=read)

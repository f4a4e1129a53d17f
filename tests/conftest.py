"""Fixtures: tiny real MDS datasets in temp dirs, and streaming's shared memory released.

Helpers that tests import live in the ``helpers`` package beside this file."""

from __future__ import annotations

import atexit
import gc
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import streaming.base.dataset
import streaming.base.shared.prefix
from streaming.base.shared.memory import SharedMemory

from helpers.data import write_mds
from jest_stream import SampleIdStreamingDataset
from jest_stream.shm import remove_stale_shared_memory


def pytest_sessionstart(session: pytest.Session) -> None:
    # Segments of killed earlier runs only: streaming jobs running on this machine keep theirs.
    remove_stale_shared_memory()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Every test ends with a garbage collection (below). Over the objects of torch, Composer
    # and the collected test modules it takes about 0.3 s, which adds minutes to the suite;
    # frozen, they are not traversed again, and a collection costs only what the test made.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def release_streaming_shared_memory(monkeypatch):
    """Releases, after each test, the shared memory its StreamingDatasets opened.

    streaming keeps every segment a dataset opens (and its file descriptor) until the process
    exits, and each new dataset opens every segment still registered to look for a free
    prefix, so a long test session would otherwise run out of file descriptors.
    """
    opened: list[SharedMemory] = []
    original_init = SharedMemory.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(SharedMemory, '__init__', recording_init)
    yield
    monkeypatch.undo()
    gc.collect()
    for shm in opened:
        atexit.unregister(shm.cleanup)
        for segment in shm.created_shms + shm.opened_shms:
            try:
                segment.close()
            except BufferError:
                pass  # still viewed by a live object: its descriptor goes when that object does
        for segment in shm.created_shms:
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


@pytest.fixture
def streaming_lock_files_in_tmp_path(tmp_path, monkeypatch):
    """Keep the lock files of this test's StreamingDatasets in its folder, not in /tmp
    (modules whose every test makes datasets use it with ``pytestmark``)."""
    locks = tmp_path / 'streaming-locks'
    locks.mkdir()
    for module in (streaming.base.dataset, streaming.base.shared.prefix):
        monkeypatch.setattr(module, 'gettempdir', lambda: str(locks))


@pytest.fixture
def child_tmpdir() -> Iterator[Path]:
    """A short, fresh temp dir for a child process's ``TMPDIR`` (the lock files of a killed
    child stay in it, and go with it).

    Not under ``tmp_path``: multiprocessing binds AF_UNIX sockets in ``TMPDIR`` (DataLoader
    workers handing tensors over do), and their paths may not exceed 107 bytes, which a
    test's own folder nearly reaches (under pytest-xdist it does).
    """
    path = Path(tempfile.mkdtemp(prefix='child-'))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mds_dir(tmp_path: Path) -> Path:
    """300 samples in about a dozen shards."""
    return write_mds(tmp_path / 'mds', 300)


@pytest.fixture
def make_streaming(tmp_path: Path) -> Callable[..., SampleIdStreamingDataset]:
    """Builds SampleIdStreamingDatasets over a directory, each with its own local cache copy."""
    made: list[SampleIdStreamingDataset] = []

    def make(directory: Path, *, batch_size: int, shuffle: bool = True, seed: int = 7,
             **kwargs) -> SampleIdStreamingDataset:
        dataset = SampleIdStreamingDataset(
            local=str(directory), batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
            num_canonical_nodes=1, **kwargs)
        made.append(dataset)
        return dataset

    yield make
    made.clear()
    gc.collect()

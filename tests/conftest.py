"""Shared fixtures: tiny real MDS datasets in temp dirs, small models, recording scorers."""

from __future__ import annotations

import atexit
import gc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter
from streaming.base.shared.memory import SharedMemory
from streaming.base.util import clean_stale_shared_memory
from torch import nn

from jest_stream import ClassificationScorer, SampleIdStreamingDataset

N_FEATURES = 8
N_CLASSES = 4


def pytest_sessionstart(session: pytest.Session) -> None:
    # Segments left by a killed earlier run would otherwise collide with this one's.
    clean_stale_shared_memory()


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


def features_and_labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy task: the label is the arg-max of the first four features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = x[:, :N_CLASSES].argmax(1).astype(np.int64)
    return x, y


def write_mds(directory: Path, n: int, *, seed: int = 0, size_limit: int = 1 << 10,
              extra: dict | None = None) -> Path:
    """``n`` samples with columns x (float32[8]) and y (int), in many small shards."""
    x, y = features_and_labels(n, seed)
    columns = {'x': f'ndarray:float32:{N_FEATURES}', 'y': 'int'}
    if extra:
        columns.update({name: kind for name, (kind, _) in extra.items()})
    with MDSWriter(out=str(directory), columns=columns, size_limit=size_limit) as writer:
        for i in range(n):
            sample = {'x': x[i], 'y': int(y[i])}
            if extra:
                sample.update({name: int(values[i]) if kind == 'int' else values[i]
                               for name, (kind, values) in extra.items()})
            writer.write(sample)
    return directory


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


def tiny_classifier(seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(N_FEATURES, N_CLASSES)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator) * 0.5)
        model.bias.zero_()
    return model


class RecordingScorer:
    """A ClassificationScorer that records the sample ids of every super-batch it scores."""

    def __init__(self, learner: nn.Module, reference: nn.Module | None = None, **kwargs) -> None:
        self.inner = ClassificationScorer(learner, reference, input_key='x', target_key='y',
                                          **kwargs)
        self.learner = learner
        self.seen: list[list[int]] = []

    def __call__(self, batch, sample_ids, criterion):
        self.seen.append(sample_ids.tolist())
        return self.inner(batch, sample_ids, criterion)

"""Tiny real datasets: a learnable toy task written as MDS shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_FEATURES = 8
N_CLASSES = 4


def features_and_labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy task: the label is the arg-max of the first four features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = x[:, :N_CLASSES].argmax(1).astype(np.int64)
    return x, y


def write_mds(directory: Path, n: int, *, seed: int = 0, size_limit: int = 1 << 10,
              extra: dict | None = None) -> Path:
    """``n`` samples with columns x (float32[8]) and y (int), in many small shards.

    ``extra`` maps a column name to ``(mds_encoding, values)``.
    """
    from streaming import MDSWriter

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

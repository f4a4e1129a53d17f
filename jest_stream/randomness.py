"""Private random generators derived from positions, never from global state.

Every super-batch gets its own generator, derived from ``(seed, purpose, epoch,
index)``. Selection is then reproducible whatever the prefetch depth, whichever
process scores the batch and wherever training resumes: the only state to save
is the position.
"""

from __future__ import annotations

import numpy as np
import torch

from jest_stream.errors import SettingError

__all__ = ['derive_seed', 'derive_generator', 'SELECTION', 'SHUFFLE', 'POLICY', 'PROXY']

# Purposes keep the streams of different consumers independent of each other.
SELECTION = 1
SHUFFLE = 2
POLICY = 3  # the candidates a lower pressure considers, and the uniformly mixed rows
PROXY = 4  # a proxy learner's random draws (dropout) while it learns


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on ``seed`` and every key, well mixed.

    Args:
        seed (int): The user's seed.
        *keys (int): Non-negative integers naming the stream (purpose, epoch, index...).

    Returns:
        int: A seed for ``torch.Generator.manual_seed``.
    """
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(key) for key in keys)]
    if any(key < 0 for key in entropy[1:]):
        raise SettingError(f'derive_seed keys must be non-negative, got {keys}')
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def derive_generator(seed: int, *keys: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))

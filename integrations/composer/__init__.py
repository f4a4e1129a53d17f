"""Composer integration: JEST selection inside a Composer ``Trainer``.

Two ways to select in a Composer run, with different costs (the method card,
``README.md`` beside this file, compares them):

- :class:`JESTAlgorithm`: the train dataloader is a plain ``DataLoader`` that reads
  super-batches of ``B``; at ``Event.AFTER_DATALOADER`` the algorithm runs the selection
  step on ``state.batch``. Composer counts raw samples, and its own dataset checkpoint
  resumes the data exactly. Pass ``algorithm_passes=jest_first`` to the ``Trainer``.
- :class:`~jest_stream.SelectiveLoader` as the ``train_dataloader``, inline or with a
  co-located scorer process, with :class:`JESTLoaderCallback` for checks, metrics and the
  scorer process's life cycle.

Importing this package needs Composer (the ``composer`` extra of jest-stream); the rest of
jest_stream never imports it.
"""

try:
    import composer  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'jest_stream.integrations.composer needs Composer; install jest-stream with its '
        'composer extra (pip install -e ".[composer]" in a clone, or mosaicml>=0.32.1,<0.33)'
    ) from error

from jest_stream.integrations.composer.algorithm import OUTSIDE_WINDOW, JESTAlgorithm
from jest_stream.integrations.composer.callback import JESTLoaderCallback
from jest_stream.integrations.composer.models import call_model, unwrap_model
from jest_stream.integrations.composer.passes import jest_first

__all__ = [
    'JESTAlgorithm',
    'JESTLoaderCallback',
    'OUTSIDE_WINDOW',
    'call_model',
    'jest_first',
    'unwrap_model',
]

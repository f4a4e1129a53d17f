"""Scoring in a co-located process that shares the learner's weights (``scoring='process'``).

- :mod:`~jest_stream.process.lifecycle`: sending the scorer, starting and stopping the
  process, :class:`ScorerProcessError`;
- :mod:`~jest_stream.process.client`: the trainer's side and its timeouts;
- :mod:`~jest_stream.process.child`: the scorer process's loop;
- :mod:`~jest_stream.process.messages`: the typed messages between the two;
- :mod:`~jest_stream.process.weights`: the shared weights and the staleness policy;
- :mod:`~jest_stream.process.ring`: the ring of shared super-batch buffers.

This package does not import mosaicml-streaming, so the scorer process starts quickly.
"""

from jest_stream.process.client import ProcessScoring
from jest_stream.process.lifecycle import ScorerProcessError, check_picklable

__all__ = ['ProcessScoring', 'ScorerProcessError', 'check_picklable']

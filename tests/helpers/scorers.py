"""Scorers that record what they score, in whichever process they run.

The scorer process unpickles scorers by importing their module, so this module imports
nothing from mosaicml-streaming.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

from torch import nn

from jest_stream import ClassificationScorer


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


class CountingScorer(ClassificationScorer):
    """A ``ClassificationScorer`` that appends a line to ``log`` for every super-batch it
    scores, in whichever process it runs."""

    def __init__(self, *args, log: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log = Path(log)

    def __call__(self, batch, sample_ids, criterion):
        with open(self.log, 'a') as out:
            out.write(f'{len(sample_ids)}\n')
        return super().__call__(batch, sample_ids, criterion)

    def calls(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


class SlowScorer(ClassificationScorer):
    """A ``ClassificationScorer`` that takes ``delay`` more seconds per super-batch, and
    appends a line to ``log`` when it starts each one."""

    def __init__(self, *args, delay: float, log: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.log = Path(log)

    def __call__(self, batch, sample_ids, criterion):
        with open(self.log, 'a') as out:
            out.write(f'{os.getpid()}\n')
        time.sleep(self.delay)
        return super().__call__(batch, sample_ids, criterion)


class StopInLockScorer(ClassificationScorer):
    """A ``ClassificationScorer`` whose scorer process stops itself (SIGSTOP) while it holds
    the control lock of the shared weights, the ``stop_at``-th time it takes it: a debugger,
    or a frozen container, at the worst moment."""

    def __init__(self, *args, stop_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def __setstate__(self, state: dict) -> None:
        # Runs where the scorer is unpickled: in the scorer process.
        from jest_stream.process.weights import SharedWeights

        self.__dict__.update(state)
        taken = itertools.count(1)
        stop_at = self.stop_at

        def stop_when_due() -> None:
            if next(taken) == stop_at:
                os.kill(os.getpid(), signal.SIGSTOP)

        SharedWeights.on_locked = stop_when_due

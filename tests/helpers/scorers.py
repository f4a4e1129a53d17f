"""Scorers that record what they score, in whichever process they run.

The scorer process unpickles scorers by importing their module, so this module imports
nothing from mosaicml-streaming.
"""

from __future__ import annotations

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

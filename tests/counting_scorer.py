"""A scorer that counts its calls in a file, importable without mosaicml-streaming.

The scorer process unpickles scorers by importing their module, so this one lives apart from
conftest (which imports streaming).
"""

from __future__ import annotations

from pathlib import Path

from jest_stream import ClassificationScorer


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

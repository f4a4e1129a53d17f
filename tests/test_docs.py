"""The docs match the code: every path they cite exists, and the code blocks marked to run
(``<!-- runs: name -->`` before a Python block) run on tiny data."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import write_mds

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', ROOT / 'benchmarks' / 'README.md',
        ROOT / 'integrations' / 'composer' / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
# Backticked repository paths: `docs/x.md`, `benchmarks/results/x/y.json`, ...
CITED = re.compile(r'`((?:docs|benchmarks|examples|jest_stream|integrations|tests|scripts)'
                   r'/[\w./-]*[\w/])`')
LINK = re.compile(r'\]\(([^)#\s]+)(?:#[^)]*)?\)')
RUNS = re.compile(r'<!-- runs: ([\w-]+) -->\s*```python\n(.*?)```', re.S)


def _cited(doc: Path) -> list[tuple[str, Path]]:
    text = doc.read_text()
    paths = [(m, ROOT / m) for m in CITED.findall(text)]
    paths += [(m, (doc.parent / m).resolve()) for m in LINK.findall(text)
              if not m.startswith(('http://', 'https://', 'mailto:'))]
    return paths


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_path_exists(doc: Path):
    missing = [cited for cited, path in _cited(doc) if not path.exists()]
    assert not missing, f'{doc.relative_to(ROOT)} cites paths that do not exist: {missing}'


def test_the_checker_sees_citations():
    # The README cites docs and results; if the patterns broke, the test above would pass
    # vacuously.
    assert len(_cited(ROOT / 'README.md')) > 15


class TinyCNN(nn.Module):
    """Four classes from 1x8x8 images."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _prelude(tmp_path: Path) -> dict:
    """What the marked blocks use: tiny data under data/, models, an optimizer."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((640, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 640)
    write_mds(tmp_path / 'unused', 1)  # imports streaming's writer once, outside the blocks
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / 'data' / 'pool'),
                   columns={'image': 'ndarray:float32:1,8,8', 'label': 'int'},
                   size_limit=1 << 14) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.write({'image': image, 'label': int(label)})
    model = TinyCNN(0)
    from jest_stream import ClassificationScorer, SampleIdStreamingDataset, SelectiveLoader

    namespace = {
        'torch': torch, 'np': np, 'model': model, 'reference_model': TinyCNN(1),
        'optimizer': torch.optim.SGD(model.parameters(), lr=0.1), 'log': lambda metrics: None,
        'images': images[:100], 'labels': labels[:100],
        'ClassificationScorer': ClassificationScorer, 'SelectiveLoader': SelectiveLoader,
        'validation_accuracy': lambda: 0.5,
    }
    namespace['dataset'] = SampleIdStreamingDataset(local=str(tmp_path / 'data' / 'pool'),
                                                    batch_size=320, shuffle=False)
    namespace['scorer'] = ClassificationScorer(model, namespace['reference_model'])
    return namespace


BLOCKS = [(doc, name, code) for doc in DOCS for name, code in RUNS.findall(doc.read_text())]


def test_there_are_blocks_to_run():
    assert {name for _, name, _ in BLOCKS} >= {'quickstart', 'your-data', 'map-style',
                                              'policies'}


@pytest.mark.parametrize('doc, name, code', BLOCKS, ids=[f'{d.name}:{n}' for d, n, _ in BLOCKS])
def test_marked_blocks_run(doc, name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _prelude(tmp_path)
    exec(compile(textwrap.dedent(code), f'{doc.name}:{name}', 'exec'), namespace)  # noqa: S102

"""Ctrl-C while the loader's DataLoader forks its workers raises KeyboardInterrupt."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.data import write_mds

REPO = Path(__file__).resolve().parents[1]

# The at-fork hook sends SIGINT once, from the first worker fork: its handler then runs
# inside the hook, where CPython drops any exception (as it does when a real Ctrl-C arrives
# while the DataLoader forks).
SCRIPT = '''
import os, signal, sys
import torch
from torch.utils.data import TensorDataset
from jest_stream import SampleIdStreamingDataset, SelectiveLoader

sent = []

def interrupt_once():
    if not sent:
        sent.append(True)
        signal.raise_signal(signal.SIGINT)

if sys.argv[1] == 'map':
    dataset = TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
else:
    dataset = SampleIdStreamingDataset(local=sys.argv[2], batch_size=16, num_canonical_nodes=1)
loader = SelectiveLoader(dataset, batch_size=8, filter_ratio=0.5, criterion='uniform',
                         num_workers=1)
os.register_at_fork(after_in_parent=interrupt_once)
try:
    for epoch in range(3):
        for batch in loader:
            pass
except KeyboardInterrupt:
    print('INTERRUPTED', epoch, flush=True)
    raise
print('DONE', flush=True)
'''


@pytest.mark.parametrize('source', ['map', 'streaming'])
def test_an_interrupt_while_workers_fork_is_raised_not_lost(tmp_path, source):
    data = write_mds(tmp_path / 'mds', 64) if source == 'streaming' else tmp_path
    script = tmp_path / 'interrupted.py'
    script.write_text(textwrap.dedent(SCRIPT))
    run = subprocess.run([sys.executable, str(script), source, str(data)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert 'INTERRUPTED 0' in run.stdout, run.stdout + run.stderr
    assert 'DONE' not in run.stdout
    assert run.returncode != 0 and 'KeyboardInterrupt' in run.stderr
    assert 'Exception ignored' not in run.stderr, run.stderr

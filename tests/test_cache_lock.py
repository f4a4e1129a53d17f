"""One writer per cache folder, checked with real concurrent processes.

A second writer of a folder (a second annotation run, on another rank or from a requeued
job) is refused at once, or after a bounded wait, with a CacheError naming the folder and
the other writer; it never removes the other writer's temporary files. A killed writer
never blocks the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from helpers.data import N_CLASSES, N_FEATURES, write_mds
from helpers.models import tiny_classifier
from helpers.waits import wait_for
from jest_stream.cache import (
    CacheLocked,
    CacheWriter,
    Fingerprint,
    ReferenceCache,
    dataset_fingerprint,
    model_checksum,
)
from jest_stream.cache.lock import LOCK_FILE, OWNER_FILE, WriterLock
from jest_stream.errors import SettingError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(TESTS), str(REPO)])}
N, PART = 40, 10

# A writer in its own process: writes part 0, says "ready", and on "go" writes the rest.
WRITER = textwrap.dedent('''
    import sys
    import numpy as np
    from jest_stream.cache import CacheWriter, Fingerprint

    path, dataset = sys.argv[1], sys.argv[2]
    fingerprint = Fingerprint(dataset=dataset, model='m' * 64, transform='t')
    losses = np.arange({n}, dtype=np.float32)
    with CacheWriter(path, fingerprint=fingerprint, num_samples={n}, group='loss',
                     part_size={part}) as writer:
        writer.write_part(0, {{'loss': losses[:{part}]}})
        print('ready', flush=True)
        if sys.stdin.readline().strip() != 'go':
            sys.exit(3)
        for part in range(1, writer.num_parts):
            start, stop = writer.part_range(part)
            writer.write_part(part, {{'loss': losses[start:stop]}})
        writer.finish()
    print('done', flush=True)
''').format(n=N, part=PART)


@pytest.fixture
def dataset_hash(tmp_path: Path) -> str:
    return dataset_fingerprint(write_mds(tmp_path / 'mds', 5))


def subprocess_env(tmpdir: Path) -> dict[str, str]:
    """The tests' imports, and temporary files (of killed processes too) in ``tmpdir``."""
    return {**ENV, 'TMPDIR': str(tmpdir)}


def start_writer(path: Path, dataset_hash: str) -> subprocess.Popen:
    """A writer process that holds ``path`` (in a test's folder) once it has printed 'ready'."""
    process = subprocess.Popen([sys.executable, '-c', WRITER, str(path), dataset_hash],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=subprocess_env(path.parent), cwd=REPO)
    line = process.stdout.readline()
    assert line == 'ready\n', (line, process.stderr.read())
    return process


def finish_writer(process: subprocess.Popen, *, told: bool = False) -> None:
    """Tell the writer to finish (unless it was ``told`` already) and check it did."""
    out, err = process.communicate(None if told else 'go\n', timeout=120)
    assert process.returncode == 0 and out == 'done\n', err


def writer_in_this_process(path: Path, dataset_hash: str, **kwargs) -> CacheWriter:
    fingerprint = Fingerprint(dataset=dataset_hash, model='m' * 64, transform='t')
    return CacheWriter(path, fingerprint=fingerprint, num_samples=N, group='loss',
                       part_size=PART, **kwargs)


def test_a_second_writer_is_refused_at_once_and_leaves_the_first_ones_files(
        tmp_path, dataset_hash):
    cache = tmp_path / 'ref'
    first = start_writer(cache, dataset_hash)
    try:
        # What the first writer's part in flight looks like on disk.
        in_flight = cache / 'parts' / f'.part-000001.bin.tmp-{first.pid}'
        in_flight.write_bytes(b'half a part')
        started = time.monotonic()
        with pytest.raises(CacheLocked) as error:
            writer_in_this_process(cache, dataset_hash)
        assert time.monotonic() - started < 10  # refused at once, not after a wait
        message = str(error.value)
        assert str(cache) in message and f'pid {first.pid}' in message
        assert 'another annotation' in message and 'lock_timeout' in message
        assert in_flight.read_bytes() == b'half a part'  # a live writer's file is never removed
    finally:
        finish_writer(first)
    stored = ReferenceCache(cache, dataset=tmp_path / 'mds', model_checksum=None, transform=None)
    assert np.array_equal(stored.read(range(N))['loss'], np.arange(N, dtype=np.float32))
    assert not (cache / OWNER_FILE).exists()


def test_a_waiting_writer_gives_up_after_its_timeout_or_continues_the_finished_cache(
        tmp_path, dataset_hash):
    cache = tmp_path / 'ref'
    first = start_writer(cache, dataset_hash)
    try:
        started = time.monotonic()
        with pytest.raises(CacheLocked, match=r'waited for \d+\.\d s'):
            writer_in_this_process(cache, dataset_hash, lock_timeout=0.5)
        assert time.monotonic() - started >= 0.5
    finally:
        first.stdin.write('go\n')
        first.stdin.flush()
    # Given long enough, the second writer gets the lock once the first lets go of it, and
    # finds every part done.
    with writer_in_this_process(cache, dataset_hash, lock_timeout=120) as second:
        assert second.pending_parts() == []
        assert second.manifest['complete']
    finish_writer(first, told=True)


def test_a_killed_writer_blocks_no_one_and_its_temporary_files_go(tmp_path, dataset_hash):
    cache = tmp_path / 'ref'
    first = start_writer(cache, dataset_hash)
    left = cache / 'parts' / f'.part-000001.bin.tmp-{first.pid}'
    left.write_bytes(b'half a part')
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (cache / LOCK_FILE).exists() and (cache / OWNER_FILE).exists()
    with writer_in_this_process(cache, dataset_hash) as second:  # no wait needed
        assert not left.exists()
        assert second.pending_parts() == [1, 2, 3]
        assert (cache / OWNER_FILE).read_text().count(f'"pid": {os.getpid()}') == 1
    assert not (cache / OWNER_FILE).exists()


def test_a_folder_holding_only_the_lock_file_is_a_new_cache(tmp_path, dataset_hash):
    folder = tmp_path / 'ref'
    folder.mkdir()
    lock = WriterLock(folder)
    lock.acquire()
    lock.release()
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
    with writer_in_this_process(folder, dataset_hash) as writer:
        assert writer.pending_parts() == [0, 1, 2, 3]


@pytest.mark.parametrize('timeout', [-1, float('inf'), float('nan'), None, '5'])
def test_every_wait_is_bounded(tmp_path, dataset_hash, timeout):
    with pytest.raises(SettingError, match='lock_timeout'):
        writer_in_this_process(tmp_path / 'ref', dataset_hash, lock_timeout=timeout)


class GatedLinear(nn.Linear):
    """A linear classifier that, after ``free_calls`` forward passes, waits for a gate file."""

    def __init__(self, gate: str, free_calls: int) -> None:
        super().__init__(N_FEATURES, N_CLASSES)
        self.gate = Path(gate)
        self.free_calls = free_calls

    def forward(self, x: Tensor) -> Tensor:
        self.free_calls -= 1
        deadline = time.monotonic() + 120
        while self.free_calls < 0 and not self.gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f'{self.gate} did not appear in 120 s')
            time.sleep(0.02)
        return super().forward(x)


def gated_classifier(gate: str = '', free_calls: int = 0) -> nn.Module:
    return GatedLinear(gate, free_calls)


def _annotate(tmp_path: Path, mds: Path, out: Path, free_calls: int) -> list[str]:
    kwargs = f'{{"gate": "{tmp_path / "gate"}", "free_calls": {free_calls}}}'
    return [sys.executable, '-m', 'jest_stream.cli', 'annotate', '--local', str(mds),
            '--model', 'test_cache_lock:gated_classifier', '--model-kwargs', kwargs,
            '--checkpoint', str(tmp_path / 'ref.pt'), '--input-key', 'x', '--target-key', 'y',
            '--transform-id', 'raw', '--out', str(out), '--batch-size', '25',
            '--part-size', '50', '--workers', '2', '--no-progress', '--keep-shared-memory']


def test_two_annotation_runs_into_one_folder(tmp_path, child_tmpdir):
    mds = write_mds(tmp_path / 'mds', 400)
    reference = tiny_classifier(1)
    torch.save(reference.state_dict(), tmp_path / 'ref.pt')
    env = subprocess_env(child_tmpdir)
    out = tmp_path / 'ref'
    # The first run writes one part (two batches), then waits for the gate file.
    first = subprocess.Popen(_annotate(tmp_path, mds, out, free_calls=2), env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        wait_for(lambda: any((out / 'parts').glob('part-*.bin')), first, 120,
                 'the first run writing a part')
        second = subprocess.run(_annotate(tmp_path, mds, out, free_calls=100), env=env,
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.startswith('jest-stream: error:')
        assert 'Traceback' not in second.stderr
        assert str(out) in second.stderr and f'pid {first.pid}' in second.stderr
        assert first.poll() is None  # the first run is still at work, and goes on
        (tmp_path / 'gate').touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:  # the test failed half way: leave no process behind
            os.killpg(first.pid, signal.SIGTERM)
            first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert '8 parts written, 0 already done' in stdout
    again = subprocess.run(_annotate(tmp_path, mds, out, free_calls=0), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and '0 parts written, 8 already done' in again.stdout
    cache = ReferenceCache(out, dataset=mds, model_checksum=model_checksum(reference),
                           transform='raw')
    assert len(cache.read(range(400))['loss']) == 400

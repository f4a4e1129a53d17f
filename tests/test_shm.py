"""Removing the shared memory of dead streaming jobs, and only theirs."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers.data import write_mds
from jest_stream.shm import remove_stale_shared_memory, stale_shared_memory


def _map_and_wait(path: str, ready, done) -> None:
    with open(path, 'r+b') as file:
        mapped = mmap.mmap(file.fileno(), 0)
        ready.set()
        done.wait(60)
        mapped.close()


def test_only_prefixes_no_live_process_uses_are_removed(tmp_path: Path):
    for prefix in ('000007', '000008'):
        for name in ('locals', 'barrier', 'next_epoch'):
            (tmp_path / f'{prefix}_{name}').write_bytes(b'\0' * 4096)
    (tmp_path / 'other_file').write_bytes(b'x')
    ctx = multiprocessing.get_context('spawn')
    ready, done = ctx.Event(), ctx.Event()
    # A live job maps one segment of prefix 7: the whole prefix stays.
    user = ctx.Process(target=_map_and_wait, args=(str(tmp_path / '000007_barrier'), ready,
                                                   done), daemon=True)
    user.start()
    try:
        assert ready.wait(60)
        assert [p.name for p in stale_shared_memory(tmp_path)] == [
            '000008_barrier', '000008_locals', '000008_next_epoch']
        removed = remove_stale_shared_memory(tmp_path)
        assert sorted(removed) == ['000008_barrier', '000008_locals', '000008_next_epoch']
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            '000007_barrier', '000007_locals', '000007_next_epoch', 'other_file']
    finally:
        done.set()
        user.join(30)
    # Once nothing uses it, prefix 7 goes too.
    assert len(remove_stale_shared_memory(tmp_path)) == 3


KILLED = '''
import os, sys
from jest_stream import SampleIdStreamingDataset
dataset = SampleIdStreamingDataset(local=sys.argv[1], batch_size=10, num_canonical_nodes=1)
print(dataset._shm_prefix_int, flush=True)
import time
time.sleep(600)
'''


def test_a_killed_streaming_job_is_cleaned_and_a_live_one_is_kept(tmp_path: Path, mds_dir,
                                                                    make_streaming):
    live = make_streaming(mds_dir, batch_size=10)
    live_prefix = f'{live._shm_prefix_int:06d}_'
    (tmp_path / 'killed.py').write_text(textwrap.dedent(KILLED))
    # Its own shards: streaming refuses two live datasets over one local folder.
    other = write_mds(tmp_path / 'other', 100)
    # A process-group kill takes multiprocessing's resource tracker too: nobody unlinks.
    job = subprocess.Popen([sys.executable, str(tmp_path / 'killed.py'), str(other)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        dead_prefix = f'{int(job.stdout.readline()):06d}_'
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(60)
    left = [name for name in os.listdir('/dev/shm') if name.startswith(dead_prefix)]
    assert left, 'the killed job left nothing to clean'
    removed = remove_stale_shared_memory()
    assert set(left) <= set(removed)
    assert not any(name.startswith(live_prefix) for name in removed)
    assert any(name.startswith(live_prefix) for name in os.listdir('/dev/shm'))
    assert live[5]['sample_id'] == 5  # still usable

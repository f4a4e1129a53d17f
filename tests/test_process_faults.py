"""Faults of process scoring: a dying or failing scorer process surfaces in the trainer within
a bounded time, and training scripts leave no processes and no shared memory behind, whether
they end normally, with an exception, on Ctrl-C, or killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels, write_mds
from helpers.models import tiny_classifier
from jest_stream import ClassificationScorer, SelectiveLoader
from jest_stream.process import ScorerProcessError


def _tensor_loader(input_key=0, **kwargs):
    x, y = features_and_labels(200)
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=input_key,
                                  target_key=1)
    return SelectiveLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                           batch_size=5, filter_ratio=0.5, scorer=scorer, scoring='process',
                           **kwargs)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _leaked(segments: list[str]) -> list[str]:
    """The files of ``segments`` still in /dev/shm that no live process maps or holds open."""
    left = [path for path in segments if os.path.exists(path)]
    if not left:
        return []
    used = set()
    for process in psutil.process_iter():
        try:
            paths = [m.path for m in process.memory_maps()]
            paths += [f.path for f in process.open_files()]
        except psutil.Error:
            continue
        used.update(paths)
    return [path for path in left if path not in used]


def test_a_killed_scorer_process_raises_in_the_trainer_and_a_new_one_starts():
    with _tensor_loader(timeout=60) as loader:
        iterator = iter(loader)
        next(iterator)
        pid = loader.scorer_process.pid
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ScorerProcessError, match=rf'pid {pid}\) was killed by SIGKILL'):
            for _ in iterator:
                pass
        assert time.monotonic() - start < 10
        assert loader.scorer_process is None and _gone(pid)
        # Iterating again starts a fresh scorer process.
        assert len(list(loader)) == len(loader)
        assert loader.scorer_process.pid != pid


def test_an_exception_in_the_scorer_process_carries_its_traceback():
    with _tensor_loader(input_key='image') as loader:
        with pytest.raises(ScorerProcessError) as caught:
            next(iter(loader))
        assert loader.scorer_process is None, 'a failed scorer process is stopped'
    message = str(caught.value)
    assert 'raised while scoring super-batch 0 of epoch 0' in message
    assert 'Traceback' in message and "input_key='image'" in message
    assert isinstance(caught.value.__cause__, KeyError)


# Real training scripts in their own process groups

SCRIPT = '''
import json
import os
import signal
import sys


def snapshot(loader):
    """Pids of every descendant and the /dev/shm files they all map or hold open."""
    import psutil

    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    segments = set()
    for process in processes:
        try:
            paths = [m.path for m in process.memory_maps()]
            paths += [f.path for f in process.open_files()]
        except psutil.Error:
            continue
        segments.update(p for p in paths if p.startswith('/dev/shm/') and os.path.exists(p))
    return {'scorer': loader.scorer_process.pid, 'pids': [p.pid for p in processes[1:]],
            'segments': sorted(segments)}


def main():
    mode, data, report = sys.argv[1:4]
    # A job started in the background of a non-interactive shell inherits SIGINT ignored;
    # take Ctrl-C as a terminal would deliver it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import time

    import torch

    from jest_stream import ClassificationScorer, SampleIdStreamingDataset, SelectiveLoader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scorer = ClassificationScorer(model, reference, input_key='x', target_key='y')
    if mode in ('killed', 'group_killed'):
        # A killed process cannot release streaming's shared memory (streaming's own
        # clean_stale_shared_memory is for that): train on a map-style dataset.
        from torch.utils.data import TensorDataset

        dataset = TensorDataset(torch.randn(300, 8), torch.randint(0, 4, (300,)))
        scorer.input_key, scorer.target_key = 0, 1
        key = 0
    else:
        import fcntl

        # streaming picks its shared-memory prefix without a lock: the scripts of the test,
        # started together, take turns to build their datasets.
        with open(os.path.join(os.path.dirname(data), '..', 'streaming.lock'), 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            dataset = SampleIdStreamingDataset(local=data, batch_size=50, shuffle=True,
                                               num_canonical_nodes=1)
        key = 'x'
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer,
                             num_workers=2, scoring='process', timeout=60)
    steps = 0
    for _ in range(2 if mode == 'normal' else 10**6):
        for batch in loader:
            target = batch[1] if key == 0 else batch['y']
            loss = torch.nn.functional.cross_entropy(model(batch[key]), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 3:
                with open(report + '.part', 'w') as f:
                    json.dump(snapshot(loader), f)
                os.rename(report + '.part', report)
                if mode == 'exception':
                    raise RuntimeError('a bug in the training loop')
                if mode == 'killed':
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == 'group_killed':
                    time.sleep(600)  # until the test kills the whole process group
            if steps > 3 and mode == 'interrupt':
                time.sleep(0.05)  # keep training, gently, until Ctrl-C
    loader.close()
    print('DONE', steps, flush=True)


if __name__ == '__main__':
    main()
'''


MODES = ('normal', 'exception', 'interrupt', 'killed', 'group_killed')


@pytest.fixture(scope='module')
def scripts(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """The four training scripts, started at once (they spend most of their time starting
    up), each in its own process group; killed at the end if still there."""
    root = tmp_path_factory.mktemp('script')
    (root / 'train.py').write_text(textwrap.dedent(SCRIPT))
    started = {}
    for mode in MODES:
        folder = root / mode
        folder.mkdir()
        # Each its own shards: streaming refuses two live datasets over one local folder.
        data = write_mds(folder / 'mds', 300)
        with open(folder / 'out', 'w') as out, open(folder / 'err', 'w') as err:
            started[mode] = (subprocess.Popen(
                [sys.executable, str(root / 'train.py'), mode, str(data),
                 str(folder / 'report.json')],
                stdout=out, stderr=err, start_new_session=True), folder)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            # Only the script itself: its scorer process and workers then exit on their own,
            # and multiprocessing's resource tracker removes the script's semaphore.
            process.kill()
            process.wait()


@pytest.mark.parametrize('mode', MODES)
def test_training_scripts_leave_no_processes_or_shared_memory(scripts, mode):
    process, folder = scripts[mode]
    report = folder / 'report.json'
    deadline = time.monotonic() + 150
    while not report.exists():
        assert process.poll() is None, (folder / 'err').read_text()
        assert time.monotonic() < deadline, 'the script did not reach its third step'
        time.sleep(0.05)
    snapshot = json.loads(report.read_text())
    if mode == 'interrupt':
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    if mode == 'group_killed':
        os.killpg(process.pid, signal.SIGKILL)  # kill -9 -PGID: nobody gets to clean up
    process.wait(timeout=60)
    out, err = (folder / 'out').read_text(), (folder / 'err').read_text()
    expected = {'normal': 0, 'exception': 1, 'interrupt': -signal.SIGINT,
                'killed': -signal.SIGKILL, 'group_killed': -signal.SIGKILL}[mode]
    assert process.returncode in (expected, 1 if mode == 'interrupt' else expected), err
    if mode == 'normal':
        assert 'DONE' in out
    if mode == 'exception':
        assert 'a bug in the training loop' in err
    if mode == 'interrupt':
        assert 'KeyboardInterrupt' in err
    assert snapshot['scorer'] in snapshot['pids']
    if mode in ('killed', 'group_killed'):
        # A map-style run names nothing in /dev/shm (the scorer process's lock is a record
        # lock on an anonymous file, not a named semaphore), so a kill can leak nothing.
        assert snapshot['segments'] == []
    else:
        assert snapshot['segments'], 'the snapshot found no shared memory at all'
    # The scorer process, the DataLoader workers and multiprocessing's helper all end...
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in snapshot['pids']) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in snapshot['pids'] if not _gone(pid)] == []
    # ... and no shared-memory file they used is left behind: gone from /dev/shm, or still
    # in use by another live process (streaming maps other jobs' segments while it picks its
    # own prefix).
    while _leaked(snapshot['segments']) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leaked(snapshot['segments']) == []

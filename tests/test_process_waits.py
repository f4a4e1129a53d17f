"""Every wait on the other process is bounded: a scorer process that stops (SIGSTOP, a
debugger, a frozen container) surfaces in the trainer as a ``ScorerProcessError`` naming what
was waited for, within ``timeout``; and a scorer process never outlives its trainer by more
than the super-batch it is scoring."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from helpers.scorers import StopInLockScorer
from helpers.waits import wait_for
from jest_stream import SelectiveLoader
from jest_stream.process import ScorerProcessError
from jest_stream.process.client import _Outbox
from jest_stream.process.weights import _SEQ, SharedWeights, WeightsTimeout, state_tensors


def _tensors(n: int = 200) -> TensorDataset:
    x, y = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _wait_stopped(pid: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, 'the scorer process never stopped'
        time.sleep(0.02)


def test_a_scorer_process_stopped_inside_the_weights_lock_fails_the_next_publish():
    model = tiny_classifier(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # The scorer process takes the lock three times for the first super-batch (the latest
    # version, then a copy between two checks); the fourth time, for the second one, it stops.
    scorer = StopInLockScorer(model, tiny_classifier(1), input_key=0, target_key=1, stop_at=4)
    with SelectiveLoader(_tensors(), batch_size=5, filter_ratio=0.5, scorer=scorer,
                         scoring='process', timeout=3) as loader:
        iterator = iter(loader)
        batch = next(iterator)
        pid = loader.scorer_process.pid
        _wait_stopped(pid)
        loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()  # the next batch publishes these weights: the lock is held
        start = time.monotonic()
        with pytest.raises(ScorerProcessError, match=r'control lock of the shared weights'):
            next(iterator)
        waited = time.monotonic() - start
    assert 3.0 <= waited < 3.0 + 15.0  # the timeout, plus stopping the process
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_scorer_process_stopped_while_the_trainer_waits_for_a_selection():
    scorer = StopInLockScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                              target_key=1, stop_at=1)
    with SelectiveLoader(_tensors(), batch_size=5, filter_ratio=0.5, scorer=scorer,
                         scoring='process', timeout=2) as loader:
        start = time.monotonic()
        with pytest.raises(ScorerProcessError,
                           match=r'sent nothing for 2 s.*selection of super-batch 0'):
            next(iter(loader))
    assert time.monotonic() - start < 2.0 + 60.0  # start-up, the timeout, the stop


def _never_read(connection, ready) -> None:
    ready.set()
    time.sleep(600)


def test_a_send_to_a_process_that_reads_nothing_gives_up_after_timeout():
    ctx = multiprocessing.get_context('spawn')
    read, write = ctx.Pipe(duplex=False)
    ready = ctx.Event()
    peer = ctx.Process(target=_never_read, args=(read, ready), daemon=True)
    peer.start()
    try:
        assert ready.wait(60)
        outbox = _Outbox(write)
        checks = []
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            # Larger than any pipe buffer: a plain send would block until the peer reads.
            outbox.send(b'x' * (4 << 20), timeout=1.0, check=lambda: checks.append(1))
        assert 1.0 <= time.monotonic() - start < 5.0 and checks
    finally:
        peer.kill()
        peer.join(30)
        write.close()


def test_a_reader_gives_up_on_a_writer_stopped_in_the_middle_of_a_publish():
    model = tiny_classifier(0)
    weights = SharedWeights.for_module(model, timeout=1.0)
    replica = [t.detach().clone() for _, t in state_tensors(tiny_classifier(1))]
    # As a writer stopped between marking a slot as being written and finishing it.
    weights._control[_SEQ[0]] += 1
    start = time.monotonic()
    with pytest.raises(WeightsTimeout, match='in the middle of a publish'):
        weights.read_into(replica)
    assert 1.0 <= time.monotonic() - start < 5.0


# A scorer process outlives a killed trainer by the super-batch it is scoring, at most

TRAINER = '''
import json, os, sys, time
import torch
from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from helpers.scorers import SlowScorer
from jest_stream import SelectiveLoader


def main():
    mode, log, report = sys.argv[1:4]
    torch.set_num_threads(1)
    x, y = features_and_labels(400)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    busy = mode == 'busy'
    scorer = SlowScorer(tiny_classifier(0), tiny_classifier(1), input_key=0, target_key=1,
                        delay=3.0 if busy else 0.0, log=log)
    # Busy: four super-batches in flight, scored ahead (no weight updates here). Idle: none
    # scored ahead of the one handed over.
    loader = SelectiveLoader(dataset, batch_size=5, filter_ratio=0.5, scorer=scorer,
                             scoring='process', timeout=120, prefetch_depth=4 if busy else 1)
    iterator = iter(loader)
    next(iterator)
    with open(report + '.part', 'w') as f:
        json.dump({'scorer': loader.scorer_process.pid}, f)
    os.rename(report + '.part', report)
    time.sleep(600)  # until killed


if __name__ == '__main__':
    main()
'''


@pytest.mark.parametrize('mode, bound', [('busy', 3.0 + 3.0), ('idle', 1.5)])
def test_a_scorer_process_outlives_a_killed_trainer_by_one_super_batch_at_most(
        tmp_path: Path, mode: str, bound: float):
    script = tmp_path / 'trainer.py'
    script.write_text(textwrap.dedent(TRAINER))
    log, report = tmp_path / 'scored.log', tmp_path / 'report.json'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])}
    trainer = subprocess.Popen([sys.executable, str(script), mode, str(log), str(report)],
                               env=env, stderr=subprocess.PIPE)
    try:
        wait_for(report.exists, trainer, 120, 'the trainer reporting its scorer process')
        pid = json.loads(report.read_text())['scorer']
        if mode == 'busy':
            # Kill while the scorer process has just started a super-batch, with more queued.
            while len(log.read_text().splitlines()) < 2:
                time.sleep(0.01)
        else:
            time.sleep(1.0)  # it has answered the only request: idle
        trainer.kill()
        trainer.wait(30)
        killed = time.monotonic()
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() - killed < 60, 'the scorer process did not exit'
            time.sleep(0.01)
        outlived = time.monotonic() - killed
    finally:
        trainer.kill()
        trainer.wait(30)
    scored = len(log.read_text().splitlines())
    print(f'{mode}: the scorer process outlived its trainer by {outlived:.3f} s')
    assert outlived < bound, f'{mode}: the scorer process outlived its trainer by {outlived:.2f} s'
    if mode == 'busy':
        assert scored == 2, f'it went on scoring the queue: {scored} super-batches'

"""The shared double buffer of the learner's weights, and the count of weight updates."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as torch_mp
from torch import nn

from jest_stream.process.weights import (
    SharedWeights,
    StepCounter,
    WeightsTimeout,
    WeightSync,
    state_tensors,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for _, t in state_tensors(module)]


def test_publish_then_read_gives_the_published_state_and_version():
    source, replica = _model(0), _model(1)
    source(torch.randn(4, 6))  # batch-norm statistics and counter move: buffers are shared too
    weights = SharedWeights.for_module(source, timeout=30)
    weights.publish(_tensors(source), 7)
    assert weights.read_into(_tensors(replica)) == (7, 1)
    for (name, a), (_, b) in zip(state_tensors(source), state_tensors(replica), strict=True):
        assert torch.equal(a, b), name
    assert replica[1].num_batches_tracked.item() == 1
    # A second publish goes to the other slot and becomes the active one.
    with torch.no_grad():
        source[0].weight.add_(1.0)
    weights.publish(_tensors(source), 8)
    assert weights.latest() == (8, 2)
    weights.read_into(_tensors(replica))
    assert torch.equal(replica[0].weight, source[0].weight)


def test_publish_refuses_a_changed_model_before_touching_the_buffer():
    torch_mp.get_context('spawn')
    model = _model()
    weights = SharedWeights.for_module(model, timeout=30)
    weights.publish(_tensors(model), 1)
    wrong = _tensors(model)
    wrong[0] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"learner tensor '0.weight'.*close\(\) the loader"):
        weights.publish(wrong, 2)
    # The failed publish left the buffer consistent: the next one and a read still work.
    weights.publish(_tensors(model), 3)
    assert weights.read_into(_tensors(_model(1)))[0] == 3


def _hold_lock(weights: SharedWeights, held, stop_after: bool) -> None:
    """Takes the control lock and keeps it: stops itself, or exits while holding it."""
    weights._lock.acquire(timeout=10)
    held.set()
    if stop_after:
        os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)  # the kernel releases a record lock of a process that ends


def test_a_lock_held_by_a_process_that_died_is_free_at_once():
    ctx = torch_mp.get_context('spawn')
    model = _model()
    weights = SharedWeights.for_module(model, timeout=30)
    held = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(weights, held, False), daemon=True)
    holder.start()
    assert held.wait(60)
    holder.join(30)
    start = time.monotonic()
    weights.publish(_tensors(model), 1)
    assert time.monotonic() - start < 1.0
    assert weights.latest() == (1, 1)


def test_a_lock_held_by_a_stopped_process_is_waited_for_at_most_timeout():
    ctx = torch_mp.get_context('spawn')
    model = _model()
    weights = SharedWeights.for_module(model, timeout=1.0)
    held = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(weights, held, True), daemon=True)
    holder.start()
    try:
        assert held.wait(60)
        checks = []
        start = time.monotonic()
        with pytest.raises(WeightsTimeout, match='control lock'):
            weights.publish(_tensors(model), 1, give_up=lambda: checks.append(1))
        assert 1.0 <= time.monotonic() - start < 5.0
        assert checks, 'give_up was never consulted while waiting'
        # give_up stops the wait early when it raises (the other process is gone).
        with pytest.raises(RuntimeError, match='peer is gone'):
            weights.publish(_tensors(model), 1, give_up=_raise_gone)
    finally:
        holder.kill()
        holder.join(30)


def _raise_gone() -> None:
    raise RuntimeError('peer is gone')


# A writer hammering publishes while another process reads: every read is one version.

N_TENSORS = 12
NUMEL = 1 << 16


def _reader(weights: SharedWeights, done, report, seconds: float) -> None:
    """Reads until ``seconds`` pass, checking each read is all one version, then reports."""
    torch.set_num_threads(1)
    replica = [torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)
               for spec in weights.specs]
    reads = torn = 0
    last = -1
    versions = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        version, _ = weights.read_into(replica)
        values = torch.stack([t[:8] for t in replica]).unique()
        full = all(bool((t == version).all()) for t in replica)
        if len(values) != 1 or not full or version < last:
            torn += 1
        last = version
        versions.add(version)
        reads += 1
    report.put({'reads': reads, 'torn': torn, 'versions': len(versions),
                'retries': weights.retries})
    done.set()


CUDA = pytest.param('cuda', marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')])


@pytest.mark.parametrize('device', ['cpu', CUDA])
def test_concurrent_reader_never_sees_torn_weights(device):
    # On CUDA the buffers are shared by CUDA IPC and copied on streams: the writer's copy must
    # be complete before a slot is marked complete, the reader's before it re-checks.
    ctx = torch_mp.get_context('spawn')
    specs_model = nn.ParameterList([nn.Parameter(torch.zeros(NUMEL, device=device))
                                    for _ in range(N_TENSORS)])
    weights = SharedWeights.for_module(specs_model, timeout=30)
    source = [torch.zeros(NUMEL, device=device) for _ in range(N_TENSORS)]
    weights.publish(source, 0)
    done, report = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(weights, done, report, 2.0), daemon=True)
    reader.start()
    version = 0
    try:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            version += 1
            for tensor in source:
                tensor.fill_(version)
            weights.publish(source, version)
        result = report.get(timeout=30)
    finally:
        reader.join(10)
        if reader.is_alive():
            reader.kill()
    assert result["torn"] == 0, result
    # Under load the reader may see few versions; what matters is that none was torn.
    assert result['reads'] > 20 and result['versions'] > 1, result
    assert version > 100, 'the writer did not hammer'


# Counting weight updates

def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 6)).pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize('make', [
    lambda p: torch.optim.SGD(p, lr=0.1, foreach=False),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.Adam(p, foreach=False),
    lambda p: torch.optim.Adam(p, foreach=True),
    lambda p: torch.optim.Adam(p, fused=True),
    lambda p: torch.optim.AdamW(p, foreach=True),
], ids=['sgd', 'sgd-momentum-foreach', 'adam', 'adam-foreach', 'adam-fused', 'adamw-foreach'])
def test_every_optimizer_step_counts_once(make):
    model = _model()
    optimizer = make(model.parameters())
    counter = StepCounter(model)
    assert counter.poll() == 0
    _step(model, optimizer)
    assert counter.poll() == 1
    _step(model, optimizer)
    _step(model, optimizer)
    assert counter.poll() == 3, 'two steps between two batch boundaries count two'
    assert counter.poll() == 3
    counter.close()


def test_fused_adam_leaves_version_counters_alone_so_the_hook_is_needed():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    before = [p._version for p in model.parameters()]
    _step(model, optimizer)
    assert [p._version for p in model.parameters()] == before


def test_other_updates_count_through_version_counters_and_data_needs_bump():
    model, other = _model(0), _model(1)
    counter = StepCounter(model)
    # Another model's optimizer is not the learner's.
    _step(other, torch.optim.SGD(other.parameters(), lr=0.1))
    assert counter.poll() == 0
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.01)
    assert counter.poll() == 1
    model.load_state_dict(_model(2).state_dict())
    assert counter.poll() == 2
    model[0].weight.data.add_(1.0)
    assert counter.poll() == 2, 'changes through .data are invisible'
    assert counter.bump() == 3
    counter.close()


def test_buffer_changes_without_a_step_count_once():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = StepCounter(model)
    # Gradient accumulation: a training forward moves the batch-norm statistics, no step yet.
    model(torch.randn(4, 6)).sum().backward()
    assert counter.poll() == 1
    assert counter.poll() == 1
    # A step that comes with new statistics counts once, not twice.
    _step(model, optimizer)
    assert counter.poll() == 2
    model.eval()
    model(torch.randn(4, 6))  # evaluation leaves the statistics alone
    assert counter.poll() == 2
    counter.close()


def test_a_dropped_counter_unhooks_itself():
    import gc

    from torch.optim.optimizer import _global_optimizer_post_hooks

    before = len(_global_optimizer_post_hooks)
    counter = StepCounter(_model())
    assert len(_global_optimizer_post_hooks) == before + 1
    del counter
    gc.collect()
    assert len(_global_optimizer_post_hooks) == before


# Every kind of update reaches the scorer process

def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 6)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _update(kind: str, model: nn.Module) -> None:
    if kind.startswith(('sgd', 'adam', 'adamw')):
        name, _, flavour = kind.partition('_')
        options = {'foreach': {'foreach': True}, 'fused': {'fused': True},
                   'loop': {'foreach': False}}[flavour]
        cls = {'sgd': torch.optim.SGD, 'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[name]
        _step(model, cls(model.parameters(), lr=0.1, **options))
    elif kind == 'data_write':
        model[0].weight.data.add_(0.5)  # invisible to version counters
    elif kind == 'no_grad_write':
        with torch.no_grad():
            model[0].bias.mul_(2.0).add_(1.0)
    elif kind == 'load_state_dict':
        model.load_state_dict(_model(7).state_dict())
    elif kind == 'buffer':
        model.train()
        model(torch.randn(5, 6))  # batch-norm statistics move, no parameter does


UPDATES = ['sgd_loop', 'sgd_foreach', 'sgd_fused', 'adam_loop', 'adam_foreach', 'adam_fused',
           'adamw_fused', 'data_write', 'no_grad_write', 'load_state_dict', 'buffer']


@pytest.mark.parametrize('kind', UPDATES)
def test_weight_sync_publishes_every_kind_of_update(kind):
    model = _model(0)
    sync = WeightSync(model, sync_every=1, max_staleness=0, prefetch_depth=1, timeout=30)
    try:
        assert sync.poll() == 0  # nothing changed yet: nothing counted, nothing published
        _update(kind, model)
        assert sync.poll() == 1 and sync.published == 1
        replica = _tensors(_model(1))
        assert sync.shared.read_into(replica)[0] == 1
        for (name, mine), theirs in zip(state_tensors(model), replica, strict=True):
            assert torch.equal(mine, theirs), name
        assert sync.poll() == 1  # and counted once
    finally:
        sync.close()

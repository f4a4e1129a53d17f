"""Process scoring over real MDS shards: same selections as inline, bounded staleness, resume.

Scorers here are built from library classes (and ``helpers.scorers``) only, so the scorer
process never has to import this test module (and, through it, mosaicml-streaming) to
unpickle them.
"""

from __future__ import annotations

import gc
import time

import psutil
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from helpers.data import features_and_labels
from helpers.models import tiny_classifier
from helpers.scorers import CountingScorer
from jest_stream import ClassificationScorer, SelectiveLoader
from jest_stream.process.ring import BatchRing, SlotCache

N = 300


def _scorer(learner, reference=None, *, criterion_model=True, **kwargs):
    """A scorer with ``reference`` (by default a tiny classifier; none if ``criterion_model``
    is None)."""
    kwargs.setdefault('input_key', 'x')
    kwargs.setdefault('target_key', 'y')
    if reference is None and criterion_model is not None:
        reference = tiny_classifier(1)
    return ClassificationScorer(learner, reference, **kwargs)


def _train_step(model, optimizer, inputs, targets):
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def _train(loader, model, optimizer, steps, n_batches, *, ids=lambda b: b['sample_id'],
           inputs=lambda b: b['x'], targets=lambda b: b['y'], before_steps=None):
    """Sub-batch ids and metrics of ``n_batches`` batches, training ``steps[i]`` optimizer steps
    on batch ``i``, across epochs; ``before_steps(metrics)`` runs before each batch's steps."""
    seen, metrics = [], []
    while len(seen) < n_batches:
        for batch in loader:
            seen.append(ids(batch).tolist())
            metrics.append(dict(loader.metrics))
            if before_steps is not None:
                before_steps(metrics)
            for _ in range(steps[len(seen) - 1]):
                _train_step(model, optimizer, inputs(batch), targets(batch))
            if len(seen) == n_batches:
                break
    return seen, metrics


def _scorer_caught_up(scorer: CountingScorer, steps: list[int] | None = None):
    """A ``before_steps`` for ``_train``: wait until the scorer process has answered every
    request sent, so that results scored ahead predate the updates that follow (on a busy
    machine it may lag behind and score them with newer weights). With ``steps``, only
    before updates that follow a stretch without any."""

    def wait(metrics: list[dict]) -> None:
        i = len(metrics) - 1
        if steps is not None and (i == 0 or steps[i] == 0 or steps[i - 1] != 0):
            return
        sent = i + 1 + sum(m['rescored'] for m in metrics) + metrics[-1]['scoring_ahead']
        deadline = time.monotonic() + 60
        while scorer.calls() < sent:
            assert time.monotonic() < deadline, f'{scorer.calls()} of {sent} scored in 60 s'
            time.sleep(0.01)

    return wait


# Settings

@pytest.mark.parametrize('kwargs, message', [
    ({'scoring': 'thread'}, r"scoring='thread'.*'inline', 'process'"),
    ({'sync_every': 2}, r'sync_every=2 only apply to scoring="process"'),
    ({'scoring': 'process', 'sync_every': 0}, r'sync_every=0 must be an int >= 1'),
    ({'scoring': 'process', 'prefetch_depth': 0}, r'prefetch_depth=0 must be an int >= 1'),
    ({'scoring': 'process', 'max_staleness': -1}, r'max_staleness=-1 must be an int >= 0'),
    ({'scoring': 'process', 'sync_every': 4, 'max_staleness': 2},
     r'max_staleness=2 < sync_every - 1 = 3'),
    ({'scoring': 'process', 'device': 'meta'}, r'cpu or a cuda device'),
])
def test_settings_are_checked_at_construction(kwargs, message):
    x, y = features_and_labels(40)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    with pytest.raises(ValueError, match=message):
        SelectiveLoader(dataset, batch_size=5, filter_ratio=0.5,
                        scorer=_scorer(tiny_classifier(0), input_key=0, target_key=1), **kwargs)


def _forward(model, batch):
    return model(batch[0])


def test_an_unpicklable_scorer_is_refused_at_construction_with_the_fix():
    x, y = features_and_labels(40)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    scorer = _scorer(tiny_classifier(0), input_key=0, target_key=1,
                     forward=lambda model, batch: model(batch[0]))
    with pytest.raises(TypeError, match=r'scorer= must be picklable.*lambda.*top level'):
        SelectiveLoader(dataset, batch_size=5, filter_ratio=0.5, scorer=scorer,
                        scoring='process')
    # A module-level function pickles; inline scoring never needed pickling.
    scorer.forward = _forward
    SelectiveLoader(dataset, batch_size=5, filter_ratio=0.5, scorer=scorer, scoring='process')
    scorer.forward = lambda model, batch: model(batch[0])
    SelectiveLoader(dataset, batch_size=5, filter_ratio=0.5, scorer=scorer)


# The batch ring, without a process

def test_ring_fills_partial_batches_keeps_strings_and_reallocates_on_new_shapes():
    ring = BatchRing(2, capacity=6, device=torch.device('cpu'))
    cache = SlotCache()
    slot = ring.acquire()
    full = {'x': torch.arange(12.0).view(6, 2), 'name': list('abcdef'), 'ids': [torch.arange(6)]}
    ring.fill(slot, full)
    assert all(buffer.is_shared() for buffer in ring.slots[slot].buffers)
    request = ring.request(slot, with_buffers=True)
    seen = cache.batch(request)
    assert torch.equal(seen['x'], full['x']) and seen['name'] == full['name']
    assert torch.equal(seen['ids'][0], full['ids'][0])
    # A partial batch of the same shapes fills the first rows of the same buffers.
    ring.fill(slot, {'x': torch.ones(3, 2), 'name': list('xyz'), 'ids': [torch.arange(3) + 7]})
    again = ring.request(slot, with_buffers=False)
    assert again.allocation == request.allocation and again.buffers is None
    partial = cache.batch(again)
    assert torch.equal(partial['x'], torch.ones(3, 2)) and partial['name'] == list('xyz')
    assert partial['ids'][0].tolist() == [7, 8, 9]
    # A new per-sample shape or dtype reallocates the slot; the new buffers go with the next
    # request.
    ring.fill(slot, {'x': torch.ones(4, 3), 'name': list('pqrs'), 'ids': [torch.arange(4)]})
    assert ring.allocation(slot) != request.allocation
    with pytest.raises(RuntimeError, match='never received'):
        cache.batch(ring.request(slot, with_buffers=False))
    assert cache.batch(ring.request(slot, with_buffers=True))['x'].shape == (4, 3)
    # Use counts: held by the trainer and by each unanswered request.
    other = ring.acquire()
    assert ring.acquire() is None
    ring.add_user(slot)
    ring.release(slot)
    assert ring.acquire() is None, 'a request still reads the slot'
    ring.drop_user(slot)
    assert ring.acquire() == slot
    ring.release(other)
    with pytest.raises(RuntimeError, match='released twice'):
        ring.drop_user(other)


def test_ring_refuses_tensors_without_the_batch_dimension():
    ring = BatchRing(1, capacity=4, device=torch.device('cpu'))
    with pytest.raises(ValueError, match='first dimension'):
        ring.fill(ring.acquire(), {'x': torch.ones(4, 2), 'scale': torch.tensor(2.0)})


# Process scoring end to end

def test_process_scoring_selects_what_inline_selects_while_the_model_trains(
        tmp_path, mds_dir, make_streaming):
    # Zero-update stretches let the loader score ahead; the bursts that follow make those
    # results stale, so they are scored again: max_staleness=0 must still match inline.
    steps = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 1, 3, 0, 1, 1, 1]
    runs = {}
    for scoring in ('inline', 'process'):
        model = tiny_classifier(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
        scorer = CountingScorer(model, tiny_classifier(1), input_key='x', target_key='y',
                                log=tmp_path / f'{scoring}.calls')
        extra = {'max_staleness': 0, 'sync_every': 1} if scoring == 'process' else {}

        with SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, scorer=scorer, n_chunks=2, seed=11,
                             scoring=scoring, **extra) as loader:
            wait = _scorer_caught_up(scorer, steps) if scoring == 'process' else None
            runs[scoring] = _train(loader, model, optimizer, steps, len(steps),
                                   before_steps=wait)
            if scoring == 'process':
                pid = loader.scorer_process.pid
                startup = loader.scorer_process.startup
                rescored = loader.telemetry.summary()['rescored']
    assert runs['process'][0] == runs['inline'][0]
    metrics = runs['process'][1]
    assert [m['staleness'] for m in metrics] == [0] * len(steps)
    assert [m['trainer_steps'] for m in metrics] == [sum(steps[:i]) for i in range(len(steps))]
    assert rescored >= 1, 'the stale results scored ahead were not scored again'
    assert sum(m['rescored'] for m in metrics) == rescored
    # One scorer process for all three epochs, started without mosaicml-streaming.
    assert startup['pid'] == pid and not startup['streaming_imported']
    assert startup['threads'] == max(1, torch.get_num_threads() // 2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_staleness_is_reported_and_bounded(tmp_path, mds_dir, make_streaming):
    # Irregular bursts of updates: results scored ahead are sometimes too stale.
    steps = [1, 1, 1, 1, 3, 1, 0, 1, 4, 1, 1, 1]
    model = tiny_classifier(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scorer = CountingScorer(model, tiny_classifier(1), input_key='x', target_key='y',
                            log=tmp_path / 'calls')
    with SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                         filter_ratio=0.8, scorer=scorer, n_chunks=2, seed=3,
                         scoring='process', sync_every=2, max_staleness=3,
                         prefetch_depth=3) as loader:
        _, metrics = _train(loader, model, optimizer, steps, len(steps),
                            before_steps=_scorer_caught_up(scorer))
        summary = loader.telemetry.summary()
    staleness = [m['staleness'] for m in metrics]
    assert max(staleness) <= 3 and max(staleness) > 0, staleness
    assert summary['rescored'] >= 1
    for m in metrics:
        assert m['staleness'] == m['trainer_steps'] - m['weights_version']
        assert m['score_s'] > 0 and m['result_wait_s'] >= 0 and m['host_rss_bytes'] > 0


def test_gradient_accumulation_with_batch_norm_matches_inline(mds_dir, make_streaming):
    # Forwards without a step move the batch-norm statistics the scorer uses in eval mode.
    runs = {}
    for scoring in ('inline', 'process'):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                    torch.nn.Linear(8, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        extra = {'max_staleness': 0} if scoring == 'process' else {}
        with SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, scorer=_scorer(model, criterion_model=None),
                             criterion='hard_learner', method='topk', seed=4, scoring=scoring,
                             **extra) as loader:
            seen = []
            for _ in range(2):
                for batch in loader:
                    seen.append(batch['sample_id'].tolist())
                    F.cross_entropy(model(batch['x']), batch['y']).backward()
                    if len(seen) % 3 == 0:
                        optimizer.step()
                        optimizer.zero_grad()
            runs[scoring] = seen
    assert runs['process'] == runs['inline']


def _manual_sgd(model, batch, lr=0.5):
    loss = F.cross_entropy(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for param, grad in zip(model.parameters(), grads, strict=True):
        param.data.add_(grad, alpha=-lr)  # invisible to the update counter


def test_publish_weights_after_updates_the_loader_cannot_see():
    x, y = features_and_labels(120)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    runs = {}
    for scoring in ('inline', 'process'):
        model = tiny_classifier(0)
        extra = {'max_staleness': 0} if scoring == 'process' else {}
        with SelectiveLoader(dataset, batch_size=6, filter_ratio=0.8, seed=5,
                             scorer=_scorer(model, input_key=0, target_key=1), scoring=scoring,
                             **extra) as loader:
            seen = []
            for _ in range(2):
                for batch in loader:
                    seen.append(batch[2].tolist())
                    _manual_sgd(model, batch)
                    loader.publish_weights()
            runs[scoring] = seen
            if scoring == 'process':
                assert loader.metrics['weights_version'] == len(seen) - 1
    assert runs['process'] == runs['inline']


@pytest.mark.parametrize('num_workers, stop_after', [(0, 3), (2, 8)])
def test_resume_continues_exactly_in_process_mode(mds_dir, make_streaming, num_workers,
                                                  stop_after):
    # As tests/test_resume.py: 6 super-batches per epoch; 9 steps cross into epoch 1. The
    # weights do not change, so inline scoring gives the expected sequence.
    total = 9

    def loader(scoring):
        extra = {'prefetch_depth': 3} if scoring == 'process' else {}
        return SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                               filter_ratio=0.8, scorer=_scorer(tiny_classifier(0)), n_chunks=2,
                               num_workers=num_workers, seed=11, scoring=scoring, **extra)

    def taker(source):
        """Takes the next ``k`` batches, continuing the same iteration, as a trainer would."""
        iterator = iter(source)

        def take(k):
            nonlocal iterator
            out, positions = [], []
            while len(out) < k:
                try:
                    batch = next(iterator)
                except StopIteration:
                    iterator = iter(source)
                    continue
                out.append(batch['sample_id'].tolist())
                positions.append((source.metrics['epoch'], source.metrics['super_batch']))
            return out, positions

        return take

    expected, expected_positions = taker(loader('inline'))(total)
    gc.collect()
    with loader('process') as first:
        before, positions = taker(first)(stop_after)
        state = first.state_dict()
    assert before == expected[:stop_after]
    del first
    gc.collect()
    with loader('process') as resumed:
        resumed.load_state_dict(state)
        after, after_positions = taker(resumed)(total - stop_after)
    # Only batches handed over count: the ones scored ahead are drawn and scored again.
    assert positions + after_positions == expected_positions
    assert before + after == expected
    epoch0 = sum(expected[:6], [])
    assert len(set(epoch0)) == len(epoch0)


def test_break_discards_results_in_flight_and_keeps_the_process(mds_dir, make_streaming):
    # easy_reference does not read the learner: nothing is shared, staleness is 0.
    def run(scoring):
        extra = {'prefetch_depth': 3} if scoring == 'process' else {}
        loader = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                                 filter_ratio=0.8, scorer=_scorer(tiny_classifier(0)),
                                 criterion='easy_reference', method='topk', seed=2,
                                 scoring=scoring, **extra)
        with loader:
            out = []
            for i, batch in enumerate(loader):
                out.append(batch['sample_id'].tolist())
                if i == 1:
                    break
            pid = loader.scorer_process.pid if scoring == 'process' else None
            out.append(loader.state_dict()['super_batches'])
            out.extend(batch['sample_id'].tolist() for batch in loader)
            if scoring == 'process':
                assert loader.scorer_process.pid == pid
                assert loader.metrics['staleness'] == 0
        return out

    assert run('process') == run('inline')


class _Named(Dataset):
    """Dict samples with a string column; 105 samples: 5 super-batches of 20, one of 5."""

    def __init__(self) -> None:
        self.x, self.y = features_and_labels(105)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {'x': self.x[i], 'y': int(self.y[i]), 'name': f'sample-{i}'}


def test_memory_stays_flat_over_many_batches_with_strings_and_partial_batches():
    model = tiny_classifier(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = SelectiveLoader(_Named(), batch_size=10, filter_ratio=0.5, seed=1,
                             scorer=_scorer(model), scoring='process', prefetch_depth=2)
    trainer, child = psutil.Process(), None
    rss = []
    batches = 0
    with loader:
        for epoch in range(45):
            for batch in loader:
                assert batch['name'] == [f'sample-{i}' for i in batch['sample_id'].tolist()]
                _train_step(model, optimizer, batch['x'], batch['y'])
                batches += 1
            if epoch == 4:
                child = psutil.Process(loader.scorer_process.pid)
            if epoch >= 4:
                rss.append((trainer.memory_info().rss, child.memory_info().rss))
        # 105 = 5 x 20 + 5: the last 5 of each epoch cannot fill a sub-batch of 10.
        assert loader.telemetry.summary()['dropped'] == 45 * 5
    assert batches == 225  # 200 after the 5 warm-up epochs
    growth_trainer = rss[-1][0] - min(r[0] for r in rss)
    growth_child = rss[-1][1] - min(r[1] for r in rss)
    assert growth_trainer < 4 << 20 and growth_child < 4 << 20, (growth_trainer, growth_child)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


# CUDA

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_process_scoring_selects_what_inline_selects(mds_dir, make_streaming):
    steps = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1]
    runs = {}
    for scoring in ('inline', 'process'):
        model = tiny_classifier(0).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        extra = {'max_staleness': 0} if scoring == 'process' else {}
        with SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                             filter_ratio=0.8, scorer=_scorer(model, tiny_classifier(1).cuda()),
                             n_chunks=2, seed=11, scoring=scoring, **extra) as loader:
            ids, _ = _train(loader, model, optimizer, steps, len(steps),
                            ids=lambda b: b['sample_id'].cpu())
            runs[scoring] = ids
            if scoring == 'process':
                assert loader.metrics['staleness'] == 0
                assert loader._process._ring.slots[0].buffers[0].is_cuda
    assert runs['process'] == runs['inline']

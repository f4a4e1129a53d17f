"""Selection policies: schedules, uniform mixing, adaptive pressure, quotas and weights, each
through the one step, resumed exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels, write_mds
from helpers.loops import sub_batch_ids
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import (
    ClassificationScorer,
    DataError,
    SampleIdStreamingDataset,
    SelectionConfig,
    SelectionStep,
    SelectiveLoader,
    SettingError,
)
from jest_stream.policies import (
    AdaptivePressure,
    Plan,
    Progress,
    Quota,
    Schedule,
    SelectionPolicy,
)
from jest_stream.scores import PerExampleScores


def _tensors(n: int = 400, groups: int | None = None) -> TensorDataset:
    x, y = features_and_labels(n)
    columns = [torch.from_numpy(x), torch.from_numpy(y)]
    if groups is not None:
        columns.append(torch.arange(n) % groups)
    return TensorDataset(*columns)


def _scorer(**kwargs):
    return ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                target_key=1, **kwargs)


def _at(steps: float) -> Progress:
    return Progress(steps=int(steps), samples=0)


# Schedules

def test_schedule_warms_up_ramps_and_anneals():
    linear = Schedule(warmup=10, ramp=20, anneal_start=50, anneal_end=70)
    assert [linear.pressure(_at(s)) for s in (0, 9, 10, 20, 30, 49, 50, 60, 70, 99)] == [
        0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0]
    cosine = Schedule(warmup=0, ramp=10, shape='cosine')
    assert cosine.pressure(_at(5)) == pytest.approx(0.5)
    assert cosine.pressure(_at(2)) == pytest.approx(0.5 - 0.5 * math.cos(math.pi * 0.2))
    window = Schedule(unit='fraction', warmup=0.25, anneal_start=0.75, anneal_end=0.75)
    assert [window.pressure(Progress(0, 0, f)) for f in (0.1, 0.25, 0.5, 0.75, 0.9)] == [
        0, 1, 1, 0, 0]
    samples = Schedule(unit='samples', warmup=1000)
    assert samples.pressure(Progress(steps=99, samples=999)) == 0
    assert samples.pressure(Progress(steps=0, samples=1000)) == 1


@pytest.mark.parametrize('kwargs, message', [
    ({'unit': 'epochs'}, 'unit'), ({'warmup': -1}, 'warmup'), ({'ramp': math.nan}, 'ramp'),
    ({'anneal_start': 5}, 'anneal_start and anneal_end'),
    ({'warmup': 10, 'anneal_start': 5, 'anneal_end': 8}, 'warmup'),
    ({'unit': 'fraction', 'warmup': 2.0}, 'warmup'), ({'shape': 'step'}, 'shape'),
])
def test_schedule_settings_are_checked(kwargs, message):
    with pytest.raises(SettingError, match=message):
        Schedule(**kwargs)


def test_the_loader_refuses_a_schedule_in_fractions():
    with pytest.raises(SettingError, match='does not know how long training will be'):
        SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                        policy=SelectionPolicy(schedule=Schedule(unit='fraction')))


def test_pressure_sets_the_candidates_scored():
    # b = 8, B = 40 (f = 0.8). Pressure 0: uniform, nothing scored; 0.5: f = 0.4, 13
    # candidates; 1: all 40.
    scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)
    step = SelectionStep(config, scorer)
    x, y = features_and_labels(40)
    batch = {'x': torch.from_numpy(x), 'y': torch.from_numpy(y)}
    ids = torch.arange(100, 140)
    for pressure, scored in ((0.0, None), (0.5, 13), (1.0, 40)):
        scorer.seen.clear()
        selection = step.choose(batch, ids, 0, 3, Plan(pressure=pressure))
        assert selection.n_candidates == (scored or 8)
        assert [len(s) for s in scorer.seen] == ([] if scored is None else [scored])
        assert selection.policy['filter_ratio_now'] == pytest.approx(
            1 - 8 / (scored or 8))
        chosen = set(ids[selection.candidates[selection.selected]].tolist()
                     if selection.candidates is not None
                     else ids[selection.selected].tolist())
        assert len(chosen) == 8 and chosen <= set(ids.tolist())


def _ids(loader, steps):
    return sub_batch_ids(loader, steps, 2)


@pytest.mark.parametrize('scoring', ['inline', 'process'])
def test_resumption_in_the_middle_of_a_schedule_is_exact(scoring):
    def make():
        policy = SelectionPolicy(schedule=Schedule(warmup=3, ramp=6, anneal_start=12,
                                                   anneal_end=16, shape='cosine'), mix=0.25)
        return SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                               seed=4, policy=policy, scoring=scoring, timeout=60)

    with make() as loader:
        full = _ids(loader, 18)  # 10 super-batches per epoch: crosses into the second
    with make() as first:
        before = _ids(first, 7)  # stop mid-ramp
        state = first.state_dict()
    with make() as resumed:
        resumed.load_state_dict(state)
        assert before + _ids(resumed, 11) == full


# Uniform mixing

def test_mixing_draws_a_fraction_uniformly_from_the_rest():
    config = SelectionConfig.create(batch_size=8, super_batch_size=40, method='topk')
    scores = torch.linspace(0, 1, 40)
    step = SelectionStep(config, lambda batch, ids, criterion: PerExampleScores(scores))
    step.scorer.learner = None
    batch = {'x': torch.zeros(40, 2)}
    counts = np.zeros(40, dtype=np.int64)
    for index in range(600):
        selection = step.choose(batch, torch.arange(40), 0, index, Plan(mix=0.25))
        top = selection.selected[:6].tolist()
        assert sorted(top) == list(range(34, 40))  # six by score: the six best
        mixed = selection.selected[6:].tolist()
        assert len(mixed) == 2 and not set(mixed) & set(top)
        counts[mixed] += 1
    assert selection.policy['mix'] == 0.25
    # The mixed rows are drawn uniformly from the 34 others, whatever their scores: a
    # chi-square test against equal counts (1,200 draws, about 35 per row).
    assert counts[34:].sum() == 0
    assert scipy.stats.chisquare(counts[:34]).pvalue > 0.001


# Adaptive pressure

def test_adaptive_pressure_eases_when_learnability_is_gone_and_recovers():
    adaptive = AdaptivePressure(window=10, decay=0.5)
    for step in range(20):
        adaptive.observe(step, -0.1 if step < 10 else 0.3)
    assert adaptive.multiplier_at(0) == adaptive.multiplier_at(19) == 1.0
    assert adaptive.multiplier_at(20) == 0.5    # window 0 (learnability <= 0) is read at 20
    assert adaptive.multiplier_at(30) == 1.0    # window 1 (learnability > 0) at 30
    adaptive.report(35, 0.8)
    adaptive.report(38, 0.7)                    # worse than the best so far
    for step in range(20, 40):
        adaptive.observe(step, 0.3)
    assert adaptive.multiplier_at(50) == 0.5    # the reports up to step 40, read at 50


def test_adaptive_pressure_recovers_from_windows_where_nothing_was_scored():
    adaptive = AdaptivePressure(window=2, decay=0.5, min_learnability=0.0)
    for step in range(8):
        adaptive.observe(step, -1.0)  # learnability gone: the pressure eases
    assert adaptive.multiplier_at(9) == 0.125   # windows 0, 1 and 2 read
    assert adaptive.multiplier_at(11) == 0.0625
    # Low enough that only b candidates are drawn: nothing is scored, nothing observed, and
    # each such window gives the pressure back.
    assert adaptive.multiplier_at(13) == 0.125
    assert adaptive.multiplier_at(19) == 1.0
    # An equal metric is not a worse one; a worse one eases the pressure.
    adaptive.report(19, 0.5)
    adaptive.report(20, 0.5)
    assert adaptive.multiplier_at(23) == 1.0
    adaptive.report(23, 0.4)
    assert adaptive.multiplier_at(27) == 0.5


def test_adaptive_policy_resumes_exactly_and_reports_through_the_loader():
    def make():
        policy = SelectionPolicy(adaptive=AdaptivePressure(window=3, decay=0.5,
                                                           min_learnability=10.0))
        return SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                               seed=5, policy=policy)

    loader = make()
    full = _ids(loader, 16)
    # With a threshold no learnability reaches, the pressure halves window after window.
    assert loader.policy.adaptive.multiplier < 0.2
    assert loader.metrics['pressure'] == loader.policy.adaptive.multiplier
    first = make()
    before = _ids(first, 8)
    first.report_metric(0.5)
    state = first.state_dict()
    assert state['policy']['adaptive']['metrics'] == [[8, 0.5]]
    resumed = make()
    resumed.load_state_dict(state)
    # The reported metric is the first: it is the best, so it changes nothing here.
    assert before + _ids(resumed, 8) == full
    with pytest.raises(SettingError, match='AdaptivePressure'):
        SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer()
                        ).report_metric(1.0)


def test_adaptive_multipliers_asked_ahead_are_given_again_after_a_resume():
    # Process scoring plans up to prefetch_depth super-batches ahead of the trainer, so a
    # checkpoint holds the state of a later window than the position it resumes from.
    def pressure():
        return AdaptivePressure(window=4, decay=0.5, min_learnability=10.0)

    inline, ahead = pressure(), pressure()
    given = {}
    for step in range(16):
        given[step] = inline.multiplier_at(step)  # asked in the trainer's order
        inline.observe(step, 0.0)
    assert len(set(given.values())) > 2
    for step in range(16):
        ahead.multiplier_at(step + 4)  # planned ahead
        assert ahead.multiplier_at(step) == given[step], step
        ahead.observe(step, 0.0)
    resumed = pressure()
    resumed.load_state_dict(ahead.state_dict())
    assert [resumed.multiplier_at(step) for step in range(12, 16)] == \
        [given[step] for step in range(12, 16)]


@pytest.mark.parametrize('stop', [6, 7])
def test_adaptive_policy_resumes_exactly_with_process_scoring(stop):
    def make():
        policy = SelectionPolicy(adaptive=AdaptivePressure(window=4, decay=0.5,
                                                           min_learnability=10.0))
        return SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                               seed=5, policy=policy, scoring='process', prefetch_depth=4,
                               timeout=60)

    with make() as loader:
        full = _ids(loader, 14)
    with make() as first:
        before = _ids(first, stop)
        state = first.state_dict()
    with make() as resumed:
        resumed.load_state_dict(state)
        assert before + _ids(resumed, 14 - stop) == full


def test_adaptive_window_must_cover_the_prefetch_depth():
    with pytest.raises(SettingError, match='prefetch_depth'):
        SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                        scoring='process', prefetch_depth=4,
                        policy=SelectionPolicy(adaptive=AdaptivePressure(window=2)))


# Quotas

def _counts(groups: torch.Tensor, rows: list[int]) -> dict[int, int]:
    values, counts = np.unique(groups[rows].numpy(), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


@pytest.mark.parametrize('method', ['joint', 'topk', 'sample'])
@pytest.mark.parametrize('mix', [0.0, 0.25])
def test_quotas_hold_exactly_in_every_sub_batch(method, mix):
    # Four groups, of unequal sizes; the scores favour group 0 heavily.
    n, b = 80, 16
    groups = torch.tensor([0] * 40 + [1] * 20 + [2] * 12 + [3] * 8)
    scores = torch.where(groups == 0, 3.0, 0.0) + torch.linspace(0, 0.5, n)
    config = SelectionConfig.create(batch_size=b, super_batch_size=n, method=method,
                                    n_chunks=4)
    step = SelectionStep(config, lambda batch, ids, criterion: PerExampleScores(scores))
    batch = {'x': torch.zeros(n, 2), 'group': groups}
    bounded = Quota('group', min_share={1: 0.25, 3: 0.125}, max_share=0.5)
    for index in range(20):
        counts = _counts(groups, step.choose(batch, torch.arange(n), 0, index,
                                             Plan(quota=bounded, mix=mix)).selected.tolist())
        assert counts.get(0, 0) <= 8 and counts.get(1, 0) >= 4 and counts.get(3, 0) >= 2
        assert all(c <= 8 for c in counts.values()) and sum(counts.values()) == b
        selection = step.choose(batch, torch.arange(n), 0, index,
                                Plan(quota=Quota('group', proportional=True), mix=mix))
        assert _counts(groups, selection.selected.tolist()) == {0: 8, 1: 4, 2: 2, 3: 2}
        assert selection.policy['share/0'] == 0.5


def test_quotas_through_the_loader_and_when_they_cannot_hold():
    policy = SelectionPolicy(quota=Quota(2, proportional=True))
    # Unshuffled, every super-batch of 40 holds ten rows of each of the four groups.
    loader = SelectiveLoader(_tensors(400, groups=4), batch_size=8, filter_ratio=0.8,
                             scorer=_scorer(), policy=policy, shuffle=False)
    for batch in loader:
        assert sorted(np.bincount(batch[2].numpy(), minlength=4).tolist()) == [2, 2, 2, 2]
    step = SelectionStep(SelectionConfig.create(batch_size=8, super_batch_size=40),
                         lambda batch, ids, criterion: PerExampleScores(torch.zeros(40)))
    groups = torch.tensor([0] * 36 + [1] * 4)
    batch = {'g': groups}
    # Group 1 holds 4 candidates: a cap of 4 rows per group cannot fill 8, so the caps give
    # way for this super-batch (and say so); the minimums still hold.
    selection = step.choose(batch, torch.arange(40), 0, 0,
                            Plan(quota=Quota('g', min_share=0.5, max_share=0.5)))
    assert _counts(groups, selection.selected.tolist()) == {0: 4, 1: 4}
    assert selection.policy['quota_relaxed'] == 0.0
    selection = step.choose({'g': torch.zeros(40, dtype=torch.long)}, torch.arange(40), 0, 0,
                            Plan(quota=Quota('g', max_share=0.5)))
    assert len(selection.selected) == 8 and selection.policy['quota_relaxed'] == 1.0
    with pytest.raises(SettingError, match='minimums add up'):
        step.choose(batch, torch.arange(40), 0, 0, Plan(quota=Quota('g', min_share=0.6)))


def test_quotas_per_stream_of_a_streaming_dataset(tmp_path):
    from streaming import Stream

    big = write_mds(tmp_path / 'big', 240)
    small = write_mds(tmp_path / 'small', 60, seed=1)
    dataset = SampleIdStreamingDataset(
        streams=[Stream(local=str(big)), Stream(local=str(small))], batch_size=50,
        shuffle=True, shuffle_seed=3, num_canonical_nodes=1)
    scorer = RecordingScorer(tiny_classifier(0), tiny_classifier(1))
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer,
                             policy=SelectionPolicy(quota=Quota('stream', min_share=0.3)))
    for batch, candidates in zip(loader, scorer.seen, strict=True):
        from_small = int((batch['sample_id'] >= 240).sum())
        assert from_small >= min(3, sum(1 for i in candidates if i >= 240))
        assert loader.metrics.get('share/1', 0.0) == from_small / 10


# Importance weights

def test_weights_make_the_weighted_mean_unbiased_on_a_toy_distribution():
    n, b = 30, 6
    scores = torch.linspace(-2, 2, n)
    values = torch.linspace(0, 5, n) ** 2
    config = SelectionConfig.create(batch_size=b, super_batch_size=n, method='sample')
    step = SelectionStep(config, lambda batch, ids, criterion: PerExampleScores(scores))
    batch = {'v': values}
    estimates = []
    for index in range(4000):
        sub, _ = step(batch, torch.arange(n), epoch=0, index=index, plan=Plan(weights=True))
        estimates.append(float((sub['sample_weight'] * sub['v']).sum()))
    mean, error = np.mean(estimates), np.std(estimates) / math.sqrt(len(estimates))
    assert abs(mean - float(values.mean())) < 4 * error
    # The plain mean of the selected rows is biased towards high scores (and high values).
    plain = np.mean([float(step(batch, torch.arange(n), epoch=0, index=i)[0]['v'].mean())
                     for i in range(200)])
    assert plain > float(values.mean()) + 10 * error


def test_weights_through_the_loader_and_refused_where_they_would_be_biased():
    loader = SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                             method='sample', policy=SelectionPolicy(weights=True))
    batch = next(iter(loader))
    assert len(batch) == 4 and batch[3].shape == (8,) and bool((batch[3] > 0).all())
    for kwargs, policy in (({'method': 'topk'}, SelectionPolicy(weights=True)),
                           ({'method': 'joint'}, SelectionPolicy(weights=True))):
        with pytest.raises(SettingError, match='weights=True'):
            SelectiveLoader(_tensors(), batch_size=8, filter_ratio=0.8, scorer=_scorer(),
                            policy=policy, **kwargs)
    for other in ({'mix': 0.25}, {'quota': Quota(1, proportional=True)}):
        with pytest.raises(SettingError, match='weights=True needs plain sampling'):
            SelectionPolicy(weights=True, **other)


# The same policies in Composer

def test_jest_algorithm_follows_a_schedule_and_reports_evaluations(mds_dir, make_streaming):
    pytest.importorskip('composer')
    from composer.loggers import InMemoryLogger
    from torchmetrics.classification import MulticlassAccuracy

    from helpers.composer import DictClassifier, fit, make_trainer

    class EvaluatedClassifier(DictClassifier):
        def __init__(self, module):
            super().__init__(module)
            self.accuracy = MulticlassAccuracy(num_classes=4, average='micro')

        def get_metrics(self, is_train=False):
            return {} if is_train else {'MulticlassAccuracy': self.accuracy}

        def update_metric(self, batch, outputs, metric):
            metric.update(outputs.argmax(1), batch['y'])

    from torch.utils.data import DataLoader

    from jest_stream import collate_samples
    from jest_stream.integrations.composer import JESTAlgorithm, jest_first

    policy = SelectionPolicy(schedule=Schedule(unit='fraction', warmup=0.5),
                             adaptive=AdaptivePressure(window=1, decay=0.5))
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=DictClassifier(tiny_classifier(1)),
                              target_key='y', policy=policy, eval_metric='MulticlassAccuracy',
                              seed=2)
    loader = DataLoader(make_streaming(mds_dir, batch_size=50), batch_size=50,
                        collate_fn=collate_samples)
    evaluation = DataLoader(make_streaming(mds_dir, batch_size=50, shuffle=False),
                            batch_size=50, collate_fn=collate_samples)
    memory = InMemoryLogger()
    model = EvaluatedClassifier(tiny_classifier(0))
    fit(make_trainer(loader, model, max_duration='6ba', algorithms=[algorithm],
                     algorithm_passes=jest_first, loggers=[memory], eval_dataloader=evaluation,
                     eval_interval='2ba'))
    pressures = [value for _, value in memory.data['jest/pressure']]
    assert pressures[:3] == [0.0, 0.0, 0.0] and all(p > 0 for p in pressures[3:])
    assert algorithm.batches_outside == 3 and algorithm.batches_selected == 3
    reported = algorithm.policy.adaptive.state_dict()
    assert reported['best'] is not None or reported['metrics'], 'no evaluation was reported'
    assert algorithm.state_dict()['policy']['adaptive'] == reported


# Rows without a loss (all padding, every label ignored)

@pytest.mark.parametrize('plan', [
    Plan(), Plan(mix=0.25), Plan(weights=True),
    Plan(quota=Quota('g', min_share={1: 0.5})), Plan(quota=Quota('g', proportional=True)),
], ids=['plain', 'mix', 'weights', 'quota', 'proportional'])
def test_excluded_rows_are_never_preferred_under_any_policy(plan):
    # Excluded rows score highest, and half of group 1 is excluded: selection, mixing,
    # weights and quotas run over the others, and a minimum the others cannot meet is capped.
    n, b = 40, 8
    groups = torch.tensor([0] * 30 + [1] * 10)
    excluded = torch.zeros(n, dtype=torch.bool)
    excluded[::4] = True
    excluded[30:35] = True
    scores = torch.where(excluded, 10.0, torch.linspace(0, 1, n))
    config = SelectionConfig.create(batch_size=b, super_batch_size=n, method='sample')
    step = SelectionStep(config, lambda batch, ids, criterion: PerExampleScores(
        scores, excluded=excluded))
    batch = {'g': groups, 'x': torch.zeros(n, 2)}
    for index in range(30):
        selection = step.choose(batch, torch.arange(n), 0, index, plan)
        rows = selection.selected
        assert len(rows) == b and len(set(rows.tolist())) == b
        assert not bool(excluded[rows].any())
        if plan.quota is not None and not plan.quota.proportional:
            assert int((groups[rows] == 1).sum()) >= 4
        if plan.weights:
            sub, _ = step(batch, torch.arange(n), epoch=0, index=index, plan=plan)
            assert bool(torch.isfinite(sub['sample_weight']).all())
    # Fewer rows with a loss than b: they are all taken, the excluded fill in, and the quota
    # says it could not hold.
    few = torch.ones(n, dtype=torch.bool)
    few[:3] = False
    step = SelectionStep(config, lambda batch, ids, criterion: PerExampleScores(
        scores, excluded=few))
    selection = step.choose(batch, torch.arange(n), 0, 0, plan)
    assert set(range(3)) <= set(selection.selected.tolist()) and len(selection.selected) == b
    if plan.quota is not None:
        assert selection.policy['quota_relaxed'] == 1.0


def test_a_quota_that_too_few_scored_rows_can_fill_says_what_to_change():
    from jest_stream.quotas import GroupQuota

    # Group 1 must fill half of 4 rows, but only one of its rows has a finite key.
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    quota = GroupQuota(groups=groups, total=4, low={1: 2}, high={})
    keys = torch.tensor([5.0, 4.0, 3.0, 2.0, -math.inf, -math.inf])
    with pytest.raises(DataError, match=r'only 3 of the 4 rows.*group 1: 2 to 4 of 4.*min_share'):
        quota.pick(keys, 4)

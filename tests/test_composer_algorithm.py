"""JESTAlgorithm in the real Composer Trainer on the CPU, over real MDS shards.

300 samples read in super-batches of B = 50 (6 per epoch), sub-batches of b = 10.
"""

from __future__ import annotations

import functools
import gc
import logging
import shutil
from pathlib import Path

import pandas
import pytest
import torch
from composer import Trainer
from composer.core import Algorithm, Evaluator, Event
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from helpers.composer import (  # noqa: F401 (one_thread is an autouse fixture)
    SUB,
    B,
    DictClassifier,
    N,
    TrainedBatches,
    fit,
    make_trainer,
    one_thread,
)
from helpers.data import N_CLASSES, features_and_labels
from helpers.models import tiny_classifier
from jest_stream import (
    AdaptivePressure,
    ClassificationScorer,
    ProxyScorer,
    SelectionPolicy,
    SelectiveLoader,
    StateError,
    collate_samples,
    get_criterion,
    read_log,
)
from jest_stream.config import SelectionConfig
from jest_stream.integrations.composer import JESTAlgorithm, call_model, jest_first
from jest_stream.step import SelectionStep

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


class RecordingFactory:
    """Builds the default-like scorer and records the ids of every super-batch it scores."""

    def __init__(self, reference: nn.Module | None = None) -> None:
        self.reference = reference
        self.seen: list[list[int]] = []
        self.chunks: list[int] = []

    def forward(self, model, batch):
        self.chunks.append(len(batch['y']))
        return model(batch)

    def __call__(self, model):
        inner = ClassificationScorer(model, self.reference, target_key='y', forward=self.forward,
                                     chunk_size=None)

        def scorer(batch, sample_ids, criterion):
            self.seen.append(sample_ids.tolist())
            return inner(batch, sample_ids, criterion)

        scorer.learner = model
        return scorer


def _reference() -> nn.Module:
    return DictClassifier(tiny_classifier(1))


def _loader(make_streaming, mds_dir, *, batch_size=B, shuffle=True, **kwargs) -> DataLoader:
    dataset = make_streaming(mds_dir, batch_size=batch_size, shuffle=shuffle)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples, **kwargs)


def _trainer(loader, algorithm, *, callbacks=(), algorithms=(), model=None, **kwargs
             ) -> Trainer:
    model = model if model is not None else DictClassifier(tiny_classifier(0))
    return make_trainer(loader, model, algorithms=[algorithm, *algorithms],
                        algorithm_passes=jest_first, callbacks=list(callbacks), **kwargs)


def test_selects_sub_batches_counts_raw_samples_and_logs(mds_dir, make_streaming):
    factory = RecordingFactory(_reference())
    trained = TrainedBatches()
    memory = InMemoryLogger()
    algorithm = JESTAlgorithm(filter_ratio=0.8, scorer_factory=factory, method='topk', seed=5)
    trainer = fit(_trainer(_loader(make_streaming, mds_dir), algorithm, callbacks=[trained],
                            loggers=[memory]))
    assert algorithm.sub_batch_size == SUB
    assert [len(ids) for ids in factory.seen] == [B] * 4
    for raw, sub in zip(factory.seen, trained.ids, strict=True):
        assert len(sub) == SUB and len(set(sub)) == SUB and set(sub) <= set(raw)
    # Composer counted the batch before AFTER_DATALOADER: raw samples.
    assert int(trainer.state.timestamp.batch) == 4
    assert int(trainer.state.timestamp.sample) == 4 * B
    assert algorithm.samples_trained == 4 * SUB
    # Composer sized its microbatch from the dataloader (B); the trainer only gets b.
    assert trainer.state.device_train_microbatch_size == SUB
    for key in ('jest/kept_fraction', 'jest/score_s', 'jest/select_s', 'jest/active',
                'jest/score_selected_mean', 'jest/score_selected_std', 'jest/score_all_mean'):
        assert len(memory.data[key]) == 4, key
    assert [value for _, value in memory.data['jest/kept_fraction']] == [SUB / B] * 4
    # top-k: the selected scores are above the mean of their super-batches.
    means = [v for _, v in memory.data['jest/score_selected_mean']]
    alls = [v for _, v in memory.data['jest/score_all_mean']]
    assert all(m > a for m, a in zip(means, alls, strict=True))


def test_first_selection_is_the_step_at_the_batch_position(mds_dir, make_streaming):
    factory = RecordingFactory(_reference())
    trained = TrainedBatches()
    algorithm = JESTAlgorithm(filter_ratio=0.8, scorer_factory=factory, seed=21, n_chunks=2)
    learner = DictClassifier(tiny_classifier(0))
    initial = DictClassifier(tiny_classifier(0))
    fit(_trainer(_loader(make_streaming, mds_dir), algorithm, callbacks=[trained],
                  model=learner, max_duration='1ba'))
    # Recompute the first selection by hand, with the untrained weights and the derived
    # generator of (seed, epoch 0, batch 0).
    x, y = features_and_labels(N)
    ids = torch.tensor(factory.seen[0])
    batch = {'x': torch.from_numpy(x)[ids], 'y': torch.from_numpy(y)[ids], 'sample_id': ids}
    scorer = ClassificationScorer(initial, _reference(), target_key='y', forward=call_model)
    config = SelectionConfig(criterion=get_criterion('learnability'), method='joint',
                             batch_size=SUB, super_batch_size=B, n_chunks=2, temperature=1.0,
                             seed=21)
    result = SelectionStep(config, scorer).choose(batch, ids, 0, 0)
    assert trained.ids[0] == ids[result.selected].tolist()


class BatchSizeRecorder(Algorithm):
    """Another algorithm at AFTER_DATALOADER that records the batch size it sees and, on dict
    batches, transforms the inputs (as MixUp would)."""

    def __init__(self, target: str | int = 'y') -> None:
        self.target = target
        self.sizes: list[int] = []

    def match(self, event, state):
        return event == Event.AFTER_DATALOADER

    def apply(self, event, state, logger):
        self.sizes.append(len(state.batch[self.target]))
        if isinstance(state.batch, dict):
            state.batch = {**state.batch, 'x': state.batch['x'] * 1.0}


@pytest.mark.parametrize('recorder_last', [True, False])
def test_runs_before_other_algorithms_with_jest_first(mds_dir, make_streaming, recorder_last):
    recorder = BatchSizeRecorder()
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y')
    model = DictClassifier(tiny_classifier(0))
    algorithms = [algorithm, recorder] if recorder_last else [recorder, algorithm]
    trainer = Trainer(model=model, train_dataloader=_loader(make_streaming, mds_dir),
                      max_duration='3ba', optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      algorithms=algorithms, algorithm_passes=jest_first, progress_bar=False,
                      log_to_console=False, device='cpu')
    fit(trainer)
    assert recorder.sizes == [SUB] * 3


def test_without_the_pass_an_earlier_transform_is_refused(mds_dir, make_streaming):
    # Listed after JESTAlgorithm, the recorder runs first on AFTER_DATALOADER (reverse order).
    recorder = BatchSizeRecorder()
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y')
    model = DictClassifier(tiny_classifier(0))
    trainer = Trainer(model=model, train_dataloader=_loader(make_streaming, mds_dir),
                      max_duration='2ba', optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      algorithms=[algorithm, recorder], progress_bar=False,
                      log_to_console=False, device='cpu')
    with pytest.raises(RuntimeError, match='algorithm_passes=jest_first'):
        trainer.fit()
    trainer.close()
    assert recorder.sizes == [B]


def _save_at_batch_4_and_epoch_ends(state, event):
    return (event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == 4) or \
        event == Event.EPOCH_CHECKPOINT


def _save_at_epoch_ends(state, event):
    return event == Event.EPOCH_CHECKPOINT


def _run(tmp_path, make_streaming, mds_dir, total, *, load_path=None, save_interval=None,
         selection_log=None):
    factory = RecordingFactory(_reference())
    trained = TrainedBatches()
    algorithm = JESTAlgorithm(filter_ratio=0.8, scorer_factory=factory, n_chunks=2,
                              selection_log=selection_log)
    extra = {} if save_interval is None else {'save_folder': str(tmp_path / 'ckpt'),
                                              'save_interval': save_interval}
    trainer = _trainer(_loader(make_streaming, mds_dir), algorithm, callbacks=[trained],
                       max_duration=f'{total}ba', load_path=load_path, **extra)
    fit(trainer)
    result = {
        'raw': factory.seen,
        'selected': trained.ids,
        'weights': [p.detach().clone() for p in trainer.state.model.parameters()],
        'time': (int(trainer.state.timestamp.epoch), int(trainer.state.timestamp.batch_in_epoch)),
        'checkpoints': sorted(p.name for p in (tmp_path / 'ckpt').glob('ep*'))
        if save_interval is not None else [],
    }
    del trainer
    gc.collect()
    return result


def _assert_same_weights(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_from_composer_checkpoints_is_exact(tmp_path: Path, mds_dir, make_streaming):
    """Mid-epoch (batch 4 of 6) and epoch-boundary (after batch 6) checkpoints, 10 batches."""
    total = 10
    full = _run(tmp_path, make_streaming, mds_dir, total,
                save_interval=_save_at_batch_4_and_epoch_ends)
    assert len(full['raw']) == total
    assert sorted(sum(full['raw'][:6], [])) == list(range(N)), 'epoch 0 read a sample twice'
    assert full['raw'][6:] != full['raw'][:4], 'epoch 1 should be a different shuffle'
    assert full['checkpoints'] == ['ep0-ba4-rank0.pt', 'ep1-ba6-rank0.pt']
    for name, done in (('ep0-ba4-rank0.pt', 4), ('ep1-ba6-rank0.pt', 6)):
        resumed = _run(tmp_path, make_streaming, mds_dir, total,
                       load_path=str(tmp_path / 'ckpt' / name))
        assert resumed['raw'] == full['raw'][done:], f'resume from {name} drew other batches'
        assert resumed['selected'] == full['selected'][done:], f'{name} selected differently'
        assert resumed['time'] == full['time']
        _assert_same_weights(resumed['weights'], full['weights'])


def test_the_selection_log_follows_checkpoints(tmp_path: Path, mds_dir, make_streaming):
    """A run logs every super-batch; resumed from a checkpoint with the log of a run that
    went on past it, the log is cut back to the checkpoint and ends as an uninterrupted one."""
    total = 6
    full = _run(tmp_path, make_streaming, mds_dir, total,
                save_interval=_save_at_batch_4_and_epoch_ends, selection_log=tmp_path / 'log')
    table = read_log(tmp_path / 'log').to_pandas()
    assert sorted(set(table['step'])) == list(range(total))
    assert len(table) == total * B
    for step, rows in table.groupby('step'):
        chosen = rows[rows['selected']].sort_values('order')
        assert chosen['sample_id'].tolist() == full['selected'][step]
    shutil.copytree(tmp_path / 'log', tmp_path / 'killed')
    _run(tmp_path, make_streaming, mds_dir, total, selection_log=tmp_path / 'killed',
         load_path=str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'))
    resumed = read_log(tmp_path / 'killed').to_pandas()
    pandas.testing.assert_frame_equal(resumed, table)
    with pytest.raises(ValueError, match='already holds a selection log'):
        _run(tmp_path, make_streaming, mds_dir, 1, selection_log=tmp_path / 'log')


@pytest.mark.parametrize('name', ['ep0-ba6-rank0.pt', 'ep1-ba6-rank0.pt'])
def test_resume_after_a_run_that_stopped_on_an_epoch_s_last_batch(tmp_path, mds_dir,
                                                                 make_streaming, name):
    """Composer saves ``ep0-ba6`` at that batch with an interval such as ``'1ep'`` (its
    timestamp: epoch 0, batch 6 of 6); an interval that fires only at ``EPOCH_CHECKPOINT``
    saves ``ep1-ba6``, where the timestamp says epoch 1, batch 0."""
    full = _run(tmp_path / 'full', make_streaming, mds_dir, 9)
    first = _run(tmp_path, make_streaming, mds_dir, 6,
                 save_interval='1ep' if name.startswith('ep0') else _save_at_epoch_ends)
    assert first['checkpoints'] == [name]
    resumed = _run(tmp_path, make_streaming, mds_dir, 9, load_path=str(tmp_path / 'ckpt' / name))
    assert first['raw'] + resumed['raw'] == full['raw']
    assert first['selected'] + resumed['selected'] == full['selected']
    assert resumed['time'] == full['time']
    _assert_same_weights(resumed['weights'], full['weights'])


def test_seed_is_checkpointed_and_a_different_one_refused(tmp_path, mds_dir, make_streaming):
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y')
    trainer = _trainer(_loader(make_streaming, mds_dir), algorithm, max_duration='2ba',
                       save_folder=str(tmp_path / 'ck'), save_interval='2ba')
    fit(trainer)
    assert algorithm.seed == 3  # the trainer's seed
    assert algorithm.state_dict()['seed'] == 3
    path = str(tmp_path / 'ck' / 'ep0-ba2-rank0.pt')
    resumed = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y')
    trainer = _trainer(_loader(make_streaming, mds_dir), resumed, max_duration='3ba',
                       load_path=path)
    trainer.close()
    assert resumed.seed == 3
    with pytest.raises(ValueError, match='seed=3'):
        _trainer(_loader(make_streaming, mds_dir),
                 JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y', seed=4),
                 max_duration='3ba', load_path=path)


@pytest.mark.parametrize(('max_duration', 'batches'), [('4ba', 4), ('120sp', 3), ('1ep', 6),
                                                       ('2ep', 12)])
def test_max_duration_units(mds_dir, make_streaming, max_duration, batches):
    factory = RecordingFactory(_reference())
    trained = TrainedBatches()
    algorithm = JESTAlgorithm(filter_ratio=0.8, scorer_factory=factory)
    trainer = fit(_trainer(_loader(make_streaming, mds_dir), algorithm, callbacks=[trained],
                            max_duration=max_duration))
    # 'ba' counts optimizer steps, 'sp' raw samples read (stopping at the first batch boundary
    # at or past it), 'ep' passes over the data.
    assert len(trained.ids) == batches
    assert all(len(ids) == SUB for ids in trained.ids)
    assert int(trainer.state.timestamp.sample) == batches * B
    if max_duration.endswith('ep'):
        for epoch in range(batches // 6):
            drawn = sum(factory.seen[6 * epoch:6 * epoch + 6], [])
            assert sorted(drawn) == list(range(N))


@pytest.mark.parametrize('outside', ['uniform', 'first'])
def test_selection_window(mds_dir, make_streaming, outside):
    factory = RecordingFactory(_reference())
    trained = TrainedBatches()
    memory = InMemoryLogger()
    algorithm = JESTAlgorithm(filter_ratio=0.8, scorer_factory=factory, start=0.25, end=0.75,
                              outside_window=outside)
    fit(_trainer(_loader(make_streaming, mds_dir, shuffle=False), algorithm,
                  callbacks=[trained], loggers=[memory], max_duration='2ep'))
    # 12 batches: selection runs for batches 3..8 (done = batch / 12 in [0.25, 0.75)).
    active = [value for _, value in memory.data['jest/active']]
    assert active == [0.0] * 3 + [1.0] * 6 + [0.0] * 3
    assert len(factory.seen) == 6
    assert (algorithm.batches_selected, algorithm.batches_outside) == (6, 6)
    assert all(len(ids) == SUB for ids in trained.ids)
    if outside == 'first':
        # The dataset does not shuffle within its shards: the first rows of each super-batch.
        assert trained.ids[0] == list(range(SUB))


def test_scoring_is_chunked_by_the_training_microbatch(mds_dir, make_streaming):
    factory = RecordingFactory(_reference())
    default = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y',
                            forward=factory.forward)
    fit(_trainer(_loader(make_streaming, mds_dir), default, max_duration='1ba',
                  device_train_microbatch_size=5))
    # Learner and reference each scored 50 rows in chunks of 5.
    assert factory.chunks == [5] * 20
    factory.chunks.clear()
    explicit = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y',
                             forward=factory.forward, chunk_size=20)
    fit(_trainer(_loader(make_streaming, mds_dir), explicit, max_duration='1ba'))
    assert factory.chunks == [20, 20, 10] * 2


def test_composer_classifier_with_tuple_batches():
    x, y = features_and_labels(120)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = DataLoader(dataset, batch_size=40, shuffle=False)
    model = ComposerClassifier(tiny_classifier(0), num_classes=N_CLASSES)
    reference = ComposerClassifier(tiny_classifier(1), num_classes=N_CLASSES)
    recorder = BatchSizeRecorder(target=1)
    algorithm = JESTAlgorithm(batch_size=8, reference=reference, id_key=None)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='1ep',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      algorithms=[algorithm, recorder], algorithm_passes=jest_first,
                      progress_bar=False, log_to_console=False, device='cpu')
    fit(trainer)
    assert recorder.sizes == [8, 8, 8]
    assert int(trainer.state.timestamp.sample) == 120


def test_partial_last_batch_smaller_than_a_sub_batch_is_trained_whole(caplog):
    x, y = features_and_labels(105)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    recorder = BatchSizeRecorder(target=1)
    model = ComposerClassifier(tiny_classifier(0), num_classes=N_CLASSES)
    trainer = Trainer(model=model, train_dataloader=DataLoader(dataset, batch_size=50),
                      max_duration='1ep', optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      algorithms=[JESTAlgorithm(filter_ratio=0.8, criterion='hard_learner',
                                                id_key=None), recorder],
                      algorithm_passes=jest_first, progress_bar=False, log_to_console=False,
                      device='cpu')
    with caplog.at_level(logging.WARNING, logger='jest_stream'):
        fit(trainer)
    assert recorder.sizes == [10, 10, 5]
    assert 'drop_last=True' in caplog.text


def test_bad_settings_fail_early_with_the_fix(mds_dir, make_streaming):
    with pytest.raises(ValueError, match='exactly one of filter_ratio'):
        JESTAlgorithm(reference=_reference())
    with pytest.raises(ValueError, match='filter_ratio=1.0'):
        JESTAlgorithm(filter_ratio=1.0, reference=_reference())
    with pytest.raises(ValueError, match='reference is None'):
        JESTAlgorithm(filter_ratio=0.8)
    with pytest.raises(ValueError, match='not both'):
        JESTAlgorithm(filter_ratio=0.8, reference=_reference(), scorer_factory=RecordingFactory())
    with pytest.raises(ValueError, match='0 <= start < end <= 1'):
        JESTAlgorithm(filter_ratio=0.8, reference=_reference(), start=0.5, end=0.5)
    with pytest.raises(ValueError, match='outside_window'):
        JESTAlgorithm(filter_ratio=0.8, reference=_reference(), outside_window='all')
    with pytest.raises(ValueError, match='criterion'):
        JESTAlgorithm(filter_ratio=0.8, reference=_reference(), criterion='loss')
    # B = 50 with filter_ratio 0.75 keeps 12.5 rows: refused when training starts.
    trainer = _trainer(_loader(make_streaming, mds_dir),
                       JESTAlgorithm(filter_ratio=0.75, reference=_reference(), target_key='y'))
    with pytest.raises(ValueError, match='not a whole sub-batch size'):
        trainer.fit()
    trainer.close()
    # The StreamingDataset must be built with the DataLoader's batch size.
    dataset = make_streaming(mds_dir, batch_size=25)
    trainer = _trainer(DataLoader(dataset, batch_size=B, collate_fn=collate_samples),
                       JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y'))
    with pytest.raises(ValueError, match='batch_size=50'):
        trainer.fit()
    trainer.close()
    # A SelectiveLoader already selects.
    model = DictClassifier(tiny_classifier(0))
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=B), batch_size=SUB,
                             filter_ratio=0.8, criterion='uniform')
    trainer = _trainer(loader, JESTAlgorithm(filter_ratio=0.8, criterion='uniform'), model=model)
    with pytest.raises(TypeError, match='not both'):
        trainer.fit()
    trainer.close()


# A learning scorer's state, all-or-nothing loads and evaluations

def _save_at_batch_3(state, event):
    return event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == 3


class ProxyFactory:
    """``scorer_factory`` building a ProxyScorer whose proxy starts from ``seed``'s weights."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.scorer: ProxyScorer | None = None

    def __call__(self, model):
        inner = ClassificationScorer(DictClassifier(tiny_classifier(self.seed)), _reference(),
                                     target_key='y', forward=call_model)
        self.scorer = ProxyScorer(inner, optimizer=functools.partial(torch.optim.SGD, lr=0.5))
        return self.scorer


def _proxy_run(tmp_path, make_streaming, mds_dir, *, seed, load_path=None, save=False):
    factory = ProxyFactory(seed)
    trained = TrainedBatches()
    algorithm = JESTAlgorithm(filter_ratio=0.8, scorer_factory=factory, n_chunks=2)
    extra = {'save_folder': str(tmp_path / 'ckpt'), 'save_interval': _save_at_batch_3} \
        if save else {}
    trainer = fit(_trainer(_loader(make_streaming, mds_dir), algorithm, callbacks=[trained],
                           max_duration='6ba', load_path=load_path, **extra))
    weights = [p.detach().clone() for p in trainer.state.model.parameters()]
    del trainer
    gc.collect()
    return factory.scorer, trained.ids, weights


def test_a_proxy_scorer_resumes_from_composer_checkpoints(tmp_path, mds_dir, make_streaming):
    full, full_ids, full_weights = _proxy_run(tmp_path, make_streaming, mds_dir, seed=2,
                                              save=True)
    assert full.updates == 6
    # The resumed run's factory builds its proxy from other weights at FIT_START, after the
    # checkpoint was loaded: the saved state waits for it.
    resumed, ids, weights = _proxy_run(tmp_path, make_streaming, mds_dir, seed=5,
                                       load_path=str(tmp_path / 'ckpt' / 'ep0-ba3-rank0.pt'))
    assert resumed.updates == 6, 'the proxy restarted instead of continuing'
    expected = full.state_dict()
    for key, value in resumed.state_dict()['model'].items():
        torch.testing.assert_close(value, expected['model'][key], rtol=0, atol=0)
    assert ids == full_ids[3:]
    _assert_same_weights(weights, full_weights)


def test_a_learning_scorer_state_and_a_scorer_that_does_not_learn_are_refused(
        tmp_path, mds_dir, make_streaming):
    _proxy_run(tmp_path / 'proxy', make_streaming, mds_dir, seed=2, save=True)
    with pytest.raises(StateError, match='does not learn: resume with the scorer'):
        _trainer(_loader(make_streaming, mds_dir),
                 JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y'),
                 load_path=str(tmp_path / 'proxy' / 'ckpt' / 'ep0-ba3-rank0.pt'))
    fit(_trainer(_loader(make_streaming, mds_dir),
                 JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y'),
                 max_duration='3ba', save_folder=str(tmp_path / 'plain'), save_interval='3ba'))
    # The factory builds the proxy at FIT_START: the state is refused there.
    trainer = _trainer(_loader(make_streaming, mds_dir),
                       JESTAlgorithm(filter_ratio=0.8, scorer_factory=ProxyFactory(2)),
                       max_duration='6ba', load_path=str(tmp_path / 'plain' / 'ep0-ba3-rank0.pt'))
    with pytest.raises(StateError, match='holds none of its state'):
        trainer.fit()
    trainer.close()


def _adaptive_algorithm(selection_log) -> JESTAlgorithm:
    # A mean learnability never above min_learnability: the pressure eases every window.
    policy = SelectionPolicy(adaptive=AdaptivePressure(window=1, min_learnability=1e9))
    return JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y',
                         policy=policy, selection_log=selection_log)


def test_a_refused_state_changes_nothing(tmp_path, mds_dir, make_streaming):
    saved = _adaptive_algorithm(tmp_path / 'log')
    fit(_trainer(_loader(make_streaming, mds_dir), saved, max_duration='4ba',
                 save_folder=str(tmp_path / 'ckpt'), save_interval='4ba'))
    assert saved.policy.adaptive.multiplier < 1.0
    # Resumed with a log folder that lacks the saved run's rows: the log refuses, after the
    # policy's state was loaded; the policy must be as it was.
    resumed = _adaptive_algorithm(tmp_path / 'other')
    before = resumed.policy.state_dict()
    with pytest.raises(StateError, match='selection log'):
        _trainer(_loader(make_streaming, mds_dir), resumed, max_duration='6ba',
                 load_path=str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'))
    assert resumed.policy.state_dict() == before
    assert resumed.policy.adaptive.multiplier == 1.0
    assert (resumed.batches_selected, resumed.samples_trained) == (0, 0)


class TwoMetricClassifier(DictClassifier):
    """Evaluated with accuracy and top-2 accuracy (an evaluator can have either)."""

    def __init__(self, module):
        super().__init__(module)
        self.accuracy = MulticlassAccuracy(num_classes=N_CLASSES, average='micro')
        self.top_two = MulticlassAccuracy(num_classes=N_CLASSES, average='micro', top_k=2)

    def get_metrics(self, is_train=False):
        return {} if is_train else {'MulticlassAccuracy': self.accuracy, 'TopTwo': self.top_two}

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs, batch['y'])


def _evaluators(make_streaming, mds_dir) -> list[Evaluator]:
    def loader():
        return _loader(make_streaming, mds_dir, shuffle=False)
    return [Evaluator(label='first', dataloader=loader(), metric_names=['MulticlassAccuracy']),
            Evaluator(label='second', dataloader=loader(), metric_names=['MulticlassAccuracy'],
                      subset_num_batches=1),
            Evaluator(label='other', dataloader=loader(), metric_names=['TopTwo'])]


@pytest.mark.parametrize('eval_label', [None, 'second'])
def test_each_evaluator_reports_its_own_metric(mds_dir, make_streaming, eval_label):
    # A window longer than the run: every reported value stays in the pressure's state.
    policy = SelectionPolicy(adaptive=AdaptivePressure(window=100))
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y',
                              policy=policy, eval_metric='MulticlassAccuracy',
                              **({} if eval_label is None else {'eval_label': eval_label}))
    memory = InMemoryLogger()
    fit(_trainer(_loader(make_streaming, mds_dir), algorithm, loggers=[memory],
                 model=TwoMetricClassifier(tiny_classifier(0)), max_duration='4ba',
                 eval_dataloader=_evaluators(make_streaming, mds_dir), eval_interval='2ba'))
    logged = {label: [float(v) for _, v in memory.data[f'metrics/{label}/MulticlassAccuracy']]
              for label in ('first', 'second')}
    assert len(logged['first']) == len(logged['second']) == 2
    assert logged['first'] != logged['second'], 'the evaluators must differ for the test'
    labels = ['first', 'second'] if eval_label is None else [eval_label]
    expected = [[steps, logged[label][i]] for i, steps in enumerate((2, 4)) for label in labels]
    assert algorithm.policy.adaptive.state_dict()['metrics'] == expected


def test_an_eval_label_without_the_metric_is_refused(mds_dir, make_streaming):
    policy = SelectionPolicy(adaptive=AdaptivePressure(window=100))
    with pytest.raises(ValueError, match='eval_label'):
        JESTAlgorithm(filter_ratio=0.8, reference=_reference(), policy=policy, eval_label='a')
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=_reference(), target_key='y',
                              policy=policy, eval_metric='MulticlassAccuracy',
                              eval_label='other')
    trainer = _trainer(_loader(make_streaming, mds_dir), algorithm,
                       model=TwoMetricClassifier(tiny_classifier(0)), max_duration='2ba',
                       eval_dataloader=_evaluators(make_streaming, mds_dir), eval_interval='2ba')
    with pytest.raises(ValueError, match="eval_label='other'"):
        trainer.fit()
    trainer.close()

"""SelectiveLoader as the Composer Trainer's train dataloader, inline and with a scorer process.

300 samples read in super-batches of B = 50 (6 per epoch), sub-batches of b = 10.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.core import Event
from composer.loggers import InMemoryLogger
from jest_stream.integrations.composer import JESTAlgorithm, JESTLoaderCallback, jest_first
from torch.utils.data import DataLoader

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
from helpers.models import tiny_classifier
from helpers.scorers import RecordingScorer
from jest_stream import SelectiveLoader, collate_samples

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def _selective_loader(make_streaming, mds_dir, scorer, **kwargs) -> SelectiveLoader:
    return SelectiveLoader(make_streaming(mds_dir, batch_size=B), batch_size=SUB,
                           filter_ratio=0.8, scorer=scorer, n_chunks=2, seed=9, **kwargs)


def _trainer(loader, model, *, callbacks=(), **kwargs) -> Trainer:
    return make_trainer(loader, model, callbacks=[JESTLoaderCallback(), *callbacks], **kwargs)


def test_counts_selected_samples_and_logs_loader_metrics(mds_dir, make_streaming):
    model = DictClassifier(tiny_classifier(0))
    scorer = RecordingScorer(model.module, tiny_classifier(1))
    loader = _selective_loader(make_streaming, mds_dir, scorer)
    trained = TrainedBatches()
    memory = InMemoryLogger()
    trainer = fit(_trainer(loader, model, callbacks=[trained], loggers=[memory]))
    assert [len(ids) for ids in trained.ids] == [SUB] * 4
    assert [len(seen) for seen in scorer.seen] == [B] * 4
    # Composer counts what it trains on: selected samples.
    assert int(trainer.state.timestamp.sample) == 4 * SUB
    assert (loader.state_dict()['epoch'], loader.state_dict()['super_batches']) == (0, 4)
    for key in ('jest/score_s', 'jest/select_s', 'jest/wait_s', 'jest/drawn',
                'jest/score_selected_mean', 'jest/score_all_mean'):
        assert len(memory.data[key]) == 4, key
    assert [v for _, v in memory.data['jest/drawn']] == [B] * 4
    assert trained.positions == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_selects_what_the_algorithm_selects(mds_dir, make_streaming):
    """Same data, seed and model: the loader and JESTAlgorithm train on the same examples."""
    steps = 8
    model = DictClassifier(tiny_classifier(0))
    loader = SelectiveLoader(make_streaming(mds_dir, batch_size=B), batch_size=SUB,
                             filter_ratio=0.8, scorer=RecordingScorer(model.module,
                                                                      tiny_classifier(1)),
                             n_chunks=2, seed=9)
    by_loader = TrainedBatches()
    fit(_trainer(loader, model, callbacks=[by_loader], max_duration=f'{steps}ba'))

    model = DictClassifier(tiny_classifier(0))
    by_algorithm = TrainedBatches()
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=DictClassifier(tiny_classifier(1)),
                              target_key='y', n_chunks=2, seed=9)
    trainer = Trainer(
        model=model, max_duration=f'{steps}ba',
        train_dataloader=DataLoader(make_streaming(mds_dir, batch_size=B), batch_size=B,
                                    collate_fn=collate_samples),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5), algorithms=[algorithm],
        algorithm_passes=jest_first, callbacks=[by_algorithm], progress_bar=False,
        log_to_console=False, device='cpu')
    fit(trainer)
    assert by_loader.ids == by_algorithm.ids


def _save_at_batch_4_and_epoch_ends(state, event):
    return (event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == 4) or \
        event == Event.EPOCH_CHECKPOINT


def _run(tmp_path, make_streaming, mds_dir, total, *, load_path=None, save=False,
         save_interval=_save_at_batch_4_and_epoch_ends, **loader_kw):
    model = DictClassifier(tiny_classifier(0))
    scorer = RecordingScorer(model.module, tiny_classifier(1))
    loader = _selective_loader(make_streaming, mds_dir, scorer, **loader_kw)
    trained = TrainedBatches()
    extra = {'save_folder': str(tmp_path / 'ckpt'), 'save_interval': save_interval} if save else {}
    trainer = _trainer(loader, model, callbacks=[trained], max_duration=f'{total}ba',
                       load_path=load_path, **extra)
    spun_before = loader.telemetry.totals['batches']
    fit(trainer)
    result = {
        'raw': scorer.seen,
        'selected': trained.ids,
        'positions': trained.positions,
        'handed_over': loader.telemetry.totals['batches'] - spun_before,
        'weights': [p.detach().clone() for p in model.parameters()],
        'process_closed': loader.scorer_process is None,
        'epoch': int(trainer.state.timestamp.epoch),
        'batch_in_epoch': int(trainer.state.timestamp.batch_in_epoch),
        'checkpoints': sorted(p.name for p in (tmp_path / 'ckpt').glob('ep*')) if save else [],
    }
    del trainer, loader
    gc.collect()
    return result


def _assert_same_weights(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_from_composer_checkpoints_is_exact_and_does_not_spin(tmp_path: Path, mds_dir,
                                                                      make_streaming):
    total = 10
    full = _run(tmp_path, make_streaming, mds_dir, total, save=True)
    assert len(full['raw']) == total
    assert sorted(sum(full['raw'][:6], [])) == list(range(N))
    for name, done in (('ep0-ba4-rank0.pt', 4), ('ep1-ba6-rank0.pt', 6)):
        path = str(tmp_path / 'ckpt' / name)
        resumed = _run(tmp_path, make_streaming, mds_dir, total, load_path=path)
        # Nothing drawn or scored twice: the scorer saw exactly the remaining super-batches.
        assert resumed['raw'] == full['raw'][done:], name
        assert resumed['handed_over'] == total - done
        assert resumed['positions'] == full['positions'][done:]
        assert resumed['selected'] == full['selected'][done:]
        _assert_same_weights(resumed['weights'], full['weights'])
        # After the epoch-boundary checkpoint Composer counts one epoch too many: see
        # test_composer_epoch_is_consistent_after_an_epoch_end_checkpoint.
        if done == 4:
            assert (resumed['epoch'], resumed['batch_in_epoch']) == (full['epoch'],
                                                                     full['batch_in_epoch'])


def _save_at_epoch_ends(state, event):
    return event == Event.EPOCH_CHECKPOINT


def _stopped_on_last_batch(tmp_path, make_streaming, mds_dir, name):
    """A 9-batch run, and a 6-batch run that stops on epoch 0's last batch and saves ``name``.

    Composer saves ``ep0-ba6`` at that batch (its timestamp: epoch 0, batch 6 of 6) with an
    interval such as ``'1ep'``, which saves at the end of training; an interval that fires only
    at ``EPOCH_CHECKPOINT`` saves ``ep1-ba6``, where the timestamp already says epoch 1, batch 0.
    """
    full = _run(tmp_path / 'full', make_streaming, mds_dir, 9)
    first = _run(tmp_path, make_streaming, mds_dir, 6, save=True,
                 save_interval='1ep' if name.startswith('ep0') else _save_at_epoch_ends)
    assert first['selected'] == full['selected'][:6]
    assert first['checkpoints'] == [name]
    return full


@pytest.mark.parametrize('name', ['ep0-ba6-rank0.pt', 'ep1-ba6-rank0.pt'])
def test_resume_after_a_run_that_stopped_on_an_epoch_s_last_batch(tmp_path, mds_dir,
                                                                 make_streaming, name):
    full = _stopped_on_last_batch(tmp_path, make_streaming, mds_dir, name)
    resumed = _run(tmp_path, make_streaming, mds_dir, 9, load_path=str(tmp_path / 'ckpt' / name))
    assert resumed['raw'] == full['raw'][6:]
    assert resumed['selected'] == full['selected'][6:]
    _assert_same_weights(resumed['weights'], full['weights'])
    if name == 'ep0-ba6-rank0.pt':
        assert (resumed['epoch'], resumed['batch_in_epoch']) == (full['epoch'],
                                                                 full['batch_in_epoch'])


@pytest.mark.parametrize('stopped', [False, True])
def test_composer_epoch_is_consistent_after_an_epoch_end_checkpoint(tmp_path, mds_dir,
                                                                    make_streaming, stopped):
    if stopped:
        full = _stopped_on_last_batch(tmp_path, make_streaming, mds_dir, 'ep1-ba6-rank0.pt')
    else:
        full = _run(tmp_path, make_streaming, mds_dir, 9, save=True,
                    save_interval=_save_at_epoch_ends)
    resumed = _run(tmp_path, make_streaming, mds_dir, 9,
                   load_path=str(tmp_path / 'ckpt' / 'ep1-ba6-rank0.pt'))
    assert (resumed['epoch'], resumed['batch_in_epoch']) == (full['epoch'],
                                                             full['batch_in_epoch'])


def test_process_scoring_resumes_exactly(tmp_path, mds_dir, make_streaming):
    """With sync_every=1 and max_staleness=0 the scorer process selects what inline does."""
    total = 8
    inline = _run(tmp_path / 'inline', make_streaming, mds_dir, total)
    full = _run(tmp_path, make_streaming, mds_dir, total, save=True, scoring='process',
                sync_every=1, max_staleness=0)
    assert full['selected'] == inline['selected']
    assert full['process_closed'], 'JESTLoaderCallback stops the scorer process at FIT_END'
    _assert_same_weights(full['weights'], inline['weights'])
    resumed = _run(tmp_path, make_streaming, mds_dir, total, scoring='process', sync_every=1,
                   max_staleness=0, load_path=str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'))
    assert resumed['handed_over'] == total - 4
    assert resumed['positions'] == inline['positions'][4:]
    assert resumed['selected'] == inline['selected'][4:]
    _assert_same_weights(resumed['weights'], inline['weights'])


@pytest.mark.parametrize(('max_duration', 'batches'), [('4ba', 4), ('30sp', 3), ('1ep', 6),
                                                       ('2ep', 12)])
def test_max_duration_units(mds_dir, make_streaming, max_duration, batches):
    model = DictClassifier(tiny_classifier(0))
    scorer = RecordingScorer(model.module, tiny_classifier(1))
    trained = TrainedBatches()
    trainer = fit(_trainer(_selective_loader(make_streaming, mds_dir, scorer), model,
                            callbacks=[trained], max_duration=max_duration))
    # 'ba' counts optimizer steps, 'sp' selected samples trained on, 'ep' passes over the data.
    assert len(trained.ids) == batches
    assert int(trainer.state.timestamp.sample) == batches * SUB
    assert len(scorer.seen) == batches
    if max_duration.endswith('ep'):
        assert int(trainer.state.timestamp.epoch) == batches // 6
        for epoch in range(batches // 6):
            drawn = sum(scorer.seen[6 * epoch:6 * epoch + 6], [])
            assert sorted(drawn) == list(range(N))


def test_callback_refuses_a_scorer_that_scores_with_a_copy(mds_dir, make_streaming):
    model = DictClassifier(tiny_classifier(0))
    copy = tiny_classifier(0)
    loader = _selective_loader(make_streaming, mds_dir, RecordingScorer(copy, tiny_classifier(1)))
    trainer = _trainer(loader, model)
    with pytest.raises(ValueError, match='not a copy'):
        trainer.fit()
    trainer.close()


def test_callback_needs_a_selective_loader(mds_dir, make_streaming):
    model = DictClassifier(tiny_classifier(0))
    loader = DataLoader(make_streaming(mds_dir, batch_size=SUB), batch_size=SUB,
                        collate_fn=collate_samples)
    trainer = _trainer(loader, model)
    with pytest.raises(TypeError, match='JESTAlgorithm instead'):
        trainer.fit()
    trainer.close()

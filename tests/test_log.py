"""The selection log: its rows, files, rotation, exactness across a SIGKILL and a resume,
damaged files; and metrics to Composer's and TensorBoard's loggers.

Run as a script, this file is the training job that the SIGKILL test kills and resumes.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels, write_mds
from helpers.distributed import rendezvous, spawn
from helpers.models import tiny_classifier
from helpers.segments import segments_of
from jest_stream import (
    ClassificationScorer,
    MissingColumnError,
    SampleIdStreamingDataset,
    SelectionConfig,
    SelectionStep,
    SelectiveLoader,
    SettingError,
    SettingTypeError,
    StateError,
)
from jest_stream.errors import DataError
from jest_stream.log import LogError, SelectionLog, log_files, log_metrics, read_log
from jest_stream.policies import Plan, Quota, SelectionPolicy
from jest_stream.scores import PerExampleScores

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _scores(batch, ids, criterion):
    """Learnability from stored per-row losses: the learner's ``l``, the reference's ``r``."""
    return PerExampleScores(batch['l'] - batch['r'], learner=batch['l'], reference=batch['r'])


def _super_batch(n: int, index: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return {'l': torch.rand(n, generator=generator) * 3, 'r': torch.rand(n, generator=generator),
            'y': torch.randint(0, 4, (n,), generator=generator),
            'noisy': torch.rand(n, generator=generator) < 0.3}


def _by_step(table: pa.Table, step: int) -> dict[str, np.ndarray]:
    rows = table.filter(pa.compute.equal(table['step'], step))
    return {name: rows.column(name).to_numpy() for name in rows.column_names}


# The rows


def test_one_row_per_sample_drawn_with_candidacy_order_scores_columns_and_policy(tmp_path):
    # b = 8 of B = 40 at pressure 0.5: 13 candidates are scored; a quarter is mixed in.
    config = SelectionConfig.create(batch_size=8, super_batch_size=40, method='topk')
    log = SelectionLog(tmp_path / 'log', columns={'label': 'y', 'noisy': 'noisy'})
    results = []

    def record(result):
        results.append((result.selection, result.sample_ids.clone()))
        log.record(result)

    step = SelectionStep(config, _scores, record=record)
    subs = []
    for index in range(3):
        batch = _super_batch(40, index)
        ids = torch.arange(1000 + 40 * index, 1040 + 40 * index)
        sub, _ = step(batch, ids, epoch=2, index=index, plan=Plan(pressure=0.5, mix=0.25))
        subs.append((batch, sub))
    log.close()
    table = read_log(tmp_path / 'log')
    assert table.num_rows == 3 * 40 and log.steps == 3
    for index, ((selection, ids), (batch, sub)) in enumerate(zip(results, subs, strict=True)):
        rows = _by_step(table, index)
        assert rows['epoch'].tolist() == [2] * 40 and rows['index'].tolist() == [index] * 40
        assert rows['row'].tolist() == list(range(40))
        assert rows['sample_id'].tolist() == ids.tolist()
        candidates = selection.candidates.numpy()
        assert len(candidates) == 13 == rows['n_candidates'][0]
        assert np.flatnonzero(rows['candidate']).tolist() == candidates.tolist()
        # The selected rows, in selection order, are the sub-batch in its order.
        chosen = np.flatnonzero(rows['selected'])
        in_order = chosen[np.argsort(rows['order'][chosen])]
        assert rows['sample_id'][in_order].tolist() \
            == ids[candidates[selection.selected.numpy()]].tolist()
        assert rows['order'][in_order].tolist() == list(range(8))
        assert (rows['order'][~rows['selected']] == -1).all()
        learner, reference = batch['l'].numpy(), batch['r'].numpy()
        offered = rows['candidate']
        np.testing.assert_array_equal(rows['learner'][offered], learner[offered])
        np.testing.assert_array_equal(rows['reference'][offered], reference[offered])
        np.testing.assert_allclose(rows['score'][offered], (learner - reference)[offered],
                                   rtol=1e-6)
        for name in ('score', 'learner', 'reference', 'weight'):
            assert np.isnan(rows[name][~offered]).all(), name
        assert np.isnan(rows['weight']).all()
        assert rows['label'].tolist() == batch['y'].tolist()
        assert rows['noisy'].tolist() == batch['noisy'].tolist()
        assert set(rows['pressure']) == {0.5} and set(rows['mix']) == {0.25}
        assert rows['filter_ratio_now'][0] == pytest.approx(1 - 8 / 13)
        assert sub['l'].tolist() == batch['l'][candidates[selection.selected]].tolist()


def test_importance_weights_are_logged_for_the_selected_rows(tmp_path):
    config = SelectionConfig.create(batch_size=6, super_batch_size=30, method='sample')
    with SelectionLog(tmp_path) as log:
        step = SelectionStep(config, _scores, record=log.record)
        sub, selection = step(_super_batch(30, 0), torch.arange(30), epoch=0, index=0,
                              plan=Plan(weights=True))
    rows = _by_step(read_log(tmp_path), 0)
    chosen = np.flatnonzero(rows['selected'])
    in_order = chosen[np.argsort(rows['order'][chosen])]
    np.testing.assert_array_equal(rows['weight'][in_order], sub['sample_weight'].numpy())
    assert np.isnan(rows['weight'][~rows['selected']]).all()


def _tensors(n: int) -> TensorDataset:
    x, y = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _tuple_scorer():
    return ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                target_key=1)


@pytest.mark.parametrize('scope', ['rank', 'global'])
def test_the_loader_logs_what_it_hands_over_and_a_short_last_batch(tmp_path, scope):
    # 126 samples in super-batches of 40: three full ones and a last of 6 < b, handed over
    # whole (drop_last=False). Global scope orders the candidates by sample id.
    log = SelectionLog(tmp_path / scope, columns={'label': 1})
    dataset = _tensors(126)
    loader = SelectiveLoader(dataset, batch_size=8, super_batch_size=40,
                             scorer=_tuple_scorer(), n_chunks=2, seed=3, drop_last=False,
                             selection_scope=scope, selection_log=log)
    handed = [batch[2].tolist() for batch in loader]
    loader.close()
    table = read_log(tmp_path / scope)
    assert log.steps == len(handed) == 4 and table.num_rows == 126
    for index, ids in enumerate(handed):
        rows = _by_step(table, index)
        chosen = np.flatnonzero(rows['selected'])
        assert rows['sample_id'][chosen[np.argsort(rows['order'][chosen])]].tolist() == ids
        assert rows['label'].tolist() == dataset.tensors[1].numpy()[rows['sample_id']].tolist()
    last = _by_step(table, 3)
    assert last['selected'].all() and np.isnan(last['score']).all()
    assert np.isnan(last['pressure']).all()
    assert last['order'].tolist() == list(range(6)) and len(handed[3]) == 6
    assert np.unique(table['sample_id'].to_numpy()).tolist() == list(range(126))


def test_streams_of_a_streaming_dataset_are_logged(tmp_path):
    from streaming import Stream

    big = write_mds(tmp_path / 'big', 120)
    small = write_mds(tmp_path / 'small', 30, seed=1)
    dataset = SampleIdStreamingDataset(
        streams=[Stream(local=str(big)), Stream(local=str(small))], batch_size=50,
        shuffle=True, shuffle_seed=3, num_canonical_nodes=1)
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='x',
                                  target_key='y')
    # A folder is enough: the loader logs a StreamingDataset's streams.
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer,
                             selection_log=str(tmp_path / 'log'),
                             policy=SelectionPolicy(quota=Quota('stream', min_share=0.2)))
    shares = []
    for _ in loader:
        shares.append(loader.metrics.get('share/1', 0.0))
    loader.close()
    table = read_log(tmp_path / 'log')
    ids, stream = table['sample_id'].to_numpy(), table['stream'].to_numpy()
    assert (stream == (ids >= 120)).all() and table.num_rows == 150
    for index, share in enumerate(shares):  # the quota's share, from the log
        rows = _by_step(table, index)
        assert rows['stream'][rows['selected']].mean() == pytest.approx(share)


def _global_scope_worker(rank: int, world: int, meeting: str, folder: Path) -> None:
    from helpers.distributed import make_loader, map_dataset, process_group, run_steps

    with process_group(rank, world, meeting):
        log = SelectionLog(folder / 'log', columns={'label': 1})
        loader = make_loader(map_dataset(130), world=world, global_super=40, global_batch=8,
                             scope='global', selection_log=log)
        ids, _ = run_steps(loader, 3)
        loader.close()
        (folder / f'ids{rank}.json').write_text(json.dumps(ids))


def test_each_rank_writes_its_own_files_under_torch_distributed(tmp_path):
    # Two gloo ranks, global selection: 8 of each step's 40 candidates (20 a rank) per rank.
    spawn(_global_scope_worker, 2, rendezvous(tmp_path), tmp_path)
    assert [(f.rank, f.first_step) for f in log_files(tmp_path / 'log')] == [(0, 0), (1, 0)]
    table = read_log(tmp_path / 'log')
    trained = [json.loads((tmp_path / f'ids{rank}.json').read_text()) for rank in (0, 1)]
    for step in range(3):
        rows = _by_step(table, step)
        assert sorted(rows['rank'].tolist()) == [0] * 20 + [1] * 20
        assert len(set(rows['sample_id'].tolist())) == 40 == rows['n_candidates'][0]
        chosen = np.flatnonzero(rows['selected'])
        in_order = chosen[np.argsort(rows['order'][chosen])]
        # Rank r trains the r-th 8 of the global selection order.
        assert rows['sample_id'][in_order].tolist() == trained[0][step] + trained[1][step]


# Files


def test_pandas_and_pyarrow_read_the_folder(tmp_path):
    import pandas as pd
    import pyarrow.dataset as ds

    log = SelectionLog(tmp_path / 'log', max_rows_per_file=90)
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)
    step = SelectionStep(config, _scores, record=log.record)
    for index in range(5):
        step(_super_batch(40, index), torch.arange(40) + 40 * index, epoch=0, index=index)
    log.close()
    expected = read_log(tmp_path / 'log')
    assert len(log_files(tmp_path / 'log')) == 3  # 90 rows a file: two super-batches of 40
    frame = pd.read_parquet(tmp_path / 'log').sort_values(['step', 'row'], ignore_index=True)
    assert frame.equals(expected.to_pandas())
    assert frame['score'].dtype == np.float32 and frame['selected'].dtype == bool
    assert ds.dataset(tmp_path / 'log').to_table().num_rows == 200
    loader = SelectiveLoader(_tensors(200), batch_size=8, super_batch_size=40,
                             criterion='uniform', selection_log=SelectionLog(tmp_path / 'uniform'))
    list(loader)
    loader.close()
    uniform = pd.read_parquet(tmp_path / 'uniform')  # nothing scored: null scores
    assert len(uniform) == 200 and uniform['score'].isna().all()
    assert uniform['selected'].sum() == 5 * 8


def test_rotation_by_rows_bytes_and_files_and_ranks_in_file_names(tmp_path):
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)

    def run(log, steps=10):
        step = SelectionStep(config, _scores, record=log.record)
        for index in range(steps):
            step(_super_batch(40, index), torch.arange(40) + 40 * index, epoch=0, index=index)
        log.close()

    run(SelectionLog(tmp_path / 'rows', max_rows_per_file=120))
    files = log_files(tmp_path / 'rows')
    assert [f.first_step for f in files] == [0, 3, 6, 9]
    assert [pq.read_metadata(f.path).num_rows for f in files] == [120, 120, 120, 40]
    run(SelectionLog(tmp_path / 'kept', max_rows_per_file=80, max_files=2))
    assert [f.first_step for f in log_files(tmp_path / 'kept')] == [6, 8]
    assert read_log(tmp_path / 'kept')['step'].to_numpy().min() == 6
    one_step = SelectionLog(tmp_path / 'bytes', max_bytes_per_file=1)
    run(one_step, steps=3)
    assert [f.first_step for f in log_files(tmp_path / 'bytes')] == [0, 1, 2]
    run(SelectionLog(tmp_path / 'ranks', rank=0), steps=2)
    run(SelectionLog(tmp_path / 'ranks', rank=3), steps=2)
    names = sorted(p.name for p in (tmp_path / 'ranks').iterdir())
    assert names == ['selection-rank000-step000000000000.parquet',
                     'selection-rank003-step000000000000.parquet']
    assert read_log(tmp_path / 'ranks')['rank'].to_numpy().tolist() == [0] * 80 + [3] * 80
    assert read_log(tmp_path / 'ranks', ranks=[3]).num_rows == 80


# Run by the test below in its own interpreter: loaders that never close their logs.
_UNCLOSED_LOGS = """
import gc, os, sys
import torch
from torch.utils.data import TensorDataset
from jest_stream import SelectionLog, SelectiveLoader

folder = sys.argv[1]
dataset = TensorDataset(torch.randn(120, 4), torch.arange(120) % 3)


def loader(name):
    return SelectiveLoader(dataset, batch_size=8, super_batch_size=40, criterion='uniform',
                           seed=0, selection_log=SelectionLog(os.path.join(folder, name)))


dropped = loader('dropped')  # three steps, then freed by the garbage collector
list(dropped)
del dropped
gc.collect()
reopened = loader('reopened')  # three steps, close(), three more
list(reopened)
reopened.close()
list(reopened)
forked = loader('forked')
list(forked)
child = os.fork()
if child == 0:
    sys.exit(0)  # the child's interpreter exits; the rows are its parent's to write
os.waitpid(child, 0)
print('after the child:', sorted(os.listdir(os.path.join(folder, 'forked'))))
"""


def test_rows_of_a_log_never_closed_are_written_at_interpreter_exit(tmp_path):
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    job = subprocess.run([sys.executable, '-c', _UNCLOSED_LOGS, str(tmp_path)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert 'after the child: []' in job.stdout
    for name, steps in (('dropped', 3), ('reopened', 6), ('forked', 3)):
        table = read_log(tmp_path / name)
        assert table['step'].to_numpy().tolist() == np.repeat(np.arange(steps), 40).tolist()


def test_a_folder_with_another_runs_log_is_refused_unless_overwritten(tmp_path):
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)
    for overwrite in (False, True):
        log = SelectionLog(tmp_path, overwrite=overwrite)
        step = SelectionStep(config, _scores, record=log.record)
        if overwrite:
            step(_super_batch(40, 9), torch.arange(40), epoch=0, index=0)
            log.close()
            assert read_log(tmp_path)['step'].to_numpy().max() == 0
            return
        step(_super_batch(40, 0), torch.arange(40), epoch=0, index=0)
        step(_super_batch(40, 1), torch.arange(40), epoch=0, index=1)
        log.close()
        with pytest.raises(SettingError, match='already holds a selection log of rank 0'):
            SelectionLog(tmp_path).state_dict()


def test_bad_settings_and_columns_are_refused_with_the_fix(tmp_path):
    with pytest.raises(SettingError, match='other than'):
        SelectionLog(tmp_path, columns={'score': 'y'})
    with pytest.raises(SettingError, match='max_rows_per_file'):
        SelectionLog(tmp_path, max_rows_per_file=0)
    with pytest.raises(SettingError, match='streams'):
        SelectionLog(tmp_path, streams=[5, 10])
    with pytest.raises(SettingTypeError, match='must be a folder'):
        SelectiveLoader(_tensors(40), batch_size=8, filter_ratio=0.5, scorer=_tuple_scorer(),
                        selection_log=True)
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)
    batch = _super_batch(40, 0)
    for columns, error, message in (({'label': 'missing'}, MissingColumnError, 'missing'),
                                    ({'two_d': 'l2'}, DataError, 'one scalar per sample')):
        log = SelectionLog(tmp_path / str(len(str(columns))), columns=columns)
        step = SelectionStep(config, _scores, record=log.record)
        with pytest.raises(error, match=message):
            step({**batch, 'l2': torch.zeros(40, 2)}, torch.arange(40), epoch=0, index=0)
    log = SelectionLog(tmp_path / 'kinds', columns=['y'])
    step = SelectionStep(config, _scores, record=log.record)
    step(batch, torch.arange(40), epoch=0, index=0)
    with pytest.raises(DataError, match="'y' held int64 values and now holds float64"):
        step({**batch, 'y': batch['y'].double()}, torch.arange(40), epoch=0, index=1)


# Resumption


def test_state_dict_writes_every_row_and_a_resume_cuts_the_rows_after_it(tmp_path):
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)

    def steps(log, first, last):
        step = SelectionStep(config, _scores, record=log.record)
        for index in range(first, last):
            names = [f'sample {40 * index + i}' for i in range(40)]  # a string column
            step({**_super_batch(40, index), 'name': names}, torch.arange(40) + 40 * index,
                 epoch=0, index=index)

    whole = SelectionLog(tmp_path / 'whole', max_rows_per_file=200, columns=['name'])
    steps(whole, 0, 12)
    whole.close()
    assert read_log(tmp_path / 'whole')['name'].to_pylist()[-1] == 'sample 479'
    log = SelectionLog(tmp_path / 'cut', max_rows_per_file=200, columns=['name'])
    steps(log, 0, 7)
    state = log.state_dict()
    assert state == {'version': 1, 'steps': 7, 'run': state['run'], 'rank': 0}
    assert {_run_of(f.path) for f in log_files(tmp_path / 'cut')} == {state['run']}
    assert read_log(tmp_path / 'cut').num_rows == 7 * 40  # on disk, without a close
    steps(log, 7, 11)  # rotates at step 10: the file of steps 5-9 straddles the position
    log.flush()
    resumed = SelectionLog(tmp_path / 'cut', max_rows_per_file=200, columns=['name'])
    resumed.load_state_dict(state)
    assert read_log(tmp_path / 'cut')['step'].to_numpy().max() == 6
    steps(resumed, 7, 12)
    resumed.close()
    assert read_log(tmp_path / 'cut').equals(read_log(tmp_path / 'whole'))
    assert [f.path.name for f in log_files(tmp_path / 'cut')] \
        == [f.path.name for f in log_files(tmp_path / 'whole')]
    with pytest.raises(StateError, match='rows are missing'):
        SelectionLog(tmp_path / 'cut').load_state_dict({'version': 1, 'steps': 20})
    with pytest.raises(StateError, match='no file of rank 0'):
        SelectionLog(tmp_path / 'empty').load_state_dict({'version': 1, 'steps': 3})
    with pytest.raises(StateError, match='version'):
        SelectionLog(tmp_path / 'cut').load_state_dict({'version': 9, 'steps': 3})
    with pytest.raises(SettingError, match='already holds'):
        SelectionLog(tmp_path / 'cut').load_state_dict({})
    other = SelectionLog(tmp_path / 'cut', max_rows_per_file=200, columns=['y'])
    other.load_state_dict(state)
    with pytest.raises(LogError, match='resume with the same columns'):
        SelectionStep(config, _scores, record=other.record)(
            _super_batch(40, 7), torch.arange(40), epoch=0, index=7)
    # The same names, but a column that now holds ints: refused when the open file is written.
    retyped = SelectionLog(tmp_path / 'cut', max_rows_per_file=200, columns=['name'])
    retyped.load_state_dict(state)
    SelectionStep(config, _scores, record=retyped.record)(
        {**_super_batch(40, 7), 'name': torch.arange(40)}, torch.arange(40), epoch=0, index=7)
    with pytest.raises(LogError, match=r'selection-rank000-step000000000005\.parquet: .* '
                                       r'resume with the same columns'):
        retyped.flush()
    retyped._pending = []  # the refused rows: nothing left to write at exit


@pytest.mark.parametrize('length, max_bytes', [(0, 10_000), (200, 40_000)])
def test_a_resume_rotates_by_bytes_as_an_uninterrupted_run_does(tmp_path, length, max_bytes):
    # Strings of 8 to 11 characters, or of 200 (some of them two bytes long in UTF-8): a file
    # holds three or four steps of 40 rows, the strings' bytes counted.
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)

    def steps(log, first, last):
        step = SelectionStep(config, _scores, record=log.record)
        for index in range(first, last):
            names = [f'{"é" * (i % 3)}sample {40 * index + i}'.ljust(length, '.')
                     for i in range(40)]
            step({**_super_batch(40, index), 'name': names}, torch.arange(40) + 40 * index,
                 epoch=0, index=index)

    def log_at(name):
        return SelectionLog(tmp_path / name, columns=['name'], max_bytes_per_file=max_bytes)

    whole = log_at('whole')
    steps(whole, 0, 12)
    whole.close()
    files = log_files(tmp_path / 'whole')
    names = [f.path.name for f in files]
    assert len(names) >= 3
    for file in files:  # the strings held in memory stay within the bound
        strings = pq.read_table(file.path, columns=['name'])['name']
        assert pa.compute.sum(pa.compute.binary_length(strings)).as_py() <= max_bytes
    for saved in range(1, 12):
        killed = log_at(f'at{saved}')
        steps(killed, 0, saved)
        state = killed.state_dict()
        steps(killed, saved, min(saved + 3, 12))  # logged after the checkpoint, then killed
        killed.flush()
        resumed = log_at(f'at{saved}')
        resumed.load_state_dict(state)
        steps(resumed, saved, 12)
        resumed.close()
        assert [f.path.name for f in log_files(tmp_path / f'at{saved}')] == names, saved
        assert read_log(tmp_path / f'at{saved}').equals(read_log(tmp_path / 'whole'))


def _files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_refused_resume_leaves_the_folder_as_it_was(tmp_path):
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)

    def logged(name, steps, **settings):
        log = SelectionLog(tmp_path / name, max_rows_per_file=80, **settings)
        step = SelectionStep(config, _scores, record=log.record)
        for index in range(steps):
            step(_super_batch(40, index), torch.arange(40) + 40 * index, epoch=0, index=index)
        log.close()
        return tmp_path / name, log_files(tmp_path / name)

    # Only the files of steps 8-11 are left: the position 5 cannot be reached.
    folder, files = logged('kept', 12, max_files=2)
    assert [f.first_step for f in files] == [8, 10]
    before = _files_of(folder)
    with pytest.raises(StateError, match='no file of rank 0'):
        SelectionLog(folder).load_state_dict({'version': 1, 'steps': 5})
    assert _files_of(folder) == before
    # The file that straddles the position ends too early, or is damaged.
    folder, files = logged('short', 6)
    assert [f.first_step for f in files] == [0, 2, 4]
    table = pq.read_table(files[1].path)
    pq.write_table(table.filter(pa.compute.equal(table['step'], 2)), files[1].path)
    before = _files_of(folder)
    with pytest.raises(StateError, match='rows are missing'):
        SelectionLog(folder).load_state_dict({'version': 1, 'steps': 4})
    assert _files_of(folder) == before
    files[1].path.write_bytes(before[files[1].path.name][:100])
    before = _files_of(folder)
    with pytest.raises(LogError, match=re.escape(files[1].path.name)):
        SelectionLog(folder).load_state_dict({'version': 1, 'steps': 3})
    assert _files_of(folder) == before


def _run_of(path: Path) -> str | None:
    return json.loads(pq.read_schema(path).metadata[b'jest_stream.selection_log']).get('run')


def test_a_resume_into_another_runs_folder_is_refused_and_older_states_resume(tmp_path):
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)

    def run(folder, first, last, state=None, **settings):
        log = SelectionLog(folder, max_rows_per_file=80, **settings)
        if state is not None:
            log.load_state_dict(state)
        step = SelectionStep(config, _scores, record=log.record)
        for index in range(first, last):
            step(_super_batch(40, index), torch.arange(40) + 40 * index, epoch=0, index=index)
        return log.state_dict()

    mine = run(tmp_path / 'mine', 0, 3)
    theirs = run(tmp_path / 'theirs', 0, 5)
    assert mine['run'] != theirs['run']
    before = _files_of(tmp_path / 'theirs')
    with pytest.raises(StateError, match=re.escape(str(tmp_path / 'theirs')) + ".*another run"):
        SelectionLog(tmp_path / 'theirs').load_state_dict(mine)
    assert _files_of(tmp_path / 'theirs') == before
    # The same run resumes, and its files keep its run.
    assert run(tmp_path / 'mine', 3, 4, state=mine)['run'] == mine['run']
    assert {_run_of(f.path) for f in log_files(tmp_path / 'mine')} == {mine['run']}
    # A state saved before runs were recorded, and another rank's state (one checkpoint for
    # every rank), are not checked for the run; the log keeps the run of its files.
    older = {'version': 1, 'steps': 3}
    assert run(tmp_path / 'theirs', 3, 4, state=older)['run'] == theirs['run']
    other_rank = {**mine, 'rank': 1, 'steps': 4}
    assert run(tmp_path / 'theirs', 4, 5, state=other_rank)['run'] == theirs['run']
    assert read_log(tmp_path / 'theirs')['step'].to_numpy().max() == 4
    with pytest.raises(StateError, match='run=7'):
        SelectionLog(tmp_path / 'mine').load_state_dict({**mine, 'run': 7})


def train(mds: str, log_dir: str, checkpoint: str, steps: int, kill_at: int) -> None:
    """The training job: checkpoints (model, optimizer, loader) every 5 steps; SIGKILLs
    itself after step ``kill_at`` (before that step's checkpoint)."""
    torch.set_num_threads(1)
    dataset = SampleIdStreamingDataset(local=mds, batch_size=50, shuffle=True, shuffle_seed=3,
                                       num_canonical_nodes=1)
    learner = tiny_classifier(0)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
    scorer = ClassificationScorer(learner, tiny_classifier(1), input_key='x', target_key='y')
    # 50 rows a super-batch, three a file.
    log = SelectionLog(log_dir, columns={'label': 'y'}, max_rows_per_file=150)
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer, seed=5,
                             n_chunks=2, selection_log=log)
    step = 0
    if os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        learner.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        loader.load_state_dict(state['loader'])
        step = state['step']
    while step < steps:
        for batch in loader:
            loss = F.cross_entropy(learner(batch['x']), batch['y'])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step % 5 == 0:
                torch.save({'step': step, 'model': learner.state_dict(),
                            'optimizer': optimizer.state_dict(),
                            'loader': loader.state_dict()}, checkpoint + '.partial')
                os.replace(checkpoint + '.partial', checkpoint)
            if step == steps:
                break
    loader.close()


def test_the_log_is_exact_across_a_sigkill_and_a_resume(tmp_path, child_tmpdir):
    # 300 samples, super-batches of 50 (6 an epoch), 16 steps. Checkpoints after 5, 10, 15;
    # killed after step 10, before its checkpoint: the file of steps 3-5 was rewritten with
    # step 5 (after the position) and the one of steps 6-8 was written whole; step 9 waited
    # in memory. The resume cuts the first, deletes the second, and logs 5 onwards again.
    mds = write_mds(tmp_path / 'mds', 300)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(TESTS), str(REPO)]),
           'TMPDIR': str(child_tmpdir)}
    killed = tmp_path / 'killed'
    job = subprocess.run([sys.executable, __file__, str(mds), str(killed),
                          str(tmp_path / 'ckpt.pt'), '16', '10'], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    for name in segments_of(mds):  # SIGKILL skipped streaming's clean-up
        Path('/dev/shm', name).unlink(missing_ok=True)
    assert job.returncode == -signal.SIGKILL, job.stderr
    assert [f.first_step for f in log_files(killed)] == [0, 3, 6]
    assert read_log(killed)['step'].to_numpy().max() == 8
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=False)['loader']['log']['steps'] == 5

    train(str(mds), str(killed), str(tmp_path / 'ckpt.pt'), 16, kill_at=-1)
    gc.collect()
    whole = tmp_path / 'whole'
    train(str(mds), str(whole), str(tmp_path / 'whole.pt'), 16, kill_at=-1)
    resumed, uninterrupted = read_log(killed), read_log(whole)
    assert resumed.num_rows == uninterrupted.num_rows == 16 * 50
    assert resumed.equals(uninterrupted)
    assert [f.path.name for f in log_files(killed)] == [f.path.name for f in log_files(whole)]
    assert not [p for p in killed.iterdir() if p.name.startswith('.')]


# Damage


def test_damaged_files_raise_a_log_error_naming_the_file(tmp_path):
    config = SelectionConfig.create(batch_size=8, super_batch_size=40)
    log = SelectionLog(tmp_path / 'log', max_rows_per_file=80)
    step = SelectionStep(config, _scores, record=log.record)
    for index in range(5):
        step(_super_batch(40, index), torch.arange(40), epoch=0, index=index)
    state = log.state_dict()
    files = log_files(tmp_path / 'log')
    damaged = files[-1].path
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(LogError, match=re.escape(str(damaged)) + '.*damaged or truncated'):
        read_log(tmp_path / 'log')
    with pytest.raises(LogError, match=re.escape(damaged.name)):
        SelectionLog(tmp_path / 'log').load_state_dict(state)
    damaged.unlink()
    # A column that is not in the log is the caller's mistake: the files are not blamed.
    with pytest.raises(SettingError, match=r"\['sampel_id'\] are not columns.*'sample_id'"):
        read_log(tmp_path / 'log', columns=['sampel_id'])
    with pytest.raises(SettingTypeError, match='list of column names'):
        read_log(tmp_path / 'log', columns='sample_id')
    assert read_log(tmp_path / 'log', columns=['sample_id']).column_names == ['sample_id']
    table = pq.read_table(files[0].path)
    for entry in (b'{"version": 1', b'[1]'):
        pq.write_table(table.replace_schema_metadata({b'jest_stream.selection_log': entry}),
                       files[0].path)
        with pytest.raises(LogError, match=re.escape(str(files[0].path)) + '.*JSON object'):
            read_log(tmp_path / 'log')
    pq.write_table(pa.table({'step': [1]}), files[0].path)
    with pytest.raises(LogError, match='not one a SelectionLog wrote'):
        read_log(tmp_path / 'log')
    with pytest.raises(LogError, match='no selection log files'):
        read_log(tmp_path / 'nothing')


# Metrics to other loggers


class _Writer:
    """Records ``add_scalar`` calls as a ``SummaryWriter`` would receive them (tensorboard
    is not installed here)."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, scalar_value, global_step=None):
        self.calls.append((tag, scalar_value, global_step))


def test_loader_metrics_go_to_a_summary_writer():
    loader = SelectiveLoader(_tensors(200), batch_size=8, super_batch_size=40,
                             scorer=_tuple_scorer(), seed=1, policy=SelectionPolicy(
                                 quota=Quota(1, min_share=0.1)))
    writer = _Writer()
    for step, _ in enumerate(loader):
        log_metrics(writer, {**loader.metrics, 'note': 'text', 'flag': True}, step)
    tags = {tag for tag, _, _ in writer.calls}
    assert {'jest/pressure', 'jest/score_selected_mean', 'jest/score_s', 'jest/drawn',
            'jest/share/0', 'jest/filter_ratio_now'} <= tags
    assert 'jest/note' not in tags and 'jest/flag' not in tags
    assert [s for tag, _, s in writer.calls if tag == 'jest/pressure'] == [0, 1, 2, 3, 4]
    assert all(isinstance(v, float) for _, v, _ in writer.calls)


def _composer_metrics(memory) -> dict[str, list[float]]:
    return {key: [value for _, value in values] for key, values in memory.data.items()
            if key.startswith('jest/')}


@pytest.mark.parametrize('integration', ['algorithm', 'loader_callback'])
def test_composer_loggers_get_the_policy_shares_and_score_statistics(mds_dir, make_streaming,
                                                                     integration):
    pytest.importorskip('composer')
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader

    from helpers.composer import DictClassifier, fit, make_trainer
    from jest_stream import collate_samples
    from jest_stream.integrations.composer import JESTAlgorithm, JESTLoaderCallback, jest_first

    torch.set_num_threads(1)
    model = DictClassifier(tiny_classifier(0))
    policy = SelectionPolicy(quota=Quota('y', min_share=0.15), mix=0.2)
    memory = InMemoryLogger()
    if integration == 'algorithm':
        algorithm = JESTAlgorithm(filter_ratio=0.8, reference=DictClassifier(tiny_classifier(1)),
                                  target_key='y', policy=policy, seed=2)
        loader = DataLoader(make_streaming(mds_dir, batch_size=50), batch_size=50,
                            collate_fn=collate_samples)
        fit(make_trainer(loader, model, algorithms=[algorithm], algorithm_passes=jest_first,
                         loggers=[memory]))
    else:
        scorer = ClassificationScorer(model.module, tiny_classifier(1), input_key='x',
                                      target_key='y')
        loader = SelectiveLoader(make_streaming(mds_dir, batch_size=50), batch_size=10,
                                 filter_ratio=0.8, scorer=scorer, seed=2, policy=policy)
        fit(make_trainer(loader, model, callbacks=[JESTLoaderCallback()], loggers=[memory]))
    metrics = _composer_metrics(memory)
    assert metrics['jest/pressure'] == [1.0] * 4 and metrics['jest/mix'] == [0.2] * 4
    assert metrics['jest/filter_ratio_now'] == pytest.approx([0.8] * 4)
    shares = {key: values for key, values in metrics.items() if key.startswith('jest/share/')}
    assert set(shares) == {f'jest/share/{g}' for g in range(4)}
    for step in range(4):  # four classes' shares of each sub-batch of 10, each at least 0.15
        step_shares = [values[step] for values in shares.values()]
        assert sum(step_shares) == pytest.approx(1.0)
        assert min(step_shares) >= 0.2 - 1e-9  # 0.15 of 10 rounds up to 2 rows
    for key in ('jest/score_selected_mean', 'jest/score_selected_std', 'jest/score_all_mean',
                'jest/score_s', 'jest/select_s'):
        assert len(metrics[key]) == 4, key


if __name__ == '__main__':
    train(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))

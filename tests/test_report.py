"""Reports and exports from a selection log: the pure summaries on a log whose answers are
known, ``jest-stream report`` and ``jest-stream export`` on a log a real loader wrote, the
exported ids read back as a filtered dataset, bad settings refused before the log is read,
and what the ``candidate`` column holds outside a Composer selection window."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.composer import SUB, B, DictClassifier, fit, make_trainer
from helpers.data import features_and_labels, write_mds
from helpers.models import tiny_classifier
from jest_stream import (
    ClassificationScorer,
    SampleIdStreamingDataset,
    SampleSubset,
    SelectionConfig,
    SelectionLog,
    SelectionStep,
    SelectiveLoader,
    SettingError,
    SettingTypeError,
    collate_samples,
    read_ids,
)
from jest_stream.cli import main
from jest_stream.errors import DataError
from jest_stream.export import choose_ids, export_ids, selection_rates, write_ids
from jest_stream.integrations.composer import JESTAlgorithm, jest_first
from jest_stream.log import FIXED_COLUMNS, read_log
from jest_stream.report import (
    ReportDependencyError,
    build_report,
    default_window,
    detect_columns,
    flagged_fraction,
    group_shares,
    score_quantiles,
    score_scatter,
    selection_counts,
    summarise,
    write_report,
)
from jest_stream.scores import PerExampleScores

# Four samples drawn at each of four steps. Sample 0 is selected every time, 1 and 2 twice,
# 3 never (and is no candidate at step 3); 0 and 1 have label 0, 2 label 1, 3 label 2;
# 3 is noisy.
SELECTED = {0: (0, 1), 1: (0, 2), 2: (0, 1), 3: (0, 2)}


def _known_log() -> pa.Table:
    steps = np.repeat(np.arange(4), 4)
    ids = np.tile(np.arange(4), 4)
    selected = np.array([i in SELECTED[s] for s, i in zip(steps, ids, strict=True)])
    candidate = ~((steps == 3) & (ids == 3))
    learner = (ids + steps).astype(np.float32)
    order = np.full(16, -1, dtype=np.int32)
    for s, chosen in SELECTED.items():
        order[4 * s + np.array(chosen)] = [0, 1]
    columns = {
        'step': steps, 'epoch': steps // 2, 'index': steps % 2, 'rank': np.zeros(16, np.int16),
        'row': ids, 'sample_id': ids, 'candidate': candidate, 'selected': selected,
        'order': order, 'score': pa.array(learner - 1, mask=~candidate),
        'learner': pa.array(learner, mask=~candidate),
        'reference': pa.array(np.ones(16, np.float32), mask=~candidate),
        'weight': pa.nulls(16, pa.float32()), 'n_candidates': np.where(steps == 3, 3, 4),
        'pressure': np.ones(16, np.float32), 'mix': np.zeros(16, np.float32),
        'filter_ratio_now': np.where(steps == 3, 1 / 3, 0.5).astype(np.float32),
        'label': np.array([0, 0, 1, 2])[ids], 'noisy': ids == 3,
    }
    table = pa.table(columns)
    assert table.column_names[:len(FIXED_COLUMNS)] == list(FIXED_COLUMNS)
    return table


def test_summaries_of_a_log_with_known_answers():
    table = _known_log()
    assert detect_columns(table) == (['label'], ['noisy'])
    shares = group_shares(table, 'label', window=2)
    assert shares['step'] == [0, 2] and shares['groups'] == ['0', '1', '2']
    assert shares['selected'] == {'0': [0.75, 0.75], '1': [0.25, 0.25], '2': [0.0, 0.0]}
    assert shares['candidates']['0'] == pytest.approx([0.5, 4 / 7])
    assert shares['candidates']['2'] == pytest.approx([0.25, 1 / 7])
    assert shares['overall']['1'] == {'selected': 0.25, 'candidates': pytest.approx(4 / 15)}
    flagged = flagged_fraction(table, 'noisy', window=2)
    assert flagged['selected'] == [0.0, 0.0]
    assert flagged['candidates'] == pytest.approx([0.25, 1 / 7])
    assert flagged['overall']['candidates'] == pytest.approx(0.2) and flagged['kept_ratio'] == 0
    counts = selection_counts(table)
    assert counts['samples'] == 4 and counts['never_selected_fraction'] == 0.25
    assert counts['histogram'] == {'times': [0, 1, 2, 3, 4], 'samples': [1, 0, 2, 0, 1]}
    assert counts['mean_selected'] == 2.0 and counts['mean_rate'] == pytest.approx(0.5)
    quantiles = score_quantiles(table, window=2, quantiles=(0.0, 0.5, 1.0))
    # Window 0: learner losses of the selected are 0, 1 (step 0) and 1, 3 (step 1).
    assert quantiles['learner']['selected'][0] == [0.0, 1.0, 3.0]
    assert quantiles['learner']['candidates'][1] == [2.0, 4.0, 5.0]  # 2 3 4 5, 3 4 5
    assert quantiles['reference']['selected'] == [[1.0, 1.0, 1.0]] * 2
    scatter = score_scatter(table, max_points=5)
    assert scatter['candidates'] == 15 and scatter['shown'] == 5 == len(scatter['learner'])
    summary = summarise(table)
    assert (summary['rows'], summary['steps'], summary['candidate_rows'],
            summary['selected_rows']) == (16, 4, 15, 8)
    assert summary['scores']['learner']['selected'] == pytest.approx(np.mean([0, 1, 1, 3, 2, 3,
                                                                              3, 5]))
    assert summary['policy']['filter_ratio_now']['last'] == pytest.approx(1 / 3)
    report = build_report(table, window=2)
    assert set(report['groups']) == {'label'} and set(report['flags']) == {'noisy'}
    json.dumps(report)  # plain values only
    assert build_report(table.to_pandas(), window=2) == report  # pandas.read_parquet's frame
    assert selection_rates(table.to_pandas())['rate'].tolist() == [1.0, 0.5, 0.5, 0.0]
    with pytest.raises(SettingError, match="'colour' is not a column"):
        build_report(table, groups=['colour'])


def _stored_scores(batch, ids, criterion):
    """Scores stored in the super-batch's ``s`` column."""
    return PerExampleScores(batch['s'])


def _step_log(folder, scores: list[list[float]], noisy: list[list[bool]], *,
              batch_size: int = 1) -> pa.Table:
    """A log written by SelectionLog through SelectionStep: top-k of the given scores."""
    n = len(scores[0])
    config = SelectionConfig.create(batch_size=batch_size, super_batch_size=n, method='topk')
    with SelectionLog(folder, columns=['noisy']) as log:
        step = SelectionStep(config, _stored_scores, record=log.record)
        for index, (s, flags) in enumerate(zip(scores, noisy, strict=True)):
            batch = {'s': torch.tensor(s), 'noisy': torch.tensor(flags)}
            step(batch, torch.arange(n * index, n * (index + 1)), epoch=0, index=index)
    return read_log(folder)


def test_flagged_fraction_of_a_window_whose_only_selected_row_is_the_first(tmp_path):
    # Step 0 selects row 0 of the log, the only flagged one; step 1 selects an unflagged row.
    table = _step_log(tmp_path / 'log', [[3.0, 0.0, 1.0, 2.0], [0.0, 1.0, 3.0, 2.0]],
                      [[True, False, False, False], [False, False, False, False]])
    assert np.flatnonzero(table.column('selected').to_numpy()).tolist() == [0, 6]
    flagged = flagged_fraction(table, 'noisy', window=1)
    assert flagged['selected'] == [1.0, 0.0]
    assert flagged['candidates'] == [0.25, 0.0]
    assert flagged['overall'] == {'selected': 0.5, 'candidates': 0.125}
    assert flagged['kept_ratio'] == 4.0
    whole = flagged_fraction(table, 'noisy', window=2)
    assert whole['selected'] == [0.5] and whole['candidates'] == [0.125]


def test_the_logs_own_columns_are_never_reported_as_groups_or_flags(tmp_path, monkeypatch):
    table = _step_log(tmp_path / 'log', [[3.0, 0.0, 1.0, 2.0]], [[True, False, True, False]])
    assert detect_columns(table) == ([], ['noisy'])  # candidate, selected, rank... are not
    # A column the log writes itself in a later version is the log's, not the user's.
    table = table.append_column('drawn_before', pa.array(np.zeros(4, dtype=bool)))
    monkeypatch.setitem(FIXED_COLUMNS, 'drawn_before', 'bool')
    assert detect_columns(table) == ([], ['noisy'])


def test_candidates_outside_a_composer_selection_window_with_outside_window_first(
        tmp_path, mds_dir, make_streaming):
    # What docs/selection-log.md says of the candidate column: outside [start, end),
    # outside_window='first' hands over the first b rows of the super-batch; they are the
    # candidates (n_candidates = b), all selected, none is scored, the policy columns are null.
    log = SelectionLog(tmp_path / 'log')
    algorithm = JESTAlgorithm(filter_ratio=0.8, reference=DictClassifier(tiny_classifier(1)),
                              target_key='y', start=0.25, end=0.75, outside_window='first',
                              selection_log=log)
    dataset = make_streaming(mds_dir, batch_size=B, shuffle=False)
    loader = DataLoader(dataset, batch_size=B, collate_fn=collate_samples)
    fit(make_trainer(loader, DictClassifier(tiny_classifier(0)), algorithms=[algorithm],
                     algorithm_passes=jest_first, max_duration='1ep'))
    frame = read_log(tmp_path / 'log').to_pandas()
    inside = []
    for step, rows in frame.groupby('step'):
        assert len(rows) == B and rows['selected'].sum() == SUB
        if rows['pressure'].isna().all():  # outside the window
            assert rows['score'].isna().all() and rows['filter_ratio_now'].isna().all()
            first = [True] * SUB + [False] * (B - SUB)
            assert rows['selected'].tolist() == first and rows['candidate'].tolist() == first
            assert (rows['n_candidates'] == SUB).all()
            assert rows['order'].tolist()[:SUB] == list(range(SUB))
        else:
            assert rows['candidate'].all() and (rows['n_candidates'] == B).all()
            assert rows['score'].notna().all() and (rows['pressure'] == 1).all()
            assert rows['filter_ratio_now'].iloc[0] == pytest.approx(0.8)
            inside.append(step)
    assert inside == [2, 3, 4]  # selection runs while 1/4 <= step / 6 < 3/4


def test_export_ranks_by_selection_rate_then_count_then_id():
    rates = selection_rates(_known_log())
    assert rates['sample_id'].tolist() == [0, 1, 2, 3]
    assert rates['candidate'].tolist() == [4, 4, 4, 3]
    assert rates['rate'].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert choose_ids(rates, top=0.5).tolist() == [0, 1]
    assert choose_ids(rates, bottom=0.25).tolist() == [3]
    assert choose_ids(rates, bottom=0.5).tolist() == [1, 3]
    assert choose_ids(rates, bottom=1.0, min_candidates=4).tolist() == [0, 1, 2]
    for kwargs in ({}, {'top': 0.5, 'bottom': 0.5}, {'top': 0.0}, {'top': 1.5}):
        with pytest.raises(SettingError):
            choose_ids(rates, **kwargs)


def _write_log(tmp_path, n: int = 400):
    """A real loader's log, two epochs over an MDS dataset with a flag column ``noisy``."""
    noisy = np.random.default_rng(0).random(n) < 0.3
    mds = write_mds(tmp_path / 'mds', n, extra={'noisy': ('int', noisy.astype(np.int64))})
    dataset = SampleIdStreamingDataset(local=str(mds), batch_size=50, shuffle=True,
                                       shuffle_seed=1, num_canonical_nodes=1)
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='x',
                                  target_key='y')
    log = SelectionLog(tmp_path / 'log', columns={'label': 'y', 'noisy': 'noisy'},
                       max_rows_per_file=300)
    loader = SelectiveLoader(dataset, batch_size=10, filter_ratio=0.8, scorer=scorer, seed=2,
                             selection_log=log)
    for _ in range(2):
        for _ in loader:
            pass
    loader.close()
    return mds, tmp_path / 'log'


def test_report_and_export_commands_on_a_real_log(tmp_path, capsys):
    mds, log = _write_log(tmp_path)
    out = tmp_path / 'report'
    assert main(['report', str(log), '--out', str(out), '--no-progress', '--window', '4']) == 0
    printed = capsys.readouterr().out
    assert '"steps": 16' in printed and 'never selected' in printed and 'noisy:' in printed
    report = json.loads((out / 'report.json').read_text())
    assert report['window'] == 4 and set(report['flags']) == {'noisy'}
    assert set(report['groups']) == {'label'} and report['summary']['rows'] == 800
    expected = {'scores.png', 'selection_counts.png', 'scatter.png', 'share_label.png',
                'flagged_noisy.png', 'index.html', 'report.json'}
    assert set(report['files']) == expected == {p.name for p in out.iterdir()}
    import matplotlib.image

    assert matplotlib.image.imread(out / 'scores.png').shape[2] in (3, 4)
    page = (out / 'index.html').read_text()
    assert all(f'src="{name}"' in page for name in expected if name.endswith('.png'))

    ids_file = tmp_path / 'ids.npy'
    assert main(['export', str(log), '--top', '0.5', '--out', str(ids_file)]) == 0
    assert 'wrote 200 of 400 ranked sample ids' in capsys.readouterr().out
    ids = read_ids(ids_file)
    rates = selection_rates(read_log(log))
    assert rates['rate'][np.isin(rates['sample_id'], ids)].min() \
        >= rates['rate'][~np.isin(rates['sample_id'], ids)].max()
    assert main(['export', str(log), '--bottom', '0.1', '--out', str(tmp_path / 'b.parquet')]) \
        == 0
    import pandas as pd

    bottom = pd.read_parquet(tmp_path / 'b.parquet')
    assert len(bottom) == 40 and list(bottom.columns) == ['sample_id', 'candidate', 'selected',
                                                          'rate']
    assert read_ids(tmp_path / 'b.parquet').tolist() == bottom['sample_id'].tolist()

    # Read back as a filtered dataset: a loader over the subset sees exactly those samples.
    subset = SampleSubset(SampleIdStreamingDataset(local=str(mds), batch_size=50,
                                                   shuffle=False, num_canonical_nodes=1), ids)
    loader = SelectiveLoader(subset, batch_size=25, filter_ratio=0.0, criterion='uniform',
                             drop_last=False, seed=0)
    seen = [i for batch in loader for i in batch['sample_id'].tolist()]
    assert sorted(seen) == ids.tolist()


def test_report_errors_are_one_line_naming_the_folder_and_the_fix(tmp_path, capsys,
                                                                 monkeypatch):
    assert main(['report', str(tmp_path)]) == 1
    assert 'no selection log files' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as if it were not installed
    with pytest.raises(ReportDependencyError, match=r"jest-stream\[report\]"):
        write_report(tmp_path, tmp_path / 'out')
    assert main(['export', str(tmp_path), '--top', '0.5', '--out', str(tmp_path / 'x.npy')]) \
        == 1
    assert 'no selection log files' in capsys.readouterr().err
    # Settings are checked before the log is read: the suffix first.
    assert main(['export', str(tmp_path), '--top', '0.5', '--out', str(tmp_path / 'x.csv')]) \
        == 1
    assert '.npy or .parquet file, e.g. x.npy' in capsys.readouterr().err


BAD_REPORT_SETTINGS = [
    ({'window': 0}, SettingError, r'window=0 must be an int >= 1 \(steps per window'),
    ({'window': -3}, SettingError, 'window=-3'),
    ({'window': True}, SettingTypeError, 'window=True must be an int'),
    ({'window': 2.5}, SettingTypeError, 'window=2.5'),
    ({'max_points': -1}, SettingError, r'max_points=-1 must be an int >= 1 \(points'),
    ({'max_points': 0}, SettingError, 'max_points=0'),
    ({'max_points': False}, SettingTypeError, 'max_points=False'),
    ({'groups': 'label'}, SettingTypeError, r"groups='label' must be a list .* \['label'\]"),
    ({'flags': [1]}, SettingTypeError, r'\[1\] are not column names'),
    ({'progress': 1}, SettingTypeError, 'progress=1 must be True or False'),
]


@pytest.mark.parametrize(('settings', 'kind', 'message'), BAD_REPORT_SETTINGS)
def test_bad_report_settings_are_refused_before_the_log_is_read(tmp_path, settings, kind,
                                                                message):
    missing = tmp_path / 'no-log'  # reading it would raise a LogError
    with pytest.raises(kind, match=message):
        write_report(missing, tmp_path / 'out', plots=False, **settings)
    with pytest.raises(kind, match=message):
        build_report(_known_log(), **settings)
    assert not (tmp_path / 'out').exists()


def test_bad_settings_of_the_report_functions_name_the_setting_and_the_fix():
    table = _known_log()
    with pytest.raises(SettingError, match='windows=0'):
        default_window(table, 0)
    for quantiles, kind in (([1.5], SettingError), ([], SettingTypeError),
                            ('0.5', SettingTypeError), ([0.9, 0.1], SettingError),
                            ([float('nan')], SettingError), ([True], SettingTypeError)):
        with pytest.raises(kind, match='quantiles'):
            score_quantiles(table, window=2, quantiles=quantiles)
    with pytest.raises(SettingError, match='seed=-1'):
        score_scatter(table, seed=-1)
    with pytest.raises(SettingError, match='max_points=-1'):
        score_scatter(table, max_points=-1)
    with pytest.raises(SettingTypeError, match='window=True'):
        group_shares(table, 'label', window=True)
    with pytest.raises(SettingError, match=r"'colour' is not a column of the log; it has \["):
        group_shares(table, 'colour', window=2)
    # A label given as a flag would count labels 1 and 2 as flagged.
    with pytest.raises(SettingError, match=r"column 'label' holds \[0, 1, 2\].*groups instead"):
        flagged_fraction(table, 'label', window=2)
    with pytest.raises(SettingError, match="'label' holds"):
        build_report(table, flags=['label'])
    nullable = table.append_column('unsure', pa.array([True, None] * 8))
    with pytest.raises(SettingError, match="'unsure' holds .*no nulls"):
        flagged_fraction(nullable, 'unsure', window=2)
    assert flagged_fraction(table, 'noisy', window=2) \
        == flagged_fraction(table.set_column(table.column_names.index('noisy'), 'noisy',
                                             pa.array(np.tile([0, 0, 0, 1], 4))),
                            'noisy', window=2)  # 0/1 ints are a flag too
    with pytest.raises(SettingError, match=r"'step' is not a column of the log"):
        summarise(table.drop_columns(['step']))
    with pytest.raises(SettingError, match=r"no \['candidate'\] columns"):
        selection_rates(table.drop_columns(['candidate']))


def test_bad_export_settings_are_refused_before_the_log_is_read(tmp_path):
    missing, out = tmp_path / 'no-log', tmp_path / 'ids.npy'
    for settings, kind, message in (
            ({'top': 1.5}, SettingError, r'top=1.5 must be a finite number in \(0, 1\]'),
            ({'bottom': 0.0}, SettingError, 'bottom=0.0'),
            ({'top': True}, SettingTypeError, 'top=True must be a number'),
            ({'top': float('nan')}, SettingError, 'top=nan'),
            ({}, SettingError, 'exactly one of top'),
            ({'top': 0.5, 'bottom': 0.5}, SettingError, 'exactly one of top'),
            ({'top': 0.5, 'min_candidates': 0}, SettingError, 'min_candidates=0 must be an int'),
            ({'top': 0.5, 'min_candidates': True}, SettingTypeError, 'min_candidates=True')):
        with pytest.raises(kind, match=message):
            export_ids(missing, out, **settings)
    with pytest.raises(SettingTypeError, match='out=3'):
        export_ids(missing, 3, top=0.5)
    assert not out.exists()
    with pytest.raises(SettingTypeError, match='float64 values; sample ids are integers'):
        write_ids(np.array([1.5, 2.0]), out)
    with pytest.raises(SettingError, match='shape'):
        write_ids(np.zeros((2, 2), dtype=np.int64), out)
    rates = selection_rates(_known_log())
    with pytest.raises(SettingError, match=r'no counts of the ids \[7\]'):
        write_ids(np.array([1, 7]), tmp_path / 'ids.parquet', rates)
    assert not (tmp_path / 'ids.parquet').exists()
    write_ids(np.array([1, 3]), tmp_path / 'ids.parquet', rates)
    assert pq.read_table(tmp_path / 'ids.parquet')['selected'].to_pylist() == [2, 0]
    x, y = features_and_labels(10)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    with pytest.raises(SettingTypeError, match='sample ids are integers'):
        SampleSubset(dataset, [1.5])  # would be sample 1
    with pytest.raises(SettingTypeError, match='bool'):
        SampleSubset(dataset, [True, False])


@pytest.mark.parametrize(('argv', 'message'), [
    (['report', '{log}', '--max-points', '-1'], 'max_points=-1 must be an int >= 1'),
    (['report', '{log}', '--window', '0'], 'window=0 must be an int >= 1'),
    (['report', '{log}', '--flags', 'sample_id', '--no-plots'],
     "flags: the column 'sample_id' holds"),
    (['report', '{log}', '--groups', 'colour', '--no-plots'], "'colour' is not a column"),
    (['export', '{log}', '--top', '1.5', '--out', '{out}'], 'top=1.5 must be'),
    (['export', '{log}', '--bottom', '-0.1', '--out', '{out}'], 'bottom=-0.1 must be'),
    (['export', '{log}', '--top', '0.5', '--min-candidates', '0', '--out', '{out}'],
     'min_candidates=0 must be an int >= 1'),
])
def test_bad_command_line_settings_are_one_line_and_a_non_zero_exit(tmp_path, capsys, argv,
                                                                    message):
    log = tmp_path / 'log'
    _step_log(log, [[3.0, 0.0, 1.0, 2.0]], [[True, False, False, False]])
    out = tmp_path / 'ids.npy'
    argv = [a.format(log=log, out=out) for a in argv]
    assert main([*argv, '--no-progress'] if argv[0] == 'report' else argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('jest-stream: error: ') and message in err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert not out.exists() and not (log / 'report').exists()


def test_sample_subset_keeps_global_ids_and_ids_files_are_checked(tmp_path):
    x, y = features_and_labels(50)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    subset = SampleSubset(dataset, [3, 17, 42])
    assert len(subset) == 3 and subset[1][2] == 17 and torch.equal(subset[1][0], dataset[17][0])
    loader = SelectiveLoader(subset, batch_size=3, filter_ratio=0.0, criterion='uniform',
                             id_key=2, shuffle=False)
    assert sorted(next(iter(loader))[2].tolist()) == [3, 17, 42]
    with pytest.raises(SettingError, match='50 samples'):
        SampleSubset(dataset, [50])
    with pytest.raises(SettingError, match='.npy or .parquet'):
        write_ids(np.arange(3), tmp_path / 'ids.txt')
    (tmp_path / 'bad.npy').write_bytes(b'not numpy')
    with pytest.raises(DataError, match='bad.npy'):
        read_ids(tmp_path / 'bad.npy')
    np.save(tmp_path / 'floats.npy', np.ones(3))
    with pytest.raises(DataError, match='not a list of integer sample ids'):
        read_ids(tmp_path / 'floats.npy')

"""Smoke tests of the benchmarks' shared machinery and of each benchmark's core, on tiny sizes.

They check that the measurements run end to end and report what the result files
promise; the figures themselves come only from the benchmarks, never from tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from benchmarks import data_path, distributed, flexi, reference_cache, selection_scaling
from benchmarks.common import report, stats
from benchmarks.common.data import POOL_COLUMNS
from benchmarks.selection_scaling import ScalingConfig

# Data path ----------------------------------------------------------------------------


def _write_pool(directory: Path, n: int) -> Path:
    """``n`` random images with the columns of the real pool, in several small shards."""
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(directory), columns=POOL_COLUMNS, size_limit=1 << 14) as writer:
        for i in range(n):
            label = int(rng.integers(0, 10))
            writer.write({'image': rng.integers(0, 256, (28, 28), dtype=np.uint8),
                          'label': label, 'clean_label': label, 'corrupted': 0,
                          'train_index': i})
    return directory


@pytest.fixture
def tiny_pool(tmp_path: Path) -> Path:
    return _write_pool(tmp_path / 'pool', 200)


def _tiny_config() -> data_path.DataPathConfig:
    return data_path.DataPathConfig(batch_size=4, super_batch_size=20, num_workers=0, warmup=1,
                                    batches=3, scored_batches=2, rounds=2, hidden=8,
                                    num_canonical_nodes=1)


def test_data_path_modes_interleave_and_summarise(tiny_pool: Path, tmp_path: Path) -> None:
    config = _tiny_config()
    runs = data_path.compare(tiny_pool, config, echo=False)
    gc.collect()
    # Every mode once per round, the order rotating between rounds.
    assert [r['mode'] for r in runs] == ['raw', 'uniform', 'learnability',
                                         'uniform', 'learnability', 'raw']
    for run in runs:
        assert run['batches'] == (2 if run['mode'] == 'learnability' else 3)
        assert run['drawn_per_s'] > 0 and run['first_batch_s'] >= 0
        assert len(run['loadavg_before']) == 3
        if run['mode'] == 'raw':
            assert run['delivered_per_s'] == pytest.approx(run['drawn_per_s'])
            assert 'telemetry' not in run
        else:
            # One sub-batch of 4 per super-batch of 20.
            assert run['delivered_per_s'] == pytest.approx(run['drawn_per_s'] / 5)
            assert set(run['telemetry']) == {'wait_s', 'transfer_s', 'score_s', 'select_s',
                                             'interval_s'}
    scored = [r for r in runs if r['mode'] == 'learnability']
    assert all(r['telemetry']['score_s'] > 0 for r in scored)
    summary = data_path.summarise(runs)
    assert set(summary['ratios']) == {'uniform_over_raw', 'learnability_over_raw'}
    for ratio in summary['ratios'].values():
        assert len(ratio['paired']) == 2
        assert ratio['median_paired'] > 0 and ratio['of_medians'] > 0
    assert 'telemetry_median' in summary['modes']['uniform']
    results = {'config': asdict(config), 'run': {'loadavg_start': [0.0, 0.0, 0.0]},
               'cpu': {'summary': summary}}
    png = tmp_path / 'data_path.png'
    data_path._plot(results, png)
    assert png.stat().st_size > 0


def test_data_path_refuses_a_pool_too_small_to_time(tiny_pool: Path) -> None:
    config = replace(_tiny_config(), warmup=20)
    with pytest.raises(ValueError, match='no super-batch was timed'):
        data_path.run_mode('raw', tiny_pool, config)
    with pytest.raises(ValueError, match='mode='):
        data_path.run_mode('fast', tiny_pool, config)
    gc.collect()


def test_data_path_gpu_section_skips_without_cuda(tiny_pool: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip('CUDA is here: the skip path does not run')
    assert data_path.gpu_section(tiny_pool, _tiny_config()) == {'available': False}


# Selection scaling ----------------------------------------------------------------------


def _scaling_config() -> ScalingConfig:
    # The tests' own thread count: measure() sets it, and must not change the test process.
    return ScalingConfig(sizes=(64, 128), dim=16, rounds=1, min_time_s=0.0, max_repeats=2,
                         threads=torch.get_num_threads())


def test_both_samplers_pick_the_same_sub_batch() -> None:
    learner, reference = selection_scaling.make_embeddings(96, 16, seed=3)
    picks = [method(learner, reference, 19, n_chunks=4, temperature=1.0,
                    generator=torch.Generator().manual_seed(5))
             for method in selection_scaling.METHODS.values()]
    assert torch.equal(picks[0], picks[1])
    assert len(set(picks[0].tolist())) == 19
    assert selection_scaling.sub_batch_size(1024, 0.8) == 205


def test_measure_reports_times_peak_and_digest() -> None:
    config = _scaling_config()
    result = selection_scaling.measure('incremental', 128, config)
    assert result['n_select'] == 26
    assert 1 <= len(result['times_s']) <= 2 and min(result['times_s']) > 0
    assert result['peak_bytes'] >= 0 and result['baseline_bytes'] > 0
    assert len(result['digest']) == 16
    with pytest.raises(ValueError, match='method='):
        selection_scaling.measure('fastest', 128, config)


def test_measure_in_a_fresh_process() -> None:
    config = replace(_scaling_config(), threads=1)
    result = selection_scaling.measure_in_subprocess('materialised', 128, config)
    assert result['method'] == 'materialised' and result['size'] == 128
    assert result['threads'] == 1
    # A 128 x 128 float32 matrix is 64 KiB; the materialised form holds a few of them.
    assert result['peak_bytes'] >= 0
    inline = selection_scaling.measure('materialised', 128, _scaling_config())
    assert result['digest'] == inline['digest']


def test_memory_fit_tells_the_units_apart() -> None:
    sizes = [1024, 2048, 4096]
    fit = selection_scaling.fit_memory(sizes, [3 * 4 * s * s for s in sizes],
                                       filter_ratio=0.8, n_chunks=16)
    assert fit['slope'] == pytest.approx(2.0)
    assert [p['per_BxB'] for p in fit['per_size']] == pytest.approx([3.0] * 3)
    linear = selection_scaling.fit_memory(sizes, [4 * 256 * s for s in sizes],
                                          filter_ratio=0.8, n_chunks=16)
    assert linear['slope'] == pytest.approx(1.0)
    assert selection_scaling.fit_memory([1024], [0.0], filter_ratio=0.8,
                                        n_chunks=16)['slope'] is None


def test_memory_verdict_compares_the_constants() -> None:
    sizes = [4096, 8192]
    b = [selection_scaling.sub_batch_size(s, 0.8) for s in sizes]
    fits = {
        'incremental': selection_scaling.fit_memory(
            sizes, [4 * s * k for s, k in zip(sizes, b, strict=True)], filter_ratio=0.8,
            n_chunks=16),
        'materialised': selection_scaling.fit_memory(sizes, [5 * 4 * s * s for s in sizes],
                                                     filter_ratio=0.8, n_chunks=16),
    }
    verdict = selection_scaling.memory_verdict(fits)
    assert verdict['memory_met'] is True
    assert verdict['incremental_per_Bxb'] == pytest.approx([1.0, 1.0])
    # An incremental peak that keeps a B x B matrix fails.
    fits['incremental'] = fits['materialised']
    assert selection_scaling.memory_verdict(fits)['memory_met'] is False
    assert selection_scaling.memory_verdict({})['memory_met'] is None


def test_summary_ratios_agreement_and_plot(tmp_path: Path) -> None:
    config = _scaling_config()
    runs = []
    for round_index in range(2):
        for size in (64, 128):
            for method, seconds in (('materialised', 0.02 * size), ('incremental', 0.01 * size)):
                runs.append({'method': method, 'size': size, 'round': round_index,
                             'times_s': [seconds], 'peak_bytes': 4 * size * size,
                             'digest': f'd{size}'})
    summary = selection_scaling.summarise(runs, config)
    assert summary['speed_ratio'] == {'64': pytest.approx(2.0), '128': pytest.approx(2.0)}
    assert summary['paired_speed_ratios']['128'] == pytest.approx([2.0, 2.0])
    assert summary['same_indices'] == {'64': True, '128': True}
    assert summary['speed_ratio_at_largest'] == pytest.approx(2.0)
    assert math.isclose(summary['memory_fit']['materialised']['slope'], 2.0)
    results = {'config': asdict(config), 'cpu': {'summary': summary}}
    png = tmp_path / 'selection_scaling.png'
    selection_scaling._plot(results, png)
    assert png.stat().st_size > 0


def test_selection_scaling_gpu_section_skips_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip('CUDA is here: the skip path does not run')
    assert selection_scaling.run_gpu(_scaling_config()) == {'available': False}


# Shared machinery ------------------------------------------------------------------------


def test_statistics_come_from_numpy_and_scipy() -> None:
    assert stats.first_reach([0, 10, 20], [0.9, 0.5, 0.95], 0.9) == 20  # step 0 is no reach
    assert stats.first_reach([0, 10, 20], [0.1, 0.5, 0.7], 0.8) is None
    low, high = stats.t_interval([1.0, 2.0, 3.0])
    # Mean 2, standard error 1/sqrt(3), t(0.975, df=2) = 4.3027.
    assert (low, high) == pytest.approx((2 - 4.3027 / 3 ** 0.5, 2 + 4.3027 / 3 ** 0.5), rel=1e-4)
    assert stats.t_interval([5.0]) is None
    summary = stats.summary([2.0, None, 4.0])
    assert summary['mean'] == 3.0 and summary['n'] == 2 and summary['of'] == 3
    assert stats.summary([None])['mean'] is None
    assert stats.loglog_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert stats.loglog_slope([1, 2], [0.0, 5.0]) is None
    assert stats.slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0) and stats.slope([1], [1]) == 0
    assert stats.spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)


def test_report_parser_run_record_and_files(tmp_path: Path) -> None:
    parser = report.benchmark_parser('example', 'measures nothing', quick='a short run',
                                     seeds=(0, 1), threads=1)
    args = parser.parse_args(['--out-dir', str(tmp_path), '--seeds', '3', '4', '--quick'])
    assert args.out == tmp_path and args.seeds == [3, 4] and args.quick
    assert args.threads is None
    assert report.benchmark_parser('example', 'd', quick='q').parse_args([]).out == (
        report.RESULTS_ROOT / 'example')
    threads = torch.get_num_threads()
    try:
        run = report.start_run('example', ['--quick'], threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    done = report.finish_run(run)
    assert done['command'] == 'python -m benchmarks.example --quick'
    assert done['versions']['torch'] and len(done['loadavg_end']) == 3 and done['wall_s'] >= 0
    assert '_started' not in done
    json_path, png_path = report.report_paths(tmp_path, 'example', quick=True)
    assert json_path.name == 'example_quick.json' and png_path.name == 'example_quick.png'

    def plot(record, path):
        fig = report.pyplot().figure()
        fig.gca().plot(record['values'])
        report.save_figure(fig, path)

    inside = str(report.REPO_ROOT / 'data' / 'pool')
    report.write_report({'run': done, 'values': [1, 2], 'where': inside}, json_path, png_path,
                        plot)
    saved = json.loads(json_path.read_text())
    assert saved['where'] == 'data/pool' and saved['run']['benchmark'] == 'example'
    assert png_path.stat().st_size > 0


# Flexi, reference cache, distributed ---------------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """One torch thread, as these benchmarks run; the test's own count is put back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures('one_torch_thread')
def test_flexi_families_train_score_and_report_on_tiny_data(tmp_path: Path) -> None:
    config = replace(flexi.QUICK, cnn_steps=2, vit_steps=2, batch_size=8, super_batch_size=40,
                     n_super_batches=2, vit_size=(16, 1, 2))
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))

    data = {'clean': split(32), 'train': split(32), 'test': split(20),
            'super_batches': [{'image': torch.as_tensor(images), 'label': torch.as_tensor(labels)}
                              for images, labels in (split(40), split(40))],
            'corrupted': [rng.random(40) < 0.4 for _ in range(2)]}
    results = {'config': asdict(config), 'random_topk_overlap': 0.2, 'models': {
        family.name: flexi._run_family(family, data, config, lambda _: None)
        for family in flexi._families(config)}}
    for entry in results['models'].values():
        mixed = entry['learners']['mixed']
        assert -1 <= mixed['metrics']['spearman_learnability']['mean'] <= 1
        assert 0 <= mixed['metrics']['topk_overlap']['mean'] <= 1
        # Cheap scoring and mixed-resolution training cost fewer FLOPs, counted.
        assert mixed['score_flops_per_super_batch']['learner_ratio'] < 1
        assert entry['train_flops_per_step']['ratio'] < 1
    assert 'spearman' in flexi._table(results)
    flexi._plot(results, tmp_path / 'flexi.png')
    assert (tmp_path / 'flexi.png').stat().st_size > 0


def test_reference_cache_sizes_reads_and_plot(tmp_path: Path) -> None:
    pool = reference_cache.write_pool(tmp_path / 'pool', 64)
    sizes = reference_cache.cache_sizes(tmp_path / 'sizes', pool, 64, part_size=32)
    assert set(sizes) == set(reference_cache.KINDS)
    # float32 losses are 4 bytes raw; float16 embeddings of two towers at d=64, 256 bytes.
    assert sizes['loss']['raw_bytes_per_sample'] == 4
    assert sizes['emb64']['raw_bytes_per_sample'] == 2 * 64 * 2
    reads = {kind: reference_cache.read_throughput(tmp_path / 'sizes' / kind, pool,
                                                   [torch.arange(10), torch.arange(40, 60)])
             for kind in reference_cache.KINDS}
    assert all(r['parts_read'] == 2 and r['cold_samples_per_s'] > 0 for r in reads.values())
    demand = {'drawn_samples_per_s': 1000.0}
    record = {'sizes': sizes, 'loader': {'live_reference': demand, 'cached_reference': demand},
              'reads': reads}
    reference_cache._plot(record, tmp_path / 'reference_cache.png')
    assert (tmp_path / 'reference_cache.png').stat().st_size > 0


@pytest.mark.usefixtures('one_torch_thread')
def test_distributed_measures_a_scope_and_plots_both(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    data = {'x': torch.randn(200, distributed.DIM, generator=generator),
            'y': torch.randint(0, distributed.CLASSES, (200,), generator=generator),
            'tokens': torch.randint(0, distributed.TOKENS, (200,), generator=generator)}
    args = argparse.Namespace(super_batch=40)
    results = []
    for task in distributed.TASKS:
        measured = distributed._measure(distributed._loader(task, 'rank', data, args), 4)
        assert measured['step_s_median'] > 0 and measured['comm_bytes_per_step'] == 0
        results += [{'task': task, 'scope': scope, **measured} for scope in distributed.SCOPES]
    record = {'world': 1, 'super_batch_per_rank': 40, 'filter_ratio': 0.8, 'results': results}
    distributed._plot(record, tmp_path / 'distributed.png')
    assert (tmp_path / 'distributed.png').stat().st_size > 0

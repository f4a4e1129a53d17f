"""Smoke tests of the throughput benchmarks' core functions, on tiny sizes.

They check that the measurements run end to end and report what the result files
promise; the figures themselves come only from the benchmarks, never from tests.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from benchmarks import data_path, selection_scaling
from benchmarks.fashion_mnist import POOL_COLUMNS
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


def _tiny_config(tmp_path: Path) -> data_path.DataPathConfig:
    return data_path.DataPathConfig(batch_size=4, super_batch_size=20, num_workers=0, warmup=1,
                                    batches=3, scored_batches=2, rounds=2, hidden=8,
                                    num_canonical_nodes=1, out_dir=str(tmp_path / 'out'))


def test_data_path_modes_interleave_and_summarise(tiny_pool: Path, tmp_path: Path) -> None:
    config = _tiny_config(tmp_path)
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
    results = {'config': asdict(config),
               'loadavg_start': (0.0, 0.0, 0.0), 'cpu': {'summary': summary}}
    png = tmp_path / 'data_path.png'
    data_path._plot(results, png)
    assert png.stat().st_size > 0


def test_data_path_refuses_a_pool_too_small_to_time(tiny_pool: Path, tmp_path: Path) -> None:
    config = replace(_tiny_config(tmp_path), warmup=20)
    with pytest.raises(ValueError, match='no super-batch was timed'):
        data_path.run_mode('raw', tiny_pool, config)
    with pytest.raises(ValueError, match='mode='):
        data_path.run_mode('fast', tiny_pool, config)
    gc.collect()


def test_data_path_gpu_section_skips_without_cuda(tiny_pool: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip('CUDA is here: the skip path does not run')
    assert data_path.gpu_section(tiny_pool, _tiny_config(tmp_path)) == {'available': False}


# Selection scaling ----------------------------------------------------------------------


def _scaling_config(tmp_path: Path) -> ScalingConfig:
    # The tests' own thread count: measure() sets it, and must not change the test process.
    return ScalingConfig(sizes=(64, 128), dim=16, rounds=1, min_time_s=0.0, max_repeats=2,
                         threads=torch.get_num_threads(), out_dir=str(tmp_path / 'out'))


def test_both_samplers_pick_the_same_sub_batch() -> None:
    learner, reference = selection_scaling.make_embeddings(96, 16, seed=3)
    picks = [method(learner, reference, 19, n_chunks=4, temperature=1.0,
                    generator=torch.Generator().manual_seed(5))
             for method in selection_scaling.METHODS.values()]
    assert torch.equal(picks[0], picks[1])
    assert len(set(picks[0].tolist())) == 19
    assert selection_scaling.sub_batch_size(1024, 0.8) == 205


def test_measure_reports_times_peak_and_digest(tmp_path: Path) -> None:
    config = _scaling_config(tmp_path)
    result = selection_scaling.measure('incremental', 128, config)
    assert result['n_select'] == 26
    assert 1 <= len(result['times_s']) <= 2 and min(result['times_s']) > 0
    assert result['peak_bytes'] >= 0 and result['baseline_bytes'] > 0
    assert len(result['digest']) == 16
    with pytest.raises(ValueError, match='method='):
        selection_scaling.measure('fastest', 128, config)


def test_measure_in_a_fresh_process(tmp_path: Path) -> None:
    config = replace(_scaling_config(tmp_path), threads=1)
    result = selection_scaling.measure_in_subprocess('materialised', 128, config)
    assert result['method'] == 'materialised' and result['size'] == 128
    assert result['threads'] == 1
    # A 128 x 128 float32 matrix is 64 KiB; the materialised form holds a few of them.
    assert result['peak_bytes'] >= 0
    inline = selection_scaling.measure('materialised', 128, _scaling_config(tmp_path))
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
    config = _scaling_config(tmp_path)
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


def test_selection_scaling_gpu_section_skips_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip('CUDA is here: the skip path does not run')
    assert selection_scaling.run_gpu(_scaling_config(tmp_path)) == {'available': False}

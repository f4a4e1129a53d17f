"""Throughput of the data path: a plain DataLoader against jest_stream's loader.

Run it from the repository root::

    python -m benchmarks.data_path               # a few minutes on two CPU cores
    python -m benchmarks.data_path --quick       # a smoke run
    python -m benchmarks.data_path --gpu         # also on CUDA, where it exists
    python -m benchmarks.data_path --threads 1   # one torch thread in the main process

Three ways of reading the real Fashion-MNIST pool (57,000 images as MDS shards, built
once by :func:`benchmarks.common.data.prepare` under ``data/fashion-mnist``) in
super-batches of ``B = 320`` (sub-batches of 64, filter ratio 0.8), with the same
``StreamingDataset`` settings and the same number of DataLoader workers:

- ``raw``: a ``StreamingDataset(batch_size=B)`` read through a plain
  ``torch.utils.data.DataLoader(batch_size=B)`` with torch's default collate: the
  baseline, what a training loop without jest_stream reads;
- ``uniform``: :class:`jest_stream.SelectiveLoader` with ``criterion='uniform'``: sample
  ids, jest_stream's collate, the device hand-off, a uniform sub-batch and the telemetry,
  and no scoring: the pipeline's own overhead;
- ``learnability``: the same loader scoring every super-batch with learnability (the
  benchmarks' ``SmallCNN`` as the learner and another as a live reference, per-example
  cross-entropy, joint selection): the data path with scoring.

Every mode runs once per round, the order rotating from round to round, so that a busy
phase of a shared machine hits every mode. Each run reads a fresh dataset, drops the
first ``warmup`` super-batches (worker start-up) and times the next ones. Throughput is
counted in samples drawn (read from the dataset) and delivered (handed to the consumer)
per second; the loader's own telemetry (``loader.metrics``: waiting for data, transfer,
scoring, selection) is averaged over the timed super-batches. The load average of the
machine is recorded around every run.

With ``--gpu`` where CUDA exists the same three modes run on the GPU (pinned host
batches; the plain DataLoader's batches are copied with ``non_blocking=True``).

Results go to ``benchmarks/results/data_path/`` (``data_path.json`` and
``data_path.png``; ``data_path_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.common import report
from benchmarks.common.data import open_streaming, prepare
from benchmarks.common.training import LOADER_TIMINGS, synchronize
from benchmarks.common.workload import LoaderWorkload, selective_loader
from jest_stream import remove_stale_shared_memory
from jest_stream.batch import batch_length, move_to_device

__all__ = ['MODES', 'DataPathConfig', 'cli', 'compare', 'main', 'parse_args', 'run_mode',
           'summarise']

MODES = ('raw', 'uniform', 'learnability')


@dataclass(frozen=True)
class DataPathConfig(LoaderWorkload):
    """Every setting of the benchmark (written into the results file)."""

    threads: int | None = None
    gpu: bool = False
    clean_shm: bool = False
    num_canonical_nodes: int | None = None


def _raw_dataset(pool: Path, config: DataPathConfig) -> Any:
    from streaming import StreamingDataset

    return open_streaming(lambda: StreamingDataset(
        local=str(pool), batch_size=config.super_batch_size, shuffle=True,
        shuffle_seed=config.seed, num_canonical_nodes=config.num_canonical_nodes))


def _raw_batches(loader: Any, device: str) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    for batch in loader:
        if device != 'cpu':
            batch = move_to_device(batch, torch.device(device), non_blocking=True)
        yield batch, None


def _selective_batches(loader: Any) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    for batch in loader:
        yield batch, dict(loader.metrics)


def run_mode(mode: str, pool: str | Path, config: DataPathConfig, *, device: str = 'cpu'
             ) -> dict[str, Any]:
    """Read ``warmup`` + ``batches`` super-batches of a fresh dataset in ``mode``; time the rest.

    Args:
        mode (str): ``raw``, ``uniform`` or ``learnability``.
        pool (str | Path): Local MDS dataset of the pool (``image`` uint8[28, 28], ``label``).
        config (DataPathConfig): Sizes, workers, counts, seed.
        device (str): ``cpu`` or a CUDA device.

    Returns:
        dict: ``drawn_per_s`` and ``delivered_per_s`` over the timed super-batches,
        ``first_batch_s`` (start-up), ``batches`` timed, the load average around the run and,
        for jest_stream's loader, ``telemetry``: the mean ``wait_s``, ``transfer_s``,
        ``score_s`` and ``select_s`` per super-batch.
    """
    if mode not in MODES:
        raise ValueError(f'mode={mode!r} is not known; choose one of {list(MODES)}')
    with warnings.catch_warnings():
        # torch's default collate warns (in every worker) about MDS's read-only arrays.
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        return _run_mode(mode, Path(pool), config, device)


def _run_mode(mode: str, pool: Path, config: DataPathConfig, device: str) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    cuda = device.startswith('cuda')
    timed = config.timed_batches(mode)
    load_before = os.getloadavg()
    workers = config.num_workers
    if mode == 'raw':
        loader = DataLoader(_raw_dataset(pool, config), batch_size=config.super_batch_size,
                            num_workers=workers, pin_memory=cuda,
                            prefetch_factor=2 if workers else None)
        batches = _raw_batches(loader, device)
    else:
        loader = selective_loader(mode, pool, config, device=device,
                                  num_canonical_nodes=config.num_canonical_nodes)
        batches = _selective_batches(loader)
    metrics: list[dict[str, Any]] = []
    drawn = delivered = count = 0
    start = time.perf_counter()
    first_batch_s = window_start = None
    for index, (batch, batch_metrics) in enumerate(batches):
        rows = batch_length(batch)
        if index == 0:
            synchronize(device)
            first_batch_s = time.perf_counter() - start
        if index == config.warmup - 1 or (config.warmup == 0 and index == 0):
            synchronize(device)
            window_start = time.perf_counter() if config.warmup else start
        if index >= config.warmup:
            count += 1
            delivered += rows
            drawn += batch_metrics['drawn'] if batch_metrics else rows
            if batch_metrics:
                metrics.append(batch_metrics)
        if index + 1 >= config.warmup + timed:
            break
    synchronize(device)
    elapsed = time.perf_counter() - window_start if window_start is not None else 0.0
    batches.close()
    del batches, loader
    gc.collect()
    if count == 0 or elapsed <= 0:
        raise ValueError(f'{mode}: no super-batch was timed: the pool has fewer than '
                         f'warmup + 1 = {config.warmup + 1} super-batches of '
                         f'{config.super_batch_size}; lower warmup or super_batch_size')
    out: dict[str, Any] = {
        'mode': mode, 'device': device, 'batches': count, 'elapsed_s': elapsed,
        'drawn_per_s': drawn / elapsed, 'delivered_per_s': delivered / elapsed,
        'first_batch_s': first_batch_s, 'loadavg_before': load_before,
        'loadavg_after': os.getloadavg(), 'threads': torch.get_num_threads(),
    }
    if metrics:
        out['telemetry'] = {key: statistics.fmean(m.get(key, 0.0) for m in metrics)
                            for key in LOADER_TIMINGS}
        out['telemetry']['interval_s'] = elapsed / count
    return out


def compare(pool: str | Path, config: DataPathConfig, *, device: str = 'cpu',
            modes: tuple[str, ...] = MODES, echo: bool = True) -> list[dict[str, Any]]:
    """Every mode once per round, the order rotating, so slow phases hit every mode."""
    plan = [(round_index, mode) for round_index in range(config.rounds)
            for mode in modes[round_index % len(modes):] + modes[:round_index % len(modes)]]
    runs = []
    for round_index, mode in tqdm(plan, desc=f'{device} runs', unit='run', disable=not echo):
        result = run_mode(mode, pool, config, device=device)
        result['round'] = round_index
        runs.append(result)
        if echo:
            tqdm.write(f'  {device} round {round_index + 1}/{config.rounds} {mode:>12}: '
                       f'{result["drawn_per_s"]:8.0f} drawn/s {result["delivered_per_s"]:8.0f} '
                       f'delivered/s ({result["batches"]} super-batches, load '
                       f'{result["loadavg_after"][0]:.1f})')
    return runs


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode, ratios to the plain DataLoader, and the telemetry breakdown.

    Two ratios per mode: of the medians over rounds, and the median of the ratios taken
    within each round (runs of one round are neighbours in time, so this one cancels slow
    phases of the machine best).
    """
    modes: dict[str, Any] = {}
    for run in runs:
        modes.setdefault(run['mode'], []).append(run)
    summary: dict[str, Any] = {'modes': {}, 'ratios': {}}
    for mode, results in modes.items():
        entry: dict[str, Any] = {
            'median_drawn_per_s': statistics.median(r['drawn_per_s'] for r in results),
            'median_delivered_per_s': statistics.median(r['delivered_per_s'] for r in results),
            'drawn_per_s': [r['drawn_per_s'] for r in results],
            'median_first_batch_s': statistics.median(r['first_batch_s'] for r in results),
        }
        telemetry = [r['telemetry'] for r in results if 'telemetry' in r]
        if telemetry:
            entry['telemetry_median'] = {key: statistics.median(t[key] for t in telemetry)
                                         for key in telemetry[0]}
        summary['modes'][mode] = entry
    if 'raw' in modes:
        raw_by_round = {r['round']: r['drawn_per_s'] for r in modes['raw']}
        raw = summary['modes']['raw']['median_drawn_per_s']
        for mode in modes:
            if mode == 'raw':
                continue
            paired = [r['drawn_per_s'] / raw_by_round[r['round']] for r in modes[mode]
                      if r['round'] in raw_by_round]
            summary['ratios'][f'{mode}_over_raw'] = {
                'of_medians': summary['modes'][mode]['median_drawn_per_s'] / raw,
                'median_paired': statistics.median(paired) if paired else None,
                'paired': paired,
            }
    return summary


def _print_summary(summary: dict[str, Any], config: DataPathConfig, title: str) -> None:
    print(f'\n{title}')
    print(f'{"mode":>13} {"drawn/s":>9} {"delivered/s":>12} {"vs raw":>7} {"paired":>7} '
          f'{"start-up s":>10} | per super-batch (ms): {"wait":>6} {"transfer":>8} '
          f'{"score":>6} {"select":>6} {"interval":>8}')
    for mode, entry in summary['modes'].items():
        ratio = summary['ratios'].get(f'{mode}_over_raw')
        of_medians = f'{ratio["of_medians"]:.3f}' if ratio else '1'
        paired = f'{ratio["median_paired"]:.3f}' if ratio and ratio['median_paired'] else '-'
        line = (f'{mode:>13} {entry["median_drawn_per_s"]:9.0f} '
                f'{entry["median_delivered_per_s"]:12.0f} {of_medians:>7} {paired:>7} '
                f'{entry["median_first_batch_s"]:10.2f} |')
        telemetry = entry.get('telemetry_median')
        if telemetry:
            line += (f'                      {1e3 * telemetry["wait_s"]:6.2f} '
                     f'{1e3 * telemetry["transfer_s"]:8.2f} {1e3 * telemetry["score_s"]:6.2f} '
                     f'{1e3 * telemetry["select_s"]:6.2f} {1e3 * telemetry["interval_s"]:8.2f}')
        print(line)


def _verdicts(summary: dict[str, Any]) -> dict[str, Any]:
    ratio = summary['ratios'].get('uniform_over_raw')
    value = ratio['median_paired'] if ratio else None
    return {'uniform_over_raw_min': 0.95, 'uniform_over_raw': value,
            'uniform_met': value is not None and value >= 0.95}


def gpu_section(pool: Path, config: DataPathConfig) -> dict[str, Any]:
    """The same comparison on CUDA; skipped cleanly where CUDA is missing."""
    if not torch.cuda.is_available():
        print('--gpu: CUDA is not available here; the GPU measurements are skipped', flush=True)
        return {'available': False}
    runs = compare(pool, config, device='cuda')
    summary = summarise(runs)
    _print_summary(summary, config, f'CUDA ({torch.cuda.get_device_name()}), medians:')
    return {'available': True, 'device': torch.cuda.get_device_name(), 'runs': runs,
            'summary': summary, 'targets': _verdicts(summary)}


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = report.pyplot()
    sections = report.device_sections(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, heights, dots = [], [], []
    for device, summary in sections:
        for mode, entry in summary['modes'].items():
            labels.append(f'{mode}\n({device})')
            heights.append(entry['median_drawn_per_s'])
            dots.append(entry['drawn_per_s'])
    axes[0].bar(range(len(labels)), heights, color='tab:blue')
    for i, values in enumerate(dots):
        axes[0].scatter([i] * len(values), values, color='black', s=8, zorder=3)
    axes[0].set_xticks(range(len(labels)), labels, fontsize=8)
    axes[0].set_ylabel('samples drawn / s')
    axes[0].set_title('throughput (bars: median; dots: rounds)', fontsize=9)
    stages = [('wait_s', 'wait for data'), ('transfer_s', 'transfer'), ('score_s', 'score'),
              ('select_s', 'select + gather')]
    names, rows = [], []
    for device, summary in sections:
        for mode, entry in summary['modes'].items():
            if 'telemetry_median' in entry:
                names.append(f'{mode}\n({device})')
                rows.append(entry['telemetry_median'])
    bottom = [0.0] * len(rows)
    for key, label in stages:
        values = [1e3 * row[key] for row in rows]
        axes[1].bar(range(len(rows)), values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    other = [max(0.0, 1e3 * row['interval_s'] - b) for row, b in zip(rows, bottom, strict=True)]
    axes[1].bar(range(len(rows)), other, bottom=bottom, label='other', color='lightgray')
    axes[1].set_xticks(range(len(names)), names, fontsize=8)
    axes[1].set_ylabel('ms per super-batch')
    axes[1].set_title("jest_stream's telemetry per super-batch (medians)", fontsize=9)
    axes[1].legend(fontsize=7)
    config = results['config']
    fig.suptitle(f'data path, Fashion-MNIST pool, B={config["super_batch_size"]}, '
                 f'b={config["batch_size"]}, {config["num_workers"]} workers; load '
                 f'{results["run"]["loadavg_start"][0]:.1f} at the start', fontsize=9)
    report.save_figure(fig, path)


def main(config: DataPathConfig, out: Path, argv: Sequence[str] | None = None
         ) -> dict[str, Any]:
    """Run every mode; write ``data_path.json`` and ``data_path.png`` to ``out``."""
    if config.clean_shm:
        remove_stale_shared_memory()
    run = report.start_run('data_path', argv, threads=config.threads)
    data = prepare(config.data_dir)
    results: dict[str, Any] = {'config': asdict(config), 'filter_ratio': config.filter_ratio,
                               'data': data.summary(), 'run': run}
    print(f'{os.cpu_count()} cores, load {run["loadavg_start"][0]:.1f}; {run["threads"]} torch '
          f'thread(s) in the main process, {config.num_workers} workers; '
          f'B={config.super_batch_size}, b={config.batch_size}; pool of {data.n_pool} images; '
          f'{config.rounds} interleaved rounds', flush=True)
    runs = compare(data.pool_dir, config)
    summary = summarise(runs)
    results['cpu'] = {'runs': runs, 'summary': summary}
    results['targets'] = _verdicts(summary)
    _print_summary(summary, config, 'CPU, medians:')
    if config.gpu:
        results['gpu'] = gpu_section(data.pool_dir, config)
    results['run'] = report.finish_run(run)
    ratios = summary['ratios']
    target = results['targets']
    print(f'\nuniform / raw: {target["uniform_over_raw"]:.3f} (median of paired rounds; '
          f'{ratios["uniform_over_raw"]["of_medians"]:.3f} of medians; target >= 0.95: '
          f'{"met" if target["uniform_met"] else "NOT met"}); learnability / raw: '
          f'{ratios["learnability_over_raw"]["median_paired"]:.3f}; load '
          f'{results["run"]["loadavg_end"][0]:.1f}; {results["run"]["wall_s"]:.0f} s in all',
          flush=True)
    report.write_report(results, *report.report_paths(out, 'data_path', config.quick), _plot)
    return results


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataPathConfig, Any]:
    """The configuration and the other arguments (``out``)."""
    parser = report.benchmark_parser('data_path', __doc__.split('\n\n')[0], threads="torch's",
                              quick='one round, 30 timed super-batches (10 scored)')
    parser.add_argument('--gpu', action='store_true', help='also measure on CUDA')
    parser.add_argument('--rounds', type=int, help='interleaved rounds')
    parser.add_argument('--batches', type=int, help='timed super-batches per run (unscored)')
    parser.add_argument('--scored-batches', type=int, help='timed super-batches per scored run')
    parser.add_argument('--workers', type=int, help='DataLoader workers (default 2)')
    parser.add_argument('--clean-shm', action='store_true',
                        help='first remove the shared memory that killed streaming jobs left '
                             '(jest_stream.remove_stale_shared_memory: segments no live '
                             'process uses; those of running jobs stay)')
    args = parser.parse_args(argv)
    config = DataPathConfig(gpu=args.gpu, clean_shm=args.clean_shm)
    if args.quick:
        config = replace(config, rounds=1, batches=30, scored_batches=10, quick=True)
    overrides = {'rounds': args.rounds, 'batches': args.batches,
                 'scored_batches': args.scored_batches, 'num_workers': args.workers,
                 'threads': args.threads}
    return replace(config, **{key: value for key, value in overrides.items()
                              if value is not None}), args


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.data_path``."""
    config, args = parse_args(argv)
    return main(config, args.out, argv)


if __name__ == '__main__':
    cli()

"""The selection log: what it costs the data path, and what it shows of the demo's selection.

Run it from the repository root::

    python -m benchmarks.selection_log               # both parts, a few minutes
    python -m benchmarks.selection_log --quick       # fewer rounds and batches
    python -m benchmarks.selection_log --part overhead
    python -m benchmarks.selection_log --part demo

``overhead``: a ``SelectiveLoader`` over the real Fashion-MNIST pool (57,000 images as MDS
shards, :func:`benchmarks.common.data.prepare`), super-batches of 320, sub-batches of 64,
read without and with a :class:`jest_stream.SelectionLog` that logs the pool's ``label``,
``clean_label`` and ``corrupted`` columns, the loader's state saved every
``checkpoint_every`` super-batches in both (which writes the log). Two modes:
``uniform`` (no scoring: the cheapest data path, where the log's share is largest) and
``learnability`` (the benchmarks' small CNNs as learner and live reference). The reading
runs in the main process (``num_workers=0``) so that every microsecond the log spends is
on the path being timed: the worst case. Each round runs both arms back to back, the order
alternating. Two figures: the median over rounds of the paired ratio (with / without) of
the process's CPU seconds per super-batch (the wall-clock ratio beside it), and, far less
noisy on a shared machine, the log's own CPU time per super-batch (its thread's time in
``record`` and in writing files, from ``SelectionLog.stats``) as a share of the loader's
CPU time per super-batch without it.

``demo``: the demo's learnability run (:data:`benchmarks.demo.DEMO_QUICK`: noisy
Fashion-MNIST, b = 32 of B = 160, the reference's stored losses, seed 0, 120 steps), built as
:func:`benchmarks.learning_efficiency.selective_loader` builds it, with a selection log; then
``jest-stream report`` of that log. Its plots, ``report.json`` and ``index.html`` go to
``benchmarks/results/selection_log/demo/``; the log itself to ``data/selection_log/demo``.

Results: ``benchmarks/results/selection_log/selection_log.json`` (``_quick`` for
``--quick``).
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import report
from benchmarks.common.data import open_streaming, prepare
from benchmarks.common.tasks import ReferenceSettings, prepare_task
from benchmarks.common.training import train_selective
from benchmarks.common.workload import LoaderWorkload, selective_loader
from jest_stream import SampleIdStreamingDataset, SelectionLog, SelectiveLoader
from jest_stream.report import write_report

__all__ = ['LogBenchConfig', 'MODES', 'POOL_COLUMNS', 'demo_log', 'main', 'measure_overhead',
           'run_arm']

NAME = 'selection_log'
MODES = ('uniform', 'learnability')
#: Columns of the pool the log records besides its own.
POOL_COLUMNS = {'label': 'label', 'clean_label': 'clean_label', 'corrupted': 'corrupted'}


@dataclass(frozen=True)
class LogBenchConfig(LoaderWorkload):
    """Every setting of the overhead measurement (written into the results file)."""

    num_workers: int = 0
    warmup: int = 3
    batches: int = 100
    rounds: int = 7
    checkpoint_every: int = 25
    threads: int = 1


QUICK = LogBenchConfig(batches=40, scored_batches=12, rounds=3, quick=True)


def run_arm(mode: str, pool: Path, config: LogBenchConfig, *, logged: bool) -> dict[str, Any]:
    """Read ``warmup`` + timed super-batches, without or with a selection log.

    Returns:
        dict: ``seconds_per_batch`` over the timed super-batches, ``batches`` and, with the
        log, ``log_stats`` (rows, files written, seconds recording and writing) and
        ``log_bytes`` on disk.
    """
    timed = config.timed_batches(mode)
    with tempfile.TemporaryDirectory(prefix='selection-log-') as folder:
        log = SelectionLog(folder, columns=POOL_COLUMNS) if logged else None
        loader = selective_loader(mode, pool, config, selection_log=log)
        start, count = (0.0, 0.0), 0
        for index, _ in enumerate(loader):
            if index + 1 == config.warmup:
                start = (time.perf_counter(), time.process_time())
            elif index >= config.warmup:
                count += 1
            if (index + 1) % config.checkpoint_every == 0:
                loader.state_dict()
            if count == timed:
                break
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        loader.close()
        out: dict[str, Any] = {'mode': mode, 'logged': logged, 'batches': count,
                               'seconds_per_batch': wall / count,
                               'cpu_seconds_per_batch': cpu / count}
        if log is not None:
            out['log_stats'] = dict(log.stats)
            out['log_bytes'] = sum(p.stat().st_size for p in Path(folder).iterdir())
        del loader
        gc.collect()
    return out


def measure_overhead(pool: Path, config: LogBenchConfig, *, progress: bool = True
                     ) -> dict[str, Any]:
    """Paired rounds of each mode without and with the log; medians of the paired ratios."""
    results: dict[str, Any] = {}
    for mode in MODES:
        rounds = []
        for round_index in tqdm(range(config.rounds), desc=f'overhead {mode}', unit='round',
                                disable=not progress):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            arms = {logged: run_arm(mode, pool, config, logged=logged) for logged in order}
            rounds.append({'without': arms[False], 'with': arms[True], **{
                f'{kind}ratio': arms[True][f'{kind}seconds_per_batch']
                / arms[False][f'{kind}seconds_per_batch'] for kind in ('', 'cpu_')}})
        logged = [r['with'] for r in rounds]
        steps = [a['log_stats']['rows'] / config.super_batch_size for a in logged]
        per_batch = [a['log_stats']['record_s'] / n for a, n in zip(logged, steps, strict=True)]
        # The log's own CPU time (its thread's, recording and writing) per super-batch, over
        # the loader's CPU time per super-batch without it, in the same round.
        own = [(a['log_stats']['record_cpu_s'] + a['log_stats']['write_cpu_s']) / n
               for a, n in zip(logged, steps, strict=True)]
        shares = [o / r['without']['cpu_seconds_per_batch']
                  for o, r in zip(own, rounds, strict=True)]
        results[mode] = {
            'median_log_cpu_s_per_batch': statistics.median(own),
            'median_log_cpu_share': statistics.median(shares),
            'rounds': rounds,
            'median_ratio': statistics.median(r['ratio'] for r in rounds),
            'median_cpu_ratio': statistics.median(r['cpu_ratio'] for r in rounds),
            **{f'median_{kind}seconds_per_batch_{arm}': statistics.median(
                r[arm][f'{kind}seconds_per_batch'] for r in rounds)
               for kind in ('', 'cpu_') for arm in ('without', 'with')},
            'median_record_s_per_batch': statistics.median(per_batch),
            'median_write_s_per_file': statistics.median(
                a['log_stats']['write_s'] / max(a['log_stats']['files_written'], 1)
                for a in logged),
            'log_bytes_per_row': statistics.median(a['log_bytes'] / a['log_stats']['rows']
                                                   for a in logged),
        }
    return results


def demo_log(out: Path, log_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """The demo's quick learnability run with a selection log, then its report in ``out``."""
    from benchmarks.demo import DEMO_QUICK as config

    ratio, seed, task = config.ratios[0], config.seeds[0], 'classification'
    data = prepare(config.data_dir, noise_rate=config.noise_rate,
                   clean_fraction=config.clean_fraction, seed=config.data_seed,
                   limit=config.limit, progress=progress)
    eval_rows = np.sort(np.random.default_rng(np.random.SeedSequence([config.data_seed, 5]))
                        .choice(len(data.test_labels), config.eval_size, replace=False))
    big = config.super_batch_size(ratio)
    setup = prepare_task(task, data=data, eval_rows=eval_rows, probe_rows=big,
                         num_workers=config.num_workers, progress=progress,
                         reference=ReferenceSettings(
                             steps=config.reference_steps, lr=config.reference_lr,
                             batch_size=config.reference_batch_size, seed=config.data_seed))
    method = config.method(task, 'learnability')
    learner = setup.task.make_learner(seed)
    dataset = open_streaming(lambda: SampleIdStreamingDataset(
        local=str(setup.pool_dir), batch_size=big, shuffle=True, shuffle_seed=seed,
        num_canonical_nodes=1))
    log = SelectionLog(log_dir, columns=POOL_COLUMNS, overwrite=True)
    loader = SelectiveLoader(dataset, batch_size=config.batch_size, super_batch_size=big,
                             scorer=setup.task.make_scorer(learner, setup.cache),
                             criterion=method.criterion, method=method.selection or
                             config.selection, n_chunks=config.n_chunks,
                             temperature=config.temperature, seed=seed,
                             num_workers=config.num_workers, selection_log=log)
    measured = train_selective(
        learner, loader, steps=config.steps, loss_fn=setup.task.loss,
        optimizer=torch.optim.Adam(learner.parameters(), lr=config.lr),
        checkpoints=list(range(0, config.steps + 1, config.eval_every)),
        evaluate=setup.evaluate, noisy_key=setup.task.noisy_key, desc='demo with a log',
        progress=progress)
    loader.close()
    summary = write_report(log_dir, out, progress=progress)
    return {'config': {'ratio': ratio, 'seed': seed, 'steps': config.steps,
                       'batch_size': config.batch_size, 'super_batch_size': big},
            'accuracy': measured['accuracy'][-1],
            'noisy_fraction_overall': measured.get('noisy_fraction_overall'),
            'log': str(log_dir), 'report': str(out), 'files': summary['files'],
            'never_selected_fraction': summary['counts']['never_selected_fraction'],
            'flags': {c: f['overall'] | {'kept_ratio': f['kept_ratio']}
                      for c, f in summary['flags'].items()}}


def _print_overhead(results: dict[str, Any]) -> None:
    print('\nper super-batch, medians over rounds; ratios: with the log / without, paired by '
          'round')
    print(f'{"mode":>13} {"cpu ms without":>14} {"with":>7} {"cpu ratio":>9} '
          f'{"wall ratio":>10} {"log cpu ms":>10} {"log share":>9} {"write ms/file":>13} '
          f'{"bytes/row":>9}')
    for mode, entry in results.items():
        print(f'{mode:>13} {1e3 * entry["median_cpu_seconds_per_batch_without"]:14.2f} '
              f'{1e3 * entry["median_cpu_seconds_per_batch_with"]:7.2f} '
              f'{entry["median_cpu_ratio"]:9.3f} {entry["median_ratio"]:10.3f} '
              f'{1e3 * entry["median_log_cpu_s_per_batch"]:10.3f} '
              f'{entry["median_log_cpu_share"]:9.2%} '
              f'{1e3 * entry["median_write_s_per_file"]:13.1f} '
              f'{entry["log_bytes_per_row"]:9.1f}')


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; returns the exit status."""
    parser = report.benchmark_parser(
        NAME, __doc__.split('\n\n')[0], quick=f'{QUICK.rounds} rounds of {QUICK.batches} '
        f'super-batches ({QUICK.scored_batches} scored)', threads=LogBenchConfig.threads)
    parser.add_argument('--part', choices=('overhead', 'demo', 'both'), default='both')
    parser.add_argument('--log-dir', type=Path,
                        default=report.REPO_ROOT / 'data' / 'selection_log' / 'demo',
                        help='where the demo run writes its selection log')
    args = parser.parse_args(argv)
    config = QUICK if args.quick else LogBenchConfig()
    if args.threads is not None:
        config = LogBenchConfig(**{**asdict(config), 'threads': args.threads})
    run = report.start_run(NAME, argv, threads=config.threads)
    json_path, _ = report.report_paths(args.out, NAME, config.quick)
    # A run of one part keeps the other part's results of an earlier run.
    record: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    record['config'] = asdict(config)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        if args.part in ('overhead', 'both'):
            data = prepare(config.data_dir, progress=True)
            record['overhead'] = measure_overhead(data.pool_dir, config)
            _print_overhead(record['overhead'])
        if args.part in ('demo', 'both'):
            record['demo'] = demo_log(args.out / 'demo', args.log_dir)
            print(f'\ndemo: report of {args.log_dir} in {args.out / "demo"}: '
                  f'{", ".join(record["demo"]["files"])}')
    record['run'] = report.finish_run(run)
    report.write_record(json_path, record)
    print(f'wrote {report.repo_relative(str(json_path))}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

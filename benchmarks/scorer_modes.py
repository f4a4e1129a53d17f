"""Inline against process scoring: throughput side by side in one run, memory over a long run.

Run it from the repository root::

    python -m benchmarks.scorer_modes            # a few minutes on two CPU cores
    python -m benchmarks.scorer_modes --quick    # a smoke run
    python -m benchmarks.scorer_modes --gpu      # also the CUDA paths, where CUDA exists

What it measures, on the real Fashion-MNIST pool (MDS shards, built once under
``data/fashion-mnist``), with the benchmarks' small CNN as the learner, sub-batches of
64 from super-batches of 96 (filter ratio 1/3). The default criterion is
``hard_learner``: one learner forward per super-batch, which is also what
``learnability`` costs when the reference's losses come from an offline cache (the usual
JEST set-up); ``--criterion learnability`` adds a live reference CNN (twice the scoring
cost).

1. The cost of one training step on a sub-batch and of scoring one super-batch, in the
   trainer process alone: here scoring costs about as much as training, the case where
   a scorer process can help most.
2. Training throughput (steps per second) of the same loop with inline scoring and
   with process scoring, the modes interleaved over several rounds so that both see
   the same machine. On the CPU each process gets its own share of the cores: the
   scorer process takes half of the trainer's torch threads (at least one), so the
   trainer is set to the rest (``torch.set_num_threads``). The inline mode is measured
   both with all cores and with as many threads as the process trainer has.
3. Host memory (RSS) of the trainer and of the scorer process over many short epochs
   of process scoring: it must stay flat after warm-up.
4. With ``--gpu`` where CUDA exists: the same throughput comparison on the GPU
   (batches and weights shared by CUDA IPC), host-to-device bandwidth from pinned
   and from pageable memory, and how much of the scoring time process scoring hides.

Results go to ``benchmarks/results/scorer_modes/`` (``scorer_modes.json`` and
``scorer_modes.png``; ``scorer_modes_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import report, stats
from benchmarks.common.data import batch_logits, open_streaming, prepare
from benchmarks.common.models import count_parameters, make_cnn
from benchmarks.common.tasks import classification_scorer
from benchmarks.common.training import synchronize
from jest_stream import SampleIdStreamingDataset, SelectiveLoader, get_criterion

__all__ = ['BenchConfig', 'cli', 'main', 'parse_args']


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of the benchmark (written into the results file)."""

    batch_size: int = 64
    super_batch_size: int = 96
    criterion: str = 'hard_learner'
    hidden: int = 48
    lr: float = 0.05
    steps: int = 150
    warmup: int = 15
    rounds: int = 3
    memory_epochs: int = 60
    memory_epoch_batches: int = 20
    seed: int = 0
    gpu: bool = False
    quick: bool = False
    data_dir: str = str(report.REPO_ROOT / 'data' / 'fashion-mnist')


@dataclass(frozen=True)
class Mode:
    """One way of running the loop: scoring mode, the trainer's torch threads, the device."""

    name: str
    scoring: str
    threads: int
    device: str = 'cpu'


def _models(config: BenchConfig, device: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    learner = make_cnn(config.seed, hidden=config.hidden).to(device)
    reference = None
    if config.criterion in ('learnability', 'easy_reference'):
        reference = make_cnn(config.seed + 1, hidden=config.hidden).to(device)
    return learner, reference


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(batch_logits(model, batch), batch['label']).backward()
    optimizer.step()


def _dataset(config: BenchConfig, pool: Path, *, epoch_size: int | None = None) -> Any:
    return open_streaming(lambda: SampleIdStreamingDataset(
        local=str(pool), batch_size=config.super_batch_size, shuffle=True,
        shuffle_seed=config.seed, epoch_size=epoch_size))


def measure_costs(config: BenchConfig, pool: Path, threads: int, device: str = 'cpu'
                  ) -> dict[str, float]:
    """Seconds per training step on ``b`` and per scoring of ``B``, in this process alone."""
    torch.set_num_threads(threads)
    learner, reference = _models(config, device)
    optimizer = torch.optim.SGD(learner.parameters(), lr=config.lr)
    scorer = classification_scorer(learner, reference)
    # One whole super-batch: a uniform loader that keeps everything it draws.
    loader = SelectiveLoader(_dataset(config, pool), batch_size=config.super_batch_size,
                             super_batch_size=config.super_batch_size, criterion='uniform',
                             device=device)
    big = next(iter(loader))
    del loader
    gc.collect()
    small = {key: value[:config.batch_size] for key, value in big.items()}
    criterion = get_criterion(config.criterion)
    train, score = [], []
    for _ in range(25):
        synchronize(device)
        start = time.perf_counter()
        _train_step(learner, optimizer, small)
        synchronize(device)
        train.append(time.perf_counter() - start)
        start = time.perf_counter()
        scorer(big, big['sample_id'], criterion)
        synchronize(device)
        score.append(time.perf_counter() - start)
    train, score = train[5:], score[5:]
    return {'threads': threads, 'train_step_s': statistics.median(train),
            'score_s': statistics.median(score),
            'score_over_train': statistics.median(score) / statistics.median(train)}


def _training(config: BenchConfig, pool: Path, device: str, scoring: str, *,
              epoch_size: int | None = None
              ) -> tuple[torch.nn.Module, torch.optim.Optimizer, SelectiveLoader]:
    """A fresh learner, its SGD optimizer, and a top-k loader scoring ``inline`` or in a process."""
    learner, reference = _models(config, device)
    optimizer = torch.optim.SGD(learner.parameters(), lr=config.lr, momentum=0.9)
    loader = SelectiveLoader(_dataset(config, pool, epoch_size=epoch_size),
                             batch_size=config.batch_size,
                             super_batch_size=config.super_batch_size,
                             scorer=classification_scorer(learner, reference),
                             criterion=config.criterion, method='topk', seed=config.seed,
                             device=device, scoring=scoring)
    return learner, optimizer, loader


def run_mode(config: BenchConfig, pool: Path, mode: Mode) -> dict[str, Any]:
    """Train ``warmup + steps`` steps through a loader in ``mode``; time the last ``steps``."""
    torch.set_num_threads(mode.threads)
    learner, optimizer, loader = _training(config, pool, mode.device, mode.scoring)
    metrics = []
    with loader:
        iterator = iter(loader)
        for _ in range(config.warmup):
            _train_step(learner, optimizer, next(iterator))
        synchronize(mode.device)
        start = time.perf_counter()
        for _ in range(config.steps):
            _train_step(learner, optimizer, next(iterator))
            metrics.append(dict(loader.metrics))
        synchronize(mode.device)
        elapsed = time.perf_counter() - start
        child = loader.scorer_process.startup if loader.scorer_process else None
    del iterator, loader
    gc.collect()

    def mean(key: str) -> float | None:
        values = [m[key] for m in metrics if key in m]
        return sum(values) / len(values) if values else None

    return {'mode': mode.name, 'steps_per_s': config.steps / elapsed,
            'step_s': elapsed / config.steps, 'score_s': mean('score_s'),
            'result_wait_s': mean('result_wait_s'), 'staleness': mean('staleness'),
            'max_staleness_seen': max((m.get('staleness', 0) for m in metrics), default=0),
            'rescored': sum(m.get('rescored', 0) for m in metrics),
            'scorer_threads': None if child is None else child['threads']}


def memory_run(config: BenchConfig, pool: Path, threads: int) -> dict[str, Any]:
    """RSS of the trainer and the scorer process over many short epochs of process scoring."""
    torch.set_num_threads(threads)
    learner, optimizer, loader = _training(
        config, pool, 'cpu', 'process',
        epoch_size=config.super_batch_size * config.memory_epoch_batches)
    trainer = psutil.Process()
    samples: list[tuple[int, int, int]] = []
    steps = 0
    with loader:
        for _ in tqdm(range(config.memory_epochs), desc='memory run', unit='epoch'):
            for batch in loader:
                _train_step(learner, optimizer, batch)
                steps += 1
                if steps % 5 == 0:
                    child = psutil.Process(loader.scorer_process.pid)
                    samples.append((steps, trainer.memory_info().rss, child.memory_info().rss))
    mib = 1 << 20
    out: dict[str, Any] = {'steps': steps, 'epochs': config.memory_epochs, 'samples': samples}
    # After a warm-up of three epochs, a leak shows as a steady slope; one-off growth (a data
    # file read for the first time) and allocator noise show in the range only.
    warm = [s for s in samples if s[0] >= config.memory_epoch_batches * 3] or samples
    for index, who in ((1, 'trainer'), (2, 'scorer')):
        values = [s[index] / mib for s in warm]
        out[f'{who}_slope_mib_per_1000_steps'] = 1000 * stats.slope([s[0] for s in warm], values)
        out[f'{who}_range_after_warmup_mib'] = max(values) - min(values)
        out[f'{who}_rss_mib'] = values[-1]
    return out


def host_to_device_bandwidth(nbytes: int, repeats: int = 20) -> dict[str, float]:
    """GB/s of host-to-device copies from pageable and from pinned memory (CUDA only)."""
    out = {}
    device_buffer = torch.empty(nbytes, dtype=torch.uint8, device='cuda')
    for name, pinned in (('pageable', False), ('pinned', True)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        device_buffer.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            device_buffer.copy_(host, non_blocking=pinned)
        end.record()
        torch.cuda.synchronize()
        out[f'{name}_gb_per_s'] = nbytes * repeats / (start.elapsed_time(end) / 1000) / 1e9
    return out


def compare(config: BenchConfig, pool: Path, modes: list[Mode]) -> dict[str, Any]:
    """Each mode once per round, interleaved, so slow phases of the machine hit all modes."""
    runs: dict[str, list[dict[str, Any]]] = {mode.name: [] for mode in modes}
    plan = [(round_index, mode) for round_index in range(config.rounds) for mode in modes]
    for round_index, mode in tqdm(plan, desc='throughput runs', unit='run'):
        result = run_mode(config, pool, mode)
        runs[mode.name].append(result)
        tqdm.write(f'  round {round_index + 1}/{config.rounds} {mode.name:>24}: '
                   f'{result["steps_per_s"]:6.2f} steps/s  (mean staleness '
                   f'{result["staleness"] if result["staleness"] is not None else "-"})')
    summary = {}
    for name, results in runs.items():
        rates = [r['steps_per_s'] for r in results]
        summary[name] = {'median_steps_per_s': statistics.median(rates), 'rates': rates,
                         'runs': results}
    return summary


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cpu = results['cpu']
    names = list(cpu)
    axes[0].bar(range(len(names)), [cpu[n]['median_steps_per_s'] for n in names])
    for i, name in enumerate(names):
        axes[0].scatter([i] * len(cpu[name]['rates']), cpu[name]['rates'], color='black', s=8)
    axes[0].set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    axes[0].set_ylabel('training steps / s')
    axes[0].set_title('CPU throughput (bars: median; dots: rounds)')
    samples = results['memory']['samples']
    steps = [s[0] for s in samples]
    axes[1].plot(steps, [s[1] / (1 << 20) for s in samples], label='trainer')
    axes[1].plot(steps, [s[2] / (1 << 20) for s in samples], label='scorer process')
    axes[1].set_xlabel('training step')
    axes[1].set_ylabel('RSS (MiB)')
    axes[1].set_title(f'memory over {results["memory"]["epochs"]} epochs (process scoring)')
    axes[1].legend()
    report.save_figure(fig, path)


def main(config: BenchConfig, out: Path, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every measurement; write ``scorer_modes.json`` and ``scorer_modes.png`` to ``out``."""
    run_record = report.start_run('scorer_modes', argv)
    data = prepare(config.data_dir)
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    trainer_threads = max(1, cores - half)
    results: dict[str, Any] = {
        'config': asdict(config), 'data': data.summary(),
        'parameters': count_parameters(make_cnn(0, hidden=config.hidden)),
    }
    print(f'{cores} cores; learner: SmallCNN with {results["parameters"]} parameters; '
          f'criterion {config.criterion}; b={config.batch_size}, B={config.super_batch_size}',
          flush=True)
    costs = [measure_costs(config, data.pool_dir, threads)
             for threads in sorted({1, trainer_threads, cores})]
    results['costs'] = costs
    for cost in costs:
        print(f'cost with {cost["threads"]} thread(s): training step '
              f'{1e3 * cost["train_step_s"]:.1f} ms, scoring a super-batch '
              f'{1e3 * cost["score_s"]:.1f} ms '
              f'(scoring / training = {cost["score_over_train"]:.2f})', flush=True)
    # The process trainer runs with the cores the scorer process leaves it; inline runs with
    # all cores (its best) and with the process trainer's share (the same trainer).
    modes = {'inline_all': Mode(f'inline ({cores} threads)', 'inline', cores),
             'inline_same': Mode(f'inline ({trainer_threads} threads)', 'inline',
                                 trainer_threads),
             'process': Mode(f'process ({trainer_threads}+{half} threads)', 'process',
                             trainer_threads),
             'process_all': Mode(f'process ({cores}+{half} threads)', 'process', cores)}
    if trainer_threads == cores:
        del modes['inline_same'], modes['process_all']
    print('throughput, interleaved rounds:', flush=True)
    results['cpu'] = compare(config, data.pool_dir, list(modes.values()))
    rate = {key: results['cpu'][mode.name]['median_steps_per_s'] for key, mode in modes.items()}
    same = 'inline_same' if 'inline_same' in modes else 'inline_all'
    results['process_over_best_inline'] = rate['process'] / max(rate['inline_all'], rate[same])
    results['process_over_inline_same_threads'] = rate['process'] / rate[same]
    inline_score = statistics.median(
        r['score_s'] for r in results['cpu'][modes[same].name]['runs'])
    results['scoring_hidden_fraction'] = (1 / rate[same] - 1 / rate['process']) / inline_score
    print(f'process / best inline throughput: {results["process_over_best_inline"]:.2f}x; '
          f'process / inline with the same trainer threads: '
          f'{results["process_over_inline_same_threads"]:.2f}x; fraction of the scoring time '
          f'hidden: {results["scoring_hidden_fraction"]:.2f}', flush=True)
    print(f'memory over {config.memory_epochs} epochs of process scoring...', flush=True)
    results['memory'] = memory_run(config, data.pool_dir, trainer_threads)
    memory = results['memory']
    print(f'RSS after warm-up (3 epochs): trainer {memory["trainer_rss_mib"]:.0f} MiB, slope '
          f'{memory["trainer_slope_mib_per_1000_steps"]:+.2f} MiB per 1000 steps, range '
          f'{memory["trainer_range_after_warmup_mib"]:.1f} MiB; scorer process '
          f'{memory["scorer_rss_mib"]:.0f} MiB, slope '
          f'{memory["scorer_slope_mib_per_1000_steps"]:+.2f} MiB per 1000 steps, range '
          f'{memory["scorer_range_after_warmup_mib"]:.1f} MiB; {memory["steps"]} steps',
          flush=True)
    if config.gpu:
        results['gpu'] = gpu_section(config, data.pool_dir)
    results['run'] = report.finish_run(run_record)
    report.write_report(results, *report.report_paths(out, 'scorer_modes', config.quick), _plot)
    return results


def gpu_section(config: BenchConfig, pool: Path) -> dict[str, Any]:
    """The CUDA IPC path against inline scoring on the GPU, and host-to-device bandwidth."""
    if not torch.cuda.is_available():
        print('--gpu: CUDA is not available here; the GPU measurements are skipped', flush=True)
        return {'available': False}
    out: dict[str, Any] = {'available': True, 'device': torch.cuda.get_device_name()}
    batch_bytes = config.super_batch_size * 28 * 28
    for label, nbytes in (('super_batch', batch_bytes), ('64MiB', 64 << 20)):
        out[f'bandwidth_{label}'] = host_to_device_bandwidth(nbytes)
        print(f'host to device, {label} ({nbytes} bytes): {out[f"bandwidth_{label}"]}',
              flush=True)
    out['costs'] = measure_costs(config, pool, torch.get_num_threads(), 'cuda')
    modes = [Mode('inline (cuda)', 'inline', torch.get_num_threads(), 'cuda'),
             Mode('process (cuda, IPC)', 'process', torch.get_num_threads(), 'cuda')]
    out['throughput'] = compare(config, pool, modes)
    inline = out['throughput'][modes[0].name]
    process = out['throughput'][modes[1].name]
    out['process_over_inline'] = process['median_steps_per_s'] / inline['median_steps_per_s']
    inline_score = statistics.median(r['score_s'] for r in inline['runs'])
    out['scoring_hidden_fraction'] = (1 / inline['median_steps_per_s']
                                      - 1 / process['median_steps_per_s']) / inline_score
    print(f'cuda: process / inline {out["process_over_inline"]:.2f}x; fraction of the scoring '
          f'time hidden {out["scoring_hidden_fraction"]:.2f}', flush=True)
    return out


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Any]:
    """The configuration and the other arguments (``out``)."""
    parser = report.benchmark_parser('scorer_modes', __doc__.split('\n\n')[0],
                              quick='30 timed steps, one round, 6 memory epochs')
    parser.add_argument('--gpu', action='store_true', help='also measure the CUDA paths')
    parser.add_argument('--criterion', choices=['hard_learner', 'learnability'],
                        help='hard_learner (default; the cost of learnability with a cached '
                             'reference) or learnability with a live reference')
    parser.add_argument('--steps', type=int, help='timed steps per mode and round')
    parser.add_argument('--rounds', type=int, help='interleaved rounds')
    args = parser.parse_args(argv)
    config = BenchConfig(gpu=args.gpu)
    if args.quick:
        config = replace(config, steps=30, warmup=5, rounds=1, memory_epochs=6,
                         memory_epoch_batches=10, quick=True)
    overrides = {'steps': args.steps, 'rounds': args.rounds, 'criterion': args.criterion}
    return replace(config, **{k: v for k, v in overrides.items() if v is not None}), args


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.scorer_modes``."""
    config, args = parse_args(argv)
    return main(config, args.out, argv)


if __name__ == '__main__':
    cli()

"""Joint selection's time and peak memory against the super-batch size B.

Run it from the repository root::

    python -m benchmarks.selection_scaling              # about 5 minutes on two CPU cores
    python -m benchmarks.selection_scaling --quick      # a smoke run (B up to 2048)
    python -m benchmarks.selection_scaling --gpu        # also on CUDA, where it exists

The two forms of the JEST sampler over the sigmoid (SigLIP) pair scores of learnability
(learner minus reference), from random L2-normalised embeddings of dimension d = 256,
filter ratio 0.8 (``b = round(B / 5)``), 16 chunks, float32:

- ``materialised``: build the ``B x B`` score matrix (``SigmoidPairScores.materialise``,
  one ``B x B`` block per model) and run :func:`jest_stream.joint_select` on it;
- ``incremental``: :func:`jest_stream.joint_select_incremental` over
  ``SigmoidPairScores``, which computes only the ``B x c`` rows and columns of the chunks
  already chosen.

Each measurement runs in a fresh Python process: a warm-up call at a tiny size, then the
peak-RSS high-water mark is reset (``/proc/self/clear_refs``), the resident set is read
as the baseline, and the measured call's peak is ``ru_maxrss`` minus that baseline. RSS
counts every byte the call touches (torch's CPU tensors, oneDNN/MKL scratch, Python
objects), needs no instrumentation inside the timed code, and a fresh process gives each
measurement its own high-water mark and its own allocator state. The same process then
repeats the call for timing. Processes run interleaved (every size and method once per
round, alternating the order of the methods) so that a busy phase of a shared machine
hits both methods.

On the CPU the processes use one torch thread by default (``--threads``): on cores
shared with other work, torch's OpenMP fork-join stalls whenever one of its threads is
descheduled, and the same call then varies by several times from run to run.

On CUDA (``--gpu``) both methods run in this process; peaks come from
``torch.cuda.max_memory_allocated`` above what was allocated before the call.

Results go to ``benchmarks/results/selection_scaling/`` (``selection_scaling.json`` and
``selection_scaling.png``: time and peak memory against B, log-log; ``selection_scaling_quick.*``
for ``--quick``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.common import report, stats
from jest_stream import (
    Embeddings,
    SigmoidPairScores,
    get_criterion,
    joint_select,
    joint_select_incremental,
)

__all__ = [
    'METHODS',
    'ScalingConfig',
    'cli',
    'fit_memory',
    'main',
    'make_embeddings',
    'measure',
    'measure_cuda',
    'measure_in_subprocess',
    'memory_verdict',
    'parse_args',
    'select_incremental',
    'select_materialised',
    'sub_batch_size',
]

_CHILD_PREFIX = 'SELECTION_SCALING_RESULT '
_FLOAT32_BYTES = 4


@dataclass(frozen=True)
class ScalingConfig:
    """Every setting of the benchmark (written into the results file)."""

    sizes: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    dim: int = 256
    filter_ratio: float = 0.8
    n_chunks: int = 16
    temperature: float = 1.0
    rounds: int = 3
    min_time_s: float = 1.0
    max_repeats: int = 5
    threads: int = 1
    seed: int = 0
    gpu: bool = False
    gpu_sizes: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    quick: bool = False
    child_timeout_s: float = 1800.0
    methods: tuple[str, ...] = ('materialised', 'incremental')


def sub_batch_size(size: int, filter_ratio: float) -> int:
    """``b = round(B (1 - filter_ratio))``: the sub-batch kept from a super-batch of ``B``."""
    return max(1, round(size * (1.0 - filter_ratio)))


def make_embeddings(size: int, dim: int, *, seed: int, device: str | torch.device = 'cpu'
                    ) -> tuple[Any, Any]:
    """Learner and reference :class:`~jest_stream.Embeddings` of ``size`` pairs.

    Image embeddings are random unit vectors; each text embedding is its image's vector plus
    as much noise, renormalised, so matching pairs are more similar than the rest, as in a
    trained two-tower model. Temperature 10 and bias -10 are SigLIP's initial values.

    Args:
        size (int): ``B``, the number of pairs.
        dim (int): Embedding dimension ``d``.
        seed (int): Seed of a private generator (both models drawn from it).
        device (str | torch.device): Where the embeddings live.

    Returns:
        tuple[Embeddings, Embeddings]: Learner and reference embeddings, float32.
    """
    generator = torch.Generator().manual_seed(seed)

    def one() -> Embeddings:
        image = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
        text = torch.nn.functional.normalize(
            image + torch.randn(size, dim, generator=generator), dim=1)
        return Embeddings(image.to(device), text.to(device), 10.0, -10.0)

    return one(), one()


def _pair_scores(learner: Any, reference: Any) -> Any:
    return SigmoidPairScores(learner, reference, get_criterion('learnability'))


def select_materialised(learner: Any, reference: Any, n_select: int, *, n_chunks: int,
                        temperature: float, generator: torch.Generator) -> Tensor:
    """Build the ``B x B`` learnability matrix, then :func:`jest_stream.joint_select` on it."""
    matrix = _pair_scores(learner, reference).materialise()
    return joint_select(matrix, n_select, n_chunks=n_chunks, temperature=temperature,
                        generator=generator)


def select_incremental(learner: Any, reference: Any, n_select: int, *, n_chunks: int,
                       temperature: float, generator: torch.Generator) -> Tensor:
    """:func:`jest_stream.joint_select_incremental` over the pair scores' blocks."""
    return joint_select_incremental(_pair_scores(learner, reference), n_select,
                                    n_chunks=n_chunks, temperature=temperature,
                                    generator=generator)


METHODS: dict[str, Callable[..., Tensor]] = {
    'materialised': select_materialised,
    'incremental': select_incremental,
}


# Peak memory of the host process -----------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs``); False where it cannot."""
    try:
        Path('/proc/self/clear_refs').write_text('5')
    except OSError:
        return False
    return True


def _current_rss() -> int:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024


def _release_free_heap() -> None:
    # glibc keeps freed heap pages resident; a later allocation that reuses them would not
    # raise the RSS, so the baseline is taken with them returned to the system.
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _indices_digest(indices: Tensor) -> str:
    return hashlib.sha1(indices.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _run(method: str, learner: Any, reference: Any, n_select: int, config: ScalingConfig,
         device: str) -> tuple[Tensor, float]:
    generator = torch.Generator().manual_seed(config.seed + 1)
    start = time.perf_counter()
    indices = METHODS[method](learner, reference, n_select, n_chunks=config.n_chunks,
                              temperature=config.temperature, generator=generator)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return indices, time.perf_counter() - start


def measure(method: str, size: int, config: ScalingConfig) -> dict[str, Any]:
    """Peak host memory and times of one method at one size, in this process (CPU).

    Meant to run in a fresh process (:func:`measure_in_subprocess`): the peak is the RSS
    high-water mark above the resident set just before the call.

    Args:
        method (str): ``materialised`` or ``incremental``.
        size (int): Super-batch size ``B``.
        config (ScalingConfig): Dimension, filter ratio, chunks, repeats, threads.

    Returns:
        dict: ``times_s`` (every call), ``peak_bytes``, ``baseline_bytes``, ``peak_reset``
        (whether the high-water mark could be reset), ``digest`` of the selected indices.
    """
    if method not in METHODS:
        raise ValueError(f'method={method!r} is not known; choose one of {sorted(METHODS)}')
    torch.set_num_threads(config.threads)
    n_select = sub_batch_size(size, config.filter_ratio)
    # Warm-up at a tiny size: loads kernels and starts thread pools outside the measurement.
    warm = make_embeddings(64, config.dim, seed=config.seed + 7)
    _run(method, *warm, sub_batch_size(64, config.filter_ratio), config, 'cpu')
    del warm
    learner, reference = make_embeddings(size, config.dim, seed=config.seed)
    _release_free_heap()
    reset = _reset_peak_rss()
    baseline = _current_rss()
    indices, elapsed = _run(method, learner, reference, n_select, config, 'cpu')
    peak = max(0, _peak_rss() - baseline)
    times = [elapsed]
    while sum(times) < config.min_time_s and len(times) < config.max_repeats:
        times.append(_run(method, learner, reference, n_select, config, 'cpu')[1])
    return {'method': method, 'size': size, 'n_select': n_select, 'times_s': times,
            'peak_bytes': peak, 'baseline_bytes': baseline, 'peak_reset': reset,
            'threads': torch.get_num_threads(), 'digest': _indices_digest(indices),
            'loadavg': os.getloadavg()}


def measure_in_subprocess(method: str, size: int, config: ScalingConfig) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process, so that the peak belongs to this call."""
    spec = json.dumps({'method': method, 'size': size, 'config': asdict(config)})
    env = {**os.environ, 'OMP_NUM_THREADS': str(config.threads)}
    done = subprocess.run(
        [sys.executable, '-m', 'benchmarks.selection_scaling', '--child', spec],
        cwd=report.REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=config.child_timeout_s)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_CHILD_PREFIX):
            return json.loads(line[len(_CHILD_PREFIX):])
    raise RuntimeError(f'the measurement of {method} at B={size} failed (exit status '
                       f'{done.returncode}):\n{done.stderr[-4000:]}')


def _child(spec: str) -> None:
    payload = json.loads(spec)
    config = _config_from_dict(payload['config'])
    result = measure(payload['method'], payload['size'], config)
    print(_CHILD_PREFIX + json.dumps(result), flush=True)


def _config_from_dict(values: dict[str, Any]) -> ScalingConfig:
    tuples = {key: tuple(values[key]) for key in ('sizes', 'gpu_sizes', 'methods')}
    return ScalingConfig(**{**values, **tuples})


def measure_cuda(method: str, size: int, config: ScalingConfig, device: str = 'cuda'
                 ) -> dict[str, Any]:
    """Times and peak device memory of one method at one size on a CUDA device.

    The peak is ``torch.cuda.max_memory_allocated`` above what was allocated before the
    call (the embeddings). Out of memory is recorded, not raised.
    """
    n_select = sub_batch_size(size, config.filter_ratio)
    learner, reference = make_embeddings(size, config.dim, seed=config.seed, device=device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {'method': method, 'size': size, 'n_select': n_select}
    try:
        indices, elapsed = _run(method, learner, reference, n_select, config, device)
        out['peak_bytes'] = torch.cuda.max_memory_allocated(device) - baseline
        times = [elapsed]
        while sum(times) < config.min_time_s and len(times) < config.max_repeats:
            times.append(_run(method, learner, reference, n_select, config, device)[1])
    except torch.cuda.OutOfMemoryError:
        out.update(oom=True, times_s=[], peak_bytes=None, digest=None)
        return out
    finally:
        del learner, reference
        gc.collect()
        torch.cuda.empty_cache()
    out.update(oom=False, times_s=times, digest=_indices_digest(indices),
               baseline_bytes=baseline)
    return out


# Analysis ------------------------------------------------------------------------------


def fit_memory(sizes: list[int], peaks: list[float], *, filter_ratio: float,
               n_chunks: int) -> dict[str, Any]:
    """How a method's peak memory grows with ``B``.

    With ``b = B (1 - f)`` for a fixed filter ratio ``f``, ``B b`` and ``B^2`` are both
    quadratic in ``B``: a log-log slope alone cannot tell them apart. So the peaks are also
    given in units of one float32 ``B x B`` matrix (what the materialised form must hold)
    and of one float32 ``B x b`` block, and of one ``B x c`` chunk block, ``c = b /
    n_chunks`` (what the incremental form computes at a time).

    Args:
        sizes (list[int]): Super-batch sizes ``B``.
        peaks (list[float]): Peak bytes at each size.
        filter_ratio (float): ``f``.
        n_chunks (int): Chunks of the sampler.

    Returns:
        dict: ``slope`` (log-log over all sizes), ``slope_top3`` (over the three largest),
        and per size ``per_BxB``, ``per_Bxb`` and ``per_Bxc`` (peak over that many float32s).
    """
    pairs = sorted((s, p) for s, p in zip(sizes, peaks, strict=True) if p is not None)
    out: dict[str, Any] = {
        'slope': stats.loglog_slope([s for s, _ in pairs], [p for _, p in pairs]),
        'slope_top3': stats.loglog_slope([s for s, _ in pairs[-3:]], [p for _, p in pairs[-3:]]),
        'per_size': [],
    }
    for size, peak in pairs:
        b = sub_batch_size(size, filter_ratio)
        c = b / min(n_chunks, b)
        out['per_size'].append({
            'size': size, 'peak_bytes': peak,
            'per_BxB': peak / (_FLOAT32_BYTES * size * size),
            'per_Bxb': peak / (_FLOAT32_BYTES * size * b),
            'per_Bxc': peak / (_FLOAT32_BYTES * size * c),
        })
    return out


def memory_verdict(fits: dict[str, Any], tolerance: float = 1.25) -> dict[str, Any]:
    """Whether the incremental peak grows as ``B b`` and the materialised one as ``B^2``.

    At a fixed filter ratio both are quadratic in ``B``, so the test is on the constants:
    between the two largest sizes the incremental peak per float32 ``B x b`` block, and the
    materialised peak per float32 ``B x B`` matrix, must not grow by more than
    ``tolerance``; and the incremental peak must stay below one ``B x B`` matrix.

    Args:
        fits (dict): :func:`fit_memory` of each method.
        tolerance (float): Largest growth of the per-block figure allowed.

    Returns:
        dict: ``incremental_per_Bxb`` and ``materialised_per_BxB`` at the two largest sizes,
        and ``memory_met``.
    """
    incremental = fits.get('incremental', {}).get('per_size', [])[-2:]
    materialised = fits.get('materialised', {}).get('per_size', [])[-2:]
    if len(incremental) < 2 or len(materialised) < 2:
        return {'memory_met': None}
    per_bxb = [p['per_Bxb'] for p in incremental]
    per_bxb_mat = [p['per_BxB'] for p in materialised]
    met = (per_bxb[1] <= tolerance * per_bxb[0] and per_bxb_mat[1] <= tolerance * per_bxb_mat[0]
           and incremental[1]['per_BxB'] < 1.0)
    return {'incremental_per_Bxb': per_bxb, 'materialised_per_BxB': per_bxb_mat,
            'memory_met': met}


def _agreement(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether both methods selected the same indices at each size (same generator seed)."""
    by_size: dict[int, dict[str, set[str]]] = {}
    for run in runs:
        if run.get('digest'):
            by_size.setdefault(run['size'], {}).setdefault(run['method'], set()).add(
                run['digest'])
    return {str(size): len(methods) == 2 and len(set.union(*methods.values())) == 1
            for size, methods in sorted(by_size.items())}


def summarise(runs: list[dict[str, Any]], config: ScalingConfig) -> dict[str, Any]:
    """Medians per method and size, speed ratios per size, and the memory fits."""
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = table.setdefault(run['method'], {}).setdefault(
            str(run['size']), {'times_s': [], 'peaks_bytes': [], 'oom': False})
        entry['times_s'].extend(run['times_s'])
        if run.get('peak_bytes') is not None:
            entry['peaks_bytes'].append(run['peak_bytes'])
        entry['oom'] = entry['oom'] or bool(run.get('oom'))
    for entries in table.values():
        for entry in entries.values():
            entry['median_s'] = statistics.median(entry['times_s']) if entry['times_s'] else None
            entry['median_peak_bytes'] = (statistics.median(entry['peaks_bytes'])
                                          if entry['peaks_bytes'] else None)
    sizes = sorted({run['size'] for run in runs})
    ratios = {}
    for size in sizes:
        mat = table.get('materialised', {}).get(str(size), {}).get('median_s')
        inc = table.get('incremental', {}).get(str(size), {}).get('median_s')
        ratios[str(size)] = mat / inc if mat and inc else None
    paired = {}
    for size in sizes:
        per_round: dict[int, dict[str, float]] = {}
        for run in runs:
            if run['size'] == size and run['times_s']:
                per_round.setdefault(run['round'], {})[run['method']] = statistics.median(
                    run['times_s'])
        values = [r['materialised'] / r['incremental'] for r in per_round.values()
                  if 'materialised' in r and 'incremental' in r]
        paired[str(size)] = values
    memory = {}
    for method, entries in table.items():
        keyed = [(int(s), e['median_peak_bytes']) for s, e in entries.items()
                 if e['median_peak_bytes'] is not None]
        memory[method] = fit_memory([s for s, _ in keyed], [p for _, p in keyed],
                                    filter_ratio=config.filter_ratio, n_chunks=config.n_chunks)
    largest = str(max(sizes)) if sizes else None
    return {'table': table, 'speed_ratio': ratios, 'paired_speed_ratios': paired,
            'memory_fit': memory, 'same_indices': _agreement(runs),
            'largest_size': largest,
            'speed_ratio_at_largest': ratios.get(largest) if largest else None}


# Running it ---------------------------------------------------------------------------


def _print_table(summary: dict[str, Any], config: ScalingConfig, title: str) -> None:
    mib = 1 << 20
    print(f'\n{title}')
    print(f'{"B":>7} {"b":>6} {"materialised s":>15} {"incremental s":>14} {"speed-up":>9} '
          f'{"mat. peak MiB":>14} {"inc. peak MiB":>14} {"mem. ratio":>10} {"same idx":>9}')
    for size_key, ratio in summary['speed_ratio'].items():
        size = int(size_key)
        mat = summary['table'].get('materialised', {}).get(size_key, {})
        inc = summary['table'].get('incremental', {}).get(size_key, {})

        def seconds(entry: dict[str, Any]) -> str:
            if entry.get('oom'):
                return 'OOM'
            value = entry.get('median_s')
            return f'{value:.4f}' if value is not None else '-'

        def mebibytes(entry: dict[str, Any]) -> str:
            value = entry.get('median_peak_bytes')
            return f'{value / mib:.1f}' if value is not None else '-'

        mat_peak, inc_peak = mat.get('median_peak_bytes'), inc.get('median_peak_bytes')
        memory_ratio = f'{mat_peak / inc_peak:.1f}x' if mat_peak and inc_peak else '-'
        speed = f'{ratio:.2f}x' if ratio else '-'
        print(f'{size:>7} {sub_batch_size(size, config.filter_ratio):>6} {seconds(mat):>15} '
              f'{seconds(inc):>14} {speed:>9} {mebibytes(mat):>14} {mebibytes(inc):>14} '
              f'{memory_ratio:>10} {str(summary["same_indices"].get(size_key, "-")):>9}')
    for method, fit in summary['memory_fit'].items():
        slope = f'{fit["slope"]:.2f}' if fit['slope'] is not None else '-'
        top = f'{fit["slope_top3"]:.2f}' if fit['slope_top3'] is not None else '-'
        units = ', '.join(f'{p["size"]}: {p["per_BxB"]:.2f} BxB / {p["per_Bxb"]:.2f} Bxb / '
                          f'{p["per_Bxc"]:.1f} Bxc' for p in fit['per_size'][-2:])
        print(f'  {method}: peak memory ~ B^{slope} (B^{top} over the three largest); '
              f'peak in float32 blocks at the largest sizes: {units}')


def _plan(config: ScalingConfig, sizes: Sequence[int]) -> list[tuple[int, int, str]]:
    """``(round, size, method)`` of every measurement: each size once per round, the order of
    the methods alternating between rounds."""
    return [(round_index, size, method) for round_index in range(config.rounds)
            for size in sizes
            for method in (config.methods[::-1] if round_index % 2 else config.methods)]


def run_cpu(config: ScalingConfig) -> list[dict[str, Any]]:
    """Every size and method once per round, each in a fresh process, interleaved."""
    runs = []
    for round_index, size, method in tqdm(_plan(config, config.sizes), desc='cpu measurements',
                                          unit='process'):
        result = measure_in_subprocess(method, size, config)
        result['round'] = round_index
        runs.append(result)
        tqdm.write(f'  round {round_index + 1}/{config.rounds} B={size:>6} {method:>12}: '
                   f'{statistics.median(result["times_s"]):8.4f} s (x{len(result["times_s"])})'
                   f', peak +{result["peak_bytes"] / (1 << 20):9.1f} MiB, load '
                   f'{result["loadavg"][0]:.1f}')
    return runs


def run_gpu(config: ScalingConfig) -> dict[str, Any]:
    """The same on CUDA, in this process; skipped cleanly where CUDA is missing."""
    if not torch.cuda.is_available():
        print('--gpu: CUDA is not available here; the GPU measurements are skipped', flush=True)
        return {'available': False}
    device = 'cuda'
    warm = make_embeddings(64, config.dim, seed=config.seed + 7, device=device)
    for method in config.methods:
        _run(method, *warm, sub_batch_size(64, config.filter_ratio), config, device)
    del warm
    runs = []
    for round_index, size, method in tqdm(_plan(config, config.gpu_sizes),
                                          desc='cuda measurements', unit='call'):
        result = measure_cuda(method, size, config, device)
        result['round'] = round_index
        runs.append(result)
        text = ('out of memory' if result['oom'] else
                f'{statistics.median(result["times_s"]):8.5f} s, peak '
                f'+{result["peak_bytes"] / (1 << 20):9.1f} MiB')
        tqdm.write(f'  cuda round {round_index + 1}/{config.rounds} B={size:>6} '
                   f'{method:>12}: {text}')
    summary = summarise(runs, replace(config, sizes=config.gpu_sizes))
    return {'available': True, 'device': torch.cuda.get_device_name(), 'runs': runs,
            'summary': summary}


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = report.pyplot()
    sections = report.device_sections(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {'cpu': '-', 'cuda': '--'}
    markers = {'materialised': 'o', 'incremental': 's'}
    config = results['config']
    for label, summary in sections:
        for method, entries in summary['table'].items():
            points = sorted((int(s), e) for s, e in entries.items())
            timed = [(s, e['median_s']) for s, e in points if e['median_s']]
            peaks = [(s, e['median_peak_bytes'] / (1 << 20)) for s, e in points
                     if e['median_peak_bytes']]
            if timed:
                axes[0].plot(*zip(*timed, strict=True), styles[label], marker=markers[method],
                             label=f'{method} ({label})')
            if peaks:
                axes[1].plot(*zip(*peaks, strict=True), styles[label], marker=markers[method],
                             label=f'{method} ({label})')
    sizes = sorted({int(s) for _, summary in sections for s in summary['speed_ratio']})
    if sizes:
        mib = 1 << 20
        axes[1].plot(sizes, [_FLOAT32_BYTES * s * s / mib for s in sizes], ':', color='gray',
                     label='one float32 B x B')
        axes[1].plot(sizes, [_FLOAT32_BYTES * s * sub_batch_size(s, config['filter_ratio']) / mib
                             for s in sizes], '-.', color='gray', label='one float32 B x b')
    for ax, ylabel, title in ((axes[0], 'seconds per selection', 'time'),
                              (axes[1], 'peak memory above baseline (MiB)', 'peak memory')):
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('super-batch size B')
        ax.set_ylabel(ylabel)
        ax.set_title(f'joint selection {title} (d={config["dim"]}, '
                     f'f={config["filter_ratio"]}, {config["n_chunks"]} chunks)', fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which='both', alpha=0.3)
    report.save_figure(fig, path)


def _print_verdicts(results: dict[str, Any]) -> None:
    target, run = results['targets'], results['run']
    ratio = target['speed_ratio_at_largest']
    if target['memory_met'] is not None:
        print(f'\npeak per float32 B x b block, incremental, two largest sizes: '
              f'{target["incremental_per_Bxb"][0]:.2f}, {target["incremental_per_Bxb"][1]:.2f}; '
              f'per float32 B x B matrix, materialised: {target["materialised_per_BxB"][0]:.2f}, '
              f'{target["materialised_per_BxB"][1]:.2f} (grows as B b against B^2: '
              f'{"met" if target["memory_met"] else "NOT met"})', flush=True)
    print(f'incremental / materialised speed at B={results["cpu"]["summary"]["largest_size"]}: '
          f'{ratio:.2f}x (target >= 5x: {"met" if target["speed_met"] else "NOT met"}); load '
          f'{run["loadavg_end"][0]:.1f}; {run["wall_s"]:.0f} s in all' if ratio
          else 'no speed ratio', flush=True)


def main(config: ScalingConfig, out: Path, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure every size and method; write ``selection_scaling.json`` and ``.png`` to ``out``."""
    run = report.start_run('selection_scaling', argv)
    results: dict[str, Any] = {
        'config': asdict(config),
        'memory_method': 'peak RSS of a fresh process (ru_maxrss after resetting the '
                         'high-water mark via /proc/self/clear_refs) minus its RSS just '
                         'before the call; CUDA: max_memory_allocated minus allocated before',
    }
    print(f'{os.cpu_count()} cores, load {run["loadavg_start"][0]:.1f}; '
          f'd={config.dim}, filter ratio {config.filter_ratio}, {config.n_chunks} chunks, '
          f'float32, {config.threads} torch thread(s) per process; sizes {list(config.sizes)}; '
          f'{config.rounds} interleaved rounds', flush=True)
    runs = run_cpu(config)
    summary = summarise(runs, config)
    results['cpu'] = {'runs': runs, 'summary': summary}
    _print_table(summary, config, f'CPU, float32, {config.threads} thread(s), medians:')
    if config.gpu:
        results['gpu'] = run_gpu(config)
        if results['gpu']['available']:
            _print_table(results['gpu']['summary'], replace(config, sizes=config.gpu_sizes),
                         f'CUDA ({results["gpu"]["device"]}), float32, medians:')
    ratio = summary['speed_ratio_at_largest']
    results['targets'] = {
        'speed_ratio_at_largest_min': 5.0, 'speed_ratio_at_largest': ratio,
        'speed_met': ratio is not None and ratio >= 5.0,
        **memory_verdict(summary['memory_fit']),
    }
    results['run'] = report.finish_run(run)
    _print_verdicts(results)
    report.write_report(results, *report.report_paths(out, 'selection_scaling', config.quick),
                        _plot)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = report.benchmark_parser('selection_scaling', __doc__.split('\n\n')[0], threads=1,
                              quick='B from 256 to 2048, one round')
    parser.add_argument('--gpu', action='store_true', help='also measure on CUDA')
    parser.add_argument('--sizes', type=int, nargs='+', help='super-batch sizes B (CPU)')
    parser.add_argument('--gpu-sizes', type=int, nargs='+', help='super-batch sizes B (CUDA)')
    parser.add_argument('--rounds', type=int, help='interleaved rounds')
    # One measurement in a fresh process (what measure_in_subprocess starts).
    parser.add_argument('--child', help=argparse.SUPPRESS)
    return parser


def _config(args: argparse.Namespace) -> ScalingConfig:
    config = ScalingConfig(gpu=args.gpu)
    if args.quick:
        config = replace(config, sizes=(256, 512, 1024, 2048), gpu_sizes=(1024, 4096, 16384),
                         rounds=1, min_time_s=0.2, quick=True)
    overrides = {'sizes': tuple(args.sizes) if args.sizes else None,
                 'gpu_sizes': tuple(args.gpu_sizes) if args.gpu_sizes else None,
                 'rounds': args.rounds, 'threads': args.threads}
    return replace(config, **{key: value for key, value in overrides.items()
                              if value is not None})


def parse_args(argv: Sequence[str] | None = None) -> ScalingConfig:
    """The configuration the command line asks for."""
    return _config(_parser().parse_args(argv))


def cli(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.selection_scaling``."""
    args = _parser().parse_args(argv)
    if args.child:
        _child(args.child)
        return
    main(_config(args), args.out, argv)


if __name__ == '__main__':
    cli()

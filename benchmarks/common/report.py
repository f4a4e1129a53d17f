"""The report of a benchmark: its command line, its run record, its JSON and its PNG.

Every benchmark takes the arguments of :func:`benchmark_parser` (``--quick``, ``--out``,
and where they apply ``--seeds`` and ``--threads``), starts a run record with
:func:`start_run` (platform, versions, cores, threads, load average, the command line),
closes it with :func:`finish_run` (load average at the end, seconds in all) and writes
``<name>.json`` (``<name>_quick.json`` for ``--quick``) with a matplotlib PNG beside it
(:func:`write_report`). Paths inside the repository are written relative to it, so
committed results do not name the machine that produced them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    'REPO_ROOT',
    'RESULTS_ROOT',
    'benchmark_parser',
    'device_sections',
    'finish_run',
    'pyplot',
    'repo_relative',
    'report_paths',
    'save_figure',
    'start_run',
    'write_record',
    'write_report',
]

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_ROOT = REPO_ROOT / 'benchmarks' / 'results'
_VERSIONED = ('torch', 'numpy', 'mosaicml-streaming', 'jest-stream', 'scipy')


def repo_relative(value: Any) -> Any:
    """``value`` with every string that is a path under the repository made relative to it
    (recursively through dicts, lists and tuples)."""
    if isinstance(value, str):
        root = str(REPO_ROOT)
        if value == root:
            return '.'
        if value.startswith(root + os.sep):
            return value[len(root) + 1:]
        return value
    if isinstance(value, dict):
        return {key: repo_relative(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [repo_relative(item) for item in value]
    if isinstance(value, Path):
        return repo_relative(str(value))
    return value


def write_record(path: Path, record: dict[str, Any], *, indent: int = 1) -> None:
    """Writes ``record`` as JSON at ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(repo_relative(record), indent=indent) + '\n')
    os.replace(tmp, path)


def benchmark_parser(name: str, description: str, *, quick: str,
                     seeds: Sequence[int] | None = None, threads: int | str | None = None
                     ) -> argparse.ArgumentParser:
    """The command line every benchmark starts from.

    Args:
        name (str): The benchmark's module name (``python -m benchmarks.<name>``); its
            results go to ``benchmarks/results/<name>/`` by default.
        description (str): What it measures, for ``--help``.
        quick (str): What ``--quick`` runs, for ``--help``.
        seeds (Sequence[int], optional): Default seeds; None: no ``--seeds`` argument.
        threads (int | str, optional): Default torch threads (or its description); None: no
            ``--threads`` argument.

    Returns:
        argparse.ArgumentParser: With ``--quick``, ``--out`` (alias ``--out-dir``), and
        ``--seeds`` and ``--threads`` where asked for.
    """
    parser = argparse.ArgumentParser(prog=f'python -m benchmarks.{name}',
                                     description=description)
    parser.add_argument('--quick', action='store_true', help=quick)
    parser.add_argument('--out', '--out-dir', dest='out', type=Path, default=RESULTS_ROOT / name,
                        help=f'folder of the JSON and the PNG (default: '
                             f'benchmarks/results/{name}/)')
    if seeds is not None:
        parser.add_argument('--seeds', type=int, nargs='+', default=None,
                            help=f'seeds (default: {" ".join(map(str, seeds))})')
    if threads is not None:
        parser.add_argument('--threads', type=int, default=None,
                            help=f'torch intra-op threads (default {threads})')
    return parser


def report_paths(out: Path, name: str, quick: bool) -> tuple[Path, Path]:
    """``(json, png)`` paths of a benchmark's report in ``out``."""
    stem = f'{name}_quick' if quick else name
    return out / f'{stem}.json', out / f'{stem}.png'


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def start_run(name: str, argv: Sequence[str] | None = None, *,
              threads: int | None = None) -> dict[str, Any]:
    """The run record of a benchmark that starts now; sets torch's threads first.

    Args:
        name (str): The benchmark's module name.
        argv (Sequence[str], optional): Its arguments (``sys.argv[1:]`` by default).
        threads (int, optional): torch intra-op threads of this process; torch's default
            when None.

    Returns:
        dict: ``benchmark``, ``command``, ``platform``, ``machine``, ``python``,
        ``versions``, ``cores``, ``threads``, ``loadavg_start``, ``started_at``; the start
        time is kept under ``_started`` (removed by :func:`finish_run`).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        'benchmark': name,
        'command': shlex.join(['python', '-m', f'benchmarks.{name}', *args]),
        'platform': platform.platform(), 'machine': platform.machine(),
        'python': platform.python_version(),
        'versions': {package: _version(package) for package in _VERSIONED},
        'cores': os.cpu_count(), 'threads': torch.get_num_threads(),
        'loadavg_start': list(os.getloadavg()),
        'started_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        '_started': time.perf_counter(),
    }


def finish_run(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with ``loadavg_end`` and ``wall_s`` (seconds since :func:`start_run`)."""
    done = {key: value for key, value in run.items() if key != '_started'}
    done['loadavg_end'] = list(os.getloadavg())
    done['wall_s'] = time.perf_counter() - run['_started']
    return done


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def device_sections(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[('cpu', summary), ('cuda', summary)]`` of a record measured on the CPU and, where
    CUDA was there (``results['gpu']['available']``), on the GPU."""
    sections = [('cpu', results['cpu']['summary'])]
    if results.get('gpu', {}).get('available'):
        sections.append(('cuda', results['gpu']['summary']))
    return sections


def save_figure(fig: Any, path: Path, *, dpi: int = 120) -> None:
    """Lay out, save and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write_report(record: dict[str, Any], json_path: Path, png_path: Path | None,
                 plot: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """Write the JSON, then draw the PNG beside it from the same record, and say where.

    Args:
        record (dict): What the JSON holds (its ``run`` is the run record).
        json_path (Path): Where the JSON goes (its folder is created).
        png_path (Path, optional): Where the PNG goes.
        plot (Callable, optional): ``plot(record, png_path)``.
    """
    write_record(json_path, record)
    written = [json_path]
    if plot is not None and png_path is not None:
        plot(record, png_path)
        written.append(png_path)
    print('wrote ' + ' and '.join(str(repo_relative(str(p))) for p in written), flush=True)

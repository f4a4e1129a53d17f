"""Cost of the selection scopes over torch.distributed: bytes all-gathered and time per step.

Runs ``--world`` gloo processes on the CPU, each with a ``SelectiveLoader`` over its share of
a map-style dataset, once with ``selection_scope='rank'`` and once with ``'global'``, for
per-example (classification) scoring and for two-tower sigmoid scoring, and reports per
step the bytes this rank all-gathered (``comm_bytes``), the seconds spent in collectives
(``comm_s``) and the whole step time, measured side by side in one run.

    python -m benchmarks.distributed             # two processes, under a minute on two cores
    python -m benchmarks.distributed --quick     # 5 timed steps
    python -m benchmarks.distributed --world 4 --super-batch 1280 --steps 50

Results go to ``benchmarks/results/distributed/`` (``distributed.json`` and
``distributed.png``; ``distributed_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from benchmarks.common import report
from jest_stream import ClassificationScorer, ContrastiveScorer, SelectiveLoader

__all__ = ['main']

DIM, CLASSES, TOKENS = 32, 10, 64
TASKS = ('classification', 'contrastive')
SCOPES = ('rank', 'global')


def _random_init(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


class _SyntheticTwoTower(nn.Module):
    """A linear image tower and an embedding text tower over synthetic features."""

    def __init__(self, seed: int, width: int = 64) -> None:
        super().__init__()
        self.image = nn.Linear(DIM, width)
        self.text = nn.Embedding(TOKENS, width)
        _random_init(self, seed)

    def forward(self, images, tokens):
        return (nn.functional.normalize(self.image(images), dim=-1),
                nn.functional.normalize(self.text(tokens), dim=-1), 10.0, -10.0)


def _loader(task: str, scope: str, data: dict[str, torch.Tensor], args: argparse.Namespace
            ) -> SelectiveLoader:
    if task == 'classification':
        dataset = TensorDataset(data['x'], data['y'])
        scorer: Any = ClassificationScorer(_random_init(nn.Linear(DIM, CLASSES), 0),
                                           _random_init(nn.Linear(DIM, CLASSES), 1),
                                           input_key=0, target_key=1)
    else:
        dataset = TensorDataset(data['x'], data['tokens'])
        scorer = ContrastiveScorer(_SyntheticTwoTower(0), _SyntheticTwoTower(1), image_key=0,
                                   text_key=1)
    return SelectiveLoader(dataset, batch_size=args.super_batch // 5, filter_ratio=0.8,
                           scorer=scorer, selection_scope=scope, seed=1)


def _measure(loader: SelectiveLoader, steps: int) -> dict[str, float]:
    times, comm_bytes, comm_s = [], [], []
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        now = time.perf_counter()
        times.append(now - start)
        start = now
        comm_bytes.append(loader.metrics.get('comm_bytes', 0))
        comm_s.append(loader.metrics.get('comm_s', 0.0))
        if i + 1 == steps:
            break
    # The first step includes the loader's start-up.
    return {'step_s_median': statistics.median(times[1:]),
            'comm_bytes_per_step': statistics.median(comm_bytes[1:]),
            'comm_s_median': statistics.median(comm_s[1:])}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(0)
    n = args.super_batch * world * (args.steps + 1)
    data = {'x': torch.randn(n, DIM, generator=generator),
            'y': torch.randint(0, CLASSES, (n,), generator=generator),
            'tokens': torch.randint(0, TOKENS, (n,), generator=generator)}
    results = []
    plan = [(task, scope) for task in TASKS for scope in SCOPES]
    for task, scope in tqdm(plan, desc='scopes', unit='run', disable=rank != 0):
        results.append({'task': task, 'scope': scope,
                        **_measure(_loader(task, scope, data, args), args.steps)})
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    # Not destroy_process_group(): torch 2.7's gloo group can deadlock in its destructor right
    # after a collective (it joins its threads holding the GIL that one of them still needs).
    os._exit(0)


def _plot(record: dict[str, Any], path: Path) -> None:
    plt = report.pyplot()
    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(TASKS))
    for offset, scope in ((-0.2, 'rank'), (0.2, 'global')):
        rows = [next(r for r in record['results'] if r['task'] == t and r['scope'] == scope)
                for t in TASKS]
        step = np.array([1e3 * r['step_s_median'] for r in rows])
        comm = np.array([1e3 * r['comm_s_median'] for r in rows])
        time_ax.bar(x + offset, step - comm, 0.4, label=f'{scope}: rest of the step')
        time_ax.bar(x + offset, comm, 0.4, bottom=step - comm, label=f'{scope}: collectives')
        bytes_ax.bar(x + offset, [r['comm_bytes_per_step'] / 1024 for r in rows], 0.4,
                     label=scope)
    for ax, ylabel in ((time_ax, 'ms per step (median)'), (bytes_ax, 'KiB all-gathered per step')):
        ax.set_xticks(x, TASKS)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis='y')
        ax.legend(fontsize=8)
    fig.suptitle(f'selection scopes: {record["world"]} gloo processes, '
                 f'B={record["super_batch_per_rank"]} '
                 f'per rank, filter ratio {record["filter_ratio"]}', fontsize=9)
    report.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both scopes in ``--world`` processes; write the JSON and the PNG."""
    parser = report.benchmark_parser('distributed', __doc__.split('\n\n')[0],
                              quick='5 timed steps per scope and task')
    parser.add_argument('--world', type=int, default=2)
    parser.add_argument('--super-batch', type=int, default=640, help='B per rank')
    parser.add_argument('--steps', type=int, default=None, help='steps per run (default 20)')
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 20)
    run = report.start_run('distributed', argv)
    json_path, png_path = report.report_paths(args.out, 'distributed', args.quick)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    partial = json_path.with_suffix('.partial.json')
    mp.start_processes(_worker, args=(args.world, port, args, partial), nprocs=args.world,
                       start_method='spawn')
    results = json.loads(partial.read_text())
    partial.unlink()
    record = {'world': args.world, 'backend': 'gloo', 'super_batch_per_rank': args.super_batch,
              'filter_ratio': 0.8, 'steps': args.steps, 'quick': bool(args.quick),
              'results': results, 'run': report.finish_run(run)}
    print(f'{"task":<15}{"scope":<8}{"step ms":>9}{"comm ms":>9}{"KiB gathered/step":>19}')
    for r in results:
        print(f'{r["task"]:<15}{r["scope"]:<8}{r["step_s_median"] * 1e3:>9.1f}'
              f'{r["comm_s_median"] * 1e3:>9.1f}{r["comm_bytes_per_step"] / 1024:>19.1f}')
    for task in TASKS:
        rank, glob = (next(r for r in results if r['task'] == task and r['scope'] == s)
                      for s in SCOPES)
        print(f'{task}: global/rank step time {glob["step_s_median"] / rank["step_s_median"]:.2f}')
    report.write_report(record, json_path, png_path, _plot)


if __name__ == '__main__':
    main()

"""Cost of the selection scopes over torch.distributed: bytes all-gathered and time per step.

Runs two gloo processes on the CPU, each with a ``SelectiveLoader`` over its share of a
map-style dataset, once with ``selection_scope='rank'`` and once with ``'global'``, for
per-example (classification) scoring and for two-tower sigmoid scoring, and reports per
step the bytes this rank all-gathered (``comm_bytes``), the seconds spent in collectives
(``comm_s``) and the whole step time, measured side by side in one run.

    python -m benchmarks.distributed            # about a minute on two CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from jest_stream import ClassificationScorer, ContrastiveScorer, SelectiveLoader

__all__ = ['main']

DIM, CLASSES, TOKENS = 32, 10, 64


class TwoTower(nn.Module):
    def __init__(self, seed: int, width: int = 64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image = nn.Linear(DIM, width)
        self.text = nn.Embedding(TOKENS, width)
        for param in self.parameters():
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)

    def forward(self, images, tokens):
        return (nn.functional.normalize(self.image(images), dim=-1),
                nn.functional.normalize(self.text(tokens), dim=-1), 10.0, -10.0)


def _classifier(seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(0)
    n = args.super_batch * world * (args.steps + 1)
    x = torch.randn(n, DIM, generator=generator)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    tokens = torch.randint(0, TOKENS, (n,), generator=generator)
    results = []
    for task in ('classification', 'contrastive'):
        for scope in ('rank', 'global'):
            if task == 'classification':
                dataset = TensorDataset(x, y)
                scorer = ClassificationScorer(_classifier(0), _classifier(1), input_key=0,
                                              target_key=1)
            else:
                dataset = TensorDataset(x, tokens)
                scorer = ContrastiveScorer(TwoTower(0), TwoTower(1), image_key=0, text_key=1)
            loader = SelectiveLoader(dataset, batch_size=args.super_batch // 5,
                                     filter_ratio=0.8, scorer=scorer, selection_scope=scope,
                                     seed=1)
            steps, comm_bytes, comm_s = [], [], []
            start = time.perf_counter()
            for i, _ in enumerate(loader):
                now = time.perf_counter()
                steps.append(now - start)
                start = now
                comm_bytes.append(loader.metrics.get('comm_bytes', 0))
                comm_s.append(loader.metrics.get('comm_s', 0.0))
                if i + 1 == args.steps:
                    break
            results.append({'task': task, 'scope': scope,
                            'step_s_median': statistics.median(steps[1:]),
                            'comm_bytes_per_step': statistics.median(comm_bytes[1:]),
                            'comm_s_median': statistics.median(comm_s[1:])})
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    # Not destroy_process_group(): torch 2.7's gloo group can deadlock in its destructor right
    # after a collective (it joins its threads holding the GIL that one of them still needs).
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--world', type=int, default=2)
    parser.add_argument('--super-batch', type=int, default=640, help='B per rank')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--out-dir', type=Path, default=Path('benchmarks/results/distributed'))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    partial = args.out_dir / 'distributed.partial.json'
    mp.start_processes(_worker, args=(args.world, port, args, partial), nprocs=args.world,
                       start_method='spawn')
    results = json.loads(partial.read_text())
    partial.unlink()
    record = {'benchmark': 'distributed', 'world': args.world, 'backend': 'gloo',
              'super_batch_per_rank': args.super_batch, 'filter_ratio': 0.8,
              'steps': args.steps, 'loadavg': os.getloadavg(), 'results': results}
    (args.out_dir / 'distributed.json').write_text(json.dumps(record, indent=1))
    print(f'{"task":<15}{"scope":<8}{"step ms":>9}{"comm ms":>9}{"KiB gathered/step":>19}')
    for r in results:
        print(f'{r["task"]:<15}{r["scope"]:<8}{r["step_s_median"] * 1e3:>9.1f}'
              f'{r["comm_s_median"] * 1e3:>9.1f}{r["comm_bytes_per_step"] / 1024:>19.1f}')
    for task in ('classification', 'contrastive'):
        rank, glob = (next(r for r in results if r['task'] == task and r['scope'] == s)
                      for s in ('rank', 'global'))
        print(f'{task}: global/rank step time {glob["step_s_median"] / rank["step_s_median"]:.2f}')


if __name__ == '__main__':
    main()

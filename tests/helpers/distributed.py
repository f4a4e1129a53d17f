"""Spawning the ranks of the distributed tests, and their entry points (gloo on the CPU)."""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from helpers.data import features_and_labels
from helpers.loops import sub_batch_ids
from helpers.models import tiny_classifier
from jest_stream import ClassificationScorer, SelectiveLoader

#: Seconds the spawned ranks of one test may take.
TIMEOUT_S = 240


def rendezvous(folder: Path) -> str:
    """A new file in ``folder`` for the ranks to meet at (torch's file store).

    A file, not a free TCP port: a port found free can be taken by another process (another
    test worker's ranks) before rank 0 listens on it.
    """
    return str(folder / f'rendezvous-{uuid.uuid4().hex}')


def spawn(fn, world: int, *args) -> None:
    """Runs ``fn(rank, world, *args)`` in ``world`` processes; fails (never hangs) on timeout."""
    context = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False,
                                 start_method='spawn')
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f'distributed workers did not finish within {TIMEOUT_S} s')


@contextmanager
def process_group(rank: int, world: int, meeting: str) -> Iterator[None]:
    """A gloo group for the body; the process ends when the body does (exit code 1 on error).

    The group is never destroyed: torch 2.7's gloo process group can deadlock in its
    destructor, which joins its worker threads while holding the GIL when one of them still
    needs the GIL to free the tensors of a collective that has just finished. The ranks meet
    at a barrier instead, run the exit handlers (streaming's shared-memory clean-up among
    them) and leave with ``os._exit``.
    """
    # The launcher's environment (one node): streaming and Composer read the layout from it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), NODE_RANK='0')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{meeting}', rank=rank,
                            world_size=world)
    code = 0
    try:
        yield
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def map_dataset(n: int) -> TensorDataset:
    x, y = features_and_labels(n)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def make_loader(dataset, *, world: int, global_super: int, global_batch: int, scope: str,
                method: str = 'joint', **kwargs) -> SelectiveLoader:
    scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key=0,
                                  target_key=1)
    return SelectiveLoader(dataset, batch_size=global_batch // world,
                           super_batch_size=global_super // world, scorer=scorer,
                           method=method, n_chunks=3, seed=9, selection_scope=scope, **kwargs)


def run_steps(loader: SelectiveLoader, steps: int, save_at: int | None = None
              ) -> tuple[list[list[int]], dict | None]:
    """Sample ids of ``steps`` sub-batches, and the loader state after ``save_at`` of them."""
    states = {}

    def save(taken: int) -> None:
        if taken == save_at:
            states['saved'] = loader.state_dict()

    return sub_batch_ids(loader, steps, 2, after_step=save), states.get('saved')


def selection_worker(rank: int, world: int, meeting: str, out_dir: Path, scope: str,
                     steps: int, resume_at: int | None, count_flops: bool = False) -> None:
    """Runs ``steps`` steps (saving the loader state after ``resume_at``) and writes ids."""
    with process_group(rank, world, meeting):
        loader = make_loader(map_dataset(130), world=world, global_super=40, global_batch=8,
                             scope=scope, count_flops=count_flops)
        ids, state = run_steps(loader, steps, save_at=resume_at)
        record = {'ids': ids, 'state': state, 'metrics': loader.metrics, 'len': len(loader)}
        (out_dir / f'rank{rank}.json').write_text(json.dumps(record))


def streaming_worker(rank: int, world: int, meeting: str, out_dir: Path, mds_dir: str) -> None:
    """Two epochs over a streaming dataset whose size does not divide, in each selection
    scope (one process group for both): no rank may hang."""
    from jest_stream import SampleIdStreamingDataset

    out: dict[str, dict] = {}
    with process_group(rank, world, meeting):
        for scope in ('rank', 'global'):
            dataset = SampleIdStreamingDataset(local=mds_dir, batch_size=20, shuffle=True,
                                               shuffle_seed=3, num_canonical_nodes=1)
            scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1),
                                          input_key='x', target_key='y')
            loader = SelectiveLoader(dataset, batch_size=4, filter_ratio=0.8, scorer=scorer,
                                     selection_scope=scope, num_workers=1)
            epochs = []
            for _ in range(2):
                ids = []
                for batch in loader:
                    ids.append(batch['sample_id'].tolist())
                    # A collective per step, as DDP would do: a rank with fewer batches hangs.
                    dist.all_reduce(torch.ones(1))
                epochs.append(ids)
            out[scope] = {'epochs': epochs, 'len': len(loader)}
            del loader, dataset
            gc.collect()  # streaming allows one live dataset per local folder
        (out_dir / f'rank{rank}.json').write_text(json.dumps(out))


def hugging_face_pool(n: int, *, shards: int = 4):
    """A real Hugging Face ``datasets.IterableDataset`` over the toy task, with an id column."""
    import datasets

    x, y = features_and_labels(n)
    table = {'x': [row.tolist() for row in x], 'y': y.tolist(),
             'uid': list(range(1000, 1000 + n))}
    return datasets.Dataset.from_dict(table).with_format('torch').to_iterable_dataset(
        num_shards=shards)


def iterable_worker(rank: int, world: int, meeting: str, out_dir: Path) -> None:
    """Two epochs over an iterable dataset split by node with uneven parts: no rank hangs."""
    with process_group(rank, world, meeting):
        scorer = ClassificationScorer(tiny_classifier(0), tiny_classifier(1), input_key='x',
                                      target_key='y')
        # 7 shards over 2 ranks: the ranks' parts differ in size.
        loader = SelectiveLoader(hugging_face_pool(230, shards=7), batch_size=4,
                                 filter_ratio=0.8, scorer=scorer, id_key='uid')
        epochs = []
        for _ in range(2):
            ids = []
            for batch in loader:
                ids.append(batch['uid'].tolist())
                dist.all_reduce(torch.ones(1))  # as DDP would
            epochs.append(ids)
        (out_dir / f'rank{rank}.json').write_text(json.dumps({'epochs': epochs}))

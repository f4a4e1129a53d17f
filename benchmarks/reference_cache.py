"""Reference cache figures: bytes on disk per sample, and read speed against the loader's demand.

Run it from the repository root::

    python -m benchmarks.reference_cache     # about a minute on two CPU cores

Measured side by side in one run, on a temporary pool of 28x28 uint8 images with labels
(the columns of the Fashion-MNIST pool; pixel values do not change any figure here):

1. Bytes on disk per sample of a cache (part files and manifest) for each output kind:
   the per-example loss (float32) and image and text embeddings in float16 at d=64 and
   d=256, against the raw size. Losses are drawn as ``-log(u)``, ``u ~ Beta(8, 1)`` (most
   examples easy, a long tail); embeddings are unit-normalised Gaussian vectors. Floats
   carry mostly random mantissa bits, so zstandard saves little; the figure says how little.
2. The loader's demand: samples per second a ``SelectiveLoader`` draws (super-batches of
   320, sub-batches of 64, learnability, top-k, 2 workers) while a small CNN trains on
   what it selects, with the reference live (a second CNN scores every super-batch) and
   from a loss cache that ``jest_stream.annotate.annotate`` wrote for that CNN.
3. Read throughput of each cache kind for the same sequence of super-batch ids the
   loader drew (streaming's shuffled order), from a fresh cache (every part read,
   checked and decompressed once) and again once its parts are held in memory.

Results go to ``results/reference_cache/reference_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.fashion_mnist import batch_logits
from benchmarks.models import make_cnn

__all__ = ['main', 'write_pool', 'cache_sizes', 'loader_demand', 'read_throughput']

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = {'loss': ('loss', None), 'emb64': ('embeddings', 64), 'emb256': ('embeddings', 256)}


def write_pool(directory: Path, n: int, *, seed: int = 0) -> Path:
    """``n`` random 28x28 uint8 images with labels, as MDS shards of 4 MiB."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    with MDSWriter(out=str(directory), columns={'image': 'ndarray:uint8:28,28', 'label': 'int'},
                   size_limit=1 << 22) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.write({'image': image, 'label': int(label)})
    return directory


def synthetic_outputs(kind: str, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Outputs with the statistics described in the module docstring."""
    group, d = KINDS[kind]
    rng = np.random.default_rng(seed)
    if group == 'loss':
        return {'loss': (-np.log(rng.beta(8.0, 1.0, size=n))).astype(np.float32)}
    out = {}
    for name in ('image_emb', 'text_emb'):
        values = rng.standard_normal((n, d)).astype(np.float32)
        out[name] = (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)
    return out


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def cache_sizes(root: Path, dataset: Path, n: int, *, part_size: int) -> dict[str, Any]:
    """Write one cache per kind; bytes on disk per sample and write speed."""
    from jest_stream.cache import CacheWriter, Fingerprint, dataset_fingerprint

    results = {}
    for kind, (group, _) in KINDS.items():
        arrays = synthetic_outputs(kind, n)
        fingerprint = Fingerprint(dataset=dataset_fingerprint(dataset), model=kind * 8,
                                  transform='benchmark')
        started = time.perf_counter()
        writer = CacheWriter(root / kind, fingerprint=fingerprint, num_samples=n, group=group,
                             part_size=part_size)
        constants = {'temperature': 10.0, 'bias': -10.0} if group == 'embeddings' else None
        for part in range(writer.num_parts):
            start, stop = writer.part_range(part)
            writer.write_part(part, {k: v[start:stop] for k, v in arrays.items()}, constants)
        writer.finish()
        seconds = time.perf_counter() - started
        raw = sum(a.nbytes for a in arrays.values())
        disk = _folder_bytes(root / kind)
        results[kind] = {'raw_bytes_per_sample': raw / n, 'disk_bytes_per_sample': disk / n,
                         'disk_over_raw': disk / raw, 'write_samples_per_s': n / seconds}
    return results


class _RecordingScorer:
    """Passes through to a scorer and records the sample ids of every super-batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.learner = inner.learner
        self.ids: list[torch.Tensor] = []

    def __call__(self, batch: Any, sample_ids: torch.Tensor, criterion: Any) -> Any:
        self.ids.append(sample_ids.cpu())
        return self.inner(batch, sample_ids, criterion)


def loader_demand(pool: Path, reference: Any, *, batches: int, warmup: int, seed: int,
                  workers: int) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Samples/s a SelectiveLoader draws while a CNN trains on what it selects.

    Returns:
        tuple: The figures, and the ids of every super-batch drawn (in order).
    """
    from jest_stream import ClassificationScorer, SampleIdStreamingDataset, SelectiveLoader

    learner = make_cnn(seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    scorer = _RecordingScorer(ClassificationScorer(learner, reference, forward=batch_logits,
                                                   target_key='label'))
    dataset = SampleIdStreamingDataset(local=str(pool), batch_size=320, shuffle=True,
                                       shuffle_seed=seed, num_canonical_nodes=1)
    loader = SelectiveLoader(dataset, batch_size=64, filter_ratio=0.8, scorer=scorer,
                             method='topk', seed=seed, num_workers=workers)
    score_s = 0.0
    started = None
    for step, batch in enumerate(loader):
        if step == warmup:
            started, score_s = time.perf_counter(), 0.0
        loss = F.cross_entropy(batch_logits(learner, batch), batch['label'])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        score_s += loader.metrics['score_s']
        if step + 1 == warmup + batches:
            break
    seconds = time.perf_counter() - started
    drawn = batches * loader.super_batch_size
    return {'drawn_samples_per_s': drawn / seconds, 'trained_samples_per_s': batches * 64 / seconds,
            'score_s_per_super_batch': score_s / batches, 'steps': batches}, scorer.ids


def read_throughput(path: Path, dataset: Path, order: list[torch.Tensor]) -> dict[str, float]:
    """Samples/s of ``ReferenceCache.outputs`` over the super-batches of ``order``."""
    from jest_stream.cache import ReferenceCache

    cache = ReferenceCache(path, dataset=dataset, model_checksum=None, transform=None)
    n = sum(len(ids) for ids in order)
    figures = {}
    for label in ('cold', 'warm'):
        started = time.perf_counter()
        for ids in order:
            cache.outputs(None, ids)
        figures[f'{label}_samples_per_s'] = n / (time.perf_counter() - started)
    figures['parts_read'] = cache.stats['parts_read']
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.reference_cache',
        description='Bytes per sample and read throughput of the reference cache, against the '
                    "loader's demand, measured in one run.")
    parser.add_argument('--samples', type=int, default=16384, help='samples in the pool')
    parser.add_argument('--part-size', type=int, default=8192, help='samples per cache part')
    parser.add_argument('--steps', type=int, default=20, help='timed loader steps per setting')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers')
    parser.add_argument('--out-dir', type=Path,
                        default=REPO_ROOT / 'benchmarks' / 'results' / 'reference_cache')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    from jest_stream.annotate import annotate
    from jest_stream.cache import ReferenceCache, model_checksum

    started = time.perf_counter()
    record: dict[str, Any] = {'config': {k: str(v) if isinstance(v, Path) else v
                                         for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix='jest-stream-cache-bench-') as tmp:
        root = Path(tmp)
        pool = write_pool(root / 'pool', args.samples)
        sizes = cache_sizes(root / 'sizes', pool, args.samples, part_size=args.part_size)
        record['sizes'] = sizes

        reference = make_cnn(1)
        annotated = annotate(out=root / 'reference', model=reference, transform_id='benchmark',
                             local=pool, forward=batch_logits, target_key='label',
                             batch_size=512, num_workers=args.workers,
                             part_size=args.part_size, progress=False)
        record['annotate_samples_per_s'] = args.samples / annotated.seconds
        record['annotated_loss_disk_bytes_per_sample'] = (
            _folder_bytes(root / 'reference') / args.samples)

        warmup = 2
        live, _ = loader_demand(pool, reference, batches=args.steps, warmup=warmup, seed=0,
                                workers=args.workers)
        cache = ReferenceCache(root / 'reference', dataset=pool,
                               model_checksum=model_checksum(reference), transform='benchmark')
        cached, order = loader_demand(pool, cache, batches=args.steps, warmup=warmup, seed=0,
                                      workers=args.workers)
        record['loader'] = {'live_reference': live, 'cached_reference': cached}
        order = order[warmup:warmup + args.steps]
        demand = cached['drawn_samples_per_s']
        reads = {}
        for kind in KINDS:
            reads[kind] = read_throughput(root / 'sizes' / kind, pool, order)
            reads[kind]['cold_over_demand'] = reads[kind]['cold_samples_per_s'] / demand
        record['reads'] = reads
    record['wall_seconds'] = time.perf_counter() - started
    record['platform'] = {'python': platform.python_version(), 'torch': torch.__version__,
                          'threads': torch.get_num_threads(), 'cpus': os.cpu_count()}

    print(f'Pool of {args.samples} samples, cache parts of {args.part_size}.')
    print('\nBytes per sample     raw    on disk   disk/raw   write samples/s')
    for kind, s in sizes.items():
        print(f'  {kind:<8} {s["raw_bytes_per_sample"]:>10.1f} {s["disk_bytes_per_sample"]:>10.1f}'
              f' {s["disk_over_raw"]:>10.3f} {s["write_samples_per_s"]:>17,.0f}')
    print(f'  loss of the annotated CNN: {record["annotated_loss_disk_bytes_per_sample"]:.2f} '
          f'bytes per sample on disk')
    print(f'\nAnnotation (SmallCNN, {args.workers} workers): '
          f'{record["annotate_samples_per_s"]:,.0f} samples/s')
    print('\nLoader demand (B=320, b=64, learnability top-k, training step included)')
    for label, figures in record['loader'].items():
        print(f'  {label:<17} {figures["drawn_samples_per_s"]:>8,.0f} samples/s drawn, '
              f'{figures["score_s_per_super_batch"] * 1e3:.1f} ms scoring per super-batch')
    print(f'  the cache makes the loader draw '
          f'{cached["drawn_samples_per_s"] / live["drawn_samples_per_s"]:.2f}x as fast')
    print(f'\nCache reads in the loader\'s order ({len(order)} super-batches of 320)')
    print('  kind        cold samples/s   warm samples/s   cold / loader demand')
    for kind, r in reads.items():
        print(f'  {kind:<8} {r["cold_samples_per_s"]:>17,.0f} {r["warm_samples_per_s"]:>16,.0f}'
              f' {r["cold_over_demand"]:>21,.0f}x')

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / 'reference_cache.json'
    path.write_text(json.dumps(record, indent=2) + '\n')
    print(f'\nWrote {path} ({record["wall_seconds"]:.0f} s in all)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

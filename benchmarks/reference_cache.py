"""Reference cache figures: bytes on disk per sample, and read speed against the loader's demand.

Run it from the repository root::

    python -m benchmarks.reference_cache            # about a minute on two CPU cores
    python -m benchmarks.reference_cache --quick    # 4,096 samples, 10 timed steps

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
   from a loss cache that ``jest_stream.annotate.annotate`` wrote for that CNN: the medians
   of interleaved rounds (``--rounds``), since one run of each on a shared machine
   measures its load as much as the cache.
3. Read throughput of each cache kind for the same sequence of super-batch ids the
   loader drew (streaming's shuffled order), from a fresh cache (every part read,
   checked and decompressed once) and again once its parts are held in memory.

Results go to ``benchmarks/results/reference_cache/`` (``reference_cache.json`` and
``reference_cache.png``; ``reference_cache_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import report
from benchmarks.common.data import batch_logits, open_streaming
from benchmarks.common.models import make_cnn
from benchmarks.common.tasks import classification_scorer
from jest_stream import (
    ReferenceCache,
    SampleIdStreamingDataset,
    SelectiveLoader,
    annotate,
    model_checksum,
)
from jest_stream.cache import CacheWriter, Fingerprint, dataset_fingerprint

__all__ = ['cache_sizes', 'loader_demand', 'main', 'read_throughput', 'write_pool']

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
    learner = make_cnn(seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    scorer = _RecordingScorer(classification_scorer(learner, reference))
    dataset = open_streaming(lambda: SampleIdStreamingDataset(
        local=str(pool), batch_size=320, shuffle=True, shuffle_seed=seed,
        num_canonical_nodes=1))
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


def _measure(root: Path, samples: int, part_size: int, steps: int, workers: int,
             n_rounds: int) -> dict[str, Any]:
    pool = write_pool(root / 'pool', samples)
    record: dict[str, Any] = {'sizes': cache_sizes(root / 'sizes', pool, samples,
                                                   part_size=part_size)}
    reference = make_cnn(1)
    annotated = annotate(out=root / 'reference', model=reference, transform_id='benchmark',
                         local=pool, forward=batch_logits, target_key='label', batch_size=512,
                         num_workers=workers, part_size=part_size, progress=True)
    record['annotate_samples_per_s'] = samples / annotated.seconds
    record['annotated_loss_disk_bytes_per_sample'] = _folder_bytes(root / 'reference') / samples
    warmup = 2
    cache = ReferenceCache(root / 'reference', dataset=pool,
                           model_checksum=model_checksum(reference), transform='benchmark')
    # Interleaved rounds (the order alternates), medians: one run of each setting on a shared
    # machine measures the machine's load as much as the cache.
    settings = {'live_reference': reference, 'cached_reference': cache}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for round_index in range(n_rounds):
        names = list(settings) if round_index % 2 == 0 else list(settings)[::-1]
        for name in names:
            figures, ids = loader_demand(pool, settings[name], batches=steps, warmup=warmup,
                                         seed=0, workers=workers)
            rounds[name].append(figures)
            if name == 'cached_reference':
                order = ids
    record['loader'] = {name: {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
                        for name, runs in rounds.items()}
    record['loader_rounds'] = rounds
    cached = record['loader']['cached_reference']
    order = order[warmup:warmup + steps]
    record['reads'] = {}
    for kind in KINDS:
        reads = read_throughput(root / 'sizes' / kind, pool, order)
        reads['cold_over_demand'] = reads['cold_samples_per_s'] / cached['drawn_samples_per_s']
        record['reads'][kind] = reads
    record['super_batches_read'] = len(order)
    return record


def _print(record: dict[str, Any]) -> None:
    config = record['config']
    print(f'Pool of {config["samples"]} samples, cache parts of {config["part_size"]}.')
    print('\nBytes per sample     raw    on disk   disk/raw   write samples/s')
    for kind, s in record['sizes'].items():
        print(f'  {kind:<8} {s["raw_bytes_per_sample"]:>10.1f} {s["disk_bytes_per_sample"]:>10.1f}'
              f' {s["disk_over_raw"]:>10.3f} {s["write_samples_per_s"]:>17,.0f}')
    print(f'  loss of the annotated CNN: {record["annotated_loss_disk_bytes_per_sample"]:.2f} '
          f'bytes per sample on disk')
    print(f'\nAnnotation (SmallCNN, {config["workers"]} workers): '
          f'{record["annotate_samples_per_s"]:,.0f} samples/s')
    print(f'\nLoader demand (B=320, b=64, learnability top-k, training step included; '
          f'medians of {config["rounds"]} interleaved rounds)')
    loader = record['loader']
    for label, figures in loader.items():
        print(f'  {label:<17} {figures["drawn_samples_per_s"]:>8,.0f} samples/s drawn, '
              f'{figures["score_s_per_super_batch"] * 1e3:.1f} ms scoring per super-batch')
    cached, live = (loader[k]['drawn_samples_per_s']
                    for k in ('cached_reference', 'live_reference'))
    scoring = [loader[k]['score_s_per_super_batch'] for k in ('live_reference', 'cached_reference')]
    print(f'  the cache makes the loader draw {cached / live:.2f}x as fast, and scoring '
          f'{scoring[0] / scoring[1]:.2f}x as fast')
    print(f'\nCache reads in the loader\'s order ({record["super_batches_read"]} super-batches '
          f'of 320)')
    print('  kind        cold samples/s   warm samples/s   cold / loader demand')
    for kind, r in record['reads'].items():
        print(f'  {kind:<8} {r["cold_samples_per_s"]:>17,.0f} {r["warm_samples_per_s"]:>16,.0f}'
              f' {r["cold_over_demand"]:>21,.0f}x')


def _plot(record: dict[str, Any], path: Path) -> None:
    plt = report.pyplot()
    fig, (sizes_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds = list(record['sizes'])
    x = np.arange(len(kinds))
    for offset, key, label in ((-0.2, 'raw_bytes_per_sample', 'raw'),
                               (0.2, 'disk_bytes_per_sample', 'on disk')):
        sizes_ax.bar(x + offset, [record['sizes'][k][key] for k in kinds], 0.4, label=label)
    sizes_ax.set_xticks(x, kinds)
    sizes_ax.set(ylabel='bytes per sample', yscale='log',
                 title='size per sample (float32 loss, float16 embeddings)')
    sizes_ax.legend(fontsize=8)
    names = [f'loader, {k.split("_")[0]} reference' for k in record['loader']]
    rates = [v['drawn_samples_per_s'] for v in record['loader'].values()]
    for kind, reads in record['reads'].items():
        names += [f'{kind} read, cold', f'{kind} read, warm']
        rates += [reads['cold_samples_per_s'], reads['warm_samples_per_s']]
    colours = ['tab:gray'] * len(record['loader']) + ['tab:blue', 'tab:cyan'] * len(KINDS)
    speed_ax.barh(range(len(names)), rates, color=colours)
    speed_ax.set_yticks(range(len(names)), names, fontsize=8)
    speed_ax.set(xscale='log', xlabel='samples per second',
                 title="cache reads against the loader's demand")
    for ax in (sizes_ax, speed_ax):
        ax.grid(alpha=0.3, axis='y' if ax is sizes_ax else 'x')
    report.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = report.benchmark_parser('reference_cache', __doc__.split('\n\n')[0],
                              quick='4,096 samples in parts of 2,048, 10 timed loader steps')
    parser.add_argument('--samples', type=int, default=None,
                        help='samples in the pool (default 16384)')
    parser.add_argument('--part-size', type=int, default=None,
                        help='samples per cache part (default 8192)')
    parser.add_argument('--steps', type=int, default=None,
                        help='timed loader steps per setting (default 20)')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers')
    parser.add_argument('--rounds', type=int, default=None,
                        help='interleaved rounds of the loader with a live and a cached '
                             'reference, medians reported (default 3; --quick: 1)')
    args = parser.parse_args(argv)
    defaults = (4096, 2048, 10) if args.quick else (16384, 8192, 20)
    config = {'samples': args.samples or defaults[0], 'part_size': args.part_size or defaults[1],
              'steps': args.steps or defaults[2], 'workers': args.workers,
              'rounds': args.rounds or (1 if args.quick else 3), 'quick': bool(args.quick)}
    run = report.start_run('reference_cache', argv)
    with tempfile.TemporaryDirectory(prefix='jest-stream-cache-bench-') as tmp:
        record = {'config': config, **_measure(Path(tmp), config['samples'], config['part_size'],
                                               config['steps'], config['workers'],
                                               config['rounds'])}
    record['run'] = report.finish_run(run)
    _print(record)
    report.write_report(record, *report.report_paths(args.out, 'reference_cache', args.quick),
                        _plot)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

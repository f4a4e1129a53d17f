"""Data-quality bootstrapping: a reference trained on a small clean split steers a learner
through a large noisy pool, with the reference's losses computed once and cached.

Run it from anywhere in the repository::

    python examples/bootstrap.py                          # a few minutes on two CPU cores
    python examples/bootstrap.py --limit 12000 --steps 150  # a quicker pass

The steps:

1. Fashion-MNIST's train split becomes a noisy pool (40% of its labels replaced by
   another class) and a small clean split (5%), both MDS datasets (built once).
2. A small CNN, the *reference*, trains on the clean split only and is saved as a
   ``state_dict``.
3. ``jest-stream annotate`` stores the reference's per-example loss for every pool sample
   in a cache next to the pool, named after the model's checksum (caches of other
   references can sit beside it). Started again, it finds every part done and stops.
4. A fresh CNN, the *learner*, trains on the pool through a ``SelectiveLoader`` that keeps
   the most learnable 64 of every 320 samples (learner loss minus reference loss). The
   reference half of the score comes from the cache: the reference model never runs
   during training. A uniform baseline trains with the same budget for comparison.
5. The clean test accuracy of all three models is printed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# The example reuses the benchmarks' data preparation and model; make them importable
# from wherever the script is started.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common.data import MEAN, STD, batch_logits, prepare, read_columns  # noqa: E402
from benchmarks.common.models import make_cnn  # noqa: E402
from benchmarks.common.training import evaluate, train_classifier  # noqa: E402

# The reference sees the pixels through batch_logits' normalisation: name it, so the cache
# is only ever opened for the same transform.
TRANSFORM_ID = f'fashion-mnist/batch_logits(mean={MEAN},std={STD})'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', type=Path, default=REPO_ROOT / 'data' / 'bootstrap',
                        help='where the pool, the clean split and the cache are kept')
    parser.add_argument('--limit', type=int, default=None,
                        help='use only the first LIMIT train images (default: all 60,000)')
    parser.add_argument('--noise-rate', type=float, default=0.4)
    parser.add_argument('--clean-fraction', type=float, default=0.05)
    parser.add_argument('--reference-steps', type=int, default=500)
    parser.add_argument('--steps', type=int, default=300, help='optimizer steps of the learner')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--filter-ratio', type=float, default=0.8)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--no-baseline', action='store_true', help='skip the uniform baseline')
    return parser.parse_args()


def train_reference(clean_dir: Path, steps: int, path: Path) -> torch.nn.Module:
    """A CNN trained on the clean split, saved to ``path`` as a state_dict."""
    clean = read_columns(clean_dir, ['image', 'label'])
    reference = make_cnn(0)
    train_classifier(reference, clean['image'], clean['label'], steps=steps, batch_size=64,
                     lr=2e-3, seed=0, progress=True, desc='reference')
    torch.save(reference.state_dict(), path)
    return reference


def annotate_pool(pool_dir: Path, checkpoint: Path, out: Path, workers: int) -> None:
    """Store the reference's loss for every pool sample, through the command line."""
    command = ['annotate', '--local', str(pool_dir),
               '--model', 'benchmarks.common.models:make_cnn', '--model-kwargs', '{"seed": 0}',
               '--checkpoint', str(checkpoint),
               '--forward', 'benchmarks.common.data:batch_logits', '--target-key', 'label',
               '--transform-id', TRANSFORM_ID, '--out', str(out),
               '--batch-size', '512', '--workers', str(workers)]
    print('$ ' + shlex.join(['jest-stream', *command]))
    # The same as the jest-stream console script, run by this interpreter; from the
    # repository root, so that benchmarks.common.models imports.
    subprocess.run([sys.executable, '-m', 'jest_stream.cli', *command], cwd=REPO_ROOT,
                   check=True)


def train_learner(pool_dir: Path, reference, args: argparse.Namespace, *, criterion: str,
                  seed: int = 1) -> tuple[torch.nn.Module, float, float]:
    """A fresh CNN trained on the pool through a SelectiveLoader.

    Returns:
        tuple: The learner, the fraction of corrupted labels it trained on, and seconds.
    """
    from jest_stream import ClassificationScorer, SampleIdStreamingDataset, SelectiveLoader
    from jest_stream.loader import super_batch_size_for

    learner = make_cnn(seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    dataset = SampleIdStreamingDataset(
        local=str(pool_dir), batch_size=super_batch_size_for(args.batch_size, args.filter_ratio),
        shuffle=True, shuffle_seed=seed, num_canonical_nodes=1)
    scorer = None if criterion == 'uniform' else ClassificationScorer(
        learner, reference, forward=batch_logits, target_key='label')
    loader = SelectiveLoader(dataset, batch_size=args.batch_size, filter_ratio=args.filter_ratio,
                             scorer=scorer, criterion=criterion,
                             method='uniform' if criterion == 'uniform' else 'topk',
                             seed=seed, num_workers=args.workers)
    step, corrupted = 0, 0
    bar = tqdm(total=args.steps, desc=criterion, unit='step', leave=False)
    started = time.perf_counter()
    while step < args.steps:
        for batch in loader:
            loss = F.cross_entropy(batch_logits(learner, batch), batch['label'])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            corrupted += int(batch['corrupted'].sum())
            step += 1
            bar.update()
            if step == args.steps:
                break
    bar.close()
    return learner, corrupted / (args.steps * args.batch_size), time.perf_counter() - started


def main() -> int:
    args = parse_args()
    from jest_stream import remove_stale_shared_memory
    from jest_stream.cache import ReferenceCache, model_checksum

    remove_stale_shared_memory()  # before any StreamingDataset exists; dead jobs' only
    data = prepare(args.data_dir, noise_rate=args.noise_rate,
                   clean_fraction=args.clean_fraction, seed=0, limit=args.limit)
    print(f'Pool: {data.n_pool} images, {data.n_corrupted} with corrupted labels; clean split: '
          f'{data.n_clean}; test: {len(data.test_labels)}')

    checkpoint = args.data_dir / 'reference.pt'
    reference = train_reference(data.clean_dir, args.reference_steps, checkpoint)
    reference_accuracy = evaluate(reference, data.test_images, data.test_labels)
    print(f'Reference trained on the {data.n_clean} clean images: test accuracy '
          f'{reference_accuracy:.4f}')

    checksum = model_checksum(checkpoint)
    cache_dir = args.data_dir / f'pool.reference-{checksum[:12]}'
    annotate_pool(data.pool_dir, checkpoint, cache_dir, args.workers)

    # Opening checks that the cache belongs to this pool, this reference and this transform.
    cache = ReferenceCache(cache_dir, dataset=data.pool_dir, model_checksum=checksum,
                           transform=TRANSFORM_ID, kinds=['loss'])
    results = {'reference (clean split only)': (reference_accuracy, 0.0, None)}
    learner, noisy, seconds = train_learner(data.pool_dir, cache, args, criterion='learnability')
    results['learner, learnability from the cache'] = (
        evaluate(learner, data.test_images, data.test_labels), noisy, seconds)
    if not args.no_baseline:
        learner, noisy, seconds = train_learner(data.pool_dir, None, args, criterion='uniform')
        results['learner, uniform (baseline)'] = (
            evaluate(learner, data.test_images, data.test_labels), noisy, seconds)

    print(f'\nClean test accuracy after {args.steps} steps of {args.batch_size} '
          f'(pool labels {args.noise_rate:.0%} corrupted):')
    for name, (accuracy, noisy, seconds) in results.items():
        trained = '' if seconds is None else (
            f'   trained on {noisy:.1%} corrupted labels, {seconds:.0f} s')
        print(f'  {name:<38} {accuracy:.4f}{trained}')
    print(f'\nReference cache: {cache_dir} ({cache.stats["parts_read"]} parts read in training)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

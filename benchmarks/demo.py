"""The demo: a small preset of the learning-efficiency benchmark, on the classification task.

Run it from the repository root (``make demo`` builds the environment and the data first)::

    python -m benchmarks.demo            # two seeds, 400 steps each
    python -m benchmarks.demo --quick    # one seed, 120 steps

Fashion-MNIST with 40% of the pool's labels corrupted: a learner trained on sub-batches
picked uniformly at random, and the same learner (same initialisation, same super-batches,
same step budget) trained on the sub-batches that learnability selects (learner loss minus
the loss of a reference trained on a clean 5% split, read from a reference cache that
``jest_stream.annotate`` wrote). It is :mod:`benchmarks.learning_efficiency` with another
configuration (:data:`DEMO`), so it reports the same three speed-ups to uniform's final
accuracy (steps, FLOPs, wall-clock time) and the cost of each step split into train,
score, select and wait. Results go to ``benchmarks/results/demo/`` (``demo.json`` and
``demo.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from benchmarks.learning_efficiency import Config, describe
from benchmarks.learning_efficiency import main as run_preset

__all__ = ['DEMO', 'DEMO_QUICK', 'intro', 'main']

DEMO = Config(tasks=('classification',), methods=('learnability',), ratios=(0.8,), seeds=(0, 1))
DEMO_QUICK = replace(DEMO, seeds=(0,), steps=120, eval_every=10, eval_size=2000,
                     reference_steps=300, quick=True)
# Measured with `time make demo` on two CPU cores, the environment and the data already built.
MEASURED = {False: 'about 3 minutes', True: 'about a minute'}


def intro(config: Config) -> str:
    """What the demo will do and how long it takes, printed before it starts."""
    return (f'jest_stream demo: uniform sampling against learnability selection on noisy '
            f'Fashion-MNIST, {MEASURED[config.quick]} on two CPU cores. `make demo` has built '
            f'a virtual environment of several GB (.venv: torch, Composer, mosaicml-streaming) '
            f'and the data under data/ (once).\n{describe(config)}\nIt then prints the speed-ups '
            f'to uniform\'s final accuracy in steps, FLOPs and wall-clock time, and what a step '
            f'cost (train, score, select, wait).\n')


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    return run_preset(argv, name='demo', preset=DEMO, quick=DEMO_QUICK, intro=intro,
                      description=__doc__.split('\n\n')[0])


if __name__ == '__main__':
    raise SystemExit(main())

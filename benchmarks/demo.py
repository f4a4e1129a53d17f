"""The demo: a small preset of the learning-efficiency benchmark, on the classification task.

Run it from the repository root (``make demo`` builds the environment and the data first)::

    python -m benchmarks.demo            # two seeds, 400 steps each
    python -m benchmarks.demo --quick    # one seed, 120 steps

Fashion-MNIST with 40% of the pool's labels corrupted: a learner trained on examples read
uniformly at random, and the same learner (same initialisation, same step budget) trained
on the sub-batches of 32 that learnability selects from super-batches of 160 (learner loss
minus the loss of a reference trained on a clean 5% split, read from a reference cache that
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
# Measured with `time python -m benchmarks.demo [--quick]` on two CPU cores shared with other
# work (load average 2 to 3), the environment and the data already built: 1 min 59 s and 28 s.
MEASURED = {False: 'about 2 minutes', True: 'about 30 seconds'}


def intro(config: Config) -> str:
    """What the demo will do and how long it takes, printed before it starts."""
    return (f'jest_stream demo: uniform sampling against learnability selection on noisy '
            f'Fashion-MNIST, {MEASURED[config.quick]} on two CPU cores. `make demo` builds a '
            f'virtual environment of several GB first (.venv: torch, Composer, '
            f'mosaicml-streaming) and the data under data/ (once).\n{describe(config)}\nIt then '
            f'prints the speed-ups to uniform\'s final accuracy in steps, FLOPs and wall-clock '
            f'time, and what a step cost (train, score, select, wait).\n')


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    return run_preset(argv, name='demo', preset=DEMO, quick=DEMO_QUICK, intro=intro,
                      description=__doc__.split('\n\n')[0])


if __name__ == '__main__':
    raise SystemExit(main())

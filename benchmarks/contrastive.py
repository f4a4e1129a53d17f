"""JEST on the contrastive task: a preset of the learning-efficiency benchmark at filter ratio 0.9.

Run it from the repository root::

    python -m benchmarks.contrastive            # ratio 0.9, seeds 0 1 2, 400 steps: 12 runs
    python -m benchmarks.contrastive --quick    # one seed, 200 steps: 4 runs

A two-tower image-text model trained with the sigmoid (SigLIP) loss on Fashion-MNIST
images captioned from their labels, 40% of the pairs mismatched
(:mod:`benchmarks.common.captions`). It compares uniform sampling, independent
learnability sampling, joint learnability selection (JEST) and joint selection with
Flexi's low-resolution scoring and mixed-resolution training, at the ratio where joint
and independent selection differ most (``--methods`` adds others: the policies, the
proxy, the peers); the reference's embeddings come from a reference
cache written by ``jest_stream.annotate``. It is :mod:`benchmarks.learning_efficiency`
with another configuration (:data:`CONTRASTIVE`): the same speed-ups in steps, FLOPs and
wall-clock time. Results go to ``benchmarks/results/contrastive/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from benchmarks.learning_efficiency import Config
from benchmarks.learning_efficiency import main as run_preset

__all__ = ['CONTRASTIVE', 'CONTRASTIVE_QUICK', 'main']

CONTRASTIVE = Config(tasks=('contrastive',), ratios=(0.9,),
                     methods=('uniform', 'independent', 'joint', 'flexi_joint'))
CONTRASTIVE_QUICK = replace(CONTRASTIVE, seeds=(0,), steps=200, eval_every=10, eval_size=2000,
                            reference_steps=600, quick=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preset; returns the exit status."""
    return run_preset(argv, name='contrastive', preset=CONTRASTIVE, quick=CONTRASTIVE_QUICK,
                      description=__doc__.split('\n\n')[0])


if __name__ == '__main__':
    raise SystemExit(main())

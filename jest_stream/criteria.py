"""Selection criteria: how learner and reference losses combine into a score.

Every criterion is linear in the two losses, so the same weights apply to
per-example losses and to pair-loss matrices (and to any block of one).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from jest_stream.errors import SettingError

__all__ = ['Criterion', 'CRITERIA', 'get_criterion']


@dataclass(frozen=True)
class Criterion:
    """``score = learner_weight * loss(learner) + reference_weight * loss(reference)``.

    Attributes:
        name (str): Registry name.
        learner_weight (float): Weight of the learner's loss.
        reference_weight (float): Weight of the reference's loss.
    """

    name: str
    learner_weight: float
    reference_weight: float

    @property
    def needs_learner(self) -> bool:
        return self.learner_weight != 0.0

    @property
    def needs_reference(self) -> bool:
        return self.reference_weight != 0.0

    @property
    def scores(self) -> bool:
        """False for ``uniform``: nothing is scored at all."""
        return self.needs_learner or self.needs_reference

    def combine(self, learner: Tensor | None, reference: Tensor | None) -> Tensor:
        """The criterion applied to losses of any shape (per example, pair block...).

        Args:
            learner (Tensor | None): Learner losses; may be None when not needed.
            reference (Tensor | None): Reference losses, same shape; may be None when not needed.

        Returns:
            Tensor: The scores, same shape as the inputs.
        """
        if not self.scores:
            raise SettingError('the uniform criterion has no scores')
        if self.needs_learner and learner is None:
            raise SettingError(f'criterion {self.name!r} needs the learner losses')
        if self.needs_reference and reference is None:
            raise SettingError(f'criterion {self.name!r} needs the reference losses')
        if not self.needs_reference:
            return learner * self.learner_weight
        if not self.needs_learner:
            return reference * self.reference_weight
        return learner * self.learner_weight + reference * self.reference_weight


CRITERIA: dict[str, Criterion] = {
    # Learnable: the learner still gets it wrong, the reference shows it can be got right.
    'learnability': Criterion('learnability', 1.0, -1.0),
    # Hard for the learner (RHO-LOSS without a reference; picks label noise too).
    'hard_learner': Criterion('hard_learner', 1.0, 0.0),
    # Easy for the reference (a data-quality filter that ignores the learner).
    'easy_reference': Criterion('easy_reference', 0.0, -1.0),
    # No scoring: a uniformly random sub-batch, the baseline.
    'uniform': Criterion('uniform', 0.0, 0.0),
}


def get_criterion(name: str | Criterion) -> Criterion:
    """Look up a criterion by name.

    Args:
        name (str | Criterion): One of ``learnability``, ``hard_learner``, ``easy_reference``,
            ``uniform``, or a ``Criterion`` of your own.

    Returns:
        Criterion: The criterion.
    """
    if isinstance(name, Criterion):
        return name
    if not isinstance(name, str) or name not in CRITERIA:
        raise SettingError(f'criterion={name!r} is not known; choose one of {sorted(CRITERIA)}')
    return CRITERIA[name]

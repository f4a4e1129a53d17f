"""Selection policies: how hard to select, and under which limits, super-batch by super-batch.

Selection helps most early in training and can hurt later (the selected data levels off
near the reference's own quality while uniform data keeps teaching). A
:class:`SelectionPolicy` decides, for every super-batch, a :class:`Plan`:

- **Pressure** (:class:`Schedule`, :class:`AdaptivePressure`): a number in ``[0, 1]`` that
  scales the filter ratio. The super-batch size ``B`` stays fixed (streaming's
  ``batch_size`` and exact resumption depend on it); at pressure ``p`` selection considers
  a uniformly random subset of ``b / (1 - p f)`` candidates of the super-batch and selects
  ``b`` of them, so ``p = 0`` is uniform sampling (and scores nothing) and ``p = 1`` the
  full filter ratio ``f``.
- **Uniform mixing** (``mix``): a fraction of every sub-batch is drawn uniformly from the
  candidates, never by score, so every sample keeps a chance.
- **Quotas** (:class:`Quota`): least and most rows per group (a stream, a class, a
  concept), or rows proportional to each group's share of the candidates; every method
  respects them exactly.
- **Weights** (``weights=True``): importance weights that make the weighted loss of the
  sub-batch an unbiased estimate of the super-batch's mean loss.

Plans depend only on the position in training (and, for the adaptive policy, on the
statistics of super-batches handed over long enough before), so selections repeat after a
resume and match between inline and process scoring. The policy's state is plain values
in the loader's ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jest_stream.checks import check_bool, check_choice, check_int, check_number
from jest_stream.errors import SettingError, SettingTypeError, StateError

__all__ = [
    'PROGRESS_UNITS',
    'RAMP_SHAPES',
    'Progress',
    'Schedule',
    'AdaptivePressure',
    'Quota',
    'Plan',
    'SelectionPolicy',
]

# Windows whose multipliers are kept for positions asked again (a resume reads at most
# prefetch_depth <= window super-batches behind the latest plan).
_KEPT_WINDOWS = 4

PROGRESS_UNITS = ('steps', 'samples', 'fraction')
RAMP_SHAPES = ('linear', 'cosine')


@dataclass(frozen=True)
class Progress:
    """Where training is when a super-batch is drawn.

    Attributes:
        steps (int): Sub-batches handed to the trainer before this one, over all epochs.
        samples (int): Raw samples drawn before this super-batch, over all ranks.
        fraction (float | None): Fraction of the planned training done, where a framework
            knows it (Composer's ``max_duration``); None otherwise.
    """

    steps: int
    samples: int
    fraction: float | None = None

    def value(self, unit: str) -> float:
        """The progress in ``unit``: ``steps``, ``samples`` or ``fraction``.

        Raises:
            SettingError: ``fraction`` is asked where the planned length is not known.
        """
        if unit == 'steps':
            return float(self.steps)
        if unit == 'samples':
            return float(self.samples)
        if self.fraction is None:
            raise SettingError('a schedule in unit="fraction" needs the planned length of '
                               'training, which only a framework knows (JESTAlgorithm); give '
                               'the SelectiveLoader a schedule in "steps" or "samples"')
        return self.fraction


def _ramp(x: float, shape: str) -> float:
    x = min(max(x, 0.0), 1.0)
    return x if shape == 'linear' else 0.5 - 0.5 * math.cos(math.pi * x)


@dataclass(frozen=True)
class Schedule:
    """Selection pressure over training: warm up uniform, ramp up, anneal back to uniform.

    The pressure is 0 before ``warmup``, rises to 1 over ``ramp`` (linearly or on a cosine),
    stays at 1, and from ``anneal_start`` falls to 0 at ``anneal_end`` (the same shape).
    With ``ramp=0`` and ``anneal_start == anneal_end`` it is Composer SelectiveBackprop's
    selection window ``[start, end)``.

    Attributes:
        unit (str): ``steps`` (sub-batches handed over), ``samples`` (raw samples drawn) or
            ``fraction`` (of the planned training; ``JESTAlgorithm`` only).
        warmup (float): Uniform sampling until here.
        ramp (float): Length of the rise to full pressure after ``warmup``.
        anneal_start (float | None): Where the fall back to uniform begins; None: never.
        anneal_end (float | None): Where it reaches uniform (pressure 0).
        shape (str): ``linear`` or ``cosine`` rises and falls.

    Raises:
        SettingError: Negative lengths, an anneal that ends before it starts or starts
            before the ramp ends, or a fraction outside ``[0, 1]``.
    """

    unit: str = 'steps'
    warmup: float = 0.0
    ramp: float = 0.0
    anneal_start: float | None = None
    anneal_end: float | None = None
    shape: str = 'linear'

    def __post_init__(self) -> None:
        check_choice(self.unit, 'unit', PROGRESS_UNITS)
        check_choice(self.shape, 'shape', RAMP_SHAPES)
        high = 1.0 if self.unit == 'fraction' else None
        check_number(self.warmup, 'warmup', low=0.0, high=high)
        check_number(self.ramp, 'ramp', low=0.0, high=high)
        if (self.anneal_start is None) != (self.anneal_end is None):
            raise SettingError('give both anneal_start and anneal_end, or neither')
        if self.anneal_start is not None:
            start = check_number(self.anneal_start, 'anneal_start', low=0.0, high=high)
            end = check_number(self.anneal_end, 'anneal_end', low=0.0, high=high)
            if end < start or start < self.warmup + self.ramp:
                raise SettingError(
                    f'anneal_start={start:g} and anneal_end={end:g} must satisfy warmup + '
                    f'ramp = {self.warmup + self.ramp:g} <= anneal_start <= anneal_end')

    def pressure(self, progress: Progress) -> float:
        """The pressure in ``[0, 1]`` at ``progress``."""
        x = progress.value(self.unit)
        if x < self.warmup:
            return 0.0
        level = 1.0 if self.ramp == 0 else _ramp((x - self.warmup) / self.ramp, self.shape)
        if self.anneal_start is not None and x >= self.anneal_start:
            span = self.anneal_end - self.anneal_start
            fall = 1.0 if span == 0 else _ramp((x - self.anneal_start) / span, self.shape)
            level = min(level, 1.0 - fall)
        return level


@dataclass
class AdaptivePressure:
    """Lowers the selection pressure when selection stops paying off, and restores it.

    Training is cut into windows of ``window`` steps. At the start of each window the
    multiplier (initially 1) is updated from the window that ended a whole window earlier,
    so that every plan depends on batches already handed over, however far ahead they are
    scored:

    - the mean learnability of the candidates (``score_all_mean``; the learner's loss minus
      the reference's) at or below ``min_learnability`` means the learner has caught up
      with the reference there: the multiplier is multiplied by ``decay``; above it, divided
      by ``decay`` (up to 1). A window where nothing was scored (a pressure so low that
      only ``b`` candidates are drawn, a schedule's warm-up) counts as above it: selection
      gets to show again whether it pays, so a low multiplier never stays stuck;
    - a held-out metric reported with :meth:`report` (``mode='max'`` when higher is better)
      that is worse than the best so far multiplies it by ``decay`` too (an equal one
      changes nothing).

    Attributes:
        window (int): Steps per window (at least the process scoring's ``prefetch_depth``).
        min_learnability (float): Mean learnability at or below which selection is eased.
        decay (float): Factor in ``(0, 1)`` by which the pressure is eased.
        mode (str): ``max`` or ``min``: which way the reported metric improves.
        floor (float): The least multiplier; 0 lets selection ease into uniform sampling.
    """

    window: int = 50
    min_learnability: float = 0.0
    decay: float = 0.5
    mode: str = 'max'
    floor: float = 0.0
    multiplier: float = 1.0
    _window_sums: dict[int, list[float]] = field(default_factory=dict)
    _metrics: list[tuple[int, float]] = field(default_factory=list)
    _best: float | None = None
    _updated_to: int = 0
    _history: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int(self.window, 'window', low=1)
        check_number(self.min_learnability, 'min_learnability')
        check_number(self.decay, 'decay', low=0.0, high=1.0, low_open=True, high_open=True)
        check_choice(self.mode, 'mode', ('max', 'min'))
        check_number(self.floor, 'floor', low=0.0, high=1.0)

    def observe(self, steps: int, learnability_mean: float | None) -> None:
        """A super-batch handed over at ``steps`` with this mean learnability of candidates."""
        if learnability_mean is None or not math.isfinite(learnability_mean):
            return
        sums = self._window_sums.setdefault(steps // self.window, [0.0, 0.0])
        sums[0] += learnability_mean
        sums[1] += 1.0

    def report(self, steps: int, value: float) -> None:
        """A held-out metric (validation accuracy, loss...) measured after ``steps`` steps."""
        check_number(value, 'value')
        self._metrics.append((int(steps), float(value)))

    def multiplier_at(self, steps: int) -> float:
        """The multiplier for the super-batch at ``steps`` (updates it window by window).

        Plans may be asked ahead of the trainer (process scoring reads ahead up to
        ``prefetch_depth`` super-batches), and a checkpoint then holds the state of a later
        window: the multipliers of the last windows are kept, so an earlier position asked
        again (after a resume, or an epoch left early) gets the multiplier it had.
        """
        window = steps // self.window
        while self._updated_to < window:
            self._updated_to += 1
            self._update(self._updated_to)
            self._history[self._updated_to] = self.multiplier
            for old in [w for w in self._history if w < self._updated_to - _KEPT_WINDOWS]:
                del self._history[old]
        return self._history.get(window, self.multiplier)

    def _update(self, window: int) -> None:
        # Window w's plan reads window w - 2 (ended a full window before w begins) and the
        # metrics reported by its end.
        source = window - 2
        sums = self._window_sums.pop(source, None)
        if sums is not None and sums[1] > 0 \
                and sums[0] / sums[1] <= self.min_learnability:
            self.multiplier = max(self.floor, self.multiplier * self.decay)
        elif source >= 0:
            # Learnability above the threshold, or none measured: a pressure so low that
            # nothing was scored cannot show that selection pays again, so it recovers.
            self.multiplier = min(1.0, self.multiplier / self.decay)
        limit = (source + 1) * self.window
        reported = [v for s, v in self._metrics if s <= limit]
        self._metrics = [(s, v) for s, v in self._metrics if s > limit]
        for value in reported:
            if self._best is None or (value > self._best if self.mode == 'max'
                                      else value < self._best):
                self._best = value
            elif value != self._best:  # worse than the best so far; an equal one is not
                self.multiplier = max(self.floor, self.multiplier * self.decay)
        for old in [w for w in self._window_sums if w < source]:
            del self._window_sums[old]

    def state_dict(self) -> dict[str, Any]:
        """The multiplier and what decides its next change (plain Python values)."""
        return {'multiplier': self.multiplier, 'updated_to': self._updated_to,
                'best': self._best, 'metrics': [list(m) for m in self._metrics],
                'window_sums': {str(k): list(v) for k, v in self._window_sums.items()},
                'history': {str(k): v for k, v in self._history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: all of it, or nothing when it is not valid.

        Raises:
            StateError: A field is missing or of the wrong type.
        """
        try:  # parse all of it before anything changes
            multiplier, updated_to = float(state['multiplier']), int(state['updated_to'])
            best = None if state['best'] is None else float(state['best'])
            metrics = [(int(s), float(v)) for s, v in state['metrics']]
            window_sums = {int(k): [float(a), float(b)]
                           for k, (a, b) in state['window_sums'].items()}
            history = {int(k): float(v) for k, v in state.get('history', {}).items()}
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f'the adaptive pressure state is not one this version saved: '
                             f'{error!r}') from None
        self.multiplier, self._updated_to, self._best = multiplier, updated_to, best
        self._metrics, self._window_sums, self._history = metrics, window_sums, history


@dataclass(frozen=True)
class Quota:
    """Limits on the groups of every selected sub-batch.

    Groups come from a column of the batch (a class, a concept, a domain: one integer per
    sample), or, with ``key='stream'`` on a ``StreamingDataset`` of several streams, from the
    stream each sample came from.

    Attributes:
        key (str | int): The column (or field) of the groups, or ``'stream'``.
        min_share (float | Mapping[int, float]): Least share of the sub-batch per group.
        max_share (float | Mapping[int, float]): Largest share of the sub-batch per group.
        proportional (bool): Instead of shares: each group gets its share of the candidates
            (rounded by largest remainder), exactly.
    """

    key: str | int
    min_share: float | Mapping[int, float] = 0.0
    max_share: float | Mapping[int, float] = 1.0
    proportional: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, (str, int)):
            raise SettingTypeError(f'Quota(key={self.key!r}) must name a column or field')
        check_bool(self.proportional, 'proportional')
        for name in ('min_share', 'max_share'):
            shares = getattr(self, name)
            values = shares.values() if isinstance(shares, Mapping) else [shares]
            for value in values:
                check_number(value, name, low=0.0, high=1.0)
        if self.proportional and (self.min_share != 0.0 or self.max_share != 1.0):
            raise SettingError('a proportional quota sets every group\'s rows itself: give '
                               'proportional=True or min_share/max_share, not both')


@dataclass(frozen=True)
class Plan:
    """What the policy decided for one super-batch (plain values: it crosses processes).

    Attributes:
        pressure (float): Multiplier of the filter ratio in ``[0, 1]``.
        mix (float): Fraction of the sub-batch drawn uniformly.
        quota (Quota | None): Limits on the groups of the sub-batch.
        weights (bool): Compute importance weights.
    """

    pressure: float = 1.0
    mix: float = 0.0
    quota: Quota | None = None
    weights: bool = False


@dataclass
class SelectionPolicy:
    """Everything that shapes selection beyond the criterion and the method.

    Args:
        schedule (Schedule, optional): Pressure over training (constant full pressure when
            None).
        mix (float): Fraction of every sub-batch drawn uniformly from the candidates, in
            ``[0, 1)``.
        adaptive (AdaptivePressure, optional): Eases the pressure when selection stops
            paying off.
        quota (Quota, optional): Limits on the groups of every sub-batch.
        weights (bool): Yield importance weights with the sub-batch (``sample`` and
            ``uniform`` methods, without mixing or quotas).

    Raises:
        SettingError: A value out of range, or weights with a setting that would bias them.
    """

    schedule: Schedule | None = None
    mix: float = 0.0
    adaptive: AdaptivePressure | None = None
    quota: Quota | None = None
    weights: bool = False

    def __post_init__(self) -> None:
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise SettingTypeError(f'schedule={self.schedule!r} must be a Schedule')
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptivePressure):
            raise SettingTypeError(f'adaptive={self.adaptive!r} must be an AdaptivePressure')
        if self.quota is not None and not isinstance(self.quota, Quota):
            raise SettingTypeError(f'quota={self.quota!r} must be a Quota')
        self.mix = check_number(self.mix, 'mix', low=0.0, high=1.0, high_open=True,
                                hint='the fraction of each sub-batch drawn uniformly')
        check_bool(self.weights, 'weights')
        if self.weights and (self.mix > 0 or self.quota is not None):
            raise SettingError('weights=True needs plain sampling: uniform mixing and quotas '
                               'change the inclusion probabilities the weights are made from; '
                               'drop mix or quota, or the weights')

    @property
    def is_default(self) -> bool:
        """True when the policy changes nothing (full pressure, no mixing...)."""
        return (self.schedule is None and self.mix == 0 and self.adaptive is None
                and self.quota is None and not self.weights)

    def check_method(self, method: str, temperature: float, *, prefetch_depth: int) -> None:
        """Refuse combinations the plan cannot honour (called with the configuration).

        Raises:
            SettingError: ``weights=True`` without independent sampling at a positive
                temperature, or an adaptive ``window`` shorter than ``prefetch_depth``.
        """
        if self.weights and (method not in ('sample', 'uniform') or temperature == 0):
            raise SettingError(
                f'weights=True with method={method!r} (temperature={temperature:g}): the '
                f'weights are inverse inclusion probabilities, which only independent sampling '
                f'at a positive temperature has; use method="sample"')
        if self.adaptive is not None and self.adaptive.window < prefetch_depth:
            raise SettingError(
                f'AdaptivePressure(window={self.adaptive.window}) must be at least '
                f'prefetch_depth={prefetch_depth}: a plan may only read super-batches already '
                f'handed over')

    def plan(self, progress: Progress) -> Plan:
        """The plan of the super-batch drawn at ``progress``."""
        pressure = 1.0 if self.schedule is None else self.schedule.pressure(progress)
        if self.adaptive is not None:
            pressure *= self.adaptive.multiplier_at(progress.steps)
        return Plan(pressure=pressure, mix=self.mix, quota=self.quota, weights=self.weights)

    def observe(self, steps: int, learnability_mean: float | None) -> None:
        """A super-batch was handed over (feeds the adaptive pressure)."""
        if self.adaptive is not None:
            self.adaptive.observe(steps, learnability_mean)

    def report(self, steps: int, value: float) -> None:
        """A held-out metric measured after ``steps`` steps (for the adaptive pressure).

        Raises:
            SettingError: The policy has no adaptive pressure to report to.
        """
        if self.adaptive is None:
            raise SettingError('report() feeds AdaptivePressure: give the policy '
                               'adaptive=AdaptivePressure(...)')
        self.adaptive.report(steps, value)

    def state_dict(self) -> dict[str, Any]:
        """What the policy learned while training: its adaptive pressure's state (the rest
        of it is settings, a function of progress)."""
        return {} if self.adaptive is None else {'adaptive': self.adaptive.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            StateError: The state is not a dict, or it was saved by a policy with (or without)
                an adaptive pressure this one lacks (or has).
        """
        if not isinstance(state, Mapping):
            raise StateError(f'the policy state must be a dict, got {type(state).__name__}')
        if self.adaptive is not None:
            if 'adaptive' not in state:
                raise StateError('the state was saved without an adaptive pressure, but this '
                                 'policy has one: resume with the policy it was saved with')
            self.adaptive.load_state_dict(state['adaptive'])
        elif 'adaptive' in state:
            raise StateError('the state holds an adaptive pressure, but this policy has none: '
                             'resume with the policy it was saved with')

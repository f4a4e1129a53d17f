"""The one validated selection configuration, built by every entry point.

:class:`SelectionConfig` holds everything that decides what a super-batch step selects
and how the data path runs: the sizes (sub-batch ``b``, super-batch ``B``, filter ratio
``f = 1 - b / B``), the criterion and the selection method, the sampler's chunks and
temperature, the seed, FLOP counting, the selection scope, the scoring mode and its
process settings, and the timeout of every wait on another process. It is validated once,
when it is built (directly or through :meth:`SelectionConfig.create`), with one rule per
setting; ``SelectiveLoader`` and ``JESTAlgorithm`` both build one, so a setting means the
same thing and is refused for the same reasons everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from jest_stream.checks import check_bool, check_choice, check_int, check_number
from jest_stream.criteria import Criterion, get_criterion
from jest_stream.errors import SettingError, SettingTypeError
from jest_stream.selection import get_selection_method

__all__ = [
    'SCORING_MODES',
    'SELECTION_SCOPES',
    'ProcessSettings',
    'SelectionConfig',
    'resolve_selection',
    'super_batch_size_for',
]

SCORING_MODES = ('inline', 'process')
SELECTION_SCOPES = ('rank', 'global')
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)

_RATIO_HINT = ('the fraction of each super-batch left out: 0.8 keeps 1 in 5; 1.0 would keep '
               'nothing')


def super_batch_size_for(batch_size: int, filter_ratio: float) -> int:
    """``B = batch_size / (1 - filter_ratio)``, which must be a whole number.

    Args:
        batch_size (int): Sub-batch size ``b``.
        filter_ratio (float): Fraction of each super-batch filtered out, in ``[0, 1)``.

    Returns:
        int: The super-batch size ``B``.

    Raises:
        SettingError: A setting is out of range, or ``B`` is not whole (the message suggests
            ratios that make it so).
    """
    check_int(batch_size, 'batch_size', low=1)
    check_number(filter_ratio, 'filter_ratio', low=0.0, high=1.0, high_open=True,
                 hint=_RATIO_HINT)
    exact = batch_size / (1.0 - filter_ratio)
    size = round(exact)
    if abs(size - exact) > 1e-6 * exact:
        near = sorted({math.floor(exact), math.ceil(exact)})
        options = ', '.join(f'{1 - batch_size / n:.6g} (B={n})' for n in near if n >= batch_size)
        raise SettingError(
            f'batch_size / (1 - filter_ratio) = {batch_size} / {1 - filter_ratio:.6g} = '
            f'{exact:.4f} is not a whole super-batch size; use filter_ratio = {options}, or pass '
            f'super_batch_size=... instead of filter_ratio')
    return size


def _sub_batch_size_for(super_batch_size: int, filter_ratio: float) -> int:
    exact = super_batch_size * (1.0 - filter_ratio)
    size = round(exact)
    if abs(size - exact) > 1e-6 * max(exact, 1.0) or size < 1:
        raise SettingError(
            f'super-batches of {super_batch_size} times (1 - filter_ratio={filter_ratio:g}) = '
            f'{exact:.4f} is not a whole sub-batch size; choose a filter_ratio that keeps a '
            f'whole number of rows, or give batch_size=... instead')
    return size


def resolve_selection(criterion: str | Criterion, method: str | None) -> tuple[Criterion, str]:
    """The criterion, and the selection method (``None``: joint for a scoring criterion,
    uniform otherwise).

    Raises:
        SettingError: An unknown name, or uniform selection mixed with a scoring criterion.
    """
    crit = get_criterion(criterion)
    if method is None:
        method = 'joint' if crit.scores else 'uniform'
    get_selection_method(method)
    if (method == 'uniform') != (not crit.scores):
        raise SettingError(
            f'criterion={crit.name!r} with method={method!r}: uniform selection scores '
            f'nothing, so use criterion="uniform" with method="uniform" (or method=None)')
    return crit, method


@dataclass(frozen=True)
class ProcessSettings:
    """Settings of process scoring (``scoring='process'``).

    Attributes:
        sync_every (int): Publish the learner's weights every this many weight updates.
        max_staleness (int): Most updates a batch's scoring weights may lag the trainer's
            when it is handed over; a staler result is scored again.
        prefetch_depth (int): Super-batches in flight (the next one for the trainer and those
            loaded, and staleness permitting scored, behind it).
    """

    sync_every: int = 1
    max_staleness: int = 2
    prefetch_depth: int = 2

    @classmethod
    def create(cls, *, sync_every: int | None = None, max_staleness: int | None = None,
               prefetch_depth: int | None = None) -> ProcessSettings:
        """Settings with defaults filled in: ``sync_every=1``, ``prefetch_depth=2``,
        ``max_staleness = sync_every - 1 + prefetch_depth`` (scoring ahead then never forces
        a re-score at one update per batch)."""
        sync_every = 1 if sync_every is None else sync_every
        prefetch_depth = 2 if prefetch_depth is None else prefetch_depth
        check_int(sync_every, 'sync_every', low=1)
        check_int(prefetch_depth, 'prefetch_depth', low=1)
        if max_staleness is None:
            max_staleness = sync_every - 1 + prefetch_depth
        return cls(sync_every=sync_every, max_staleness=max_staleness,
                   prefetch_depth=prefetch_depth)

    def __post_init__(self) -> None:
        check_int(self.sync_every, 'sync_every', low=1)
        check_int(self.prefetch_depth, 'prefetch_depth', low=1)
        check_int(self.max_staleness, 'max_staleness', low=0)
        if self.max_staleness < self.sync_every - 1:
            raise SettingError(
                f'max_staleness={self.max_staleness} < sync_every - 1 = {self.sync_every - 1}: '
                f'weights published every {self.sync_every} updates are up to '
                f'{self.sync_every - 1} updates old by design. Raise max_staleness to at least '
                f'{self.sync_every - 1} or lower sync_every')


def _sizes(batch_size: int | None, filter_ratio: float | None, super_batch_size: int | None
           ) -> tuple[int | None, float | None, int | None]:
    """Any two of ``b``, ``f``, ``B`` give the third; one alone stays unsized."""
    given = [name for name, value in (('batch_size', batch_size), ('filter_ratio', filter_ratio),
                                      ('super_batch_size', super_batch_size))
             if value is not None]
    if batch_size is not None:
        check_int(batch_size, 'batch_size', low=1, hint='the sub-batch size the trainer gets')
    if filter_ratio is not None:
        check_number(filter_ratio, 'filter_ratio', low=0.0, high=1.0, high_open=True,
                     hint=_RATIO_HINT)
    if super_batch_size is not None:
        check_int(super_batch_size, 'super_batch_size', low=1)
    if len(given) == 3:
        raise SettingError('give filter_ratio=... or super_batch_size=..., not both: each '
                           'follows from the other and batch_size')
    if not given or (len(given) == 1 and super_batch_size is not None):
        raise SettingError('give the sub-batch size (batch_size=...) and one of '
                           'filter_ratio=... or super_batch_size=...')
    if len(given) == 1:
        return batch_size, filter_ratio, None
    if super_batch_size is None:
        return batch_size, filter_ratio, super_batch_size_for(batch_size, filter_ratio)
    if batch_size is None:
        return _sub_batch_size_for(super_batch_size, filter_ratio), filter_ratio, super_batch_size
    if super_batch_size < batch_size:
        raise SettingError(f'super_batch_size={super_batch_size} must be >= batch_size='
                           f'{batch_size}: a sub-batch is selected from a super-batch')
    return batch_size, 1.0 - batch_size / super_batch_size, super_batch_size


@dataclass(frozen=True)
class SelectionConfig:
    """Every setting of selection and of its data path, validated when built.

    Build it with :meth:`create` (which resolves names and defaults) or directly; either
    way every field is checked once, in ``__post_init__``. ``dataclasses.replace`` checks
    the new values too.

    Attributes:
        batch_size (int | None): Sub-batch size ``b`` handed to the trainer (per rank).
        super_batch_size (int | None): Super-batch size ``B`` read per step (per rank).
        filter_ratio (float | None): ``f = 1 - b / B``, the fraction left out.
        criterion (Criterion): How learner and reference losses combine into a score.
        method (str): Selection method: ``joint``, ``topk``, ``sample`` or ``uniform``.
        n_chunks (int): Chunks of the joint sampler (at most ``b`` are used).
        temperature (float): Softmax temperature of sampling; 0 is greedy.
        seed (int | None): Seed of the selection generators; None until a framework supplies
            one (Composer's ``rank_zero_seed``).
        count_flops (bool): Count the FLOPs of every scoring pass.
        scope (str): ``rank`` or ``global`` (see :mod:`jest_stream.distributed`).
        process (ProcessSettings | None): Process scoring settings; None scores inline.
        timeout (float): Seconds any wait on another process (DataLoader workers, the scorer
            process) may last before it raises; 0 means no timeout, which only inline scoring
            accepts.
        autocast (torch.dtype | None): Run the scoring forwards under ``torch.autocast`` in
            this dtype (``torch.bfloat16`` or ``torch.float16``); None scores in the models'
            own precision. Losses and scores are still computed in float32.

    Only ``b``, ``f`` or both may be unknown until the super-batch size is (in Composer, at
    ``FIT_START``): :meth:`sized` then fills them in.
    """

    batch_size: int | None = None
    super_batch_size: int | None = None
    filter_ratio: float | None = None
    criterion: Criterion = field(default_factory=lambda: get_criterion('learnability'))
    method: str = 'joint'
    n_chunks: int = 16
    temperature: float = 1.0
    seed: int | None = 0
    count_flops: bool = False
    scope: str = 'rank'
    process: ProcessSettings | None = None
    timeout: float = 300.0
    autocast: torch.dtype | None = None

    @classmethod
    def create(cls, *, batch_size: int | None = None, filter_ratio: float | None = None,
               super_batch_size: int | None = None, criterion: str | Criterion = 'learnability',
               method: str | None = None, n_chunks: int = 16, temperature: float = 1.0,
               seed: int | None = 0, count_flops: bool = False, selection_scope: str = 'rank',
               scoring: str = 'inline', sync_every: int | None = None,
               max_staleness: int | None = None, prefetch_depth: int | None = None,
               timeout: float = 300.0, autocast: torch.dtype | None = None
               ) -> SelectionConfig:
        """A configuration from the settings users pass to the loader or the algorithm.

        Args:
            batch_size (int, optional): Sub-batch size ``b``.
            filter_ratio (float, optional): Fraction of each super-batch left out, in
                ``[0, 1)``.
            super_batch_size (int, optional): ``B``; any two of the three sizes fix the third.
            criterion (str | Criterion): ``learnability``, ``hard_learner``,
                ``easy_reference``, ``uniform``, or a ``Criterion``.
            method (str, optional): ``joint`` (default when scoring), ``topk``, ``sample``;
                ``uniform`` goes with the uniform criterion.
            n_chunks (int): Chunks of the joint sampler.
            temperature (float): Softmax temperature; 0 is greedy.
            seed (int, optional): Seed of the selection generators.
            count_flops (bool): Count scoring FLOPs.
            selection_scope (str): ``rank`` or ``global``.
            scoring (str): ``inline`` or ``process``.
            sync_every (int, optional): Process scoring only (see :class:`ProcessSettings`).
            max_staleness (int, optional): Process scoring only.
            prefetch_depth (int, optional): Process scoring only.
            timeout (float): Seconds any wait on another process may last.
            autocast (torch.dtype, optional): Score under ``torch.autocast`` in this dtype.

        Returns:
            SelectionConfig: The validated configuration.

        Raises:
            SettingError: A value out of range, unknown, or inconsistent with another.
            SettingTypeError: A value of the wrong type (bools are not numbers).
        """
        crit, method = resolve_selection(criterion, method)
        check_choice(scoring, 'scoring', SCORING_MODES)
        given = {'sync_every': sync_every, 'max_staleness': max_staleness,
                 'prefetch_depth': prefetch_depth}
        if scoring == 'inline':
            extra = [f'{k}={v!r}' for k, v in given.items() if v is not None]
            if extra:
                raise SettingError(f'{", ".join(extra)} only apply to scoring="process"; inline '
                                   f'scoring always uses the current weights. Pass '
                                   f'scoring="process" or drop them')
            process = None
        else:
            process = ProcessSettings.create(**given)
        b, f, big = _sizes(batch_size, filter_ratio, super_batch_size)
        return cls(batch_size=b, super_batch_size=big, filter_ratio=f, criterion=crit,
                   method=method, n_chunks=n_chunks, temperature=temperature, seed=seed,
                   count_flops=count_flops, scope=selection_scope, process=process,
                   timeout=timeout, autocast=autocast)

    def __post_init__(self) -> None:
        b, f, big = self.batch_size, self.filter_ratio, self.super_batch_size
        if b is not None and f is not None and big is not None:
            ratio = _sizes(b, None, big)[1]
            if abs(ratio - f) > 1e-9:
                raise SettingError(f'filter_ratio={f!r} does not match 1 - batch_size / '
                                   f'super_batch_size = 1 - {b} / {big} = {ratio!r}')
        else:
            b, f, big = _sizes(b, f, big)
        for name, value in (('batch_size', b), ('filter_ratio', f), ('super_batch_size', big)):
            object.__setattr__(self, name, value)
        if not isinstance(self.criterion, Criterion):
            raise SettingTypeError(f'criterion={self.criterion!r} must be a Criterion; build '
                                   f'the configuration with SelectionConfig.create(...)')
        resolve_selection(self.criterion, self.method)
        check_int(self.n_chunks, 'n_chunks', low=1,
                  hint='chunks larger than batch_size are capped: one example per chunk')
        object.__setattr__(self, 'temperature', check_number(
            self.temperature, 'temperature', low=0.0, hint='0 is greedy'))
        if self.seed is not None:
            check_int(self.seed, 'seed')
        check_bool(self.count_flops, 'count_flops')
        check_choice(self.scope, 'selection_scope', SELECTION_SCOPES)
        if self.process is not None and not isinstance(self.process, ProcessSettings):
            raise SettingTypeError(f'process={self.process!r} must be ProcessSettings or None')
        self._check_timeout()
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise SettingError(f'autocast={self.autocast!r} must be torch.bfloat16 or '
                               f'torch.float16 (or None to score in full precision)')
        if self.scope == 'global' and self.process is not None:
            raise SettingError('selection_scope="global" runs collectives in the trainer '
                               'process, so it needs scoring="inline"; use selection_scope='
                               '"rank" with scoring="process"')

    def _check_timeout(self) -> None:
        timeout = check_number(self.timeout, 'timeout', low=0.0,
                               hint='seconds; 0 means no timeout')
        if timeout == 0 and self.process is not None:
            raise SettingError(
                'timeout=0 means no timeout, but with scoring="process" every wait on the '
                'scorer process must be bounded, so that a stuck process surfaces as an error '
                'instead of a hang: give the timeout in seconds (300 by default)')
        object.__setattr__(self, 'timeout', timeout)

    @property
    def sized(self) -> bool:
        """Whether ``b`` and ``B`` are both known."""
        return self.batch_size is not None and self.super_batch_size is not None

    def with_super_batch_size(self, super_batch_size: int) -> SelectionConfig:
        """This configuration for super-batches of ``super_batch_size``.

        An unsized configuration (only ``b`` or only ``f`` given) takes its missing size from
        ``super_batch_size``; a sized one must match it.

        Raises:
            SettingError: The sizes do not fit (``b > B``, or ``B * (1 - f)`` is not whole).
        """
        if self.sized:
            if self.super_batch_size != super_batch_size:
                raise SettingError(f'super-batches of {super_batch_size} rows do not match '
                                   f'super_batch_size={self.super_batch_size}')
            return self
        if self.batch_size is not None and self.batch_size > super_batch_size:
            raise SettingError(f'batch_size={self.batch_size} is larger than the super-batches '
                               f'of {super_batch_size} the train dataloader reads; read at '
                               f'least batch_size rows')
        b, f, big = _sizes(self.batch_size, self.filter_ratio, super_batch_size)
        return dataclasses.replace(self, batch_size=b, filter_ratio=f, super_batch_size=big)

    @property
    def scoring(self) -> str:
        """``inline`` or ``process``."""
        return 'inline' if self.process is None else 'process'

    def describe(self) -> dict[str, Any]:
        """The resolved settings as plain values (for logs, ``repr`` and checkpoints)."""
        out: dict[str, Any] = {
            'batch_size': self.batch_size, 'super_batch_size': self.super_batch_size,
            'filter_ratio': self.filter_ratio, 'criterion': self.criterion.name,
            'method': self.method, 'n_chunks': self.n_chunks, 'temperature': self.temperature,
            'seed': self.seed, 'count_flops': self.count_flops, 'selection_scope': self.scope,
            'scoring': self.scoring, 'timeout': self.timeout,
            'autocast': None if self.autocast is None else str(self.autocast)}
        if self.process is not None:
            out.update(dataclasses.asdict(self.process))
        return out

    def __repr__(self) -> str:
        settings = ', '.join(f'{key}={value!r}' for key, value in self.describe().items())
        return f'SelectionConfig({settings})'

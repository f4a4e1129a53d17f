"""Joint and independent selection of a sub-batch, as pure functions over scores.

Joint selection (JEST) draws the sub-batch in chunks. The first chunk is sampled
without replacement from the softmax of the candidates' own scores; every later
chunk from the softmax of their scores conditioned on what is already selected.
Sampling without replacement from a softmax is Gumbel-top-k: add Gumbel noise and
take the top entries.

Two forms of the sigmoid-loss sampler exist and, for the same generator state,
return the same indices:

- :func:`joint_select` works on the materialised ``B x B`` score matrix. It is the
  readable reference, and costs ``B^2`` memory.
- :func:`joint_select_incremental` asks a :class:`PairScores` for the rows and columns
  of each new chunk only and keeps a running conditional score, so it needs ``O(B c)``
  memory and never builds the matrix.

Both draw their noise on the CPU from a private ``torch.Generator``, one ``Tensor[B]``
per chunk in the same order. In float64 they agree exactly on random inputs; in
float32 they add the same terms in different orders, so a near-tie can rarely flip.

Independent selection (:func:`topk_select`, :func:`sample_select`,
:func:`uniform_select`) fits losses whose batch loss is a sum over examples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from jest_stream.checks import check_int, check_number
from jest_stream.errors import ScoreError, SettingError, SettingTypeError

__all__ = [
    'BatchScores',
    'CombinedConditional',
    'ConditionalScores',
    'Constraint',
    'MatrixPairScores',
    'PairScores',
    'SELECTION_METHODS',
    'chunk_sizes',
    'get_selection_method',
    'gumbel_noise',
    'gumbel_topk',
    'joint_select',
    'joint_select_incremental',
    'joint_select_softmax',
    'sample_select',
    'sample_select_with_probabilities',
    'select',
    'topk_select',
    'uniform_select',
]


@runtime_checkable
class PairScores(Protocol):
    """What the incremental joint sampler needs from a ``B x B`` pair-score matrix ``A``.

    An implementation may compute blocks on demand (from embeddings, say) so that the
    whole matrix never exists; :meth:`materialise` is there for tests and small batches.
    """

    size: int

    def diagonal(self) -> Tensor:
        """Tensor[B]: the self-pair scores ``A_kk``."""

    def columns(self, idx: Tensor) -> Tensor:
        """Tensor[B, c]: the columns ``A[:, idx]`` for ``idx`` (LongTensor[c])."""

    def rows(self, idx: Tensor) -> Tensor:
        """Tensor[c, B]: the rows ``A[idx, :]`` for ``idx`` (LongTensor[c])."""

    def materialise(self) -> Tensor:
        """Tensor[B, B]: the whole matrix ``A``."""


@runtime_checkable
class ConditionalScores(Protocol):
    """Scores of ``size`` candidates conditioned on a selected set that grows chunk by chunk.

    The blocked sampler reads :meth:`current`, samples a chunk and passes it to
    :meth:`add`. :class:`jest_stream.losses.InfoNCEConditional` is one.
    """

    size: int

    def current(self) -> Tensor:
        """Tensor[B]: every candidate's score given the chunks added so far."""

    def add(self, chunk: Tensor) -> None:
        """Condition on the candidates ``chunk`` (LongTensor[c]) as well."""


@runtime_checkable
class Constraint(Protocol):
    """Bounds on which rows a selection may pick (:class:`~jest_stream.quotas.GroupQuota`)."""

    def pick(self, keys: Tensor, k: int) -> Tensor:
        """LongTensor[k]: the rows of highest key that keep the bounds reachable."""


class MatrixPairScores:
    """:class:`PairScores` over an explicit matrix, for users who already have ``A``.

    Args:
        matrix (Tensor[B, B]): The pair scores ``A``.
    """

    def __init__(self, matrix: Tensor) -> None:
        _check_square(matrix)
        self.matrix = matrix
        self.size = int(matrix.shape[0])

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()

    def columns(self, idx: Tensor) -> Tensor:
        return self.matrix[:, idx]

    def rows(self, idx: Tensor) -> Tensor:
        return self.matrix[idx, :]

    def materialise(self) -> Tensor:
        return self.matrix


class CombinedConditional:
    """A weighted sum of :class:`ConditionalScores` over the same candidates.

    ``CombinedConditional([(1.0, learner), (-1.0, reference)])`` scores learnability.

    Args:
        terms (Sequence[tuple[float, ConditionalScores]]): ``(weight, scores)`` pairs.
    """

    def __init__(self, terms: Sequence[tuple[float, ConditionalScores]]) -> None:
        if not terms:
            raise SettingError('terms must hold at least one (weight, scores) pair')
        sizes = {scores.size for _, scores in terms}
        if len(sizes) != 1:
            raise ScoreError(f'all terms must score the same candidates, got sizes {sorted(sizes)}')
        self.terms = list(terms)
        self.size = sizes.pop()

    def current(self) -> Tensor:
        weighted = [weight * scores.current() for weight, scores in self.terms]
        return torch.stack(weighted).sum(0)

    def add(self, chunk: Tensor) -> None:
        for _, scores in self.terms:
            scores.add(chunk)


class _IncrementalPairConditional:
    """The conditional scores ``A_kk + sum_{j in S} (A_kj + A_jk)``, kept up to date."""

    def __init__(self, pair_scores: PairScores) -> None:
        self.pair_scores = pair_scores
        self.size = pair_scores.size
        self.scores = pair_scores.diagonal()

    def current(self) -> Tensor:
        return self.scores

    def add(self, chunk: Tensor) -> None:
        self.scores = (self.scores + self.pair_scores.columns(chunk).sum(1)
                       + self.pair_scores.rows(chunk).sum(0))


# Validation --------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    return check_int(value, name, low=1)


def _check_n_select(n_select: Any, n_candidates: int) -> int:
    _check_positive_int(n_select, 'n_select')
    if n_select > n_candidates:
        raise SettingError(f'n_select={n_select} exceeds the {n_candidates} candidates; '
                           f'select at most {n_candidates}')
    return n_select


def _check_temperature(temperature: Any) -> float:
    return check_number(temperature, 'temperature', low=0.0, hint='0 is greedy')


def _check_finite(scores: Tensor, name: str = 'scores') -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        n_nan = int(torch.isnan(scores).sum())
        raise ScoreError(
            f'{name} has {int(bad.sum())} non-finite entries ({n_nan} NaN); selection needs '
            f'finite scores. A NaN score is never selected, so it would silently drop its '
            f'candidate: check the scorer for a diverged model or an overflowing loss.')


def _check_square(scores: Tensor) -> None:
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ScoreError(f'scores must be a square Tensor[B, B], got shape {tuple(scores.shape)}')


def _check_vector(scores: Tensor) -> None:
    if scores.ndim != 1:
        raise ScoreError(f'scores must be a Tensor[B] of per-example scores, got shape '
                         f'{tuple(scores.shape)}')


# Building blocks ---------------------------------------------------------------------


def _private_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        # Fresh entropy rather than torch's global generator, which the caller may rely on.
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), 'little') >> 1)
    if generator.device.type != 'cpu':
        raise SettingError(f'generator must be a CPU torch.Generator (noise is drawn on the CPU '
                         f'so that every device selects the same), got one on {generator.device}')
    return generator


def chunk_sizes(n_select: int, n_chunks: int) -> list[int]:
    """Sizes of the chunks of blocked sampling.

    When ``n_chunks`` does not divide ``n_select``, the first ``n_select % n_chunks``
    chunks get one more element. When ``n_chunks > n_select`` there are ``n_select``
    chunks of size 1: a chunk is never empty.

    Args:
        n_select (int): Total number to select (positive).
        n_chunks (int): Requested number of chunks (positive).

    Returns:
        list[int]: ``min(n_chunks, n_select)`` positive sizes summing to ``n_select``.
    """
    _check_positive_int(n_select, 'n_select')
    _check_positive_int(n_chunks, 'n_chunks')
    n_chunks = min(n_chunks, n_select)
    base, extra = divmod(n_select, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


def gumbel_noise(n: int, *, generator: torch.Generator | None,
                 dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> Tensor:
    """Standard Gumbel noise, drawn on the CPU so that every device sees the same values.

    Args:
        n (int): Number of draws.
        generator (torch.Generator | None): A CPU generator; None uses a fresh private one
            (never the global generator).
        dtype (torch.dtype): dtype of the result (drawn in float64, then cast).
        device (torch.device | str, optional): Device of the result; CPU by default.

    Returns:
        Tensor[n]: ``-log(-log(u))`` for ``u`` uniform in ``(0, 1)``.
    """
    generator = _private_generator(generator)
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    # Keep both logs finite: rand can return exactly 0.
    info = torch.finfo(torch.float64)
    uniform = uniform.clamp(min=info.tiny, max=1.0 - info.eps / 2)
    return (-torch.log(-torch.log(uniform))).to(dtype=dtype, device=device)


def gumbel_topk(logits: Tensor, k: int, *, temperature: float,
                generator: torch.Generator | None, constraint: Constraint | None = None
                ) -> Tensor:
    """Sample ``k`` indices without replacement from ``softmax(logits / temperature)``.

    The Gumbel-top-k trick: the top ``k`` of ``logits / temperature + G``. Temperature 0
    is greedy top-k of ``logits``; it draws (and ignores) the same noise, so the generator
    advances the same way whatever the temperature.

    Args:
        logits (Tensor[B]): Unnormalised log-probabilities; ``-inf`` entries are never chosen.
        k (int): Number of indices to draw.
        temperature (float): Softmax temperature, >= 0.
        generator (torch.Generator | None): CPU generator of the noise.
        constraint (Constraint, optional): Picks the ``k`` rows from the perturbed scores
            under its bounds (a :class:`~jest_stream.quotas.GroupQuota`) instead of the top
            ``k``.

    Returns:
        LongTensor[k]: Indices in descending order of perturbed score, on ``logits.device``.
    """
    _check_positive_int(k, 'k')
    temperature = _check_temperature(temperature)
    if logits.ndim != 1:
        raise ScoreError(f'logits must be a Tensor[B], got shape {tuple(logits.shape)}')
    if torch.isnan(logits).any() or (logits == torch.inf).any():
        raise ScoreError('logits contain NaN or +inf; only -inf (never chosen) is allowed')
    n_finite = int(torch.isfinite(logits).sum())
    if n_finite < k:
        raise ScoreError(f'cannot draw k={k} from {n_finite} candidates with finite logits')
    dtype = torch.promote_types(logits.dtype, torch.float32)
    noise = gumbel_noise(logits.shape[0], generator=generator, dtype=dtype,
                         device=logits.device)
    keys = logits.to(dtype) if temperature == 0 else logits.to(dtype) / temperature + noise
    if constraint is not None:
        return constraint.pick(keys, k)
    return torch.topk(keys, k).indices


# Joint selection ---------------------------------------------------------------------


def joint_select(scores: Tensor, n_select: int, *, n_chunks: int = 16, temperature: float = 1.0,
                 generator: torch.Generator | None = None,
                 constraint: Constraint | None = None) -> Tensor:
    """Blocked joint sampling over the materialised pair-score matrix (reference form).

    The first chunk is drawn from ``softmax(A_kk / temperature)``; each later chunk from
    ``softmax((A_kk + sum_{j in S} (A_kj + A_jk)) / temperature)`` over the unselected
    candidates ``k``, where ``S`` is everything selected so far.

    Args:
        scores (Tensor[B, B]): Pair scores ``A`` (e.g. learner minus reference pair losses).
        n_select (int): Sub-batch size ``b``, at most ``B``.
        n_chunks (int): Number of chunks (see :func:`chunk_sizes` when it does not divide).
        temperature (float): Softmax temperature; 0 selects greedily.
        generator (torch.Generator | None): CPU generator of the noise; None draws a fresh
            private one.
        constraint (Constraint, optional): Bounds every chunk is picked under (quotas).

    Returns:
        LongTensor[n_select]: Distinct indices into ``B``, in selection order.
    """
    _check_square(scores)
    n_select = _check_n_select(n_select, scores.shape[0])
    sizes = chunk_sizes(n_select, n_chunks)
    temperature = _check_temperature(temperature)
    _check_finite(scores)
    generator = _private_generator(generator)
    diagonal = scores.diagonal()
    is_selected = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    selected = torch.zeros(0, dtype=torch.long, device=scores.device)
    for size in sizes:
        conditional = diagonal + scores[:, selected].sum(1) + scores[selected, :].sum(0)
        chunk = gumbel_topk(conditional.masked_fill(is_selected, -torch.inf), size,
                            temperature=temperature, generator=generator,
                            constraint=constraint)
        is_selected[chunk] = True
        selected = torch.cat([selected, chunk])
    return selected


def _blocked_select(conditional: ConditionalScores, n_select: int, *, n_chunks: int,
                    temperature: float, generator: torch.Generator | None,
                    constraint: Constraint | None = None) -> Tensor:
    """Blocked sampling over conditional scores that are updated after every chunk."""
    n_select = _check_n_select(n_select, conditional.size)
    sizes = chunk_sizes(n_select, n_chunks)
    temperature = _check_temperature(temperature)
    generator = _private_generator(generator)
    chunks: list[Tensor] = []
    is_selected = None
    for position, size in enumerate(sizes):
        scores = conditional.current()
        if is_selected is None:
            is_selected = torch.zeros(conditional.size, dtype=torch.bool, device=scores.device)
        _check_finite(scores.masked_fill(is_selected, 0.0))
        chunk = gumbel_topk(scores.masked_fill(is_selected, -torch.inf), size,
                            temperature=temperature, generator=generator,
                            constraint=constraint)
        is_selected[chunk] = True
        chunks.append(chunk)
        # No chunk is drawn after the last one, so conditioning on it would be wasted work.
        if position + 1 < len(sizes):
            conditional.add(chunk)
    return torch.cat(chunks)


def joint_select_incremental(pair_scores: PairScores, n_select: int, *, n_chunks: int = 16,
                             temperature: float = 1.0,
                             generator: torch.Generator | None = None,
                             constraint: Constraint | None = None) -> Tensor:
    """Blocked joint sampling that never builds the ``B x B`` matrix (fast path).

    Keeps the conditional score of every candidate and, after each chunk ``J``, adds
    ``A[:, J].sum(1) + A[J, :].sum(0)``. Draws the same noise as :func:`joint_select`,
    so for the same generator state both return the same indices (exactly in float64;
    in float32 a near-tie can rarely flip, as the sums are taken in another order).

    Args:
        pair_scores (PairScores): Blocks of the pair scores ``A``.
        n_select, n_chunks, temperature, generator, constraint: As for :func:`joint_select`.

    Returns:
        LongTensor[n_select]: Distinct indices into ``B``, in selection order. Memory is
        ``O(B c)`` for chunks of size ``c``.
    """
    if not isinstance(pair_scores, PairScores):
        raise SettingTypeError(f'pair_scores must implement PairScores (size, diagonal, '
                               f'columns, rows, materialise), got {type(pair_scores).__name__}')
    return _blocked_select(_IncrementalPairConditional(pair_scores), n_select,
                           n_chunks=n_chunks, temperature=temperature, generator=generator,
                           constraint=constraint)


def joint_select_softmax(conditional: ConditionalScores, n_select: int, *, n_chunks: int = 16,
                         temperature: float = 1.0,
                         generator: torch.Generator | None = None,
                         constraint: Constraint | None = None) -> Tensor:
    """Blocked joint sampling over conditional scores, e.g. of the softmax (InfoNCE) loss.

    Each chunk is drawn from ``softmax(conditional.current() / temperature)`` over the
    unselected candidates, then passed to ``conditional.add``. For learnability pass
    ``CombinedConditional([(1.0, learner), (-1.0, reference)])`` of two
    :class:`jest_stream.losses.InfoNCEConditional`.

    Args:
        conditional (ConditionalScores): The scores; updated in place as chunks are drawn
            (every chunk but the last is added).
        n_select, n_chunks, temperature, generator, constraint: As for :func:`joint_select`.

    Returns:
        LongTensor[n_select]: Distinct indices into ``B``, in selection order.
    """
    if not isinstance(conditional, ConditionalScores):
        raise SettingTypeError(f'conditional must implement ConditionalScores (size, current, '
                               f'add), got {type(conditional).__name__}')
    return _blocked_select(conditional, n_select, n_chunks=n_chunks, temperature=temperature,
                           generator=generator, constraint=constraint)


# Independent selection ---------------------------------------------------------------


def topk_select(scores: Tensor, n_select: int, *, generator: torch.Generator | None = None,
                constraint: Constraint | None = None, **_: Any) -> Tensor:
    """The ``n_select`` highest scores (greedy independent selection).

    Args:
        scores (Tensor[B]): Per-example scores.
        n_select (int): Number to keep, at most ``B``.
        generator (torch.Generator | None): Unused; accepted, like any other keyword, so
            that every selector can be called the same way.
        constraint (Constraint, optional): Bounds to pick under (quotas).

    Returns:
        LongTensor[n_select]: Indices in descending order of score.
    """
    _check_vector(scores)
    n_select = _check_n_select(n_select, scores.shape[0])
    _check_finite(scores)
    if constraint is not None:
        return constraint.pick(scores, n_select)
    return torch.topk(scores, n_select).indices


def sample_select(scores: Tensor, n_select: int, *, temperature: float = 1.0,
                  generator: torch.Generator | None = None,
                  constraint: Constraint | None = None) -> Tensor:
    """Sample ``n_select`` without replacement from ``softmax(scores / temperature)``.

    Args:
        scores (Tensor[B]): Per-example scores.
        n_select (int): Number to keep, at most ``B``.
        temperature (float): Softmax temperature; 0 is :func:`topk_select`.
        generator (torch.Generator | None): CPU generator of the noise; None draws a fresh
            private one.
        constraint (Constraint, optional): Bounds to pick under (quotas).

    Returns:
        LongTensor[n_select]: Distinct indices, in the order drawn.
    """
    _check_vector(scores)
    n_select = _check_n_select(n_select, scores.shape[0])
    _check_finite(scores)
    return gumbel_topk(scores, n_select, temperature=temperature, generator=generator,
                       constraint=constraint)


def sample_select_with_probabilities(scores: Tensor, n_select: int, *, temperature: float,
                                     generator: torch.Generator | None
                                     ) -> tuple[Tensor, Tensor]:
    """:func:`sample_select`, and each selected candidate's inclusion probability given the
    threshold of the draw: what importance weights need.

    Sampling without replacement by Gumbel-top-k keeps the ``k`` largest keys
    ``phi_i + G_i`` (``phi = scores / temperature``). With ``kappa`` the ``(k+1)``-th largest
    key, ``q_i = P(phi_i + G > kappa) = 1 - exp(-exp(phi_i - kappa))``, and
    ``sum_{i in S} f_i / (n q_i)`` is an unbiased estimate of the mean of ``f`` over all
    ``n`` candidates (priority sampling; Duffield et al., 2007; Kool et al., 2020,
    "Estimating gradients for discrete random variables by sampling without replacement",
    section 3). It draws the same noise as :func:`sample_select`, so it selects the same.

    Args:
        scores (Tensor[B]): Per-example scores.
        n_select (int): Number to keep, at most ``B``.
        temperature (float): Softmax temperature, > 0.
        generator (torch.Generator | None): CPU generator of the noise.

    Returns:
        tuple[LongTensor[n_select], Tensor[n_select]]: The indices, and their inclusion
        probabilities in float64 (1 for all when every candidate is kept).

    Raises:
        SettingError: ``temperature`` is not positive (inclusion probabilities need noise),
            or ``n_select`` is out of range.
        ScoreError: ``scores`` is not a 1-D tensor, or holds NaN or inf.
    """
    _check_vector(scores)
    n_select = _check_n_select(n_select, scores.shape[0])
    _check_finite(scores)
    temperature = _check_temperature(temperature)
    if temperature == 0:
        raise SettingError('inclusion probabilities need a positive temperature: at 0 the '
                           'selection is deterministic')
    phi = scores.detach().to(torch.float64).cpu() / temperature
    keys = phi + gumbel_noise(len(phi), generator=generator)
    ranked = torch.argsort(keys, descending=True)
    chosen = ranked[:n_select]
    if n_select == len(phi):
        return chosen, torch.ones(n_select, dtype=torch.float64)
    kappa = keys[ranked[n_select]]
    probabilities = -torch.expm1(-torch.exp(phi[chosen] - kappa))
    return chosen, probabilities


def uniform_select(n_candidates: int, n_select: int, *,
                   generator: torch.Generator | None = None,
                   constraint: Constraint | None = None) -> Tensor:
    """``n_select`` candidates drawn uniformly without replacement (the baseline).

    Args:
        n_candidates (int): Super-batch size ``B``.
        n_select (int): Number to keep, at most ``B``.
        generator (torch.Generator | None): CPU generator; None draws a fresh private one.
        constraint (Constraint, optional): Bounds to pick under (quotas): then a uniformly
            random order of the candidates is picked from under them.

    Returns:
        LongTensor[n_select]: The first ``n_select`` entries of a random permutation (CPU).
    """
    _check_positive_int(n_candidates, 'n_candidates')
    n_select = _check_n_select(n_select, n_candidates)
    generator = _private_generator(generator)
    order = torch.randperm(n_candidates, generator=generator)
    if constraint is not None:
        keys = torch.empty(n_candidates, dtype=torch.float64)
        keys[order] = -torch.arange(n_candidates, dtype=torch.float64)
        return constraint.pick(keys, n_select)
    return order[:n_select]


# The registry of selection methods -----------------------------------------------------


@runtime_checkable
class BatchScores(Protocol):
    """Scores of one super-batch of ``size`` candidates, in whatever form the loss allows.

    :mod:`jest_stream.scores` has the built-in forms: per-example scores, pair scores of the
    sigmoid loss, conditional scores of the softmax loss.
    """

    size: int

    def self_scores(self) -> Tensor:
        """Tensor[B]: each candidate's own score (the diagonal for pair scores); statistics."""

    def per_example(self) -> Tensor:
        """Tensor[B]: each candidate's score for independent selection."""

    def select_jointly(self, n_select: int, *, n_chunks: int, temperature: float,
                       generator: torch.Generator) -> Tensor:
        """LongTensor[n_select]: blocked joint sampling over these scores (built-in forms
        also take ``constraint=``, bounds such as quotas to pick every chunk under)."""

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> BatchScores:
        """The same scores over candidates rearranged by ``fn`` (a reorder, a gather, an
        all-gather across ranks), applied to every per-candidate tensor."""


def _joint(scores: BatchScores | None, n_candidates: int, n_select: int, *, n_chunks: int,
           temperature: float, generator: torch.Generator,
           constraint: Constraint | None = None) -> Tensor:
    extra = {} if constraint is None else {'constraint': constraint}
    return scores.select_jointly(n_select, n_chunks=n_chunks, temperature=temperature,
                                 generator=generator, **extra)


def _topk(scores: BatchScores | None, n_candidates: int, n_select: int, *, n_chunks: int,
          temperature: float, generator: torch.Generator,
          constraint: Constraint | None = None) -> Tensor:
    return topk_select(scores.per_example(), n_select, constraint=constraint)


def _sample(scores: BatchScores | None, n_candidates: int, n_select: int, *, n_chunks: int,
            temperature: float, generator: torch.Generator,
            constraint: Constraint | None = None) -> Tensor:
    return sample_select(scores.per_example(), n_select, temperature=temperature,
                         generator=generator, constraint=constraint)


def _uniform(scores: BatchScores | None, n_candidates: int, n_select: int, *, n_chunks: int,
             temperature: float, generator: torch.Generator,
             constraint: Constraint | None = None) -> Tensor:
    return uniform_select(n_candidates, n_select, generator=generator, constraint=constraint)


SelectionMethod = Callable[..., Tensor]

SELECTION_METHODS: dict[str, SelectionMethod] = {
    'joint': _joint,
    'topk': _topk,
    'sample': _sample,
    'uniform': _uniform,
}


def get_selection_method(name: str) -> SelectionMethod:
    """Look up a selection method by name.

    Args:
        name (str): ``joint`` (blocked joint sampling over pair scores), ``topk`` (greedy
            independent), ``sample`` (independent sampling from the softmax of the
            scores) or ``uniform`` (no scores).

    Returns:
        Callable: ``fn(scores, n_candidates, n_select, *, n_chunks, temperature, generator)``.

    Raises:
        SettingError: ``name`` is not one of them (the message lists them).
    """
    if not isinstance(name, str) or name not in SELECTION_METHODS:
        raise SettingError(f'method={name!r} is not known; choose one of '
                           f'{sorted(SELECTION_METHODS)}')
    return SELECTION_METHODS[name]


def select(scores: BatchScores | None, n_candidates: int, n_select: int, *, method: str,
           n_chunks: int, temperature: float, generator: torch.Generator,
           constraint: Constraint | None = None) -> Tensor:
    """Indices of the ``n_select`` candidates to keep, by the method named ``method``.

    Args:
        scores (BatchScores | None): The candidates' scores; None for ``uniform``.
        n_candidates (int): ``B``.
        n_select (int): ``b``.
        method (str): A name of :data:`SELECTION_METHODS`.
        n_chunks (int): Chunks of the joint sampler.
        temperature (float): Softmax temperature; 0 is greedy.
        generator (torch.Generator): CPU generator of the noise.
        constraint (Constraint, optional): Bounds to pick under (quotas).

    Returns:
        LongTensor[n_select]: Distinct indices into the candidates, on the CPU.
    """
    extra = {} if constraint is None else {'constraint': constraint}
    indices = get_selection_method(method)(
        scores, n_candidates, n_select, n_chunks=n_chunks, temperature=temperature,
        generator=generator, **extra)
    return indices.cpu()

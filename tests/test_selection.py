"""Joint and independent selection: distributions, agreement of the two joint forms, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from jest_stream.errors import JestStreamError
from jest_stream.losses import (
    InfoNCEConditional,
    infonce_conditional_losses,
    sigmoid_pair_losses,
)
from jest_stream.selection import (
    CombinedConditional,
    ConditionalScores,
    MatrixPairScores,
    PairScores,
    chunk_sizes,
    gumbel_noise,
    gumbel_topk,
    joint_select,
    joint_select_incremental,
    joint_select_softmax,
    sample_select,
    topk_select,
    uniform_select,
)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # The tensors here are small: on a busy machine, intra-op threads waiting for each
    # other cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, n, generator=seeded(seed), dtype=dtype)


class Tower:
    """Normalised embeddings and the sigmoid-loss parameters of one model."""

    def __init__(self, image, text, temperature, bias):
        self.image, self.text, self.temperature, self.bias = image, text, temperature, bias

    def block(self, rows=None, cols=None):
        return sigmoid_pair_losses(self.image, self.text, self.temperature, self.bias,
                                   rows=rows, cols=cols)


class LearnabilityPairScores:
    """Pair scores learner minus reference, computed block by block from embeddings."""

    def __init__(self, learner: Tower, reference: Tower):
        self.learner, self.reference = learner, reference
        self.size = learner.image.shape[0]

    def diagonal(self):
        def own(tower):
            return F.softplus(-(tower.temperature * (tower.image * tower.text).sum(-1)
                                + tower.bias))
        return own(self.learner) - own(self.reference)

    def columns(self, idx):
        return self.learner.block(cols=idx) - self.reference.block(cols=idx)

    def rows(self, idx):
        return self.learner.block(rows=idx) - self.reference.block(rows=idx)

    def materialise(self):
        return self.learner.block() - self.reference.block()


def learnability_scores(n: int, d: int, seed: int, dtype=torch.float64) -> LearnabilityPairScores:
    generator = seeded(seed)
    concepts = F.normalize(torch.randn(n, d, generator=generator, dtype=dtype), dim=-1)

    def tower(noise, temperature, bias):
        image = F.normalize(concepts + noise * torch.randn(n, d, generator=generator, dtype=dtype),
                            dim=-1)
        text = F.normalize(concepts + noise * torch.randn(n, d, generator=generator, dtype=dtype),
                           dim=-1)
        return Tower(image, text, temperature, bias)

    # The reference is the better model: its matching pairs are closer.
    return LearnabilityPairScores(tower(0.8, 10.0, -10.0), tower(0.3, 12.0, -8.0))


# chunk_sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize('n_select, n_chunks, expected', [
    (16, 4, [4, 4, 4, 4]),
    (10, 4, [3, 3, 2, 2]),
    (7, 3, [3, 2, 2]),
    (3, 16, [1, 1, 1]),
    (1, 1, [1]),
])
def test_chunk_sizes(n_select, n_chunks, expected):
    assert chunk_sizes(n_select, n_chunks) == expected


@pytest.mark.parametrize('n_select, n_chunks, name', [
    (0, 4, 'n_select'), (-3, 4, 'n_select'), (2.0, 1, 'n_select'), (True, 1, 'n_select'),
    (4, 0, 'n_chunks'), (4, 1.5, 'n_chunks'),
])
def test_chunk_sizes_rejects_bad_arguments(n_select, n_chunks, name):
    with pytest.raises(JestStreamError, match=name):
        chunk_sizes(n_select, n_chunks)


# Noise -------------------------------------------------------------------------------


def test_gumbel_noise_is_reproducible_and_leaves_the_global_generator_alone():
    before = torch.get_rng_state()
    a = gumbel_noise(1000, generator=seeded(3))
    b = gumbel_noise(1000, generator=seeded(3), dtype=torch.float32)
    gumbel_noise(10, generator=None)
    joint_select(random_matrix(8, 0), 3, n_chunks=2, generator=None)
    sample_select(torch.arange(8.0), 3, generator=None)
    uniform_select(8, 3, generator=None)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.dtype == torch.float64 and torch.isfinite(a).all()
    torch.testing.assert_close(b, a.float())
    # Standard Gumbel: mean is the Euler-Mascheroni constant, variance pi^2 / 6.
    many = gumbel_noise(200_000, generator=seeded(4))
    assert abs(many.mean().item() - 0.5772) < 0.01
    assert abs(many.var().item() - math.pi ** 2 / 6) < 0.03


def test_gumbel_topk_never_picks_minus_inf_and_counts_finite_entries():
    logits = torch.tensor([0.0, -torch.inf, 5.0, -torch.inf, 1.0])
    for seed in range(50):
        chosen = gumbel_topk(logits, 3, temperature=10.0, generator=seeded(seed))
        assert sorted(chosen.tolist()) == [0, 2, 4]
    with pytest.raises(ValueError, match='k=4'):
        gumbel_topk(logits, 4, temperature=1.0, generator=seeded(0))
    with pytest.raises(ValueError, match='NaN'):
        gumbel_topk(torch.tensor([0.0, math.nan]), 1, temperature=1.0, generator=seeded(0))


def test_gumbel_topk_order_and_noise_consumption():
    logits = torch.randn(50, generator=seeded(1))
    chosen = gumbel_topk(logits, 10, temperature=0.5, generator=seeded(2))
    keys = logits.double() / 0.5 + gumbel_noise(50, generator=seeded(2))
    assert torch.equal(chosen, torch.argsort(keys, descending=True)[:10])
    greedy_generator, sampling_generator = seeded(7), seeded(7)
    greedy = gumbel_topk(logits, 10, temperature=0.0, generator=greedy_generator)
    gumbel_topk(logits, 10, temperature=2.0, generator=sampling_generator)
    assert torch.equal(greedy, torch.topk(logits, 10).indices)
    assert torch.equal(greedy_generator.get_state(), sampling_generator.get_state())


# Joint selection: the two forms agree ------------------------------------------------


SHAPES = [  # (B, n_select, n_chunks, temperature)
    (10, 7, 3, 1.0),
    (64, 13, 4, 0.0),
    (64, 13, 4, 0.5),
    (100, 100, 16, 2.0),
    (257, 51, 16, 1.0),
    (300, 60, 7, 0.0),
    (6, 4, 16, 1.0),
]


@pytest.mark.parametrize('size, n_select, n_chunks, temperature', SHAPES)
def test_incremental_equals_materialised_on_a_matrix(size, n_select, n_chunks, temperature):
    for seed in range(8):
        scores = random_matrix(size, seed)
        materialised = joint_select(scores, n_select, n_chunks=n_chunks,
                                    temperature=temperature, generator=seeded(100 + seed))
        incremental = joint_select_incremental(MatrixPairScores(scores), n_select,
                                               n_chunks=n_chunks, temperature=temperature,
                                               generator=seeded(100 + seed))
        assert torch.equal(materialised, incremental)


@pytest.mark.parametrize('size, n_select, n_chunks, temperature', SHAPES)
def test_incremental_equals_materialised_on_embeddings(size, n_select, n_chunks, temperature):
    for seed in range(4):
        pairs = learnability_scores(size, 16, seed)
        assert isinstance(pairs, PairScores)
        materialised = joint_select(pairs.materialise(), n_select, n_chunks=n_chunks,
                                    temperature=temperature, generator=seeded(seed))
        incremental = joint_select_incremental(pairs, n_select, n_chunks=n_chunks,
                                               temperature=temperature, generator=seeded(seed))
        assert torch.equal(materialised, incremental)


@pytest.mark.parametrize('seed, temperature', [(0, 1.0), (1, 0.0)])
def test_incremental_equals_materialised_at_scale(seed, temperature):
    size = 4096
    pairs = learnability_scores(size, 32, seed)
    n_select = size // 5  # 819: not a multiple of the 16 chunks
    materialised = joint_select(pairs.materialise(), n_select, temperature=temperature,
                                generator=seeded(seed))
    incremental = joint_select_incremental(pairs, n_select, temperature=temperature,
                                           generator=seeded(seed))
    assert torch.equal(materialised, incremental)


def float32_disagreement(n_trials: int = 200, size: int = 512) -> tuple[float, float]:
    """How often float32 materialised and incremental selections differ (order, set)."""
    order_differs = set_differs = 0
    for trial in range(n_trials):
        pairs = learnability_scores(size, 32, 1000 + trial, dtype=torch.float32)
        materialised = joint_select(pairs.materialise(), size // 5, generator=seeded(trial))
        incremental = joint_select_incremental(pairs, size // 5, generator=seeded(trial))
        order_differs += not torch.equal(materialised, incremental)
        set_differs += set(materialised.tolist()) != set(incremental.tolist())
    return order_differs / n_trials, set_differs / n_trials


def test_float32_disagreement_is_rare():
    order_rate, set_rate = float32_disagreement()
    print(f'float32 B=512 b=102 n_chunks=16 temperature=1, 200 trials: order differs in '
          f'{order_rate:.1%}, selected set differs in {set_rate:.1%}')
    assert order_rate < 0.05


# Joint selection: distributions ------------------------------------------------------


def test_first_chunk_follows_softmax_of_the_diagonal():
    scores = torch.tensor([[0.0, 9.0, 9.0, 9.0],
                           [9.0, 1.0, 9.0, 9.0],
                           [9.0, 9.0, -1.0, 9.0],
                           [9.0, 9.0, 9.0, 0.5]])
    temperature = 0.8
    generator = seeded(0)
    draws = 20_000
    counts = torch.zeros(4)
    for _ in range(draws):
        counts[joint_select(scores, 1, n_chunks=1, temperature=temperature,
                            generator=generator)] += 1
    expected = torch.softmax(scores.diagonal() / temperature, 0)
    torch.testing.assert_close(counts / draws, expected, rtol=0, atol=0.015)


def test_later_chunk_follows_softmax_of_the_conditional_score():
    # Asymmetric A: the conditional score needs both A_kj and A_jk.
    scores = torch.tensor([[0.0, 0.5, -1.0],
                           [1.5, 0.2, 0.0],
                           [0.3, -0.4, 0.1]], dtype=torch.float64)
    generator = seeded(1)
    draws = 10_000
    pairs = torch.zeros(3, 3)
    for _ in range(draws):
        first, second = joint_select(scores, 2, n_chunks=2, generator=generator).tolist()
        pairs[first, second] += 1
    diagonal = scores.diagonal()
    first_probs = torch.softmax(diagonal, 0)
    for j in range(3):
        conditional = diagonal + scores[:, j] + scores[j, :]
        conditional[j] = -torch.inf
        expected = first_probs[j] * torch.softmax(conditional, 0)
        torch.testing.assert_close(pairs[j] / draws, expected.float(), rtol=0, atol=0.02)


def batch_score(scores: torch.Tensor, subset: list[int]) -> float:
    index = torch.tensor(subset)
    return scores[index][:, index].sum().item()


@pytest.mark.parametrize('seed', range(5))
def test_greedy_maximises_the_batch_score_one_step_at_a_time(seed):
    scores = random_matrix(7, seed)
    chosen = joint_select(scores, 5, n_chunks=5, temperature=0.0, generator=seeded(0))
    assert chosen[0] == scores.diagonal().argmax()
    for step in range(1, 5):
        selected = chosen[:step].tolist()
        rest = [k for k in range(7) if k not in selected]
        best = max(rest, key=lambda k: batch_score(scores, selected + [k]))
        assert chosen[step] == best


@pytest.mark.parametrize('seed', range(5))
def test_greedy_chunk_is_the_best_subset_given_earlier_chunks(seed):
    # Within a chunk the conditional scores ignore each other's pairs; the chosen chunk is
    # the subset with the highest sum of conditional scores, found here by enumeration.
    scores = random_matrix(8, seed)
    chosen = joint_select(scores, 6, n_chunks=2, temperature=0.0, generator=seeded(0))
    first, second = chosen[:3].tolist(), chosen[3:].tolist()
    assert set(first) == set(torch.topk(scores.diagonal(), 3).indices.tolist())

    def conditional_sum(subset):
        return sum(batch_score(scores, first + [k]) - batch_score(scores, first) for k in subset)

    rest = [k for k in range(8) if k not in first]
    best = max(itertools.combinations(rest, 3), key=conditional_sum)
    assert set(second) == set(best)


# Joint selection: the softmax loss ---------------------------------------------------


def infonce_pair(size: int, seed: int):
    generator = seeded(seed)
    concepts = F.normalize(torch.randn(size, 8, generator=generator, dtype=torch.float64), dim=-1)

    def model(noise, temperature):
        image = F.normalize(concepts + noise * torch.randn(size, 8, generator=generator,
                                                           dtype=torch.float64), dim=-1)
        text = F.normalize(concepts + noise * torch.randn(size, 8, generator=generator,
                                                          dtype=torch.float64), dim=-1)
        return InfoNCEConditional(image, text, temperature)

    return model(0.8, 10.0), model(0.3, 14.0)


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_joint_select_softmax_returns_distinct_indices(temperature):
    learner, reference = infonce_pair(50, seed=0)
    combined = CombinedConditional([(1.0, learner), (-1.0, reference)])
    assert isinstance(combined, ConditionalScores)
    chosen = joint_select_softmax(combined, 23, n_chunks=5, temperature=temperature,
                                  generator=seeded(0))
    assert chosen.shape == (23,) and len(set(chosen.tolist())) == 23
    assert 0 <= chosen.min() and chosen.max() < 50


def test_combined_conditional_is_the_weighted_sum():
    learner, reference = infonce_pair(20, seed=1)
    combined = CombinedConditional([(1.0, learner), (-1.0, reference)])
    assert torch.equal(combined.current(), torch.zeros(20, dtype=torch.float64))
    combined.add(torch.tensor([3, 4, 9]))
    torch.testing.assert_close(combined.current(), learner.losses() - reference.losses())
    with pytest.raises(ValueError, match='same candidates'):
        CombinedConditional([(1.0, learner), (1.0, infonce_pair(5, seed=0)[0])])


def test_joint_select_softmax_later_chunk_follows_the_conditional_losses():
    learner, reference = infonce_pair(30, seed=2)
    combined = CombinedConditional([(1.0, learner), (-1.0, reference)])
    chosen = joint_select_softmax(combined, 10, n_chunks=2, temperature=0.0,
                                  generator=seeded(0))
    first = chosen[:5]
    scores = (infonce_conditional_losses(learner.image, learner.text, 10.0, first)
              - infonce_conditional_losses(reference.image, reference.text, 14.0, first))
    scores[first] = -torch.inf
    assert set(chosen[5:].tolist()) == set(torch.topk(scores, 5).indices.tolist())


# Common properties and errors --------------------------------------------------------


def all_selectors(scores: torch.Tensor, n_select: int, generator: torch.Generator):
    return {
        'joint': joint_select(scores, n_select, generator=generator),
        'joint_incremental': joint_select_incremental(MatrixPairScores(scores), n_select,
                                                      generator=generator),
        'topk': topk_select(scores.diagonal(), n_select),
        'sample': sample_select(scores.diagonal(), n_select, generator=generator),
        'uniform': uniform_select(scores.shape[0], n_select, generator=generator),
    }


@pytest.mark.parametrize('size, n_select', [(1, 1), (20, 1), (20, 20), (37, 11)])
def test_indices_are_distinct_in_range_and_complete(size, n_select):
    for name, chosen in all_selectors(random_matrix(size, 0), n_select, seeded(0)).items():
        assert chosen.dtype == torch.long, name
        assert chosen.shape == (n_select,), name
        assert len(set(chosen.tolist())) == n_select, name
        assert 0 <= chosen.min() and chosen.max() < size, name


def test_joint_select_rejects_bad_arguments():
    scores = random_matrix(6, 0)
    with pytest.raises(ValueError, match='scores must be a square'):
        joint_select(scores[:5], 2)
    with pytest.raises(ValueError, match='scores must be a square'):
        joint_select(scores[0], 2)
    with pytest.raises(ValueError, match='n_select'):
        joint_select(scores, 0)
    with pytest.raises(ValueError, match='n_select'):
        joint_select(scores, 7)
    with pytest.raises(ValueError, match='n_chunks'):
        joint_select(scores, 2, n_chunks=0)
    with pytest.raises(ValueError, match='temperature'):
        joint_select(scores, 2, temperature=-1.0)
    with pytest.raises(ValueError, match='temperature'):
        joint_select(scores, 2, temperature=math.nan)
    with pytest.raises(ValueError, match='n_select'):
        joint_select_incremental(MatrixPairScores(scores), 7)
    with pytest.raises(TypeError, match='PairScores'):
        joint_select_incremental(scores, 2)
    with pytest.raises(TypeError, match='ConditionalScores'):
        joint_select_softmax(scores, 2)
    with pytest.raises(ValueError, match='n_candidates'):
        uniform_select(0, 1)
    with pytest.raises(ValueError, match='n_select'):
        uniform_select(5, 6)
    with pytest.raises(ValueError, match='scores must be a Tensor\\[B\\]'):
        topk_select(scores, 2)


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_non_finite_scores_raise(bad):
    scores = random_matrix(6, 0)
    scores[2, 4] = bad
    with pytest.raises(ValueError, match='scores has 1 non-finite'):
        joint_select(scores, 3)
    diagonal = scores.diagonal().clone()
    diagonal[1] = bad
    with pytest.raises(ValueError, match='NaN score is never selected'):
        joint_select(torch.diag(diagonal), 3)
    with pytest.raises(ValueError, match='scores has'):
        joint_select_incremental(MatrixPairScores(torch.diag(diagonal)), 3)
    with pytest.raises(ValueError, match='scores has'):
        topk_select(diagonal, 3)
    with pytest.raises(ValueError, match='scores has'):
        sample_select(diagonal, 3)


def test_incremental_catches_non_finite_blocks_before_sampling_on_them():
    scores = random_matrix(6, 0)
    scores[:, 0] = math.nan
    scores[0, 0] = 10.0  # candidate 0 is selected first: its column spreads NaN.
    with pytest.raises(ValueError, match='scores has'):
        joint_select_incremental(MatrixPairScores(scores), 3, n_chunks=3, temperature=0.0)


# Independent selection ---------------------------------------------------------------


def test_topk_select_is_torch_topk():
    scores = torch.randn(100, generator=seeded(0))
    assert torch.equal(topk_select(scores, 17, generator=seeded(1), temperature=3.0),
                       torch.topk(scores, 17).indices)


def test_sample_select_follows_softmax():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    generator = seeded(5)
    draws = 20_000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[sample_select(scores, 1, temperature=1.5, generator=generator)] += 1
    torch.testing.assert_close(counts / draws, torch.softmax(scores / 1.5, 0), rtol=0, atol=0.015)


def test_sample_select_at_temperature_zero_is_topk():
    scores = torch.randn(40, generator=seeded(2))
    assert torch.equal(sample_select(scores, 9, temperature=0.0, generator=seeded(0)),
                       topk_select(scores, 9))


def test_uniform_select_is_a_reproducible_permutation_prefix():
    assert sorted(uniform_select(12, 12, generator=seeded(0)).tolist()) == list(range(12))
    first = uniform_select(1000, 50, generator=seeded(3))
    assert torch.equal(first, uniform_select(1000, 50, generator=seeded(3)))
    assert torch.equal(first, torch.randperm(1000, generator=seeded(3))[:50])
    assert not torch.equal(first, uniform_select(1000, 50, generator=seeded(4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_selects_the_same_as_cpu():
    pairs = learnability_scores(1024, 32, 0)
    cpu = joint_select(pairs.materialise(), 200, generator=seeded(0))
    scores = pairs.materialise().cuda()
    assert torch.equal(joint_select(scores, 200, generator=seeded(0)).cpu(), cpu)
    assert torch.equal(
        joint_select_incremental(MatrixPairScores(scores), 200, generator=seeded(0)).cpu(), cpu)

"""Data selection for a language model on real text: steps, FLOPs and seconds to a held-out loss.

Run it from the repository root (``make data`` installs the speeches first)::

    python -m benchmarks.language_model --quick   # one seed, 150 steps: a few minutes
    python -m benchmarks.language_model           # ratios 0.5 and 0.8, 3 seeds, 500 steps

The State of the Union addresses (:mod:`benchmarks.common.text`) as byte tokens: a pool of
sequences from 195 speeches in three streams, one per era (1790-1899, 1900-1999,
2000-2021), 40% of them corrupted (shuffled bytes, random bytes); a clean reference split
of other speeches; clean held-out speeches for evaluation. A small causal Transformer
(:class:`CausalTransformer`, written here) learns from the pool through
``jest_stream.SelectiveLoader`` with ``jest_stream.LanguageModelScorer``; a reference of the
same shape, trained on the reference split only, has its per-sequence losses over the pool
stored by ``jest_stream.annotate`` in a reference cache (``loss_fn`` is
``jest_stream.sequence_losses`` with the padding mask read from the token ids) and read back
through ``jest_stream.ReferenceCache``, the path a user runs.

Methods (:data:`METHODS`): ``uniform`` (reads only the ``b`` sequences it trains on, run once
per seed and compared at every ratio), ``learnability`` at every filter ratio, and at the
ratios of ``--extra-ratios``: ``proxy`` (learnability scored by a ``ProxyScorer``, a smaller
Transformer trained online on what it selects) and ``quota`` (learnability with
``Quota(key='stream', proportional=True)``: each era keeps its share of the candidates).
Every method of a seed starts from the same initialisation.

It reports, per ratio and method, the three speed-ups to the target (uniform's final held-out
loss, nats per byte): ``speedup_steps`` (uniform's budget over the steps needed),
``speedup_flops`` (uniform's FLOPs over the method's, each step counted with
``torch.utils.flop_counter``: training, scoring with the stored reference, selection, a
proxy's training) and ``speedup_wall`` (uniform's training seconds over the method's,
evaluation excluded), on the mean curve over seeds and per seed; the share of noisy
sequences and of each era among those trained on (and the loader's ``share/<stream>``
metrics of the quota run); and the scorer's cost on this model: tokens per second of
scoring against training, and the peak memory of chunked scoring against its bound.
Results: ``benchmarks/results/language_model/language_model.json`` and ``.png``
(``language_model_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.common import report, stats
from benchmarks.common.data import read_columns
from benchmarks.common.text import (
    ERAS,
    PAD_ID,
    VOCAB_SIZE,
    PreparedText,
    open_pool,
    prepare_text,
)
from benchmarks.common.training import STEP_COSTS, train_on_arrays, train_selective
from jest_stream import (
    LanguageModelScorer,
    ProxyScorer,
    Quota,
    ReferenceCache,
    SelectionPolicy,
    SelectiveLoader,
    annotate,
    count_flops,
    get_criterion,
    get_selection_method,
    model_checksum,
    sequence_losses,
    super_batch_size_for,
    train_step_flops,
)

__all__ = [
    'CausalTransformer',
    'Config',
    'LMMethod',
    'LMSetup',
    'METHODS',
    'ModelSize',
    'QUICK',
    'SCHEMA',
    'TRANSFORM_ID',
    'format_table',
    'heldout_loss',
    'lm_loss',
    'main',
    'make_lm',
    'make_scorer',
    'measure_scorer',
    'plot',
    'prepare_setup',
    'run_benchmark',
    'run_one',
    'stored_loss',
    'summarise',
]

SCHEMA = 'jest_stream.language_model/1'
# What the reference reads: the cache is opened only for this transform.
TRANSFORM_ID = f'utf-8 bytes as token ids, {PAD_ID} = padding (vocabulary {VOCAB_SIZE})'
COLOURS = {'uniform': 'tab:gray', 'learnability': 'tab:blue', 'proxy': 'tab:green',
           'quota': 'tab:purple'}

# The model


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a causal mask, as two matrix products (the fused
    ``F.scaled_dot_product_attention`` is not counted by ``FlopCounterMode`` on the CPU)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: Tensor) -> Tensor:
        n, length, width = x.shape
        q, k, v = (self.qkv(x).view(n, length, 3, self.heads, width // self.heads)
                   .permute(2, 0, 3, 1, 4))
        weights = (q @ k.transpose(-1, -2)) / math.sqrt(width // self.heads)
        weights = weights.masked_fill(~causal, float('-inf')).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, width))


class _Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = _CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: Tensor, causal: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), causal)
        return x + self.mlp(self.mlp_norm(x))


class CausalTransformer(nn.Module):
    """A small GPT-style causal language model over byte tokens.

    Args:
        seq_len (int): Longest input ``T`` (learned position embeddings).
        width (int): Model width.
        depth (int): Transformer blocks.
        heads (int): Attention heads (they divide ``width``).
        vocab_size (int): Token ids ``V``.
    """

    def __init__(self, *, seq_len: int, width: int, depth: int, heads: int,
                 vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f'width={width} is not a multiple of heads={heads}')
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.register_buffer('causal', torch.ones(seq_len, seq_len, dtype=torch.bool).tril(),
                             persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``Tensor[n, T, V]`` of token ids ``Tensor[n, T]`` (any integer dtype)."""
        length = input_ids.shape[1]
        x = self.embed(input_ids.long()) + self.position[:length]
        causal = self.causal[:length, :length]
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.norm(x))


def make_lm(seed: int, *, seq_len: int, width: int, depth: int, heads: int
            ) -> CausalTransformer:
    """A :class:`CausalTransformer` whose weights depend only on ``seed`` (GPT-2's
    initialisation: normal(0, 0.02) weights and embeddings, zero biases, drawn from a private
    generator; the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        model = CausalTransformer(seq_len=seq_len, width=width, depth=depth, heads=heads)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias'):
                param.zero_()
            elif 'norm' not in name:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The training loss: the mean over sequences of each one's mean next-byte loss (nats),
    padding not counted; what ``LanguageModelScorer.training_loss`` minimises too."""
    losses, counted = sequence_losses(model(batch['input_ids']), batch['input_ids'],
                                      attention_mask=batch['attention_mask'])
    return losses[counted].mean()


def stored_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    """``annotate``'s ``loss_fn``: each sequence's mean next-byte loss, ``Tensor[n]``.

    ``annotate`` hands ``loss_fn`` a single column; the padding mask is not lost, as padding
    has its own token id (:data:`~benchmarks.common.text.PAD_ID`): the stored losses are the
    scorer's live ones (``attention_mask`` column) exactly.
    """
    return sequence_losses(logits, input_ids, attention_mask=input_ids != PAD_ID)[0]


def make_scorer(model: nn.Module, reference: Any, *, chunk_size: int | None = None
                ) -> LanguageModelScorer:
    """The scorer of the pool: token ids ``input_ids``, padding mask ``attention_mask``."""
    return LanguageModelScorer(model, reference, input_key='input_ids',
                               attention_mask_key='attention_mask', reduction='mean',
                               chunk_size=chunk_size, vocab_size=VOCAB_SIZE)


@torch.no_grad()
def heldout_loss(model: nn.Module, ids: Tensor, mask: Tensor, *, batch_size: int = 128
                 ) -> float:
    """Mean next-byte loss over every counted token of the held-out sequences (nats per byte).

    Args:
        model (nn.Module): The language model; its training mode is restored afterwards.
        ids (Tensor): Token ids ``[N, T]``.
        mask (Tensor): Attention mask ``[N, T]``.
        batch_size (int): Sequences per forward pass.
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(ids), batch_size):
            part, part_mask = ids[start:start + batch_size], mask[start:start + batch_size]
            losses, _ = sequence_losses(model(part), part, attention_mask=part_mask,
                                        reduction='sum')
            total += float(losses.sum())
            tokens += int((part_mask[:, 1:].bool() & part_mask[:, :-1].bool()).sum())
    finally:
        model.train(was_training)
    return total / tokens


# Settings


@dataclass(frozen=True)
class ModelSize:
    """The size of a :class:`CausalTransformer`.

    Attributes:
        width (int): Model width.
        depth (int): Transformer blocks.
        heads (int): Attention heads.
    """

    width: int
    depth: int
    heads: int


@dataclass(frozen=True)
class Config:
    """Every setting of a run (written into the results file).

    Attributes:
        ratios (tuple[float, ...]): Filter ratios of ``learnability``.
        extra_ratios (tuple[float, ...]): Ratios at which ``proxy`` and ``quota`` run too.
        methods (tuple[str, ...]): Methods besides ``uniform``.
        seeds (tuple[int, ...]): Seeds of the initialisation, the data order and selection.
        steps (int): Optimizer steps of every run.
        eval_every (int): Steps between evaluations.
        batch_size (int): Sub-batch size ``b`` (sequences).
        lr (float): Adam learning rate of the learner and the proxy.
        warmup_steps (int): Steps of the learner's linear learning-rate warm-up (0: none).
        selection (str): Selection method of the scored methods.
        temperature (float): Softmax temperature of sampled selections.
        seq_len (int): Tokens per sequence ``T``.
        learner (ModelSize): The learner's and the reference's size.
        proxy (ModelSize): The proxy learner's size.
        reference_steps (int): Adam steps of the reference on its clean split.
        reference_batch_size (int): Its batch size.
        noise_rate (float): Share of the pool's sequences corrupted.
        pool_limit (int | None): Sequences kept in the pool (at random; None: all).
        eval_sequences (int): Held-out sequences evaluated (a fixed random subset).
        data_seed (int): Seed of the splits, the noise and the evaluation subset.
        scorer_repeats (int): Interleaved repeats of the scorer's throughput measurement.
        memory_sequences (int): Sequences scored by the memory measurement.
        memory_chunks (tuple[int, ...]): Chunk sizes whose peak memory is measured.
        threads (int): torch intra-op threads.
        quick (bool): The ``--quick`` configuration.
        data_dir (str): Where the data and the reference caches are built once.
    """

    ratios: tuple[float, ...] = (0.5, 0.8)
    extra_ratios: tuple[float, ...] = (0.8,)
    methods: tuple[str, ...] = ('learnability', 'proxy', 'quota')
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 500
    eval_every: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    selection: str = 'topk'
    temperature: float = 1.0
    seq_len: int = 64
    learner: ModelSize = ModelSize(width=128, depth=2, heads=4)
    proxy: ModelSize = ModelSize(width=64, depth=1, heads=2)
    reference_steps: int = 600
    reference_batch_size: int = 32
    noise_rate: float = 0.4
    pool_limit: int | None = 40_000
    eval_sequences: int = 256
    data_seed: int = 0
    scorer_repeats: int = 15
    memory_sequences: int = 512
    memory_chunks: tuple[int, ...] = (512, 128, 32)
    threads: int = 1
    quick: bool = False
    data_dir: str = str(report.REPO_ROOT / 'data' / 'sotu')

    def super_batch_size(self, ratio: float) -> int:
        """``B`` of a filter ratio."""
        return super_batch_size_for(self.batch_size, ratio)

    def runs_at(self, ratio: float) -> tuple[str, ...]:
        """The scored methods run at ``ratio``."""
        return tuple(m for m in self.methods
                     if m == 'learnability' or ratio in self.extra_ratios)

    def checkpoints(self) -> list[int]:
        """Steps of the evaluations: 0, every ``eval_every``, and the last."""
        return sorted({0, *range(self.eval_every, self.steps + 1, self.eval_every), self.steps})

    def shape(self, proxy: bool = False) -> dict[str, int]:
        """Keyword arguments of :func:`make_lm` for the learner (or the proxy)."""
        return {'seq_len': self.seq_len, **asdict(self.proxy if proxy else self.learner)}


QUICK = Config(ratios=(0.8,), methods=('learnability',), seeds=(0,), steps=150, eval_every=15,
               reference_steps=300, pool_limit=15_000, scorer_repeats=5, memory_chunks=(128, 32),
               memory_sequences=128, quick=True)


# Set-up: data, reference, its stored losses


@dataclass
class LMSetup:
    """What every run shares.

    Attributes:
        prepared (PreparedText): The data.
        reference (CausalTransformer): The reference model (kept to count what a live one
            would cost, and to measure the scorer).
        cache (ReferenceCache): Its per-sequence losses over the pool: the scorers' reference.
        eval_ids (Tensor): Held-out token ids ``[N, T]``.
        eval_mask (Tensor): Their mask.
        probe (dict[str, Tensor]): The first pool sequences (ids ``0..n-1``), collated: FLOPs
            and the scorer's cost are measured on them.
        facts (dict): JSON-ready facts (data, reference, cache, one-off FLOPs).
    """

    prepared: PreparedText
    reference: nn.Module
    cache: ReferenceCache
    eval_ids: Tensor
    eval_mask: Tensor
    probe: dict[str, Tensor]
    facts: dict[str, Any]

    def evaluate(self, model: nn.Module) -> float:
        """Held-out loss of ``model``, nats per byte."""
        return heldout_loss(model, self.eval_ids, self.eval_mask)


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {key: torch.as_tensor(np.asarray(value)) for key, value in arrays.items()}


def _annotate(reference: nn.Module, prepared: PreparedText, progress: bool) -> ReferenceCache:
    """Store the reference's per-sequence losses over the pool, as ``jest-stream annotate``."""
    checksum = model_checksum(reference)
    dataset = open_pool(prepared, batch_size=512, seed=0, shuffle=False)
    try:
        out = prepared.root.with_name(prepared.root.name + '-references') / checksum[:16]
        annotate(out=out, model=reference, transform_id=TRANSFORM_ID, outputs='loss',
                 dataset=dataset, input_key='input_ids', target_key='input_ids',
                 loss_fn=stored_loss, batch_size=512, num_workers=0, progress=progress,
                 info={'benchmark': 'language_model'})
        return ReferenceCache(out, dataset=dataset, model_checksum=checksum,
                              transform=TRANSFORM_ID)
    finally:
        del dataset
        gc.collect()


def _check_cache(cache: ReferenceCache, reference: nn.Module, probe: dict[str, Tensor]) -> float:
    """The largest gap between stored and live reference losses on the probe (must be ~0)."""
    ids = torch.arange(len(probe['input_ids']))
    stored = cache.outputs(probe, ids)['loss']
    with torch.no_grad():
        losses, _ = sequence_losses(reference(probe['input_ids']), probe['input_ids'],
                                    attention_mask=probe['attention_mask'])
    gap = float((stored.float() - losses).abs().max())
    if gap > 1e-4:
        raise RuntimeError(f'the reference cache {cache.path} disagrees with the reference by '
                           f'{gap:.3g} nats on the first pool sequences: it was annotated for '
                           f'another model or pool')
    return gap


def prepare_setup(config: Config, *, progress: bool = True) -> LMSetup:
    """Build the data, train the reference on its split, annotate the pool, load evaluation.

    Args:
        config (Config): The settings.
        progress (bool): Show progress bars.

    Returns:
        LMSetup: What the runs share.
    """
    prepared = prepare_text(config.data_dir, seq_len=config.seq_len, noise_rate=config.noise_rate,
                            pool_limit=config.pool_limit, seed=config.data_seed,
                            progress=progress)
    clean = read_columns(prepared.reference_dir, ['input_ids', 'attention_mask'])
    reference = make_lm(10_000 + config.data_seed, **config.shape())
    started = time.perf_counter()
    train_on_arrays(reference, clean, lm_loss, steps=config.reference_steps,
                    batch_size=config.reference_batch_size, lr=config.lr, seed=config.data_seed,
                    progress=progress, desc='reference')
    reference_seconds = time.perf_counter() - started
    reference.eval()
    cache = _annotate(reference, prepared, progress)
    held_out = read_columns(prepared.eval_dir, ['input_ids', 'attention_mask'])
    rows = np.sort(np.random.default_rng(np.random.SeedSequence([config.data_seed, 7])).choice(
        len(held_out['input_ids']), min(config.eval_sequences, len(held_out['input_ids'])),
        replace=False))
    eval_ids = torch.as_tensor(held_out['input_ids'][rows])
    eval_mask = torch.as_tensor(held_out['attention_mask'][rows])
    biggest = max(config.super_batch_size(r) for r in config.ratios)
    probe = _tensors(_probe_columns(prepared, biggest))
    gap = _check_cache(cache, reference, probe)
    batch = _tensors({k: v[:config.reference_batch_size] for k, v in clean.items()})
    facts = {
        'data': prepared.summary(), 'reference_cache': str(cache.path),
        'reference_checksum': model_checksum(reference), 'cache_gap_nats': gap,
        'reference_seconds': reference_seconds,
        'reference_heldout_loss': heldout_loss(reference, eval_ids, eval_mask),
        'parameters': {'learner': _parameters(make_lm(0, **config.shape())),
                       'proxy': _parameters(make_lm(0, **config.shape(proxy=True)))},
        'eval_sequences': len(rows),
        'one_off_flops': {
            'reference_training': config.reference_steps * train_step_flops(reference, batch,
                                                                            lm_loss),
            'reference_annotation': cache.num_samples * count_flops(
                reference, probe['input_ids'][:1])[1]},
    }
    return LMSetup(prepared=prepared, reference=reference, cache=cache, eval_ids=eval_ids,
                   eval_mask=eval_mask, probe=probe, facts=facts)


def _probe_columns(prepared: PreparedText, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` pool sequences in global sample-id order (streams in order)."""
    parts: list[dict[str, np.ndarray]] = []
    left = n
    for path in prepared.pool_dirs:
        if left <= 0:
            break
        part = read_columns(path, ['input_ids', 'attention_mask', 'era', 'noisy'], limit=left)
        parts.append(part)
        left -= len(part['era'])
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Methods and runs


@dataclass(frozen=True)
class LMMethod:
    """One compared way of choosing the sequences the learner trains on.

    Attributes:
        label (str): Legend text.
        criterion (str): ``uniform`` (no scoring) or ``learnability``.
        proxy (bool): Score with a proxy learner (``ProxyScorer`` over a smaller
            :class:`CausalTransformer`) instead of the learner.
        quota (bool): Keep each era's share of the candidates
            (``Quota(key='stream', proportional=True)``).
    """

    label: str
    criterion: str = 'learnability'
    proxy: bool = False
    quota: bool = False


METHODS: dict[str, LMMethod] = {
    'uniform': LMMethod('uniform', criterion='uniform'),
    'learnability': LMMethod('learnability'),
    'proxy': LMMethod('learnability, proxy scorer', proxy=True),
    'quota': LMMethod('learnability, era quota', quota=True),
}


def _scorer(method: LMMethod, learner: nn.Module, reference: Any, seed: int, config: Config
            ) -> Any:
    """The method's scorer over ``reference`` (the cache, or the live model); None if uniform."""
    if method.criterion == 'uniform':
        return None
    if method.proxy:
        proxy = make_lm(20_000 + seed, **config.shape(proxy=True))
        return ProxyScorer(make_scorer(proxy, reference),
                           optimizer=functools.partial(torch.optim.Adam, lr=config.lr))
    return make_scorer(learner, reference)


def _loader(setup: LMSetup, method: LMMethod, scorer: Any, ratio: float, seed: int,
            config: Config) -> SelectiveLoader:
    """A ``SelectiveLoader`` over the pool's three streams, as a user builds it. Uniform reads
    only the ``b`` sequences it trains on."""
    uniform = method.criterion == 'uniform'
    big = config.batch_size if uniform else config.super_batch_size(ratio)
    policy = SelectionPolicy(quota=Quota(key='stream', proportional=True)) if method.quota \
        else None
    return SelectiveLoader(open_pool(setup.prepared, batch_size=big, seed=seed),
                           batch_size=config.batch_size, super_batch_size=big, scorer=scorer,
                           criterion=method.criterion,
                           method='uniform' if uniform else config.selection,
                           temperature=config.temperature, seed=seed, policy=policy)


class _Shares:
    """Eras of the sequences trained on, and the mean of the loader's ``share/<stream>``."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(ERAS))
        self.loader_shares: dict[str, float] = {}
        self.steps = 0
        self.loader: Any = None

    def __call__(self, batch: dict[str, Any]) -> None:
        self.counts += np.bincount(np.asarray(batch['era']), minlength=len(ERAS))
        self.steps += 1
        for key, value in getattr(self.loader, 'metrics', {}).items():
            if key.startswith('share/'):
                self.loader_shares[key] = self.loader_shares.get(key, 0.0) + float(value)

    def summary(self) -> dict[str, Any]:
        return {'era_shares': (self.counts / self.counts.sum()).tolist(),
                'loader_shares': {key: total / self.steps
                                  for key, total in sorted(self.loader_shares.items())}}


def run_one(setup: LMSetup, name: str, ratio: float | None, seed: int, config: Config, *,
            progress: bool = True) -> dict[str, Any]:
    """Train a fresh learner for ``config.steps`` on what method ``name`` selects.

    Args:
        setup (LMSetup): The shared set-up.
        name (str): A key of :data:`METHODS`.
        ratio (float | None): The filter ratio (None for ``uniform``).
        seed (int): Seed of the learner, the data order and selection.
        config (Config): The settings.
        progress (bool): Show a progress bar.

    Returns:
        dict: ``method``, ``ratio``, ``seed``, ``steps`` and ``heldout_loss`` per checkpoint,
        ``seconds`` (training time so far), ``noisy_fraction`` per interval and overall,
        ``era_shares`` of the sequences trained on, ``loader_shares`` (the loader's
        ``share/<stream>``, quota only), ``train_seconds``, ``seconds_per_step`` and
        ``step_costs`` (see ``benchmarks.common.training.train_selective``).
    """
    method = METHODS[name]
    learner = make_lm(seed, **config.shape())
    scorer = _scorer(method, learner, setup.cache, seed, config)
    shares = _Shares()
    loader = _loader(setup, method, scorer, ratio or 0.0, seed, config)
    shares.loader = loader
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    # Linear warm-up of the learning rate over the first warmup_steps, then constant.
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(config.warmup_steps, 1)))

    def after_step(batch: dict[str, Any]) -> None:
        shares(batch)
        warmup.step()

    measured = train_selective(
        learner, loader, steps=config.steps, loss_fn=lm_loss, optimizer=optimizer,
        checkpoints=config.checkpoints(), evaluate=setup.evaluate, noisy_key='noisy',
        after_step=after_step,
        desc=f'f={ratio} {name} s{seed}' if ratio else f'{name} s{seed}', progress=progress)
    measured['heldout_loss'] = measured.pop('accuracy')
    # A StreamingDataset holds shared memory until it is collected.
    del loader, scorer
    gc.collect()
    return {'method': name, 'ratio': ratio, 'seed': seed, **measured, **shares.summary()}


def step_flops(setup: LMSetup, name: str, ratio: float, config: Config) -> dict[str, int]:
    """FLOPs of one step of method ``name`` at ``ratio``, counted on pool sequences.

    Returns:
        dict: ``train`` (forward and backward of ``b`` sequences), ``score`` (the scorer over
        ``B``, reading the stored reference losses), ``select``, ``proxy`` (a proxy's training
        step), ``per_step`` (their sum) and ``live_reference`` (what a live reference forward
        would add).
    """
    method = METHODS[name]
    learner = make_lm(0, **config.shape())
    uniform = method.criterion == 'uniform'
    big = config.batch_size if uniform else config.super_batch_size(ratio)
    super_batch = {key: value[:big] for key, value in setup.probe.items()}
    counts = dict.fromkeys(('score', 'select', 'proxy', 'live_reference'), 0)
    counts['train'] = train_step_flops(
        learner, {key: value[:config.batch_size] for key, value in super_batch.items()}, lm_loss)
    if not uniform:
        criterion, ids = get_criterion(method.criterion), torch.arange(big)
        scorer = _scorer(method, learner, setup.cache, 0, config)
        scores, counts['score'] = count_flops(scorer, super_batch, ids, criterion)
        counts['select'] = count_flops(
            get_selection_method(config.selection), scores, big, config.batch_size, n_chunks=1,
            temperature=config.temperature, generator=torch.Generator().manual_seed(0))[1]
        if method.proxy:
            counts['proxy'] = scorer.learn(super_batch, ids, torch.arange(config.batch_size),
                                           count_flops=True)
        live = _scorer(method, learner, setup.reference, 0, config)
        counts['live_reference'] = count_flops(live, super_batch, ids, criterion)[1] \
            - counts['score']
    counts['per_step'] = counts['train'] + counts['score'] + counts['select'] + counts['proxy']
    return counts


# Summaries

_COSTS = (('steps', 'steps'), ('flops', 'flops'), ('seconds', 'wall'))


def _reached(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
    """First checkpoint after 0 whose held-out loss is at or below ``target``."""
    return stats.first_reach(steps, [-loss for loss in losses], -target)


def _speedups(reached: int | None, seconds: float, per_step: int, base: dict[str, float]
              ) -> dict[str, float | None]:
    """Cost to the target in steps, FLOPs and seconds, and uniform's cost over it."""
    if reached is None:
        return {**{f'{cost}_to_target': None for cost, _ in _COSTS},
                **{f'speedup_{short}': None for _, short in _COSTS}}
    spent = {'steps': reached, 'flops': reached * per_step, 'seconds': seconds}
    out: dict[str, float | None] = {f'{cost}_to_target': spent[cost] for cost, _ in _COSTS}
    for cost, short in _COSTS:
        out[f'speedup_{short}'] = base[cost] / spent[cost] if spent[cost] > 0 else None
    return out


def _per_seed(run: dict[str, Any], own: dict[str, Any], per_step: int, budget_flops: int
              ) -> dict[str, Any]:
    """One seed against its own uniform run's final loss."""
    target = own['heldout_loss'][-1]
    reached = _reached(run['steps'], run['heldout_loss'], target)
    seconds = run['seconds'][run['steps'].index(reached)] if reached is not None else 0.0
    base = {'steps': own['steps'][-1], 'flops': budget_flops, 'seconds': own['train_seconds']}
    return {'target_loss': target, **_speedups(reached, seconds, per_step, base)}


def _method_summary(mine: list[dict[str, Any]], uniform: dict[int, dict[str, Any]],
                    flops: dict[str, int], budget_flops: int, target: float) -> dict[str, Any]:
    """Curves over seeds, the cost to ``target`` on the mean curve, and per seed."""
    steps = mine[0]['steps']
    curves = np.asarray([r['heldout_loss'] for r in mine])
    mean = curves.mean(0)
    std = curves.std(0, ddof=1) if len(mine) > 1 else np.zeros_like(mean)
    seconds = np.asarray([r['seconds'] for r in mine]).mean(0)
    reached = _reached(steps, mean.tolist(), target)
    base = {'steps': steps[-1], 'flops': budget_flops,
            'seconds': float(np.mean([u['train_seconds'] for u in uniform.values()]))}
    on_mean = _speedups(reached, float(seconds[steps.index(reached)]) if reached else 0.0,
                        flops['per_step'], base)
    per_seed = {str(r['seed']): _per_seed(r, uniform[r['seed']], flops['per_step'],
                                          budget_flops) for r in mine}
    return {
        'seeds': [r['seed'] for r in mine], 'steps': steps, 'heldout_loss_mean': mean.tolist(),
        'heldout_loss_std': std.tolist(), 'seconds_mean': seconds.tolist(),
        'final_loss_mean': float(mean[-1]), 'final_loss_std': float(std[-1]), **on_mean,
        'per_seed': per_seed,
        'per_seed_speedups': {short: stats.summary([s[f'speedup_{short}']
                                                    for s in per_seed.values()])
                              for _, short in _COSTS},
        'flops_per_step': flops['per_step'],
        'flops_per_step_live_reference': flops['per_step'] + flops['live_reference'],
        'step_costs': {key: float(np.mean([r['step_costs'][key] for r in mine]))
                       for key in STEP_COSTS},
        'seconds_per_step_mean': float(np.mean([r['seconds_per_step'] for r in mine])),
        'noisy_fraction_mean': float(np.mean([r['noisy_fraction_overall'] for r in mine])),
        'noisy_fraction_curve': np.mean([r['noisy_fraction'] for r in mine], axis=0).tolist(),
        'era_shares_mean': np.mean([r['era_shares'] for r in mine], axis=0).tolist(),
        'loader_shares_mean': {key: float(np.mean([r['loader_shares'][key] for r in mine]))
                               for key in mine[0]['loader_shares']},
    }


def summarise(runs: list[dict[str, Any]], flops: dict[str, dict[str, dict[str, int]]],
              config: Config) -> dict[str, Any]:
    """Per filter ratio: every method's curves and its steps, FLOPs and seconds to the target.

    The target is uniform's final held-out loss, the mean over the seeds whose uniform run
    has finished (each seed's own per seed). Uniform's FLOPs budget is its steps times its
    per-step FLOPs; its seconds, its mean training time.

    Returns:
        dict: ``{ratio: {'target_loss', 'budget_steps', 'super_batch_size', 'methods'}}``.
    """
    uniform = {r['seed']: r for r in runs if r['method'] == 'uniform'}
    if not uniform:
        return {}
    target = float(np.mean([u['heldout_loss'][-1] for u in uniform.values()]))
    out = {}
    for ratio in config.ratios:
        costs = flops[str(ratio)]
        budget_flops = config.steps * costs['uniform']['per_step']
        methods = {'uniform': _method_summary(list(uniform.values()), uniform, costs['uniform'],
                                              budget_flops, target)}
        for name in config.runs_at(ratio):
            mine = [r for r in runs if r['method'] == name and r['ratio'] == ratio
                    and r['seed'] in uniform]
            if mine:
                methods[name] = _method_summary(mine, uniform, costs[name], budget_flops, target)
        out[str(ratio)] = {'target_loss': target, 'budget_steps': config.steps,
                           'super_batch_size': config.super_batch_size(ratio),
                           'methods': methods}
    return out


# What scoring costs on this model


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_scorer(setup: LMSetup, config: Config) -> dict[str, Any]:
    """Tokens per second of scoring against training, on this model and the pool's sequences.

    Interleaved repeats (the order rotates every round), medians. A training step is the
    forward, backward and Adam step of ``b`` sequences; every scoring case scores the
    super-batch of the largest ratio, ``B`` sequences: the learner alone (``hard_learner``),
    learnability with the stored reference (what the benchmark runs), with a live reference,
    the same in chunks of ``b``, and the proxy learner with the stored reference.

    Returns:
        dict: Per case: ``sequences``, ``tokens`` (sequences x T), ``median_s``,
        ``tokens_per_s`` and ``time_per_token_vs_training``; for the scoring cases also
        ``cost_in_steps``, what scoring one super-batch costs in training steps.
    """
    b, big = config.batch_size, config.super_batch_size(max(config.ratios))
    learner = make_lm(0, **config.shape())
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    sub = {key: value[:b] for key, value in setup.probe.items()}
    batch = {key: value[:big] for key, value in setup.probe.items()}
    ids = torch.arange(big)
    hard, learn = get_criterion('hard_learner'), get_criterion('learnability')
    proxy = make_scorer(make_lm(1, **config.shape(proxy=True)), setup.cache)

    def train() -> None:
        loss = lm_loss(learner, sub)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cases = {
        'training_step': (b, train),
        'score_learner_only': (big, lambda: make_scorer(learner, None)(batch, ids, hard)),
        'score_stored_reference': (big, lambda: make_scorer(learner, setup.cache)(batch, ids,
                                                                                  learn)),
        'score_live_reference': (big, lambda: make_scorer(learner, setup.reference)(batch, ids,
                                                                                    learn)),
        'score_live_reference_chunked': (big, lambda: make_scorer(
            learner, setup.reference, chunk_size=b)(batch, ids, learn)),
        'score_proxy_stored_reference': (big, lambda: proxy(batch, ids, learn)),
    }
    names = list(cases)
    for name in names:  # warm-up
        cases[name][1]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(config.scorer_repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds[name].append(_timed(cases[name][1]))
    return _throughput(cases, seconds, config.seq_len)


def _throughput(cases: dict[str, tuple[int, Callable[[], Any]]], seconds: dict[str, list[float]],
                seq_len: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (sequences, _) in cases.items():
        median = float(np.median(seconds[name]))
        out[name] = {'sequences': sequences, 'tokens': sequences * seq_len, 'median_s': median,
                     'tokens_per_s': sequences * seq_len / median}
    train = out['training_step']
    for name, case in out.items():
        case['time_per_token_vs_training'] = train['tokens_per_s'] / case['tokens_per_s']
        if name != 'training_step':
            case['cost_in_steps'] = case['median_s'] / train['median_s']
    return out


def _high_water_mark() -> int:
    """The process's peak resident memory since the last reset (Linux's ``VmHWM``), bytes."""
    status = Path('/proc/self/status').read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith('VmHWM:'))) * 1024


def _peak_scoring_memory(shape: dict[str, int], sequences: int, chunk: int) -> dict[str, int]:
    """In a fresh process: resident memory before, and the peak while scoring ``sequences``
    random sequences with the learner alone in chunks of ``chunk`` (bytes)."""
    torch.set_num_threads(1)
    model = make_lm(0, **shape)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (sequences, shape['seq_len']), generator=generator)
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}
    scorer = make_scorer(model, None, chunk_size=chunk)
    hard = get_criterion('hard_learner')
    small = {key: value[:2] for key, value in batch.items()}
    make_scorer(model, None)(small, torch.arange(2), hard)  # warm-up: lazy initialisation
    # Writing 5 to clear_refs resets the peak to the current resident memory (Linux >= 4.0):
    # imports peak higher than what stays resident.
    Path('/proc/self/clear_refs').write_text('5')
    before = _high_water_mark()
    scorer(batch, torch.arange(sequences), hard)
    return {'rss_before': before, 'peak': _high_water_mark()}


def measure_memory(config: Config) -> list[dict[str, Any]]:
    """Peak memory of scoring ``memory_sequences`` sequences at each of ``memory_chunks``,
    each in a fresh process, against the loss's bound of ``8 x chunk x T x V`` bytes.

    Returns:
        list[dict]: Per chunk size: ``chunk_size``, ``peak_increase_bytes`` (the process's
        peak while scoring over its resident memory just before), ``loss_bound_bytes``,
        ``per_sequence_bytes`` and ``rss_before_bytes``.
    """
    out = []
    # A fresh process per measurement: a process's peak is a high-water mark. A worker that
    # dies raises BrokenProcessPool here instead of being replaced forever.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),
                             max_tasks_per_child=1) as pool:
        for chunk in config.memory_chunks:
            got = pool.submit(_peak_scoring_memory, config.shape(), config.memory_sequences,
                              chunk).result()
            increase = got['peak'] - got['rss_before']
            out.append({'chunk_size': chunk, 'sequences': config.memory_sequences,
                        'peak_increase_bytes': increase,
                        'loss_bound_bytes': 8 * chunk * config.seq_len * VOCAB_SIZE,
                        'per_sequence_bytes': increase / chunk,
                        'rss_before_bytes': got['rss_before']})
    return out


# Report


def _speedup_text(m: dict[str, Any], short: str) -> str:
    value, seeds = m[f'speedup_{short}'], m['per_seed_speedups'][short]
    spread = f'{seeds["mean"]:.2f}±{seeds["std"]:.2f} ' if seeds['mean'] is not None else ''
    head = 'n/r' if value is None else f'{value:.2f}x'
    return f'{head} [{spread}{seeds["n"]}/{seeds["of"]}]'


def format_table(results: dict[str, Any]) -> str:
    """The summary as text: one block per filter ratio, then the scorer's costs."""
    lines = []
    for ratio, entry in sorted(results['summary'].items(), key=lambda kv: float(kv[0])):
        uniform = entry['methods']['uniform']
        lines.append(f'filter ratio {ratio} (b={results["config"]["batch_size"]}, '
                     f'B={entry["super_batch_size"]}), {len(uniform["seeds"])} seed(s): target = '
                     f'uniform\'s final held-out loss {entry["target_loss"]:.4f} nats/byte at '
                     f'{entry["budget_steps"]} steps ({uniform["seconds_mean"][-1]:.0f} s of '
                     f'training); reference {results["setup"]["reference_heldout_loss"]:.4f}')
        lines.append(f'  {"method":<13} {"final loss":>15} {"steps→":>6} '
                     f'{"speed-up steps [per seed]":>26} {"FLOPs [per seed]":>24} '
                     f'{"wall [per seed]":>24} | ms/step {"train":>5} {"score":>5} '
                     f'{"select":>6} {"other":>5} | noisy | eras trained on')
        for name, m in entry['methods'].items():
            cost = {key: 1e3 * value for key, value in m['step_costs'].items()}
            speedups = ['base'] * 3 if name == 'uniform' else \
                [_speedup_text(m, short) for _, short in _COSTS]
            eras = ' '.join(f'{share:.2f}' for share in m['era_shares_mean'])
            reached = 'n/r' if m['steps_to_target'] is None else str(m['steps_to_target'])
            lines.append(
                f'  {name:<13} {m["final_loss_mean"]:.4f}±{m["final_loss_std"]:.4f} '
                f'{reached:>6} {speedups[0]:>26} {speedups[1]:>24} {speedups[2]:>24} | '
                f'        {cost["train_s"]:5.1f} {cost["score_s"]:5.1f} {cost["select_s"]:6.1f} '
                f'{cost["wait_s"] + cost["transfer_s"] + cost["other_s"]:5.1f} | '
                f'{m["noisy_fraction_mean"]:.3f} | {eras}')
        lines.append('')
    pool = results['setup']['data']['counts']['pool']
    total = sum(pool.values())
    lines.append('eras: ' + ', '.join(f'{name} (pool share {count / total:.2f})'
                                      for name, count in pool.items()))
    lines.append(
        'steps→: first checkpoint where the mean curve over seeds reaches the target (n/r: not '
        'within the budget). Speed-ups, uniform = 1: steps, FLOPs (training + scoring with the '
        'stored reference + selection + a proxy\'s training), wall-clock (training seconds, '
        'evaluation excluded); on the mean curve, then [mean±std over the seeds that reach '
        'their own uniform\'s final loss, count/seeds]. noisy: corrupted sequences among those '
        'trained on (the pool has 0.40).')
    scorer = results.get('scorer', {})
    if scorer:
        lines.append('')
        lines.append('scoring cost on this model (medians of interleaved repeats):')
        for name, case in scorer['throughput'].items():
            extra = f', {case["cost_in_steps"]:.2f} training steps' if 'cost_in_steps' in case \
                else ''
            lines.append(f'  {name:<30} {case["sequences"]:4d} sequences: '
                         f'{case["tokens_per_s"] / 1e3:7.1f}k tokens/s '
                         f'({case["time_per_token_vs_training"]:.2f}x training\'s time per '
                         f'token{extra})')
        for probe in scorer['memory']:
            lines.append(f'  chunk_size={probe["chunk_size"]:<4} peak while scoring '
                         f'{probe["sequences"]} sequences: '
                         f'{probe["peak_increase_bytes"] / 2**20:6.1f} MiB (loss bound '
                         f'8 x chunk x T x V = {probe["loss_bound_bytes"] / 2**20:.1f} MiB)')
    return '\n'.join(lines)


def _loss_panels(axes: Any, entry: dict[str, Any], ratio: str, results: dict[str, Any]) -> None:
    views = (('steps', 'optimizer step'), ('flops', 'TFLOPs (stored reference outputs)'),
             ('seconds', 'training seconds (evaluation excluded)'))
    for ax, (view, xlabel) in zip(axes, views, strict=True):
        for name, m in entry['methods'].items():
            steps = np.asarray(m['steps'], dtype=np.float64)
            x = {'steps': steps, 'flops': steps * m['flops_per_step'] / 1e12,
                 'seconds': np.asarray(m['seconds_mean'])}[view]
            mean, std = np.asarray(m['heldout_loss_mean']), np.asarray(m['heldout_loss_std'])
            label = results['methods'][name]['label']
            if name != 'uniform':
                label += ': ' + ', '.join(
                    f'{m[f"speedup_{short}"]:.2f}x {short}' if m[f'speedup_{short}'] else
                    f'n/r {short}' for _, short in _COSTS)
            ax.plot(x, mean, color=COLOURS[name], lw=1.5, label=label)
            ax.fill_between(x, mean - std, mean + std, color=COLOURS[name], alpha=0.15)
        ax.axhline(entry['target_loss'], color='k', ls=':', lw=1, label='target: uniform final')
        ax.axhline(results['setup']['reference_heldout_loss'], color='tab:olive', ls='--', lw=1,
                   label='reference (clean split)')
        top = max(m['heldout_loss_mean'][1] for m in entry['methods'].values())
        ax.set(xlabel=xlabel, ylabel='held-out loss (nats/byte)',
               ylim=(None, top), title=f'f={ratio}, B={entry["super_batch_size"]}: by {view}')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc='upper right')


def _mix_panels(axes: Any, results: dict[str, Any]) -> None:
    ratio = max(results['summary'], key=float)
    entry = results['summary'][ratio]
    for name, m in entry['methods'].items():
        steps = m['steps'][1:]
        axes[0].plot(steps, m['noisy_fraction_curve'], color=COLOURS[name], label=name)
    axes[0].set(xlabel='optimizer step', ylabel='noisy share of the sequences trained on',
                title=f'noise trained on, f={ratio}', ylim=(0, None))
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    pool = results['setup']['data']['counts']['pool']
    bars = {'pool': np.asarray(list(pool.values()), dtype=np.float64) / sum(pool.values())}
    bars.update({name: np.asarray(m['era_shares_mean']) for name, m in entry['methods'].items()})
    width = 0.8 / len(bars)
    for i, (name, shares) in enumerate(bars.items()):
        axes[1].bar(np.arange(len(ERAS)) + i * width, shares, width,
                    color=COLOURS.get(name, 'k'), alpha=0.25 if name == 'pool' else 0.9,
                    label=name)
    axes[1].set_xticks(np.arange(len(ERAS)) + 0.4 - width / 2, [e.name for e in ERAS])
    axes[1].set(ylabel='share of the sequences trained on', title=f'eras (streams), f={ratio}')
    axes[1].legend(fontsize=7)
    scorer = results.get('scorer', {}).get('throughput', {})
    if scorer:
        names = list(scorer)
        axes[2].barh(names, [scorer[n]['tokens_per_s'] / 1e3 for n in names], color='tab:cyan')
        axes[2].set(xlabel='thousand tokens per second (1 thread)',
                    title='scoring against a training step')
        axes[2].tick_params(axis='y', labelsize=7)
    else:
        axes[2].axis('off')


def plot(results: dict[str, Any], path: Path) -> None:
    """Held-out loss against steps, FLOPs and seconds per ratio; noise, eras and scorer costs."""
    if not results.get('summary'):
        return
    plt = report.pyplot()
    ratios = sorted(results['summary'], key=float)
    fig, axes = plt.subplots(len(ratios) + 1, 3, figsize=(16, 4.2 * (len(ratios) + 1)),
                             squeeze=False)
    for row, ratio in enumerate(ratios):
        _loss_panels(axes[row], results['summary'][ratio], ratio, results)
    _mix_panels(axes[-1], results)
    config = results['config']
    size = config['learner']
    fig.suptitle(f'State of the Union addresses, bytes, {config["noise_rate"]:.0%} of the pool '
                 f'corrupted; {size["depth"]}-block Transformer of width {size["width"]}, '
                 f'sub-batch {config["batch_size"]} x {config["seq_len"]} tokens; mean ± std over '
                 f'{len(config["seeds"])} seed(s); speed-up = uniform\'s cost to its final loss / '
                 f'the method\'s', fontsize=9)
    report.save_figure(fig, path, dpi=100)


# Driver


def _jobs(config: Config) -> list[tuple[str, float | None, int]]:
    """Every run, seed by seed: uniform once (it reads no super-batch), then each ratio."""
    return [job for seed in config.seeds
            for job in [('uniform', None, seed)] + [(name, ratio, seed) for ratio in config.ratios
                                                     for name in config.runs_at(ratio)]]


def _previous(json_path: Path, config: Config) -> list[dict[str, Any]]:
    """The finished runs of an earlier invocation with the same configuration."""
    if not json_path.is_file():
        return []
    old = json.loads(json_path.read_text())
    same = old.get('schema') == SCHEMA and \
        old.get('config') == json.loads(json.dumps(report.repo_relative(asdict(config))))
    print(f'resuming: {len(old["runs"])} finished runs kept from {json_path}' if same
          else f'{json_path} holds another configuration: starting afresh')
    return old['runs'] if same else []


def describe(config: Config) -> str:
    """What a run of ``config`` does, in a few lines."""
    return (f'{len(_jobs(config))} training runs of {config.steps} steps (sub-batches of '
            f'{config.batch_size} sequences of {config.seq_len} bytes; filter ratios '
            f'{", ".join(map(str, config.ratios))}; seeds {", ".join(map(str, config.seeds))}; '
            f'methods uniform, {", ".join(config.methods)}). First: the State of the Union pool '
            f'as MDS shards, one stream per era (built once), a reference trained on the clean '
            f'split, and its losses over the pool stored with jest_stream.annotate into a '
            f'reference cache that the scorers read; then the scorer\'s throughput and memory.')


def run_benchmark(config: Config, out: Path, *, resume: bool = False, progress: bool = True,
                  argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prepare, measure the scorer, run every job, and rewrite the results after each run.

    Args:
        config (Config): The settings.
        out (Path): Folder of the JSON and the PNG.
        resume (bool): Keep the runs of an existing results file of the same configuration.
        progress (bool): Print progress.
        argv (Sequence[str], optional): The command line, for the run record.

    Returns:
        dict: What the JSON file holds.
    """
    say = print if progress else (lambda *_: None)
    run = report.start_run('language_model', argv, threads=config.threads)
    json_path, png_path = report.report_paths(out, 'language_model', config.quick)
    previous = _previous(json_path, config) if resume else []
    setup = prepare_setup(config, progress=progress)
    flops = {str(ratio): {name: step_flops(setup, name, ratio, config)
                          for name in ('uniform', *config.runs_at(ratio))}
             for ratio in config.ratios}
    scorer = {'throughput': measure_scorer(setup, config), 'memory': measure_memory(config)}
    record: dict[str, Any] = {
        'schema': SCHEMA, 'config': asdict(config),
        'methods': {name: asdict(METHODS[name]) for name in ('uniform', *config.methods)},
        'setup': setup.facts, 'flops': flops, 'scorer': scorer, 'runs': list(previous),
        'complete': False, 'setup_seconds': time.perf_counter() - run['_started']}
    say(f'set-up (data, reference, cache, FLOPs, scorer costs): {record["setup_seconds"]:.0f} s')

    def save() -> None:
        record['summary'] = summarise(record['runs'], flops, config)
        record['run'] = report.finish_run(run)
        report.write_record(json_path, record)

    done = {(r['method'], r['ratio'], r['seed']) for r in previous}
    todo = [job for job in _jobs(config) if job not in done]
    for i, (name, ratio, seed) in enumerate(todo, 1):
        result = run_one(setup, name, ratio, seed, config, progress=progress)
        record['runs'].append(result)
        save()
        say(f'[{i}/{len(todo)}] {name} f={ratio} seed {seed}: held-out loss '
            f'{result["heldout_loss"][-1]:.4f}, {1e3 * result["seconds_per_step"]:.0f} ms/step, '
            f'noisy {result["noisy_fraction_overall"]:.3f}; '
            f'{time.perf_counter() - run["_started"]:.0f} s elapsed')
    record['complete'] = True
    save()
    plot(record, png_path)
    say('\n' + format_table(record))
    say(f'\n{record["run"]["wall_s"]:.0f} s in all (set-up {record["setup_seconds"]:.0f} s); '
        f'wrote {json_path} and {png_path.name}')
    return record


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, Any]:
    """The configuration and the other arguments (``out``, ``resume``, ``replot``)."""
    preset = Config()
    parser = report.benchmark_parser(
        'language_model', __doc__.split('\n\n')[0], seeds=preset.seeds, threads=preset.threads,
        quick=f'ratio {QUICK.ratios[0]}, learnability only, one seed, {QUICK.steps} steps, '
              f'a pool of {QUICK.pool_limit} sequences')
    parser.add_argument('--ratios', type=float, nargs='+', default=None,
                        help=f'filter ratios of learnability (default '
                             f'{" ".join(map(str, preset.ratios))})')
    parser.add_argument('--extra-ratios', type=float, nargs='*', default=None,
                        help='ratios at which proxy and quota run too (default '
                             f'{" ".join(map(str, preset.extra_ratios))})')
    parser.add_argument('--methods', nargs='+', default=None,
                        choices=[m for m in METHODS if m != 'uniform'],
                        help='methods besides uniform (default: all)')
    parser.add_argument('--steps', type=int, default=None, help='optimizer steps per run')
    parser.add_argument('--eval-every', type=int, default=None)
    parser.add_argument('--pool-limit', type=int, default=None,
                        help=f'sequences in the pool (default {preset.pool_limit})')
    parser.add_argument('--data-dir', type=Path, default=None)
    parser.add_argument('--replot', action='store_true',
                        help='only redraw the plot and print the table of the existing results')
    parser.add_argument('--resume', action='store_true',
                        help='keep the finished runs of an existing results file of the same '
                             'configuration')
    args = parser.parse_args(argv)
    overrides = {
        'ratios': tuple(args.ratios) if args.ratios else None,
        'extra_ratios': tuple(args.extra_ratios) if args.extra_ratios is not None else None,
        'methods': tuple(args.methods) if args.methods else None,
        'seeds': tuple(args.seeds) if args.seeds else None, 'steps': args.steps,
        'eval_every': args.eval_every, 'pool_limit': args.pool_limit, 'threads': args.threads,
        'data_dir': str(args.data_dir) if args.data_dir else None}
    config = replace(QUICK if args.quick else preset,
                     **{key: value for key, value in overrides.items() if value is not None})
    if min(config.steps, config.eval_every) <= 0:
        parser.error('--steps and --eval-every must be positive')
    try:
        sizes = [config.super_batch_size(ratio) for ratio in config.ratios]
    except ValueError as error:
        parser.error(f'--ratios: {error}')
    if config.pool_limit is not None and config.pool_limit < max(sizes):
        parser.error(f'--pool-limit {config.pool_limit} is smaller than a super-batch '
                     f'({max(sizes)} sequences)')
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; returns the exit status."""
    config, args = parse_args(argv)
    json_path, png_path = report.report_paths(args.out, 'language_model', config.quick)
    if args.replot:
        if not json_path.is_file():
            print(f'{json_path} does not exist: run the benchmark first')
            return 1
        results = json.loads(json_path.read_text())
        plot(results, png_path)
        print(format_table(results))
        return 0
    print(describe(config), flush=True)
    run_benchmark(config, args.out, resume=args.resume, argv=argv)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

"""Learning efficiency: steps, FLOPs and wall-clock time to reach uniform sampling's final accuracy.

Run it from the repository root::

    python -m benchmarks.learning_efficiency --quick     # ratio 0.8, 3 seeds, 200 steps
    python -m benchmarks.learning_efficiency             # ratios 0.8, 0.9, 0.5, 400 steps
    python -m benchmarks.learning_efficiency --task contrastive --ratios 0.9 --seeds 0 1 2

Two tasks on real Fashion-MNIST (:mod:`benchmarks.common.tasks`), each read through
``jest_stream.SelectiveLoader`` over a ``SampleIdStreamingDataset`` of MDS shards
(super-batches of ``B = b / (1 - f)``, sub-batches of ``b``), each with a reference model
trained only on a clean 5% split whose outputs over the pool are stored with
``jest_stream.annotate`` and read back through ``jest_stream.ReferenceCache``, the path a
user runs. Every method of a seed starts from the same initialisation and reads the same
sequence of super-batches; only the selection differs. The uniform baseline reads only the
``b`` examples it trains on per step, as a loop without selection does, so that its
wall-clock time is not inflated by reading examples it would throw away.

For each task, filter ratio and method it reports three speed-ups to the target (uniform's
final accuracy), on the mean curve over seeds and per seed:

- ``speedup_steps``: uniform's step budget over the steps the method needs;
- ``speedup_flops``: uniform's FLOPs for the budget over the method's FLOPs to the target,
  each step counted with ``torch.utils.flop_counter`` (:mod:`jest_stream.flops`): training,
  scoring (with the stored reference outputs), selection, and any work a method adds
  (a proxy learner's training); the same with a live reference forward is beside it;
- ``speedup_wall``: uniform's training seconds over the method's seconds to the target,
  measured in the same run, evaluation excluded; each step's seconds are split into the
  trainer's work and the loader's wait, transfer, scoring and selection. Beside it,
  ``speedup_wall_normalised`` counts each run's seconds in its own mean training steps,
  which cancels a machine load that slows a run evenly.

Methods are entries of :data:`METHODS`; a new scorer or a peer baseline is one
:class:`Method` plus, at most, a small function (see its docstring). Results go to
``benchmarks/results/learning_efficiency/``: ``learning_efficiency.json`` and ``.png``
(accuracy against steps, FLOPs and seconds), or ``learning_efficiency_quick.*``; the JSON
is rewritten after every finished run, so an interrupted run leaves usable results,
``--resume`` continues one, and ``--replot`` summarises a results file again and redraws its
plot. ``benchmarks.demo`` and ``benchmarks.contrastive`` are presets
of this benchmark.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import report, stats
from benchmarks.common.data import open_streaming, prepare
from benchmarks.common.models import (
    count_parameters,
    make_proxy_classifier,
    make_proxy_two_tower,
)
from benchmarks.common.peers import (
    RepeatedRandomSubsets,
    SelectiveBackprop,
    SelectiveBackpropLoader,
    SelectiveBackpropSettings,
)
from benchmarks.common.tasks import TASKS, ReferenceSettings, TaskSetup, prepare_task
from benchmarks.common.training import STEP_COSTS, train_selective
from jest_stream import (
    AdaptivePressure,
    MixedResolution,
    ProxyScorer,
    SampleIdStreamingDataset,
    Schedule,
    SelectionPolicy,
    SelectiveLoader,
    count_flops,
    get_criterion,
    get_selection_method,
    remove_stale_shared_memory,
    score_flops,
    super_batch_size_for,
    train_step_flops,
)
from jest_stream.batch import batch_length

__all__ = [
    'Config',
    'FULL',
    'METHODS',
    'Method',
    'PROXIES',
    'QUICK',
    'SCHEMA',
    'adaptive_policy',
    'config_from_record',
    'configuration_flops',
    'equal_compute',
    'flops_curve',
    'format_table',
    'format_verdicts',
    'main',
    'parse_args',
    'plot',
    'proxy_scorer',
    'recommended_policy',
    'run_benchmark',
    'run_one',
    'selective_loader',
    'summarise',
]

SCHEMA = 'jest_stream.learning_efficiency/3'
COLOURS = {'uniform': 'tab:gray', 'hard_learner': 'tab:red', 'easy_reference': 'tab:orange',
           'learnability': 'tab:blue', 'independent': 'tab:orange', 'joint': 'tab:blue',
           'flexi_joint': 'tab:purple', 'proxy': 'tab:cyan', 'recommended': 'tab:green',
           'adaptive': 'goldenrod', 'rho_loss': 'tab:brown', 'sb_default': 'tab:pink',
           'sb_suggested': 'magenta', 'rs2': 'black', 'uniform_compute': 'silver'}

# Methods


@dataclass(frozen=True)
class Method:
    """One compared way of choosing what the learner trains on: an entry of :data:`METHODS`.

    The built-in methods need only the first fields. The hooks make a new scorer, a policy
    or a peer baseline one entry plus, at most, a small function:

    - a proxy learner trained online (RHO-LOSS's proxy, ``jest_stream.ProxyScorer``):
      ``scorer`` builds the proxy scorer, which learns inside the loader's step (timed as
      scoring); ``extra_flops`` counts its training step;
    - a selection policy (``jest_stream.SelectionPolicy``): ``policy`` builds a fresh one per
      run; ``report_metric`` feeds the held-out metric to its adaptive pressure;
    - scoring under ``torch.autocast``: ``scorer`` wraps the task's scorer;
    - Composer's SelectiveBackprop or RS2 (repeated random subsets): ``loader`` yields
      their sub-batches instead of a ``SelectiveLoader`` over the pool; ``drawn`` says how
      many examples a selecting step reads;
    - uniform at equal compute: ``steps`` gives it the budget another method's FLOPs buy.

    Attributes:
        label (str): Legend text.
        criterion (str): jest_stream criterion; ``uniform`` scores nothing.
        selection (str, optional): Selection method; None: ``uniform`` for the uniform
            criterion, else :attr:`Config.selection`.
        flexi (bool): Score the learner at ``1 / Config.flexi_factor`` resolution and train
            ``Config.low_fraction`` of every sub-batch at it.
        reads_super_batches (bool): Read ``B`` examples per step and keep ``b``; False reads
            only the ``b`` it trains on, as a loop without selection does (the uniform
            baseline: it would otherwise pay in wall-clock time for reading examples it
            throws away).
        peer (str, optional): For a peer (another method from the literature, or a
            baseline that is not jest_stream's), where it comes from; None for jest_stream's
            own methods.
        temperature (float, optional): Selection temperature; None: ``Config.temperature``.
        scorer (Callable, optional): ``scorer(setup, learner, reference, method, config,
            seed)`` builds the scorer (``reference`` is the cache, or the live model when
            FLOPs with a live reference are counted); None: the task's scorer.
        after_step (Callable, optional): ``after_step(scorer, batch)`` after each optimizer
            step.
        extra_flops (Callable, optional): ``extra_flops(scorer, super_batch, sub_batch)``:
            FLOPs per scoring step of work outside training, scoring and selection.
        loader (Callable, optional): ``loader(setup, method, scorer, ratio, seed, config)``
            returns the iterable of sub-batches; None: :func:`selective_loader`.
        steps (Callable, optional): ``steps(config, entry) -> int``, the method's step
            budget, from ``entry``, the summary of the other methods of its task and ratio
            (:func:`summarise`); such a method runs after them. None: ``config.steps``.
        policy (Callable, optional): ``policy(config, ratio) -> SelectionPolicy``, built
            afresh for every run.
        report_metric (bool): After every evaluation, report the held-out metric (the
            task's metric on the clean split, which no learner trains on) to the loader's
            adaptive pressure (``loader.report_metric``).
        drawn (Callable, optional): ``drawn(config, ratio) -> int``: examples a scoring
            step reads; None: ``B`` (or ``b`` when ``reads_super_batches`` is False).
    """

    label: str
    criterion: str = 'uniform'
    selection: str | None = None
    flexi: bool = False
    reads_super_batches: bool = True
    peer: str | None = None
    temperature: float | None = None
    scorer: Callable[..., Any] | None = None
    after_step: Callable[[Any, dict[str, Any]], None] | None = None
    extra_flops: Callable[[Any, dict[str, Any], dict[str, Any]], int] | None = None
    loader: Callable[..., Iterable[dict[str, Any]]] | None = None
    steps: Callable[[Config, dict[str, Any] | None], int] | None = None
    policy: Callable[[Config, float], SelectionPolicy] | None = None
    report_metric: bool = False
    drawn: Callable[[Config, float], int] | None = None

    def record(self) -> dict[str, Any]:
        """JSON-ready description: the settings, and the names of the hooks in use."""
        hooks = ('scorer', 'after_step', 'extra_flops', 'loader', 'steps', 'policy', 'drawn')
        return {'label': self.label, 'criterion': self.criterion, 'selection': self.selection,
                'flexi': self.flexi, 'reads_super_batches': self.reads_super_batches,
                'peer': self.peer, 'temperature': self.temperature,
                'report_metric': self.report_metric,
                'hooks': [h for h in hooks if getattr(self, h) is not None]}


# The proxy learner (RHO-LOSS's proxy model, ClassAct's small scorer)

#: Each task's proxy learner: a quarter of the learner's channels, half its widths (about
#: an eighth of its parameters and a twelfth of its FLOPs).
PROXIES: dict[str, Callable[[int], nn.Module]] = {
    'classification': make_proxy_classifier, 'contrastive': make_proxy_two_tower}


def proxy_scorer(setup: TaskSetup, learner: nn.Module, reference: Any, method: Method,
                 config: Config, seed: int) -> ProxyScorer:
    """Learnability scored by the task's proxy learner, with the reference's stored outputs.

    The proxy starts from its own seed, and learns online (Adam at the learners' learning
    rate, one step per super-batch) from the sub-batches it selects; the learner is not
    used for scoring.
    """
    proxy = PROXIES[setup.task.name](20_000 + seed)
    return ProxyScorer(setup.task.make_scorer(proxy, reference),
                       optimizer=functools.partial(torch.optim.Adam, lr=config.lr))


def _proxy_training_flops(scorer: ProxyScorer, super_batch: dict[str, Any],
                          sub_batch: dict[str, Any]) -> int:
    rows = torch.arange(batch_length(sub_batch))
    return int(scorer.learn(super_batch, torch.arange(batch_length(super_batch)), rows,
                            count_flops=True))


# Selection policies


#: Where the recommended policy starts to anneal, as a fraction of the budget.
RECOMMENDED_ANNEAL_START = 0.75


def recommended_policy(config: Config, ratio: float) -> SelectionPolicy:
    """Full pressure for the first three quarters of the budget, then a cosine anneal to
    uniform sampling (and no scoring) at the end.

    Selection gives most early, while the learner is far from the reference; late, the
    selected runs level off near the reference's accuracy. Tuned on the contrastive task
    (see ``benchmarks/README.md``): an anneal over the second half cost more final accuracy
    on this pool (40% mismatched pairs come back with uniform sampling) than one over the
    last quarter; neither changes the steps to uniform's final accuracy, which the first
    half sets.
    """
    start = RECOMMENDED_ANNEAL_START * config.steps
    return SelectionPolicy(schedule=Schedule(anneal_start=start, anneal_end=float(config.steps),
                                             shape='cosine'))


#: The adaptive policy's learnability threshold: below any mean learnability, so that
#: learnability only restores the pressure. On a pool with 40% corrupted labels (mismatched
#: captions) the candidates' mean learnability is negative from the first step (the
#: reference's loss on the corrupted examples dominates it): a threshold at 0 eased
#: selection to its floor within 30 steps, and the held-out metric is the better signal.
ADAPTIVE_MIN_LEARNABILITY = -1e6


def adaptive_policy(config: Config, ratio: float) -> SelectionPolicy:
    """Full pressure while the held-out metric improves, half of it while it does not.

    Windows of ``eval_every`` steps, one evaluation each: an evaluation whose held-out
    metric (the task's metric on the clean split, reported with ``loader.report_metric``)
    does not beat the best so far halves the pressure of the window after next; the next
    window restores it, as the candidates stay learnable (``ADAPTIVE_MIN_LEARNABILITY``).
    """
    return SelectionPolicy(adaptive=AdaptivePressure(
        window=config.eval_every, min_learnability=ADAPTIVE_MIN_LEARNABILITY, decay=0.5,
        floor=0.5, mode='max'))


# Peers: Composer's SelectiveBackprop, RS2, uniform at equal compute

SELECTIVE_BACKPROP = 'Composer SelectiveBackprop (Jiang et al., 2019)'


def _selective_backprop(settings: SelectiveBackpropSettings, label: str) -> Method:
    def scorer(setup: TaskSetup, learner: nn.Module, reference: Any, method: Method,
               config: Config, seed: int) -> SelectiveBackprop:
        return SelectiveBackprop(learner, setup.task.name, settings,
                                 batch_size=config.batch_size,
                                 drawn=settings.drawn(config.batch_size))

    return Method(label, peer=SELECTIVE_BACKPROP, scorer=scorer, loader=_selective_backprop_loader,
                  extra_flops=lambda selector, big, _: count_flops(selector.select, big)[1],
                  drawn=lambda config, ratio: settings.drawn(config.batch_size))


def _selective_backprop_loader(setup: TaskSetup, method: Method, selector: SelectiveBackprop,
                               ratio: float, seed: int, config: Config
                               ) -> SelectiveBackpropLoader:
    """Batches of ``b / keep`` from the pool, thinned by SelectiveBackprop."""
    n = selector.drawn
    dataset = open_streaming(lambda: SampleIdStreamingDataset(
        local=str(setup.pool_dir), batch_size=n, shuffle=True, shuffle_seed=seed,
        num_canonical_nodes=1))
    source = SelectiveLoader(dataset, batch_size=n, super_batch_size=n, criterion='uniform',
                             seed=seed, num_workers=config.num_workers)
    return SelectiveBackpropLoader(source, selector, steps=config.steps, seed=seed)


def _rs2_loader(setup: TaskSetup, method: Method, scorer: None, ratio: float, seed: int,
                config: Config) -> RepeatedRandomSubsets:
    """RS2 without replacement, each round a fresh ``1 - f`` of the pool."""
    return RepeatedRandomSubsets(str(setup.pool_dir), fraction=1.0 - ratio,
                                 batch_size=config.batch_size, seed=seed,
                                 num_workers=config.num_workers)


def _equal_compute_steps(config: Config, entry: dict[str, Any] | None) -> int:
    """The steps uniform's FLOPs per step buy with the best method's FLOPs (at least the
    budget)."""
    matched = None if entry is None else entry.get('equal_compute')
    return config.steps if matched is None else max(config.steps, matched['steps'])


def _peers() -> dict[str, Method]:
    return {
        'rho_loss': Method('RHO-LOSS (greedy top-k learnability)', 'learnability', 'topk',
                           peer='RHO-LOSS (Mindermann et al., 2022)'),
        'sb_default': _selective_backprop(SelectiveBackpropSettings(),
                                          'SelectiveBackprop, Composer defaults'),
        'sb_suggested': _selective_backprop(SelectiveBackpropSettings(scale_factor=0.5),
                                            'SelectiveBackprop, suggested (scale 0.5)'),
        'rs2': Method('RS2 (repeated random subsets, w/o replacement)', peer='RS2 (Okanovic et '
                      'al., 2023)', reads_super_batches=False, loader=_rs2_loader),
        'uniform_compute': Method('uniform at equal compute', peer='uniform at equal compute',
                                  reads_super_batches=False, steps=_equal_compute_steps),
    }


def _jest_stream_extras(task: str) -> dict[str, Method]:
    recommended = {'recommended': Method('joint, recommended policy', 'learnability',
                                         policy=recommended_policy)}
    return {
        'proxy': Method('learnability, proxy learner', 'learnability', scorer=proxy_scorer,
                        extra_flops=_proxy_training_flops),
        **(recommended if task == 'contrastive' else {}),
        'adaptive': Method('learnability, adaptive pressure', 'learnability',
                           policy=adaptive_policy, report_metric=True),
    }


METHODS: dict[str, dict[str, Method]] = {
    'classification': {
        'uniform': Method('uniform', reads_super_batches=False),
        'hard_learner': Method('hard learner', 'hard_learner'),
        'easy_reference': Method('easy reference', 'easy_reference'),
        'learnability': Method('learnability', 'learnability'),
        **_jest_stream_extras('classification'),
        **_peers(),
    },
    'contrastive': {
        'uniform': Method('uniform', reads_super_batches=False),
        'independent': Method('independent learnability (sample)', 'learnability', 'sample'),
        'joint': Method('joint learnability (JEST)', 'learnability', 'joint'),
        'flexi_joint': Method('joint, Flexi (low-res scoring, mixed-res training)',
                              'learnability', 'joint', flexi=True),
        **_jest_stream_extras('contrastive'),
        **_peers(),
    },
}


@dataclass(frozen=True)
class Config:
    """Every setting of a benchmark run (written into the results file).

    Attributes:
        tasks (tuple[str, ...]): ``classification`` and/or ``contrastive``.
        methods (tuple[str, ...], optional): Methods to run (each task runs those it has;
            ``uniform`` is always run, it sets the target); None: all.
        ratios (tuple[float, ...]): Filter ratios, run in this order.
        ratio_methods (tuple[tuple[float, tuple[str, ...]], ...], optional): Ratios at which
            only some of the methods run (with ``uniform``): ``((ratio, names), ...)``;
            methods a task lacks are skipped. Other ratios run every method.
        seeds (tuple[int, ...]): Seeds of the learners' initialisation, the data order and
            the selection; every method of a seed shares them.
        steps (int): Optimizer steps per run (the same budget for every method).
        eval_every (int): Steps between evaluations.
        eval_size (int | None): Test images evaluated (a fixed random subset); None: all.
        batch_size (int): Sub-batch size ``b``.
        lr (float): Adam learning rate of the learners (constant).
        temperature (float): Softmax temperature of the sampled selections.
        n_chunks (int): Chunks of the joint sampler.
        selection (str): Selection method of the scored methods that name none.
        flexi_factor (int): Downsampling factor of Flexi scoring and of low-res training rows.
        low_fraction (float): Share of each Flexi sub-batch trained at low resolution.
        reference_steps (int): Optimizer steps of each reference on the clean split.
        reference_lr (float): Adam learning rate of the references.
        reference_batch_size (int): Batch size of the references' training.
        noise_rate (float): Label noise of the pool (and so the mismatched captions).
        clean_fraction (float): Share of the train split kept clean for the references.
        data_seed (int): Seed of the split, the noise, the captions and the test subset.
        limit (int | None): Use only the first ``limit`` train images (small test runs).
        num_workers (int): DataLoader workers reading super-batches.
        threads (int): torch intra-op threads of the training process.
        quick (bool): The short configuration (``--quick``).
        data_dir (str): Where the MDS shards and the reference caches are built once.
    """

    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] | None = None
    ratios: tuple[float, ...] = (0.8, 0.9, 0.5)
    ratio_methods: tuple[tuple[float, tuple[str, ...]], ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    eval_every: int = 20
    eval_size: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    temperature: float = 1.0
    n_chunks: int = 16
    selection: str = 'joint'
    flexi_factor: int = 2
    low_fraction: float = 0.5
    reference_steps: int = 1000
    reference_lr: float = 2e-3
    reference_batch_size: int = 64
    noise_rate: float = 0.4
    clean_fraction: float = 0.05
    data_seed: int = 0
    limit: int | None = None
    num_workers: int = 1
    threads: int = 1
    quick: bool = False
    data_dir: str = str(report.REPO_ROOT / 'data' / 'fashion-mnist')

    def super_batch_size(self, ratio: float) -> int:
        """``B`` of a filter ratio."""
        return super_batch_size_for(self.batch_size, ratio)

    def method_names(self, task: str, ratio: float | None = None) -> tuple[str, ...]:
        """The methods run on ``task`` (at ``ratio``; all ratios when None), in registry
        order (``uniform`` first)."""
        only = None if ratio is None else dict(self.ratio_methods or ()).get(ratio)
        return tuple(name for name in METHODS[task]
                     if name == 'uniform' or ((self.methods is None or name in self.methods)
                                              and (only is None or name in only)))

    def method(self, task: str, name: str) -> Method:
        """The registry entry of a method, with its selection method filled in."""
        method = METHODS[task][name]
        if method.selection is None:
            default = 'uniform' if method.criterion == 'uniform' else self.selection
            method = replace(method, selection=default)
        return method

    def drawn(self, method: Method, ratio: float) -> int:
        """Examples the method reads per scoring step: its own number, ``B``, or ``b`` for
        one that reads no more."""
        if method.drawn is not None:
            return method.drawn(self, ratio)
        return self.super_batch_size(ratio) if method.reads_super_batches else self.batch_size

    def budget(self, method: Method, entry: dict[str, Any] | None = None) -> int:
        """The method's step budget (``entry``: the summary of its task and ratio so far)."""
        return method.steps(self, entry) if method.steps is not None else self.steps

    def checkpoints(self, steps: int | None = None) -> list[int]:
        """Steps at which accuracy is measured: 0, every ``eval_every``, and the last."""
        steps = self.steps if steps is None else steps
        return sorted({0, *range(self.eval_every, steps + 1, self.eval_every), steps})


#: The full run: every method at f = 0.8; at 0.9 and 0.5 uniform, learnability (joint on the
#: contrastive task) and the adaptive policy.
FULL = Config(ratio_methods=((0.9, ('learnability', 'joint', 'adaptive')),
                             (0.5, ('learnability', 'joint', 'adaptive'))))
QUICK = Config(ratios=(0.8,), steps=200, eval_every=10, eval_size=2000, reference_steps=600,
               quick=True)


def _mixed(method: Method, config: Config) -> MixedResolution | None:
    if not method.flexi:
        return None
    return MixedResolution(key='image', low_fraction=config.low_fraction,
                           factor=config.flexi_factor)


def _scorer(setup: TaskSetup, method: Method, learner: nn.Module, reference: Any,
            config: Config, seed: int) -> Any:
    """The method's scorer over ``reference`` (the cache, or the live model); None if uniform."""
    if method.scorer is not None:
        return method.scorer(setup, learner, reference, method, config, seed)
    if not get_criterion(method.criterion).scores:
        return None
    return setup.task.make_scorer(learner, reference,
                                  low_resolution=config.flexi_factor if method.flexi else None)


def selective_loader(setup: TaskSetup, method: Method, scorer: Any, ratio: float, seed: int,
                     config: Config) -> SelectiveLoader:
    """A ``SelectiveLoader`` over the task's pool, as a user would build it."""
    big = config.drawn(method, ratio)
    dataset = open_streaming(lambda: SampleIdStreamingDataset(
        local=str(setup.pool_dir), batch_size=big, shuffle=True, shuffle_seed=seed,
        num_canonical_nodes=1))
    temperature = config.temperature if method.temperature is None else method.temperature
    return SelectiveLoader(dataset, batch_size=config.batch_size, super_batch_size=big,
                           scorer=scorer, criterion=method.criterion, method=method.selection,
                           n_chunks=config.n_chunks, temperature=temperature, seed=seed,
                           num_workers=config.num_workers, batch_transform=_mixed(method, config),
                           policy=method.policy(config, ratio) if method.policy else None)


def configuration_flops(setup: TaskSetup, name: str, ratio: float, config: Config
                        ) -> dict[str, int]:
    """FLOPs of one step of a method, counted once on real pool samples.

    Returns:
        dict: ``train`` (forward and backward of a sub-batch, at mixed resolution for
        Flexi), ``score`` (the scorer over the super-batch, reading the stored reference
        outputs), ``select`` (scores and sampler), ``extra`` (work the method adds: a proxy
        learner's training, SelectiveBackprop's selecting forward), ``per_step`` (their sum:
        a step that scores all it reads), ``scoring`` (``per_step - train``: what a step pays
        in proportion to the candidates it scores), ``reference_forward`` (what a live
        reference adds to scoring) and ``per_step_live_reference``; ``drawn``: the examples
        a scoring step reads; ``proxy_parameters`` for a proxy scorer.
    """
    method = config.method(setup.task.name, name)
    big = config.drawn(method, ratio)
    learner = setup.task.make_learner(0)
    super_batch = {key: value[:big] for key, value in setup.probe.items()}
    sub_batch = {key: value[:config.batch_size] for key, value in super_batch.items()}
    mixed = _mixed(method, config)
    counts = {'train': train_step_flops(learner, mixed(sub_batch) if mixed else sub_batch,
                                        setup.task.loss), 'drawn': big}
    criterion = get_criterion(method.criterion)
    ids = torch.arange(big)
    scorer = _scorer(setup, method, learner, setup.cache, config, 0)
    scores, counts['score'], live = None, 0, 0
    if criterion.scores:
        scores, counts['score'] = count_flops(scorer, super_batch, ids, criterion)
        live = score_flops(_scorer(setup, method, learner, setup.reference, config, 0),
                           super_batch, criterion=criterion, sample_ids=ids)
    counts['select'] = count_flops(
        get_selection_method(method.selection), scores, big, config.batch_size,
        n_chunks=config.n_chunks, temperature=config.temperature,
        generator=torch.Generator().manual_seed(0))[1]
    counts['extra'] = (method.extra_flops(scorer, super_batch, sub_batch)
                       if method.extra_flops is not None else 0)
    counts['per_step'] = counts['train'] + counts['score'] + counts['select'] + counts['extra']
    counts['scoring'] = counts['per_step'] - counts['train']
    counts['reference_forward'] = live - counts['score'] if criterion.scores else 0
    counts['per_step_live_reference'] = counts['per_step'] + counts['reference_forward']
    if isinstance(scorer, ProxyScorer):
        counts['proxy_parameters'] = count_parameters(scorer.proxy)
    return counts


def _checkpoint_hook(setup: TaskSetup, method: Method, loader: Any, validation: list[float]
                     ) -> Callable[[int, nn.Module], None]:
    """After each evaluation: the held-out metric, reported to the policy when asked."""
    def on_checkpoint(step: int, learner: nn.Module) -> None:
        value = setup.validate(learner)
        validation.append(value)
        loader.report_metric(value)

    return on_checkpoint


def run_one(setup: TaskSetup, name: str, ratio: float, seed: int, config: Config, *,
            entry: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a fresh learner on the sub-batches method ``name`` selects.

    Args:
        entry (dict, optional): The summary of the task and ratio so far, for a method
            whose budget depends on the others' (``Method.steps``).

    Returns:
        dict: ``task``, ``method``, ``ratio``, ``seed``, ``policy`` (its repr, or None),
        ``validation`` (the held-out metric reported at each checkpoint after the first,
        for a method that reports it) and what
        :func:`benchmarks.common.training.train_selective` measured: ``steps``,
        ``accuracy``, ``seconds`` and ``scored`` per checkpoint, ``pressure`` and
        ``learnability`` per interval, ``noisy_fraction``, ``noisy_fraction_overall``,
        ``train_seconds``, ``seconds_per_step``, ``step_costs``, ``drawn_per_step``.
    """
    task = setup.task.name
    method = config.method(task, name)
    learner = setup.task.make_learner(seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    scorer = _scorer(setup, method, learner, setup.cache, config, seed)
    make_loader = method.loader if method.loader is not None else selective_loader
    loader = make_loader(setup, method, scorer, ratio, seed, config)
    steps = config.budget(method, entry)
    validation: list[float] = []
    measured = train_selective(
        learner, loader, steps=steps, loss_fn=setup.task.loss, optimizer=optimizer,
        checkpoints=config.checkpoints(steps), evaluate=setup.evaluate,
        noisy_key=setup.task.noisy_key,
        after_step=(functools.partial(method.after_step, scorer)
                    if method.after_step is not None else None),
        on_checkpoint=(_checkpoint_hook(setup, method, loader, validation)
                       if method.report_metric else None),
        desc=f'{task[:5]} f={ratio} {name} s{seed}', progress=progress)
    policy = getattr(loader, 'policy', None)
    close = getattr(loader, 'close', None)
    if close is not None:
        close()
    # A StreamingDataset holds shared memory until it is collected: release it before the
    # next run opens the same pool.
    del loader, scorer
    gc.collect()
    return {'task': task, 'method': name, 'ratio': ratio, 'seed': seed,
            'policy': None if policy is None or policy.is_default else repr(policy),
            'validation': validation, **measured}


# Summaries


def flops_curve(run: dict[str, Any], costs: dict[str, int], *, live: bool = False
                ) -> np.ndarray:
    """FLOPs spent by each checkpoint of a run: every step trains, and pays the scoring
    part of its step (scoring, selection, extra work) in proportion to the candidates it
    scored (all ``drawn`` at full pressure, fewer under a policy, none at pressure 0).

    Args:
        run (dict): A run record (``steps`` and ``scored`` per checkpoint).
        costs (dict): The method's :func:`configuration_flops`.
        live (bool): Count a live reference forward too.

    Returns:
        np.ndarray: float64 FLOPs per checkpoint.
    """
    steps = np.asarray(run['steps'], dtype=np.float64)
    scored = np.asarray(run['scored'], dtype=np.float64) / costs['drawn']
    scoring = costs['scoring'] + (costs['reference_forward'] if live else 0)
    return steps * costs['train'] + scored * scoring


def _speedups(index: int | None, steps: Sequence[int], flops: Sequence[float],
              seconds: Sequence[float], baseline: dict[str, float]) -> dict[str, float | None]:
    """Steps, FLOPs and seconds to the target (first reached at checkpoint ``index``), and
    the three speed-ups against uniform's whole budget."""
    if index is None:
        return dict.fromkeys(('steps_to_target', 'flops_to_target', 'seconds_to_target',
                              'speedup_steps', 'speedup_flops', 'speedup_wall'))
    step, flop, second = steps[index], float(flops[index]), float(seconds[index])
    return {'steps_to_target': step, 'flops_to_target': flop, 'seconds_to_target': second,
            'speedup_steps': baseline['steps'] / step,
            'speedup_flops': baseline['flops'] / flop if flop > 0 else None,
            'speedup_wall': baseline['seconds'] / second if second > 0 else None}


def _reach_index(steps: Sequence[int], curve: Sequence[float], target: float) -> int | None:
    reached = stats.first_reach(steps, curve, target)
    return None if reached is None else list(steps).index(reached)


def _summarise_method(mine: list[dict[str, Any]], uniform: dict[int, dict[str, Any]],
                      costs: dict[str, int], uniform_costs: dict[str, int], budget: int
                      ) -> dict[str, Any]:
    steps = mine[0]['steps']
    mine = [r for r in mine if r['steps'] == steps]
    curves = np.asarray([r['accuracy'] for r in mine])
    seconds = np.asarray([r['seconds'] for r in mine]).mean(0)
    flops = np.asarray([flops_curve(r, costs) for r in mine]).mean(0)
    live = np.asarray([flops_curve(r, costs, live=True) for r in mine]).mean(0)
    std = curves.std(0, ddof=1) if len(mine) > 1 else np.zeros(len(steps))
    mean = curves.mean(0)
    target = float(np.mean([u['accuracy'][-1] for u in uniform.values()]))
    baseline = {'steps': budget, 'flops': budget * uniform_costs['per_step'],
                'seconds': float(np.mean([u['train_seconds'] for u in uniform.values()]))}
    index = _reach_index(steps, mean, target)
    on_mean = _speedups(index, steps, flops, seconds, baseline)
    # The same seconds in units of the run's own training step (the trainer's forward,
    # backward and optimizer step on b examples: the same work for every method but Flexi's),
    # which cancels the load of a shared machine as it was during each run.
    in_steps = np.asarray([np.asarray(r['seconds']) / _train_step_s(r) for r in mine]).mean(0)
    uniform_in_steps = float(np.mean([u['train_seconds'] / _train_step_s(u)
                                      for u in uniform.values()]))
    normalised = (uniform_in_steps / in_steps[index]
                  if index is not None and in_steps[index] > 0 else None)
    per_seed = {}
    for run in mine:
        own = uniform[run['seed']]
        own_target = own['accuracy'][-1]
        reached = _reach_index(steps, run['accuracy'], own_target)
        per_seed[str(run['seed'])] = {'target_accuracy': own_target, **_speedups(
            reached, steps, flops_curve(run, costs), run['seconds'],
            {**baseline, 'seconds': own['train_seconds']}),
            'speedup_wall_normalised': None if reached is None or run['seconds'][reached] <= 0
            else (own['train_seconds'] / _train_step_s(own))
            / (run['seconds'][reached] / _train_step_s(run))}
    finals = curves[:, -1]
    return {
        'seeds': [r['seed'] for r in mine], 'steps': steps,
        'accuracy_mean': mean.tolist(), 'accuracy_std': std.tolist(),
        'seconds_mean': seconds.tolist(), 'flops_mean': flops.tolist(),
        'final_accuracy_mean': float(mean[-1]), 'final_accuracy_std': float(std[-1]),
        'final_below_uniform': sum(int(final < uniform[r['seed']]['accuracy'][-1])
                                   for final, r in zip(finals, mine, strict=True)),
        **on_mean, 'first_checkpoint': index == 1, 'speedup_wall_normalised': normalised,
        'speedup_flops_live_reference': (baseline['flops'] / float(live[index])
                                         if index is not None and live[index] > 0 else None),
        'flops_per_step': costs['per_step'],
        'flops_per_step_live_reference': costs['per_step_live_reference'],
        'flops_total': float(flops[-1]),
        'per_seed': per_seed,
        'per_seed_speedups': {key: stats.summary([s[f'speedup_{key}'] for s in per_seed.values()])
                              for key in ('steps', 'flops', 'wall', 'wall_normalised')},
        'step_costs': {key: float(np.mean([r['step_costs'][key] for r in mine]))
                       for key in STEP_COSTS},
        'seconds_per_step_mean': float(np.mean([r['seconds_per_step'] for r in mine])),
        'drawn_per_step': float(np.mean([r['drawn_per_step'] for r in mine])),
        'noisy_fraction_mean': float(np.mean([r['noisy_fraction_overall'] for r in mine])),
        'pressure_mean': _mean_curve([r['pressure'] for r in mine]),
    }


def _train_step_s(run: dict[str, Any]) -> float:
    """The run's mean seconds of the trainer's own work per step."""
    return max(run['step_costs']['train_s'], 1e-9)


def _mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    """Mean over runs, point by point, of curves with gaps (None)."""
    out: list[float | None] = []
    for values in zip(*curves, strict=True):
        present = [v for v in values if v is not None]
        out.append(float(np.mean(present)) if present else None)
    return out


def equal_compute(task: str, methods: dict[str, Any], budget: int) -> dict[str, Any] | None:
    """What uniform at equal compute is given: the FLOPs that the best of jest_stream's
    selection methods (highest final accuracy) spends to its final step, scoring included,
    in uniform steps.

    Returns:
        dict | None: ``method``, ``flops`` and ``steps`` (at least the budget); None before
        any selection method has finished.
    """
    ours = {name: m for name, m in methods.items()
            if METHODS[task].get(name) is not None and METHODS[task][name].peer is None
            and METHODS[task][name].criterion != 'uniform'}
    if not ours or 'uniform' not in methods:
        return None
    best = max(ours, key=lambda name: ours[name]['final_accuracy_mean'])
    total = ours[best]['flops_total']
    return {'method': best, 'flops': total,
            'steps': max(budget, math.ceil(total / methods['uniform']['flops_per_step']))}


def summarise(runs: list[dict[str, Any]], flops: dict[str, Any], config: Config
              ) -> dict[str, Any]:
    """Per task and ratio: curves over seeds, and steps, FLOPs and seconds to the target.

    The target is uniform's final accuracy (the mean over seeds on the mean curve; each
    seed's own per seed). A task and ratio is summarised once its uniform runs exist; only
    seeds whose uniform run finished count, and each method over the seeds it has
    finished.

    Returns:
        dict: ``{task: {ratio: {...}}}``, see the schema in ``benchmarks/README.md``.
    """
    out: dict[str, Any] = {}
    for task in config.tasks:
        for ratio in config.ratios:
            group = [r for r in runs if r['task'] == task and r['ratio'] == ratio]
            uniform = {r['seed']: r for r in group if r['method'] == 'uniform'}
            if not uniform:
                continue
            costs = flops[task][str(ratio)]
            methods = {}
            for name in config.method_names(task, ratio):
                mine = [r for r in group if r['method'] == name and r['seed'] in uniform]
                if mine and name in costs:
                    methods[name] = _summarise_method(mine, uniform, costs[name],
                                                      costs['uniform'], config.steps)
            out.setdefault(task, {})[str(ratio)] = {
                'target_accuracy': float(np.mean([u['accuracy'][-1] for u in uniform.values()])),
                'budget_steps': config.steps, 'super_batch_size': config.super_batch_size(ratio),
                'uniform_first_reach_steps': methods['uniform']['steps_to_target'],
                'equal_compute': equal_compute(task, methods, config.steps),
                'methods': methods}
    return out


def _cell(value: float | None, fmt: str, missing: str = 'n/r') -> str:
    return missing if value is None else format(value, fmt)


def _speedup_cell(m: dict[str, Any], key: str, baseline: bool) -> str:
    if baseline:
        return 'base'
    seeds = m['per_seed_speedups'][key]
    spread = (f'{seeds["mean"]:.2f}±{seeds["std"]:.2f} ' if seeds['mean'] is not None
              else '') + f'{seeds["n"]}/{seeds["of"]}'
    value = m[f'speedup_{key}']
    return f'{"n/r" if value is None else f"{value:.2f}x"} [{spread}]'


def format_table(results: dict[str, Any]) -> str:
    """The summary as a text table, one block per task and ratio."""
    lines = []
    for task, by_ratio in results['summary'].items():
        for ratio, entry in sorted(by_ratio.items(), key=lambda kv: float(kv[0])):
            uniform = entry['methods']['uniform']
            lines.append(
                f'{task}, filter ratio {ratio} (b={results["config"]["batch_size"]}, '
                f'B={entry["super_batch_size"]}), {len(uniform["seeds"])} seed(s): target = '
                f'uniform final {entry["target_accuracy"]:.4f} at {entry["budget_steps"]} '
                f'steps, {uniform["seconds_mean"][-1]:.1f} s of training; reference '
                f'{results["tasks"][task]["reference_accuracy"]:.4f}')
            lines.append(f'  {"method":<16} {"final acc":>15} {"steps→":>6} '
                         f'{"speed-up: steps [per seed]":>27} {"FLOPs [per seed]":>25} '
                         f'{"wall [per seed]":>25} {"w/step":>6} | ms/step: {"train":>6} '
                         f'{"score":>6} '
                         f'{"select":>6} {"wait":>6} {"other":>6} | {"read":>4} {"noisy":>5}')
            for name, m in entry['methods'].items():
                cost = m['step_costs']
                peer = results['methods'][task][name].get('peer')
                normalised = ('base' if name == 'uniform'
                              else _cell(m.get('speedup_wall_normalised'), '.2f'))
                lines.append(
                    f'  {name + ("*" if peer else ""):<16} '
                    f'{m["final_accuracy_mean"]:.4f}±{m["final_accuracy_std"]:.4f}'
                    f' {_cell(m["steps_to_target"], "d"):>6} '
                    f'{_speedup_cell(m, "steps", name == "uniform"):>27} '
                    f'{_speedup_cell(m, "flops", name == "uniform"):>25} '
                    f'{_speedup_cell(m, "wall", name == "uniform"):>25} '
                    f'{normalised:>6} |'
                    f'          {1e3 * cost["train_s"]:6.1f} {1e3 * cost["score_s"]:6.1f} '
                    f'{1e3 * cost["select_s"]:6.1f} {1e3 * cost["wait_s"]:6.1f} '
                    f'{1e3 * (cost["other_s"] + cost["transfer_s"]):6.1f} | '
                    f'{m["drawn_per_step"]:4.0f} {m["noisy_fraction_mean"]:5.3f}')
            matched = entry.get('equal_compute')
            if matched is not None and 'uniform_compute' in entry['methods']:
                lines.append(f'  uniform at equal compute: {matched["steps"]} uniform steps, the '
                             f'{matched["flops"] / 1e12:.3f} TFLOPs that {matched["method"]} '
                             f'spends in {entry["budget_steps"]} steps')
            lines.append('')
    peers = {name: m['peer'] for by_name in results['methods'].values()
             for name, m in by_name.items() if m.get('peer')}
    if peers:
        lines.append('*: peers, ' + '; '.join(f'{name} = {peer}' for name, peer in peers.items())
                     + '.')
    lines.append(
        'steps→: first checkpoint where the mean curve over seeds reaches the target (n/r: not '
        'reached within the budget). Speed-ups to the target, uniform = 1: steps (budget / '
        'steps), FLOPs (training + scoring with stored reference outputs + selection + extra '
        'work, in proportion to the candidates each step scored), wall (training seconds, '
        'evaluation excluded), on the mean curve, then [mean±std over the seeds that reach '
        'their own uniform final, count/seeds]; w/step: the wall-clock speed-up with each '
        'run\'s seconds counted in its own training steps (cancels the machine\'s load during '
        'the run; understates Flexi, whose training steps are cheaper). ms/step: the '
        'trainer\'s forward, backward and optimizer step; the loader\'s scoring (a proxy\'s '
        'training included), selection and wait for data; other: transfer and hand-over. '
        'read: examples read per step (uniform reads only what it trains on). noisy: '
        'corrupted labels / mismatched captions among the examples trained on.')
    return '\n'.join(lines)


def _times(value: float, more: str, less: str) -> str:
    return f'{value:.2f}x {more}' if value >= 1 else f'{1 / value:.2f}x {less}'


def format_verdicts(results: dict[str, Any]) -> list[str]:
    """One sentence per scored method: the three speed-ups and what a step cost."""
    lines = []
    for task, by_ratio in results['summary'].items():
        for ratio, entry in sorted(by_ratio.items(), key=lambda kv: float(kv[0])):
            base = 1e3 * entry['methods']['uniform']['seconds_per_step_mean']
            for name, m in entry['methods'].items():
                if name == 'uniform':
                    continue
                cost = {k: 1e3 * v for k, v in m['step_costs'].items()}
                step = 1e3 * m['seconds_per_step_mean']
                if m['speedup_steps'] is None:
                    reached = (f'did not reach uniform\'s final accuracy '
                               f'{entry["target_accuracy"]:.4f} in {m["steps"][-1]} steps')
                else:
                    wall, normalised = m['speedup_wall'], m.get('speedup_wall_normalised')
                    reached = (
                        f'reached uniform\'s final accuracy {entry["target_accuracy"]:.4f} in '
                        f'{_times(m["speedup_steps"], "fewer", "more")} steps, with '
                        f'{_times(m["speedup_flops"], "fewer", "more")} FLOPs, and '
                        + ('at once' if wall is None else _times(wall, 'sooner', 'later'))
                        + ' in wall-clock time' + ('' if normalised is None else
                                                   f' ({_times(normalised, "sooner", "later")} '
                                                   f'counted in training steps)'))
                lines.append(
                    f'{name} ({task}, f={ratio}) {reached}. A step cost {step:.1f} ms '
                    f'({step / base:.1f}x uniform\'s {base:.1f} ms): train {cost["train_s"]:.1f}, '
                    f'score {cost["score_s"]:.1f}, select {cost["select_s"]:.1f}, wait '
                    f'{cost["wait_s"]:.1f}, other {cost["transfer_s"] + cost["other_s"]:.1f} ms.')
    return lines


def _legend(results: dict[str, Any], m: dict[str, Any], task: str, name: str) -> str:
    label = results['methods'][task][name]['label']
    if results['methods'][task][name].get('peer'):
        label = f'[peer] {label}'
    if name == 'uniform':
        return label
    speedups = ', '.join(f'{_cell(m[f"speedup_{key}"], ".2f")}'
                         f'{"" if m[f"speedup_{key}"] is None else "x"} {key}'
                         for key in ('steps', 'flops', 'wall'))
    return f'{label}: {speedups}'


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against steps, FLOPs and seconds: one row per task and ratio, three columns.

    jest_stream's methods are solid lines, peers dashed; the legend gives each method's
    three speed-ups."""
    plt = report.pyplot()
    rows = [(task, ratio) for task, by_ratio in results['summary'].items()
            for ratio in sorted(by_ratio, key=float)]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(18, 5.0 * len(rows)), squeeze=False)
    views = (('steps', 'optimizer step', 'steps'),
             ('flops', 'TFLOPs (stored reference outputs)', 'FLOPs'),
             ('seconds', 'training seconds (evaluation excluded)', 'seconds'))
    for row, (task, ratio) in enumerate(rows):
        entry = results['summary'][task][ratio]
        budget = entry['budget_steps']
        low = min(min(m['accuracy_mean'][1:]) for m in entry['methods'].values())
        for col, (view, xlabel, what) in enumerate(views):
            ax = axes[row][col]
            for name, m in entry['methods'].items():
                x = {'steps': np.asarray(m['steps'], dtype=np.float64),
                     'flops': np.asarray(m['flops_mean']) / 1e12,
                     'seconds': np.asarray(m['seconds_mean'])}[view]
                mean, std = np.asarray(m['accuracy_mean']), np.asarray(m['accuracy_std'])
                peer = results['methods'][task][name].get('peer')
                ax.plot(x, mean, color=COLOURS.get(name), lw=1.2, ls='--' if peer else '-',
                        label=_legend(results, m, task, name))
                ax.fill_between(x, mean - std, mean + std, color=COLOURS.get(name), alpha=0.1)
            ax.axhline(entry['target_accuracy'], color='k', ls=':', lw=1,
                       label='target: uniform final')
            ax.axhline(results['tasks'][task]['reference_accuracy'], color='tab:olive', ls='-.',
                       lw=1, label='reference (clean split)')
            if view == 'steps':
                ax.set_xlim(0, budget * 1.02)
            ax.set(xlabel=xlabel, ylabel=TASKS[task].metric, ylim=(max(0.0, low - 0.05), None),
                   title=f'{task}, f={ratio}, B={entry["super_batch_size"]}: to target in {what}')
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=6, loc='lower right')
    fig.suptitle(f'Fashion-MNIST, {results["config"]["noise_rate"]:.0%} noisy labels / '
                 f'mismatched captions, sub-batch {results["config"]["batch_size"]}; mean ± std '
                 f'over seeds; speed-up = uniform\'s cost to its final accuracy / the method\'s; '
                 f'dashed: peers (uniform at equal compute runs past the budget)', fontsize=9)
    report.save_figure(fig, path, dpi=90)


# Driver


def config_from_record(record: dict[str, Any]) -> Config:
    """The :class:`Config` a results file was written with.

    Args:
        record (dict): The file's ``config`` as JSON reads it (lists where the settings hold
            tuples).

    Returns:
        Config: Equal to the one the run was given.

    Raises:
        TypeError: ``record`` names a setting :class:`Config` does not have.
    """
    values = dict(record)
    for key in ('tasks', 'methods', 'ratios', 'seeds'):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    if values.get('ratio_methods') is not None:
        values['ratio_methods'] = tuple((ratio, tuple(names))
                                        for ratio, names in values['ratio_methods'])
    return Config(**values)


def _prepare_tasks(config: Config, progress: bool) -> tuple[dict[str, TaskSetup], int]:
    data = prepare(config.data_dir, noise_rate=config.noise_rate,
                   clean_fraction=config.clean_fraction, seed=config.data_seed,
                   limit=config.limit, progress=progress)
    n_test = len(data.test_labels)
    eval_rows = (np.arange(n_test) if config.eval_size is None or config.eval_size >= n_test
                 else np.sort(np.random.default_rng(np.random.SeedSequence(
                     [config.data_seed, 5])).choice(n_test, config.eval_size, replace=False)))
    reference = ReferenceSettings(steps=config.reference_steps, lr=config.reference_lr,
                                  batch_size=config.reference_batch_size, seed=config.data_seed)
    probe = max(config.super_batch_size(r) for r in config.ratios)
    setups = {task: prepare_task(task, data=data, reference=reference, eval_rows=eval_rows,
                                 probe_rows=probe, num_workers=config.num_workers,
                                 progress=progress)
              for task in config.tasks}
    return setups, len(eval_rows)


_SELECTION_OF_METHODS = ('methods', 'ratio_methods')


def _previous_runs(json_path: Path, config: Config, say: Callable[[str], None]
                   ) -> tuple[list[dict[str, Any]], float]:
    if not json_path.is_file():
        return [], 0.0
    old = json.loads(json_path.read_text())
    # A run does not depend on which other methods run, so a resume may run fewer or more
    # (uniform at equal compute reads the others' summary when it runs, after them).
    # As written: paths inside the repository are stored relative to it.
    mine = json.loads(json.dumps(report.repo_relative(asdict(config))))
    same = {key: value for key, value in mine.items() if key not in _SELECTION_OF_METHODS}
    theirs = {key: value for key, value in old.get('config', {}).items()
              if key not in _SELECTION_OF_METHODS}
    if old.get('schema') == SCHEMA and theirs == same:
        kept = [r for r in old['runs'] if (r['task'], r['ratio'], r['seed'], r['method'])
                in set(run_order(config))]
        say(f'resuming: {len(kept)} finished runs kept from {json_path}')
        return kept, float(old.get('wall_seconds', 0.0))
    say(f'{json_path} holds another configuration: starting afresh')
    return [], 0.0


def run_order(config: Config) -> list[tuple[str, float, int, str]]:
    """``(task, ratio, seed, method)`` of every run, in order: ratio by ratio, task by task,
    seed by seed; a method whose budget depends on the others' (``Method.steps``) runs after
    every seed of them."""
    order = []
    for ratio in config.ratios:
        for task in config.tasks:
            names = config.method_names(task, ratio)
            first = [m for m in names if METHODS[task][m].steps is None]
            last = [m for m in names if METHODS[task][m].steps is not None]
            for group in (first, last):
                order += [(task, ratio, seed, m) for seed in config.seeds for m in group]
    return order


def describe(config: Config) -> str:
    """What a run of ``config`` will do, in a few lines."""
    runs = len(run_order(config))
    methods = '; '.join(f'{t} at f={r}: {", ".join(config.method_names(t, r))}'
                        for r in config.ratios for t in config.tasks)
    return (f'{runs} training runs of {config.steps} steps (sub-batches of {config.batch_size}; '
            f'seeds {", ".join(map(str, config.seeds))}; {methods}; uniform at equal compute '
            f'runs longer, after the others; uniform reads only the examples it trains on, the '
            f'others read the whole super-batch). First: the Fashion-MNIST pool '
            f'as MDS shards (built once), a reference per task trained on the clean split, '
            f'and its outputs over the pool stored with jest_stream.annotate into a reference '
            f'cache that the scorers read.')


def run_benchmark(config: Config, out: Path, *, name: str = 'learning_efficiency',
                  resume: bool = False, clean_shm: bool = False, progress: bool = True,
                  argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every configuration, rewriting the results file after each run.

    Args:
        config (Config): The settings.
        out (Path): Output folder.
        name (str): The benchmark's name (``learning_efficiency``, or a preset's).
        resume (bool): Keep the runs of an existing results file with the same ``config``.
        clean_shm (bool): First remove the shared memory that killed streaming jobs left
            (``jest_stream.remove_stale_shared_memory``: segments no live process uses).
        progress (bool): Print progress, bars and one line per finished run.
        argv (Sequence[str], optional): The command line, for the run record.

    Returns:
        dict: The results (what the JSON file holds).
    """
    say = print if progress else (lambda *_: None)
    if clean_shm:
        remove_stale_shared_memory()
    run = report.start_run(name, argv, threads=config.threads)
    json_path, png_path = report.report_paths(out, name, config.quick)
    previous, earlier_seconds = _previous_runs(json_path, config, say) if resume else ([], 0.0)
    setups, n_eval = _prepare_tasks(config, progress)
    flops = {task: {str(ratio): {m: configuration_flops(setups[task], m, ratio, config)
                                 for m in config.method_names(task, ratio)}
                    for ratio in config.ratios} for task in config.tasks}
    record: dict[str, Any] = {
        'schema': SCHEMA, 'config': asdict(config),
        'methods': {task: {m: config.method(task, m).record() for m in config.method_names(task)}
                    for task in config.tasks},
        'tasks': {task: {'reference_accuracy': s.reference_accuracy,
                         'one_off_flops': s.one_off_flops, **s.summary}
                  for task, s in setups.items()},
        'evaluation_images': n_eval, 'flops': flops, 'runs': list(previous), 'complete': False,
        'setup_seconds': time.perf_counter() - run['_started'],
    }
    say(f'set-up (data, references, reference caches, FLOPs): {record["setup_seconds"]:.0f} s')
    record['summary'] = summarise(record['runs'], flops, config)

    def save() -> None:
        record['summary'] = summarise(record['runs'], flops, config)
        record['tasks'] = {task: {**record['tasks'][task], 'proxy_parameters': {
            str(r): flops[task][str(r)]['proxy'].get('proxy_parameters')
            for r in config.ratios if 'proxy' in flops[task][str(r)]}} for task in config.tasks}
        record['run'] = report.finish_run(run)
        # Over every invocation that contributed runs (a resumed run adds its time).
        record['wall_seconds'] = record['run']['wall_s'] + earlier_seconds
        report.write_record(json_path, record)

    done = {(r['task'], r['ratio'], r['seed'], r['method']) for r in previous}
    todo = [run for run in run_order(config) if run not in done]
    for i, (task, ratio, seed, m) in enumerate(todo, 1):
        entry = record.get('summary', {}).get(task, {}).get(str(ratio))
        result = run_one(setups[task], m, ratio, seed, config, entry=entry, progress=progress)
        record['runs'].append(result)
        save()
        cost = {k: 1e3 * v for k, v in result['step_costs'].items()}
        say(f'[{i}/{len(todo)}] {task} f={ratio} seed {seed} {m}: accuracy '
            f'{result["accuracy"][-1]:.4f}, {1e3 * result["seconds_per_step"]:.1f} ms/step '
            f'(train {cost["train_s"]:.1f}, score {cost["score_s"]:.1f}, select '
            f'{cost["select_s"]:.1f}, wait {cost["wait_s"]:.1f}), noisy '
            f'{result["noisy_fraction_overall"]:.3f}; '
            f'{time.perf_counter() - run["_started"]:.0f} s elapsed')
        if i < len(todo) and todo[i][:2] != (task, ratio):
            plot(record, png_path)  # a finished task and ratio, while the others run
    record['complete'] = True
    save()
    plot(record, png_path)
    say('')
    say(format_table(record))
    say('')
    for line in format_verdicts(record):
        say(line)
    say(f'\n{record["wall_seconds"]:.0f} s in all (set-up {record["setup_seconds"]:.0f} s); '
        f'wrote {json_path} and {png_path.name}')
    return record


def build_parser(name: str, preset: Config, quick: Config, description: str
                 ) -> argparse.ArgumentParser:
    """The command line of this benchmark and of its presets (other defaults, same options)."""
    parser = report.benchmark_parser(
        name, description, seeds=preset.seeds, threads=preset.threads,
        quick=f'ratio(s) {", ".join(map(str, quick.ratios))}, seeds '
              f'{" ".join(map(str, quick.seeds))}, {quick.steps} steps, '
              f'{quick.eval_size or "all"} test images')
    parser.add_argument('--task', choices=(*TASKS, 'both'), default=None,
                        help=f'default: {" and ".join(preset.tasks)}')
    parser.add_argument('--methods', nargs='+', default=None,
                        help='methods to run besides uniform (default: '
                             f'{" ".join(preset.methods) if preset.methods else "all"})')
    parser.add_argument('--ratios', type=float, nargs='+', default=None,
                        help=f'filter ratios (default {" ".join(map(str, preset.ratios))})')
    parser.add_argument('--every-method', action='store_true',
                        help='run every method at every ratio (the full run runs only uniform, '
                             'learnability/joint and the adaptive policy at 0.9 and 0.5)')
    parser.add_argument('--steps', type=int, default=None, help='optimizer steps per run')
    parser.add_argument('--eval-every', type=int, default=None)
    parser.add_argument('--eval-size', type=int, default=None,
                        help='test images per evaluation (default: all; --quick: 2000)')
    parser.add_argument('--batch-size', type=int, default=None, help='sub-batch size b')
    parser.add_argument('--num-workers', type=int, default=None)
    parser.add_argument('--limit', type=int, default=None,
                        help='use only the first LIMIT train images (a small pool)')
    parser.add_argument('--reference-steps', type=int, default=None,
                        help=f'optimizer steps of each reference (default '
                             f'{preset.reference_steps}; --quick: {quick.reference_steps})')
    parser.add_argument('--data-dir', type=Path, default=None)
    parser.add_argument('--replot', action='store_true',
                        help='only summarise again, redraw the plot and print the table of the '
                             'existing results file of this configuration (finished or not)')
    parser.add_argument('--clean-shm', action='store_true',
                        help='first remove the shared memory that killed streaming jobs left '
                             '(jest_stream.remove_stale_shared_memory: segments no live process '
                             'uses; those of running jobs stay)')
    parser.add_argument('--resume', action='store_true',
                        help='keep the finished runs of an existing results file of the same '
                             'configuration and run only the missing ones')
    return parser


def parse_args(argv: Sequence[str] | None = None, *, name: str = 'learning_efficiency',
               preset: Config | None = None, quick: Config = QUICK,
               description: str = __doc__.split('\n\n')[0]
               ) -> tuple[Config, argparse.Namespace]:
    """The configuration and the other arguments (``out``, ``resume``, ``replot``...)."""
    preset = FULL if preset is None else preset
    parser = build_parser(name, preset, quick, description)
    args = parser.parse_args(argv)
    base = quick if args.quick else preset
    tasks = None if args.task is None else (tuple(TASKS) if args.task == 'both' else (args.task,))
    overrides: dict[str, Any] = {
        'tasks': tasks, 'methods': tuple(args.methods) if args.methods else None,
        'seeds': tuple(args.seeds) if args.seeds else None,
        'ratios': tuple(args.ratios) if args.ratios else None,
        'steps': args.steps, 'eval_every': args.eval_every, 'eval_size': args.eval_size,
        'batch_size': args.batch_size, 'num_workers': args.num_workers, 'threads': args.threads,
        'limit': args.limit, 'reference_steps': args.reference_steps,
        'data_dir': str(args.data_dir) if args.data_dir else None,
    }
    config = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if args.every_method:
        config = replace(config, ratio_methods=None)
    if config.steps <= 0 or config.eval_every <= 0:
        parser.error('--steps and --eval-every must be positive')
    known = {m for t in config.tasks for m in METHODS[t]}
    if config.methods and not set(config.methods) <= known:
        parser.error(f'--methods {" ".join(sorted(set(config.methods) - known))}: not a method '
                     f'of {" or ".join(config.tasks)}; choose from {" ".join(sorted(known))}')
    for ratio in config.ratios:
        try:
            config.super_batch_size(ratio)
        except ValueError as error:
            parser.error(f'--ratios {ratio}: {error}')
    return config, args


def main(argv: Sequence[str] | None = None, *, name: str = 'learning_efficiency',
         preset: Config | None = None, quick: Config = QUICK,
         intro: Callable[[Config], str] | None = None, description: str | None = None) -> int:
    """Run the benchmark (or a preset of it) from the command line; returns the exit status.

    Args:
        argv (Sequence[str], optional): Arguments (``sys.argv[1:]`` by default).
        name (str): The benchmark's name: its results folder and file names.
        preset (Config, optional): Defaults of the run; :class:`Config` by default.
        quick (Config): Defaults under ``--quick``.
        intro (Callable, optional): ``intro(config)``: text printed before anything runs.
        description (str, optional): What ``--help`` says the benchmark does.
    """
    config, args = parse_args(argv, name=name, preset=preset, quick=quick,
                              description=description or __doc__.split('\n\n')[0])
    json_path, png_path = report.report_paths(args.out, name, config.quick)
    if args.replot:
        if not json_path.is_file():
            print(f'{json_path} does not exist: run the benchmark first')
            return 1
        results = json.loads(json_path.read_text())
        if results.get('schema') != SCHEMA:
            print(f'{json_path} was written by another version of this benchmark '
                  f'({results.get("schema")!r}, not {SCHEMA!r}): run it again')
            return 1
        results['summary'] = summarise(results['runs'], results['flops'],
                                       config_from_record(results['config']))
        report.write_record(json_path, results)
        plot(results, png_path)
        print(format_table(results))
        print('')
        for line in format_verdicts(results):
            print(line)
        print(f'\n{len(results["runs"])} runs, complete: {results["complete"]}; summarised '
              f'again and redrew {png_path.name}')
        return 0
    print(intro(config) if intro else describe(config), flush=True)
    run_benchmark(config, args.out, name=name, resume=args.resume, clean_shm=args.clean_shm,
                  argv=argv)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

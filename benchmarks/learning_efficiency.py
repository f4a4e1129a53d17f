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
  trainer's work and the loader's wait, transfer, scoring and selection.

Methods are entries of :data:`METHODS`; a new scorer or a peer baseline is one
:class:`Method` plus, at most, a small function (see its docstring). Results go to
``benchmarks/results/learning_efficiency/``: ``learning_efficiency.json`` and ``.png``
(accuracy against steps, FLOPs and seconds), or ``learning_efficiency_quick.*``; the JSON
is rewritten after every finished run, so an interrupted run leaves usable results, and
``--resume`` continues one. ``benchmarks.demo`` and ``benchmarks.contrastive`` are presets
of this benchmark.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
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
from benchmarks.common.tasks import TASKS, ReferenceSettings, TaskSetup, prepare_task
from benchmarks.common.training import STEP_COSTS, train_selective
from jest_stream import (
    MixedResolution,
    SampleIdStreamingDataset,
    SelectiveLoader,
    count_flops,
    get_criterion,
    get_selection_method,
    score_flops,
    super_batch_size_for,
    train_step_flops,
)

__all__ = [
    'Config',
    'METHODS',
    'Method',
    'QUICK',
    'SCHEMA',
    'configuration_flops',
    'format_table',
    'format_verdicts',
    'main',
    'parse_args',
    'plot',
    'run_benchmark',
    'run_one',
    'selective_loader',
    'summarise',
]

SCHEMA = 'jest_stream.learning_efficiency/2'
COLOURS = {'uniform': 'tab:gray', 'hard_learner': 'tab:red', 'easy_reference': 'tab:orange',
           'learnability': 'tab:blue', 'independent': 'tab:orange', 'joint': 'tab:blue',
           'flexi_joint': 'tab:purple'}

# Methods


@dataclass(frozen=True)
class Method:
    """One compared way of choosing what the learner trains on: an entry of :data:`METHODS`.

    The built-in methods need only the first four fields. The hooks make a new scorer or
    a peer baseline one entry plus, at most, a small function:

    - a proxy learner trained online (RHO-LOSS's proxy): ``scorer`` builds the proxy
      scorer, ``after_step`` trains it on each selected sub-batch (timed with the step),
      ``extra_flops`` counts that training step;
    - scoring under ``torch.autocast``: ``scorer`` wraps the task's scorer;
    - Composer's SelectiveBackprop or RS2 (repeated random subsets): ``loader`` yields
      their sub-batches instead of a ``SelectiveLoader`` over the pool;
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
        scorer (Callable, optional): ``scorer(setup, learner, reference, method, config)``
            builds the scorer (``reference`` is the cache, or the live model when FLOPs
            with a live reference are counted); None: the task's scorer.
        after_step (Callable, optional): ``after_step(scorer, batch)`` after each optimizer
            step.
        extra_flops (Callable, optional): ``extra_flops(scorer, super_batch, sub_batch)``:
            FLOPs per step of work outside training, scoring and selection.
        loader (Callable, optional): ``loader(setup, method, scorer, ratio, seed, config)``
            returns the iterable of sub-batches; None: :func:`selective_loader`.
        steps (Callable, optional): ``steps(config) -> int``, the method's step budget;
            None: ``config.steps``.
    """

    label: str
    criterion: str = 'uniform'
    selection: str | None = None
    flexi: bool = False
    reads_super_batches: bool = True
    scorer: Callable[..., Any] | None = None
    after_step: Callable[[Any, dict[str, Any]], None] | None = None
    extra_flops: Callable[[Any, dict[str, Any], dict[str, Any]], int] | None = None
    loader: Callable[..., Iterable[dict[str, Any]]] | None = None
    steps: Callable[[Config], int] | None = None

    def record(self) -> dict[str, Any]:
        """JSON-ready description: the settings, and the names of the hooks in use."""
        hooks = ('scorer', 'after_step', 'extra_flops', 'loader', 'steps')
        return {'label': self.label, 'criterion': self.criterion, 'selection': self.selection,
                'flexi': self.flexi, 'reads_super_batches': self.reads_super_batches,
                'hooks': [h for h in hooks if getattr(self, h) is not None]}


METHODS: dict[str, dict[str, Method]] = {
    'classification': {
        'uniform': Method('uniform', reads_super_batches=False),
        'hard_learner': Method('hard learner', 'hard_learner'),
        'easy_reference': Method('easy reference', 'easy_reference'),
        'learnability': Method('learnability', 'learnability'),
    },
    'contrastive': {
        'uniform': Method('uniform', reads_super_batches=False),
        'independent': Method('independent learnability (sample)', 'learnability', 'sample'),
        'joint': Method('joint learnability (JEST)', 'learnability', 'joint'),
        'flexi_joint': Method('joint, Flexi (low-res scoring, mixed-res training)',
                              'learnability', 'joint', flexi=True),
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

    def method_names(self, task: str) -> tuple[str, ...]:
        """The methods run on ``task``, in registry order (``uniform`` first)."""
        return tuple(name for name in METHODS[task]
                     if self.methods is None or name == 'uniform' or name in self.methods)

    def method(self, task: str, name: str) -> Method:
        """The registry entry of a method, with its selection method filled in."""
        method = METHODS[task][name]
        if method.selection is None:
            default = 'uniform' if method.criterion == 'uniform' else self.selection
            method = replace(method, selection=default)
        return method

    def drawn(self, method: Method, ratio: float) -> int:
        """Examples the method reads per step: ``B``, or ``b`` for one that reads no more."""
        return self.super_batch_size(ratio) if method.reads_super_batches else self.batch_size

    def budget(self, method: Method) -> int:
        """The method's step budget."""
        return method.steps(self) if method.steps is not None else self.steps

    def checkpoints(self, steps: int | None = None) -> list[int]:
        """Steps at which accuracy is measured: 0, every ``eval_every``, and the last."""
        steps = self.steps if steps is None else steps
        return sorted({0, *range(self.eval_every, steps + 1, self.eval_every), steps})


QUICK = Config(ratios=(0.8,), steps=200, eval_every=10, eval_size=2000, reference_steps=600,
               quick=True)


def _mixed(method: Method, config: Config) -> MixedResolution | None:
    if not method.flexi:
        return None
    return MixedResolution(key='image', low_fraction=config.low_fraction,
                           factor=config.flexi_factor)


def _scorer(setup: TaskSetup, method: Method, learner: nn.Module, reference: Any,
            config: Config) -> Any:
    """The method's scorer over ``reference`` (the cache, or the live model); None if uniform."""
    if method.scorer is not None:
        return method.scorer(setup, learner, reference, method, config)
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
    return SelectiveLoader(dataset, batch_size=config.batch_size, super_batch_size=big,
                           scorer=scorer, criterion=method.criterion, method=method.selection,
                           n_chunks=config.n_chunks, temperature=config.temperature, seed=seed,
                           num_workers=config.num_workers, batch_transform=_mixed(method, config))


def configuration_flops(setup: TaskSetup, name: str, ratio: float, config: Config
                        ) -> dict[str, int]:
    """FLOPs of one step of a method, counted once on real pool samples.

    Returns:
        dict: ``train`` (forward and backward of a sub-batch, at mixed resolution for
        Flexi), ``score`` (the scorer over the super-batch, reading the stored reference
        outputs), ``select`` (scores and sampler), ``extra`` (work the method adds, e.g. a
        proxy's training), ``per_step`` (their sum), ``reference_forward`` (what a live
        reference adds to scoring) and ``per_step_live_reference``.
    """
    method = config.method(setup.task.name, name)
    big = config.drawn(method, ratio)
    learner = setup.task.make_learner(0)
    super_batch = {key: value[:big] for key, value in setup.probe.items()}
    sub_batch = {key: value[:config.batch_size] for key, value in super_batch.items()}
    mixed = _mixed(method, config)
    counts = {'train': train_step_flops(learner, mixed(sub_batch) if mixed else sub_batch,
                                        setup.task.loss)}
    criterion = get_criterion(method.criterion)
    ids = torch.arange(big)
    scorer = _scorer(setup, method, learner, setup.cache, config)
    scores, counts['score'], live = None, 0, 0
    if scorer is not None:
        scores, counts['score'] = count_flops(scorer, super_batch, ids, criterion)
        live = score_flops(_scorer(setup, method, learner, setup.reference, config), super_batch,
                           criterion=criterion, sample_ids=ids)
    counts['select'] = count_flops(
        get_selection_method(method.selection), scores, big, config.batch_size,
        n_chunks=config.n_chunks, temperature=config.temperature,
        generator=torch.Generator().manual_seed(0))[1]
    counts['extra'] = (method.extra_flops(scorer, super_batch, sub_batch)
                       if method.extra_flops is not None else 0)
    counts['per_step'] = counts['train'] + counts['score'] + counts['select'] + counts['extra']
    counts['reference_forward'] = live - counts['score'] if scorer is not None else 0
    counts['per_step_live_reference'] = counts['per_step'] + counts['reference_forward']
    return counts


def run_one(setup: TaskSetup, name: str, ratio: float, seed: int, config: Config, *,
            progress: bool = True) -> dict[str, Any]:
    """Train a fresh learner on the sub-batches method ``name`` selects.

    Returns:
        dict: ``task``, ``method``, ``ratio``, ``seed`` and what
        :func:`benchmarks.common.training.train_selective` measured: ``steps``,
        ``accuracy`` and ``seconds`` per checkpoint, ``noisy_fraction``,
        ``noisy_fraction_overall``, ``train_seconds``, ``seconds_per_step``, ``step_costs``.
    """
    task = setup.task.name
    method = config.method(task, name)
    learner = setup.task.make_learner(seed)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.lr)
    scorer = _scorer(setup, method, learner, setup.cache, config)
    make_loader = method.loader if method.loader is not None else selective_loader
    loader = make_loader(setup, method, scorer, ratio, seed, config)
    steps = config.budget(method)
    measured = train_selective(
        learner, loader, steps=steps, loss_fn=setup.task.loss, optimizer=optimizer,
        checkpoints=config.checkpoints(steps), evaluate=setup.evaluate,
        noisy_key=setup.task.noisy_key,
        after_step=(functools.partial(method.after_step, scorer)
                    if method.after_step is not None else None),
        desc=f'{task[:5]} f={ratio} {name} s{seed}', progress=progress)
    # A StreamingDataset holds shared memory until it is collected: release it before the
    # next run opens the same pool.
    del loader, scorer
    gc.collect()
    return {'task': task, 'method': name, 'ratio': ratio, 'seed': seed, **measured}


# Summaries


def _to_target(run: dict[str, Any], target: float) -> tuple[int, float] | None:
    """Steps and seconds at which a run's curve first reaches ``target``."""
    reached = stats.first_reach(run['steps'], run['accuracy'], target)
    if reached is None:
        return None
    return reached, run['seconds'][run['steps'].index(reached)]


def _speedups(reached: tuple[int, float] | None, per_step: float, baseline: dict[str, float]
              ) -> dict[str, float | None]:
    """Steps, FLOPs and seconds to the target, and the three speed-ups against uniform."""
    if reached is None:
        return dict.fromkeys(('steps_to_target', 'flops_to_target', 'seconds_to_target',
                              'speedup_steps', 'speedup_flops', 'speedup_wall'))
    steps, seconds = reached
    return {'steps_to_target': steps, 'flops_to_target': steps * per_step,
            'seconds_to_target': seconds,
            'speedup_steps': baseline['steps'] / steps,
            'speedup_flops': baseline['flops'] / (steps * per_step),
            'speedup_wall': baseline['seconds'] / seconds if seconds > 0 else None}


def _summarise_method(mine: list[dict[str, Any]], uniform: dict[int, dict[str, Any]],
                      costs: dict[str, int], uniform_costs: dict[str, int], budget: int
                      ) -> dict[str, Any]:
    steps = mine[0]['steps']
    curves = np.asarray([r['accuracy'] for r in mine])
    seconds = np.asarray([r['seconds'] for r in mine]).mean(0)
    std = curves.std(0, ddof=1) if len(mine) > 1 else np.zeros(len(steps))
    mean = curves.mean(0)
    target = float(np.mean([u['accuracy'][-1] for u in uniform.values()]))
    baseline = {'steps': budget, 'flops': budget * uniform_costs['per_step'],
                'seconds': float(np.mean([u['train_seconds'] for u in uniform.values()]))}
    reached = stats.first_reach(steps, mean, target)
    on_mean = _speedups(None if reached is None else (reached, seconds[steps.index(reached)]),
                        costs['per_step'], baseline)
    live = (baseline['flops'] / (reached * costs['per_step_live_reference'])
            if reached is not None else None)
    per_seed = {}
    for run in mine:
        own = uniform[run['seed']]
        per_seed[str(run['seed'])] = {'target_accuracy': own['accuracy'][-1], **_speedups(
            _to_target(run, own['accuracy'][-1]), costs['per_step'],
            {**baseline, 'seconds': own['train_seconds']})}
    return {
        'seeds': [r['seed'] for r in mine], 'steps': steps,
        'accuracy_mean': mean.tolist(), 'accuracy_std': std.tolist(),
        'seconds_mean': seconds.tolist(),
        'final_accuracy_mean': float(mean[-1]), 'final_accuracy_std': float(std[-1]),
        **on_mean, 'first_checkpoint': reached is not None and reached == steps[1],
        'speedup_flops_live_reference': live,
        'flops_per_step': costs['per_step'],
        'flops_per_step_live_reference': costs['per_step_live_reference'],
        'per_seed': per_seed,
        'per_seed_speedups': {key: stats.summary([s[f'speedup_{key}'] for s in per_seed.values()])
                              for key in ('steps', 'flops', 'wall')},
        'step_costs': {key: float(np.mean([r['step_costs'][key] for r in mine]))
                       for key in STEP_COSTS},
        'seconds_per_step_mean': float(np.mean([r['seconds_per_step'] for r in mine])),
        'drawn_per_step': float(np.mean([r['drawn_per_step'] for r in mine])),
        'noisy_fraction_mean': float(np.mean([r['noisy_fraction_overall'] for r in mine])),
    }


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
            for name in config.method_names(task):
                mine = [r for r in group if r['method'] == name and r['seed'] in uniform]
                if mine:
                    methods[name] = _summarise_method(mine, uniform, costs[name],
                                                      costs['uniform'], config.steps)
            out.setdefault(task, {})[str(ratio)] = {
                'target_accuracy': float(np.mean([u['accuracy'][-1] for u in uniform.values()])),
                'budget_steps': config.steps, 'super_batch_size': config.super_batch_size(ratio),
                'uniform_first_reach_steps': methods['uniform']['steps_to_target'],
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
            lines.append(f'  {"method":<15} {"final acc":>15} {"steps→":>6} '
                         f'{"speed-up: steps [per seed]":>27} {"FLOPs [per seed]":>25} '
                         f'{"wall [per seed]":>25} | ms/step: {"train":>6} {"score":>6} '
                         f'{"select":>6} {"wait":>6} {"other":>6} | {"read":>4} {"noisy":>5}')
            for name, m in entry['methods'].items():
                cost = m['step_costs']
                lines.append(
                    f'  {name:<15} {m["final_accuracy_mean"]:.4f}±{m["final_accuracy_std"]:.4f}'
                    f' {_cell(m["steps_to_target"], "d"):>6} '
                    f'{_speedup_cell(m, "steps", name == "uniform"):>27} '
                    f'{_speedup_cell(m, "flops", name == "uniform"):>25} '
                    f'{_speedup_cell(m, "wall", name == "uniform"):>25} |'
                    f'          {1e3 * cost["train_s"]:6.1f} {1e3 * cost["score_s"]:6.1f} '
                    f'{1e3 * cost["select_s"]:6.1f} {1e3 * cost["wait_s"]:6.1f} '
                    f'{1e3 * (cost["other_s"] + cost["transfer_s"]):6.1f} | '
                    f'{m["drawn_per_step"]:4.0f} {m["noisy_fraction_mean"]:5.3f}')
            lines.append('')
    lines.append(
        'steps→: first checkpoint where the mean curve over seeds reaches the target (n/r: not '
        'reached within the budget). Speed-ups to the target, uniform = 1: steps (budget / '
        'steps), FLOPs (training + scoring with stored reference outputs + selection), wall '
        '(training seconds, evaluation excluded), on the mean curve, then [mean±std over the '
        'seeds that reach their own uniform final, count/seeds]. ms/step: the trainer\'s '
        'forward, backward and optimizer step; the loader\'s scoring, selection and wait for '
        'data; other: transfer and hand-over. read: examples read per step (uniform reads only '
        'what it trains on). noisy: corrupted labels / mismatched captions among the examples '
        'trained on.')
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
                               f'{entry["target_accuracy"]:.4f} in {entry["budget_steps"]} steps')
                else:
                    wall = m['speedup_wall']
                    reached = (
                        f'reached uniform\'s final accuracy {entry["target_accuracy"]:.4f} in '
                        f'{_times(m["speedup_steps"], "fewer", "more")} steps, with '
                        f'{_times(m["speedup_flops"], "fewer", "more")} FLOPs, and '
                        + ('at once' if wall is None else _times(wall, 'sooner', 'later'))
                        + ' in wall-clock time')
                lines.append(
                    f'{name} ({task}, f={ratio}) {reached}. A step cost {step:.1f} ms '
                    f'({step / base:.1f}x uniform\'s {base:.1f} ms): train {cost["train_s"]:.1f}, '
                    f'score {cost["score_s"]:.1f}, select {cost["select_s"]:.1f}, wait '
                    f'{cost["wait_s"]:.1f}, other {cost["transfer_s"] + cost["other_s"]:.1f} ms.')
    return lines


def _legend(results: dict[str, Any], m: dict[str, Any], task: str, name: str) -> str:
    label = results['methods'][task][name]['label']
    if name == 'uniform':
        return label
    speedups = ', '.join(f'{_cell(m[f"speedup_{key}"], ".2f")}'
                         f'{"" if m[f"speedup_{key}"] is None else "x"} {key}'
                         for key in ('steps', 'flops', 'wall'))
    return f'{label}: {speedups}'


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against steps, FLOPs and seconds: one row per task and ratio, three columns."""
    plt = report.pyplot()
    rows = [(task, ratio) for task, by_ratio in results['summary'].items()
            for ratio in sorted(by_ratio, key=float)]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(16, 4.2 * len(rows)), squeeze=False)
    views = (('steps', 'optimizer step', 'steps'),
             ('flops', 'TFLOPs (stored reference outputs)', 'FLOPs'),
             ('seconds', 'training seconds (evaluation excluded)', 'seconds'))
    for row, (task, ratio) in enumerate(rows):
        entry = results['summary'][task][ratio]
        low = min(min(m['accuracy_mean'][1:]) for m in entry['methods'].values())
        for col, (view, xlabel, what) in enumerate(views):
            ax = axes[row][col]
            for name, m in entry['methods'].items():
                steps = np.asarray(m['steps'], dtype=np.float64)
                x = {'steps': steps, 'flops': steps * m['flops_per_step'] / 1e12,
                     'seconds': np.asarray(m['seconds_mean'])}[view]
                mean, std = np.asarray(m['accuracy_mean']), np.asarray(m['accuracy_std'])
                ax.plot(x, mean, color=COLOURS.get(name), lw=1.5, label=_legend(results, m, task,
                                                                               name))
                ax.fill_between(x, mean - std, mean + std, color=COLOURS.get(name), alpha=0.15)
            ax.axhline(entry['target_accuracy'], color='k', ls=':', lw=1,
                       label='target: uniform final')
            ax.axhline(results['tasks'][task]['reference_accuracy'], color='tab:olive', ls='--',
                       lw=1, label='reference (clean split)')
            ax.set(xlabel=xlabel, ylabel=TASKS[task].metric, ylim=(max(0.0, low - 0.05), None),
                   title=f'{task}, f={ratio}, B={entry["super_batch_size"]}: to target in {what}')
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7, loc='lower right')
    fig.suptitle(f'Fashion-MNIST, {results["config"]["noise_rate"]:.0%} noisy labels / '
                 f'mismatched captions, sub-batch {results["config"]["batch_size"]}; mean ± std '
                 f'over seeds; speed-up = uniform\'s cost to its final accuracy / the method\'s',
                 fontsize=9)
    report.save_figure(fig, path, dpi=100)


# Driver


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


def _previous_runs(json_path: Path, config: Config, say: Callable[[str], None]
                   ) -> tuple[list[dict[str, Any]], float]:
    if not json_path.is_file():
        return [], 0.0
    old = json.loads(json_path.read_text())
    if old.get('schema') == SCHEMA and old.get('config') == json.loads(json.dumps(asdict(config))):
        say(f'resuming: {len(old["runs"])} finished runs kept from {json_path}')
        return old['runs'], float(old.get('wall_seconds', 0.0))
    say(f'{json_path} holds another configuration: starting afresh')
    return [], 0.0


def describe(config: Config) -> str:
    """What a run of ``config`` will do, in a few lines."""
    runs = sum(len(config.method_names(t)) for t in config.tasks) * len(config.ratios) \
        * len(config.seeds)
    methods = '; '.join(f'{t}: {", ".join(config.method_names(t))}' for t in config.tasks)
    return (f'{runs} training runs of {config.steps} steps (sub-batches of {config.batch_size}; '
            f'filter ratios {", ".join(map(str, config.ratios))}; seeds '
            f'{", ".join(map(str, config.seeds))}; {methods}; uniform reads only the examples it '
            f'trains on, the others read the whole super-batch). First: the Fashion-MNIST pool '
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
        clean_shm (bool): Run streaming's ``clean_stale_shared_memory()`` first; it unlinks
            the streaming segments of every process on the machine, live ones included.
        progress (bool): Print progress, bars and one line per finished run.
        argv (Sequence[str], optional): The command line, for the run record.

    Returns:
        dict: The results (what the JSON file holds).
    """
    say = print if progress else (lambda *_: None)
    if clean_shm:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    run = report.start_run(name, argv, threads=config.threads)
    json_path, png_path = report.report_paths(out, name, config.quick)
    previous, earlier_seconds = _previous_runs(json_path, config, say) if resume else ([], 0.0)
    setups, n_eval = _prepare_tasks(config, progress)
    flops = {task: {str(ratio): {m: configuration_flops(setups[task], m, ratio, config)
                                 for m in config.method_names(task)}
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

    def save() -> None:
        record['summary'] = summarise(record['runs'], flops, config)
        record['run'] = report.finish_run(run)
        # Over every invocation that contributed runs (a resumed run adds its time).
        record['wall_seconds'] = record['run']['wall_s'] + earlier_seconds
        report.write_record(json_path, record)

    done = {(r['task'], r['ratio'], r['seed'], r['method']) for r in previous}
    todo = [(task, ratio, seed, m) for ratio in config.ratios for task in config.tasks
            for seed in config.seeds for m in config.method_names(task)
            if (task, ratio, seed, m) not in done]
    for i, (task, ratio, seed, m) in enumerate(todo, 1):
        result = run_one(setups[task], m, ratio, seed, config, progress=progress)
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
                        help='only redraw the plot and print the table of the existing results '
                             'file of this configuration (finished or not)')
    parser.add_argument('--clean-shm', action='store_true',
                        help="run streaming's clean_stale_shared_memory() first: it unlinks the "
                             'streaming segments of every process on the machine, so use it only '
                             'when no other streaming job runs (a killed run of this benchmark '
                             'does not need it: its local datasets skip stale segments)')
    parser.add_argument('--resume', action='store_true',
                        help='keep the finished runs of an existing results file of the same '
                             'configuration and run only the missing ones')
    return parser


def parse_args(argv: Sequence[str] | None = None, *, name: str = 'learning_efficiency',
               preset: Config | None = None, quick: Config = QUICK,
               description: str = __doc__.split('\n\n')[0]
               ) -> tuple[Config, argparse.Namespace]:
    """The configuration and the other arguments (``out``, ``resume``, ``replot``...)."""
    preset = Config() if preset is None else preset
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
        plot(results, png_path)
        print(format_table(results))
        print(f'\n{len(results["runs"])} runs, complete: {results["complete"]}; redrew '
              f'{png_path.name}')
        return 0
    print(intro(config) if intro else describe(config), flush=True)
    run_benchmark(config, args.out, name=name, resume=args.resume, clean_shm=args.clean_shm,
                  argv=argv)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

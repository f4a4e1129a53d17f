"""What scoring a super-batch costs, against a training step, for each way to make it cheap.

Run it from the repository root::

    python -m benchmarks.scoring_cost            # under a minute on two CPU cores
    python -m benchmarks.scoring_cost --quick    # a smoke run
    python -m benchmarks.scoring_cost --gpu      # also on CUDA, where it exists

On real Fashion-MNIST super-batches (``B = 320``, ``b = 64``, ``f = 0.8``) it times, in one
process and interleaved round by round (so that a busy phase of a shared machine hits every
variant), the training step on ``b`` rows of the benchmarks' learner (``SmallCNN``, 80k
parameters) and these ways to score ``B`` candidates for the ``hard_learner`` criterion
(the learner half of learnability; the reference half is free with stored outputs):

- ``learner``: the learner's forward in float32 (what selection costs by default);
- ``learner_bf16``: the same under ``torch.autocast(dtype=torch.bfloat16)``
  (``SelectiveLoader(autocast=torch.bfloat16)``);
- ``proxy``: a proxy learner (``TinyClassifier``, half the learner's parameters) scoring
  and taking its training step on the selected ``b`` (``ProxyScorer``).

It reports each variant's median seconds per super-batch, its cost in training steps
(``score / train``), its FLOPs (counted with ``torch.utils.flop_counter``), and for bf16 how
many of the ``b`` rows top-k selection picks differ from float32's. From the scoring cost it
derives the break-even speed-up in steps: selection pays off in time only when it saves
more than ``(train + score) / train`` in steps.

Results go to ``benchmarks/results/scoring_cost/`` (``scoring_cost.json`` and ``.png``).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmarks.common.data import prepare, read_columns, to_float_images
from benchmarks.common.models import count_parameters, make_classifier, make_cnn
from benchmarks.common.report import (
    REPO_ROOT,
    benchmark_parser,
    finish_run,
    pyplot,
    report_paths,
    save_figure,
    start_run,
    write_report,
)
from jest_stream import ClassificationScorer, ProxyScorer, count_flops, get_criterion

NAME = 'scoring_cost'
SUPER, SUB = 320, 64
VARIANTS = ('learner', 'learner_bf16', 'proxy')
HARD_LEARNER = get_criterion('hard_learner')


def _forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(to_float_images(batch['image']))


def _scorers(device: torch.device) -> dict[str, Callable[[dict, Tensor], Any]]:
    learner = make_cnn(0).to(device)
    proxy = ProxyScorer(ClassificationScorer(make_classifier(1).to(device), None,
                                             forward=_forward, target_key='label'),
                        optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    plain = ClassificationScorer(learner, None, forward=_forward, target_key='label')

    def learner_bf16(batch: dict, ids: Tensor) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return plain(batch, ids, HARD_LEARNER)

    def proxy_step(batch: dict, ids: Tensor) -> Any:
        scores = proxy(batch, ids, HARD_LEARNER)
        proxy.learn(batch, ids, torch.topk(scores.scores, SUB).indices)
        return scores

    return {'learner': lambda batch, ids: plain(batch, ids, HARD_LEARNER),
            'learner_bf16': learner_bf16, 'proxy': proxy_step,
            '_models': {'learner': learner, 'proxy': proxy.proxy}}


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                batch: dict[str, Tensor]) -> Tensor:
    loss = F.cross_entropy(_forward(model, batch), batch['label'])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _batches(data_dir: Path, device: torch.device, n: int) -> list[dict[str, Tensor]]:
    data = prepare(data_dir, progress=False)
    columns = read_columns(data.pool_dir, ['image', 'label'])
    images = torch.from_numpy(columns['image'][:n * SUPER])
    labels = torch.from_numpy(columns['label'][:n * SUPER]).long()
    return [{'image': images[i * SUPER:(i + 1) * SUPER].to(device),
             'label': labels[i * SUPER:(i + 1) * SUPER].to(device)} for i in range(n)]


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(device: torch.device, *, rounds: int, data_dir: Path) -> dict[str, Any]:
    """Seconds per super-batch of every variant and of the training step, interleaved."""
    batches = _batches(data_dir, device, 4)
    scorers = _scorers(device)
    models = scorers.pop('_models')
    train_model = make_cnn(0).to(device)
    optimizer = torch.optim.Adam(train_model.parameters(), lr=1e-3)
    ids = torch.arange(SUPER)
    seconds: dict[str, list[float]] = {name: [] for name in ('train', *VARIANTS)}
    for score in scorers.values():  # warm-up
        score(batches[0], ids)
    for round_ in tqdm(range(rounds), desc=f'scoring cost ({device.type})'):
        batch = batches[round_ % len(batches)]
        sub = {k: v[:SUB] for k, v in batch.items()}
        seconds['train'].append(_time(functools.partial(_train_step, train_model, optimizer,
                                                        sub), device))
        order = list(scorers.items())
        for name, score in order if round_ % 2 == 0 else order[::-1]:
            seconds[name].append(_time(functools.partial(score, batch, ids), device))
    flops = {'train': count_flops(_train_step, train_model, optimizer, batches[0] | {
        k: v[:SUB] for k, v in batches[0].items()})[1]}
    for name, score in scorers.items():
        flops[name] = count_flops(score, batches[0], ids)[1]
    return {'seconds': seconds, 'flops': flops, 'agreement': _agreement(scorers, batches, ids),
            'parameters': {k: count_parameters(m) for k, m in models.items()}}


def _agreement(scorers: dict[str, Callable], batches: list[dict], ids: Tensor
               ) -> dict[str, float]:
    """Rows of the top-``b`` that bf16 scoring picks differently from float32's."""
    changed = []
    for batch in batches:
        full = set(torch.topk(scorers['learner'](batch, ids).scores, SUB).indices.tolist())
        half = set(torch.topk(scorers['learner_bf16'](batch, ids).scores, SUB).indices.tolist())
        changed.append(len(full - half) / SUB)
    return {'topk_rows_changed_mean': statistics.mean(changed),
            'topk_rows_changed_max': max(changed)}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Medians, costs in training steps, and the break-even speed-up in steps."""
    medians = {name: statistics.median(values) for name, values in result['seconds'].items()}
    train = medians['train']
    out = {'median_s': medians}
    for name in VARIANTS:
        cost = medians[name] / train
        out[name] = {'cost_in_steps': cost, 'break_even_speedup_steps': 1.0 + cost,
                     'flops': result['flops'][name],
                     'flops_in_steps': result['flops'][name] / result['flops']['train']}
    out['bf16_over_fp32_time'] = medians['learner_bf16'] / medians['learner']
    out['proxy_over_learner_time'] = medians['proxy'] / medians['learner']
    return out


def plot(record: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    sections = [(d, record[d]['summary']) for d in ('cpu', 'cuda') if d in record]
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 3.6), squeeze=False)
    for ax, (device, summary) in zip(axes[0], sections, strict=True):
        costs = [summary[name]['cost_in_steps'] for name in VARIANTS]
        ax.bar(VARIANTS, costs, color=['tab:blue', 'tab:cyan', 'tab:green'])
        ax.axhline(1.0, color='gray', lw=0.8, ls='--')
        ax.set_ylabel('scoring a super-batch, in training steps')
        ax.set_title(f'{device}: B = {SUPER}, b = {SUB}')
        for i, cost in enumerate(costs):
            ax.text(i, cost, f'{cost:.2f}', ha='center', va='bottom')
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(NAME, 'Scoring cost against a training step: float32, bf16 '
                              'autocast and a proxy learner.', quick='5 rounds', threads=1)
    parser.add_argument('--gpu', action='store_true', help='also measure on CUDA')
    parser.add_argument('--data', type=Path, default=REPO_ROOT / 'data' / 'fashion-mnist',
                        help='where the MDS data is built once')
    args = parser.parse_args(argv)
    run = start_run(NAME, argv, threads=args.threads or 1)
    rounds = 5 if args.quick else 120
    record: dict[str, Any] = {}
    devices = [torch.device('cpu')]
    if args.gpu and torch.cuda.is_available():
        devices.append(torch.device('cuda'))
    for device in devices:
        result = measure(device, rounds=rounds, data_dir=args.data)
        record[device.type] = {'summary': summarise(result), **result}
        summary = record[device.type]['summary']
        print(f'{device.type}: scoring costs {summary["learner"]["cost_in_steps"]:.2f} steps '
              f'(fp32), {summary["learner_bf16"]["cost_in_steps"]:.2f} (bf16), '
              f'{summary["proxy"]["cost_in_steps"]:.2f} (proxy); bf16/fp32 time '
              f'{summary["bf16_over_fp32_time"]:.2f}x', flush=True)
    if args.gpu and not torch.cuda.is_available():
        record['cuda'] = {'available': False}
        record = {k: v for k, v in record.items() if k != 'cuda'} | {'gpu': {'available': False}}
    record['run'] = finish_run(run)
    json_path, png_path = report_paths(args.out, NAME, args.quick)
    write_report(record, json_path, png_path, plot)


if __name__ == '__main__':
    main()

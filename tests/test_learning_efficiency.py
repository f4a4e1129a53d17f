"""The learning-efficiency benchmark's pieces, its presets, and a smoke run on a tiny pool."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import demo
from benchmarks.common.captions import (
    ADJECTIVES,
    CLASS_PHRASES,
    MAX_TOKENS,
    TEMPLATES,
    VOCABULARY,
    caption,
    class_prompt_tokens,
    pool_captions,
    random_captions,
    tokenize,
)
from benchmarks.common.data import (
    DEFAULT_SOURCE_DIR,
    FILES,
    N_CLASSES,
    batch_logits,
    read_columns,
    source_dir,
    to_float_images,
)
from benchmarks.common.models import (
    count_parameters,
    make_classifier,
    make_proxy_classifier,
    make_proxy_two_tower,
    make_two_tower,
    sigmoid_loss,
)
from benchmarks.common.peers import (
    RepeatedRandomSubsets,
    SelectiveBackprop,
    SelectiveBackpropSettings,
)
from benchmarks.common.training import train_on_arrays, zero_shot_accuracy
from benchmarks.learning_efficiency import (
    FULL,
    METHODS,
    QUICK,
    Config,
    Method,
    adaptive_policy,
    config_from_record,
    main,
    parse_args,
    recommended_policy,
    run_benchmark,
    summarise,
)
from jest_stream import ReferenceCache, train_step_flops
from jest_stream.policies import Progress
from tests.helpers.data import write_mds


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread, as the benchmark runs (it sets it too); the test's own is put back.

    These small models train several times slower when two threads fork and join on cores
    shared with the DataLoader workers.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_fashion_mnist = pytest.mark.skipif(
    not (source_dir() / FILES['train'][0]).is_file(),
    reason=f'Fashion-MNIST is not installed under {DEFAULT_SOURCE_DIR}')


def test_every_caption_tokenises_within_the_vocabulary() -> None:
    for c in range(N_CLASSES):
        for t in range(len(TEMPLATES)):
            for a in range(len(ADJECTIVES)):
                text = caption(c, t, a)
                ids = tokenize(text)
                assert ids.shape == (MAX_TOKENS,) and ids.dtype == np.int32
                words = [VOCABULARY[i] for i in ids if i != 0]
                assert ' '.join(words) == text
                assert CLASS_PHRASES[c] in text
    with pytest.raises(ValueError, match='outside the vocabulary'):
        tokenize('a photo of a cat')


def test_captions_are_deterministic_and_name_their_class() -> None:
    labels = np.arange(40) % N_CLASSES
    first, again = random_captions(labels, seed=3), random_captions(labels, seed=3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, random_captions(labels, seed=4))
    for row, label in zip(first, labels, strict=True):
        text = ' '.join(VOCABULARY[i] for i in row if i != 0)
        assert text.endswith(CLASS_PHRASES[label]) or f'{CLASS_PHRASES[label]} for sale' in text
    np.testing.assert_array_equal(pool_captions(labels, 7), pool_captions(labels, 7))
    prompts = class_prompt_tokens()
    assert prompts.shape[0] == N_CLASSES and prompts.shape[2] == MAX_TOKENS


def test_two_tower_runs_at_full_and_half_resolution() -> None:
    model = make_two_tower(0)
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    text = torch.as_tensor(random_captions(np.arange(6), seed=0))
    for pixels in (images, images[:, ::2, ::2].contiguous()):
        image_emb, text_emb, temperature, bias = model(pixels, text)
        assert image_emb.shape == text_emb.shape == (6, 32)
        torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(6))
        torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(6))
    loss = sigmoid_loss(image_emb, text_emb, temperature, bias)
    loss.backward()
    assert torch.isfinite(loss) and model.log_temperature.grad is not None
    accuracy = zero_shot_accuracy(model, images.numpy(), np.arange(6) % N_CLASSES)
    assert 0.0 <= accuracy <= 1.0 and model.training
    assert make_classifier(1)(torch.randn(3, 1, 14, 14)).shape == (3, N_CLASSES)


def test_models_start_from_their_seed_alone() -> None:
    state = torch.random.get_rng_state()
    first, again, other = make_two_tower(4), make_two_tower(4), make_two_tower(5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first.image.fc1.weight, other.image.fc1.weight)


def test_training_on_arrays_lowers_the_loss_and_refuses_ragged_columns() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), generator=generator, dtype=torch.uint8).numpy()
    labels = (images.reshape(64, -1).mean(1) > 127).astype(np.int64)
    model = make_classifier(0)

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(
            m((batch['image'].float() / 255 - 0.5).unsqueeze(1)), batch['label'])

    losses = train_on_arrays(model, {'image': images, 'label': labels}, loss_fn, steps=60,
                             batch_size=16, lr=1e-2, seed=0)
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10])
    with pytest.raises(ValueError, match='different lengths'):
        train_on_arrays(model, {'image': images, 'label': labels[:10]}, loss_fn, steps=1,
                        batch_size=4, lr=1e-2, seed=0)


def _run(method: str, seed: int, accuracy: list[float], seconds: list[float],
         scored: list[int] | None = None, train_s: float = 0.001) -> dict:
    steps = [0, 10, 20, 30, 40]
    if scored is None:
        scored = [0] * 5 if method == 'uniform' else [160 * s for s in steps]
    return {'task': 'classification', 'method': method, 'ratio': 0.8, 'seed': seed,
            'steps': steps, 'accuracy': accuracy, 'seconds': seconds, 'scored': scored,
            'pressure': [None] * 4, 'train_seconds': seconds[-1],
            'seconds_per_step': seconds[-1] / 40,
            'drawn_per_step': 32 if method == 'uniform' else 160,
            'noisy_fraction_overall': 0.1,
            'step_costs': {'train_s': train_s, **{key: 0.001 for key in (
                'score_s', 'select_s', 'wait_s', 'transfer_s', 'other_s')}}}


def test_summary_counts_steps_flops_and_seconds_to_uniform_final_accuracy() -> None:
    config = Config(tasks=('classification',), ratios=(0.8,), seeds=(0, 1), steps=40,
                    eval_every=10)
    uniform_seconds = [0.0, 1.0, 2.0, 3.0, 4.0]
    learn_seconds = [0.0, 3.0, 6.0, 9.0, 12.0]
    runs = [_run('uniform', 0, [0.1, 0.3, 0.4, 0.5, 0.6], uniform_seconds),
            _run('uniform', 1, [0.1, 0.3, 0.4, 0.5, 0.6], uniform_seconds),
            _run('learnability', 0, [0.1, 0.5, 0.6, 0.7, 0.7], learn_seconds),
            _run('learnability', 1, [0.1, 0.4, 0.55, 0.7, 0.7], learn_seconds),
            _run('hard_learner', 0, [0.1, 0.2, 0.2, 0.2, 0.2], learn_seconds),
            # A policy that stops scoring after step 20 (pressure 0 in the last two intervals).
            _run('adaptive', 0, [0.1, 0.45, 0.55, 0.6, 0.65], learn_seconds,
                 scored=[0, 1600, 3200, 3200, 3200])]
    per_step = {'uniform': 100, 'learnability': 300, 'hard_learner': 300, 'easy_reference': 100,
                'adaptive': 300}
    # A live reference forward costs 300 FLOPs per step to the scored methods.
    flops = {'classification': {'0.8': {
        name: {'train': 100, 'scoring': value - 100, 'drawn': 160, 'per_step': value,
               'reference_forward': 300 * (name != 'uniform'),
               'per_step_live_reference': value + 300 * (name != 'uniform')}
        for name, value in per_step.items()}}}
    entry = summarise(runs, flops, config)['classification']['0.8']
    assert entry['target_accuracy'] == pytest.approx(0.6)
    learn = entry['methods']['learnability']
    # Mean curve 0.1, 0.45, 0.575, 0.7: reaches 0.6 at step 30, after 9 s of training.
    assert learn['steps_to_target'] == 30 and learn['seconds_to_target'] == pytest.approx(9.0)
    assert learn['speedup_steps'] == pytest.approx(40 / 30)
    assert learn['speedup_flops'] == pytest.approx(40 * 100 / (30 * 300))
    assert learn['speedup_flops_live_reference'] == pytest.approx(40 * 100 / (30 * 600))
    # Fewer steps, but each costs three uniform steps: later in wall-clock time.
    assert learn['speedup_wall'] == pytest.approx(4.0 / 9.0)
    seed0, seed1 = learn['per_seed']['0'], learn['per_seed']['1']
    assert (seed0['steps_to_target'], seed1['steps_to_target']) == (20, 30)
    assert seed0['speedup_wall'] == pytest.approx(4.0 / 6.0)
    assert seed0['speedup_flops'] == pytest.approx(40 * 100 / (20 * 300))
    spread = learn['per_seed_speedups']['steps']
    assert spread['mean'] == pytest.approx((2.0 + 4 / 3) / 2) and spread['n'] == 2
    assert spread['ci95'][0] < spread['mean'] < spread['ci95'][1]
    assert learn['step_costs']['score_s'] == pytest.approx(0.001)
    hard = entry['methods']['hard_learner']
    assert hard['steps_to_target'] is None and hard['speedup_wall'] is None
    assert hard['seeds'] == [0] and hard['per_seed_speedups']['steps']['n'] == 0
    assert 'easy_reference' not in entry['methods']
    # A step pays for scoring in proportion to the candidates it scored.
    annealed = entry['methods']['adaptive']
    assert annealed['steps_to_target'] == 30
    assert annealed['flops_to_target'] == pytest.approx(30 * 100 + 20 * 200)
    assert annealed['flops_total'] == pytest.approx(40 * 100 + 20 * 200)
    assert learn['flops_total'] == pytest.approx(40 * 300)
    assert learn['final_below_uniform'] == 0 and hard['final_below_uniform'] == 1
    # Uniform at equal compute gets the FLOPs of the best of jest_stream's methods.
    assert entry['equal_compute'] == {'method': 'learnability', 'flops': 40 * 300,
                                      'steps': 120}


def test_wall_clock_in_training_steps_cancels_a_load_that_slows_a_run_evenly() -> None:
    config = Config(tasks=('classification',), ratios=(0.8,), seeds=(0, 1), steps=40,
                    eval_every=10)
    flops = {'classification': {'0.8': {
        name: {'train': 100, 'scoring': 200 * (name != 'uniform'), 'drawn': 160,
               'per_step': 100 + 200 * (name != 'uniform'), 'reference_forward': 0,
               'per_step_live_reference': 100 + 200 * (name != 'uniform')}
        for name in ('uniform', 'learnability')}}}
    uniform = [_run('uniform', seed, [0.1, 0.3, 0.4, 0.5, 0.6], [0.0, 1.0, 2.0, 3.0, 4.0])
               for seed in (0, 1)]

    def learnability(load: float) -> dict:
        # The same runs on a machine `load` times as busy: every part of a step slower.
        runs = [_run('learnability', seed, accuracy, [load * s for s in (0, 3, 6, 9, 12)],
                     train_s=load * 0.001)
                for seed, accuracy in ((0, [0.1, 0.5, 0.6, 0.7, 0.7]),
                                       (1, [0.1, 0.4, 0.55, 0.7, 0.7]))]
        return summarise(uniform + runs, flops, config)['classification']['0.8'][
            'methods']['learnability']

    idle, busy = learnability(1.0), learnability(2.0)
    # Reached at step 30 after 9 s (18 s when busy) against uniform's 4 s for the budget.
    assert idle['speedup_wall'] == pytest.approx(4 / 9)
    assert busy['speedup_wall'] == pytest.approx(4 / 18)
    assert idle['speedup_wall_normalised'] == pytest.approx(4 / 9)
    assert busy['speedup_wall_normalised'] == pytest.approx(4 / 9)
    # Per seed against the seed's own uniform run: seed 0 reaches 0.6 at step 20.
    assert busy['per_seed']['0']['speedup_wall'] == pytest.approx(4 / 12)
    assert busy['per_seed']['0']['speedup_wall_normalised'] == pytest.approx(4 / 6)
    spread = busy['per_seed_speedups']['wall_normalised']
    assert spread['n'] == 2 and spread['mean'] == pytest.approx((4 / 6 + 4 / 9) / 2)
    # A run that never reaches the target has no speed-up, normalised or not.
    never = summarise(uniform + [_run('learnability', 0, [0.1] * 5, [0, 3, 6, 9, 12])],
                      flops, config)['classification']['0.8']['methods']['learnability']
    assert never['speedup_wall_normalised'] is None
    assert never['per_seed']['0']['speedup_wall_normalised'] is None


def test_config_from_record_reads_back_the_settings_a_results_file_holds() -> None:
    for config in (FULL, QUICK, Config(methods=('learnability',), seeds=(3,), limit=600)):
        record = json.loads(json.dumps(asdict(config)))
        assert config_from_record(record) == config
    with pytest.raises(TypeError, match='not_a_setting'):
        config_from_record({**asdict(QUICK), 'not_a_setting': 1})


def test_presets_share_the_benchmark_and_its_options() -> None:
    config, _ = parse_args(['--methods', 'learnability', '--steps', '50'], name='demo',
                           preset=demo.DEMO, quick=demo.DEMO_QUICK)
    assert config.tasks == ('classification',) and config.steps == 50
    assert config.method_names('classification') == ('uniform', 'learnability')
    quick, _ = parse_args(['--quick'], name='demo', preset=demo.DEMO, quick=demo.DEMO_QUICK)
    assert quick.quick and quick.seeds == (0,)
    with pytest.raises(SystemExit):
        parse_args(['--methods', 'joint'], preset=demo.DEMO)
    # The full run: every method at 0.8, the policies and learnability at 0.9 and 0.5.
    full, _ = parse_args([])
    assert full == FULL and full.method_names('contrastive', 0.8) == tuple(METHODS['contrastive'])
    assert full.method_names('contrastive', 0.9) == ('uniform', 'joint', 'adaptive')
    assert full.method_names('classification', 0.5) == ('uniform', 'learnability', 'adaptive')
    every, _ = parse_args(['--every-method'])
    assert every.method_names('classification', 0.9) == tuple(METHODS['classification'])
    # Peers are named as such; jest_stream's own methods are not.
    assert METHODS['classification']['sb_default'].peer.startswith('Composer SelectiveBackprop')
    assert METHODS['contrastive']['rho_loss'].selection == 'topk'
    assert METHODS['contrastive']['rho_loss'].peer.startswith('RHO-LOSS')
    assert all(METHODS[t][m].peer is None for t in METHODS for m in ('uniform', 'proxy',
                                                                      'adaptive'))
    assert 'recommended' in METHODS['contrastive'] and METHODS['contrastive'][
        'recommended'].peer is None


def test_policies_anneal_to_uniform_and_adapt() -> None:
    config = Config(steps=400, eval_every=20)
    policy = recommended_policy(config, 0.8)
    pressures = [policy.plan(Progress(steps=s, samples=0)).pressure for s in (0, 299, 350, 400)]
    assert pressures[:2] == [1.0, 1.0] and pressures[2] == pytest.approx(0.5)
    assert pressures[3] == 0.0
    adaptive = adaptive_policy(config, 0.8)
    assert adaptive.adaptive.window == 20
    # An evaluation that does not improve on the best halves the pressure of the window after
    # next; learnable candidates restore it a window later, whatever their mean learnability.
    for step in range(60):
        adaptive.observe(step, -2.0)
    adaptive.report(10, 0.5)
    adaptive.report(20, 0.4)
    pressures = [adaptive.plan(Progress(steps=s, samples=0)).pressure for s in (20, 40, 60)]
    assert pressures == [1.0, 0.5, 1.0]


def test_proxies_are_a_fraction_of_the_learners() -> None:
    for make, proxy in ((make_classifier, make_proxy_classifier),
                        (make_two_tower, make_proxy_two_tower)):
        assert count_parameters(proxy(0)) * 6 < count_parameters(make(0))
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    text = torch.as_tensor(random_captions(np.arange(5), seed=0))
    assert make_proxy_two_tower(0)(images, text)[0].shape == (5, 16)


def _selective_backprop_batch(n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % N_CLASSES
    return {'image': torch.randint(0, 256, (n, 28, 28), generator=generator, dtype=torch.uint8),
            'label': labels, 'text': torch.as_tensor(random_captions(labels.numpy(), seed=0))}


@pytest.mark.parametrize('task', ['classification', 'contrastive'])
def test_selective_backprop_keeps_b_rows_by_loss_and_repeats_per_seed(task: str) -> None:
    learner = make_classifier(0) if task == 'classification' else make_two_tower(0)
    settings = SelectiveBackpropSettings(scale_factor=0.5)
    selector = SelectiveBackprop(learner, task, settings, batch_size=8,
                                 drawn=settings.drawn(8))
    batch = _selective_backprop_batch(16)
    np.random.seed(3)
    first = selector.select(batch)
    np.random.seed(3)
    assert torch.equal(first, selector.select(batch)) and learner.training
    assert len(first) == 8 == len(set(first.tolist()))
    # Composer's rule samples by the rank of the loss: high losses are kept more often.
    with torch.no_grad():
        losses = selector._loss(batch)(selector._model()(torch.nn.functional.interpolate(
            to_float_images(batch['image']), scale_factor=0.5, mode='bilinear')),
            torch.arange(16))
    kept = torch.zeros(16)
    for seed in range(200):
        np.random.seed(seed)
        kept[selector.select(batch)] += 1
    order = losses.argsort()
    assert kept[order[-4:]].sum() > 2 * kept[order[:4]].sum()


def test_rs2_rounds_are_fresh_subsets_without_replacement(tmp_path: Path) -> None:
    pool = write_mds(tmp_path / 'pool', 40)

    def rounds(seed: int) -> list[list[int]]:
        rs2 = RepeatedRandomSubsets(str(pool), fraction=0.3, batch_size=4, seed=seed,
                                    num_workers=0)
        try:
            return [[int(i) for batch in rs2 for i in batch['sample_id']] for _ in range(4)]
        finally:
            rs2.close()

    first = rounds(0)
    assert [len(r) for r in first] == [12] * 4 and all(len(set(r)) == 12 for r in first)
    # The first three rounds use 36 different samples; the fourth the 4 left, then others.
    assert len(set(first[0]) | set(first[1]) | set(first[2])) == 36
    assert set(range(40)) - set(first[0] + first[1] + first[2]) <= set(first[3])
    assert first == rounds(0) and first != rounds(1)


class _ProxyScorer:
    """Learnability scored by a small proxy model of its own, trained on what is selected."""

    def __init__(self, setup, reference) -> None:
        self.learner = make_classifier(99)
        self.scorer = setup.task.make_scorer(self.learner, reference)
        self.optimizer = torch.optim.SGD(self.learner.parameters(), lr=0.01)

    def __call__(self, batch, sample_ids, criterion):
        return self.scorer(batch, sample_ids, criterion)


def _proxy_loss(model, batch):
    return torch.nn.functional.cross_entropy(batch_logits(model, batch), batch['label'])


def _hooked_methods(calls: list[int]) -> dict[str, Method]:
    """Two methods built from the registry's hooks, as a proxy scorer or a peer would be."""

    def train_proxy(scorer, batch):
        calls.append(len(batch['label']))
        scorer.optimizer.zero_grad()
        _proxy_loss(scorer.learner, batch).backward()
        scorer.optimizer.step()

    def fixed_batches(setup, method, scorer, ratio, seed, config):
        return [{key: value[:config.batch_size] for key, value in setup.probe.items()}]

    return {'hooked_proxy': Method('proxy learnability', 'learnability',
                            scorer=lambda setup, learner, reference, *_: _ProxyScorer(
                                setup, reference),
                            after_step=train_proxy,
                            extra_flops=lambda scorer, big, small: train_step_flops(
                                scorer.learner, small, _proxy_loss)),
            'twice': Method('same batch, twice the budget', loader=fixed_batches,
                            steps=lambda config, entry: 2 * config.steps)}


@needs_fashion_mnist
def test_smoke_run_on_a_tiny_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[int] = []
    for name, method in _hooked_methods(calls).items():
        monkeypatch.setitem(METHODS['classification'], name, method)
    # 600 training images: a pool of 570 and a clean split of 30.
    config = Config(ratios=(0.5,), seeds=(0,), steps=4, eval_every=2, eval_size=50,
                    batch_size=8, n_chunks=4, reference_steps=3, reference_batch_size=16,
                    num_workers=0, limit=600, data_dir=str(tmp_path / 'fm'))
    out = tmp_path / 'out'
    record = run_benchmark(config, out, progress=False)
    saved = json.loads((out / 'learning_efficiency.json').read_text())
    assert saved['complete'] and len(saved['runs']) == 13 + 12
    assert (out / 'learning_efficiency.png').stat().st_size > 0
    assert saved['run']['command'].startswith('python -m benchmarks.learning_efficiency')
    for task in ('classification', 'contrastive'):
        entry = saved['summary'][task]['0.5']
        assert set(entry['methods']) == set(METHODS[task])
        for name, summary in entry['methods'].items():
            assert {'speedup_steps', 'speedup_flops', 'speedup_wall',
                    'per_seed_speedups'} <= set(summary)
            costs = summary['step_costs']
            assert sum(costs.values()) == pytest.approx(summary['seconds_per_step_mean'])
            reads_b = ('uniform', 'twice', 'rs2', 'uniform_compute')
            if name not in reads_b:
                assert costs['score_s'] > 0
            # Uniform reads only what it trains on; selection reads the super-batch (and
            # SelectiveBackprop b / keep = 2b).
            assert summary['drawn_per_step'] == (8 if name in reads_b else 16)
        flops = saved['flops'][task]['0.5']
        assert flops['uniform']['score'] == 0 == flops['uniform']['reference_forward']
        assert flops['uniform']['per_step'] == flops['uniform']['train']
        # With stored reference outputs, learnability scores with the learner alone.
        assert flops['uniform']['per_step'] < flops['learnability' if task == 'classification'
                                                    else 'joint']['per_step']
        # The references are stored by annotate and read back through ReferenceCache.
        pool_dir = tmp_path / ('fm' if task == 'classification' else 'fm-captions') / 'pool'
        cache = ReferenceCache(saved['tasks'][task]['reference_cache'], dataset=pool_dir,
                               model_checksum=saved['tasks'][task]['reference_checksum'],
                               transform=None)
        assert cache.num_samples == 570
    classification = saved['flops']['classification']['0.5']
    assert classification['easy_reference']['score'] == 0
    assert classification['easy_reference']['reference_forward'] > 0
    cheap, full = (saved['flops']['contrastive']['0.5'][name] for name in ('flexi_joint', 'joint'))
    assert cheap['score'] < 0.5 * full['score'] and cheap['train'] < full['train']
    assert full['select'] > 0
    # The hooks: a proxy trained after every step and counted; another loader and budget.
    assert calls == [8] * 4 and classification['hooked_proxy']['extra'] > 0
    assert classification['hooked_proxy']['per_step'] == sum(
        classification['hooked_proxy'][k] for k in ('train', 'score', 'select', 'extra'))
    twice = next(r for r in saved['runs'] if r['method'] == 'twice')
    assert twice['steps'][-1] == 8 and twice['noisy_fraction_overall'] >= 0
    runs = {(r['task'], r['method']): r for r in saved['runs']}
    for task in ('classification', 'contrastive'):
        flops, entry = saved['flops'][task]['0.5'], saved['summary'][task]['0.5']
        # The library's proxy learner: smaller than the learner, its training counted.
        learnability = flops['joint' if task == 'contrastive' else 'learnability']
        assert flops['proxy']['extra'] > 0 and flops['proxy']['score'] < learnability['score']
        assert saved['tasks'][task]['proxy_parameters']['0.5'] * 6 < saved['tasks'][task][
            'learner_parameters']
        # SelectiveBackprop scores only on the steps Composer's schedule picks (the third
        # of four: the window starts half way, every other step of it selects).
        assert runs[task, 'sb_default']['scored'] == [0, 0, 16]
        assert flops['sb_suggested']['extra'] < flops['sb_default']['extra']
        # The held-out metric reported to the adaptive policy.
        assert len(runs[task, 'adaptive']['validation']) == 2
        # Uniform at equal compute runs last, for the steps the best method's FLOPs buy.
        order = [r['method'] for r in saved['runs'] if r['task'] == task]
        assert order.index('uniform_compute') > max(
            i for i, m in enumerate(order) if METHODS[task][m].steps is None)
        assert runs[task, 'uniform_compute']['steps'][-1] == entry['equal_compute']['steps'] >= 4
        assert saved['methods'][task]['rs2']['peer'].startswith('RS2')
    # The captioned pool holds, row for row, the captions the reference was annotated on.
    pool = read_columns(tmp_path / 'fm-captions' / 'pool', ['text', 'label'])
    np.testing.assert_array_equal(pool['text'], pool_captions(pool['label'], 0))

    # --replot summarises the runs of the file again and redraws the plot; it trains nothing
    # and keeps the record of the run that measured them.
    json_path, png_path = out / 'learning_efficiency.json', out / 'learning_efficiency.png'
    json_path.write_text(json.dumps({**saved, 'summary': {}}))
    png_path.unlink()
    capsys.readouterr()
    assert main(['--replot', '--out', str(out)]) == 0
    replotted = json.loads(json_path.read_text())
    assert replotted['summary'] == saved['summary'] and replotted['run'] == saved['run']
    assert replotted['runs'] == saved['runs'] and png_path.stat().st_size > 0
    printed = capsys.readouterr().out
    assert 'summarised again' in printed and 'counted in training steps' in printed
    # Uniform is the base of every speed-up in the table, the normalised one included.
    assert next(line for line in printed.splitlines()
                if line.split()[:1] == ['uniform']).count('base') == 4
    assert len(calls) == 4
    json_path.write_text(json.dumps({**saved, 'schema': 'jest_stream.learning_efficiency/1'}))
    assert main(['--replot', '--out', str(out)]) == 1
    assert 'another version' in capsys.readouterr().out
    json_path.write_text(json.dumps(saved))

    # A resumed run keeps every finished run and trains nothing more; one with fewer methods
    # keeps theirs.
    again = run_benchmark(replace(config), out, resume=True, progress=False)
    assert again['runs'] == record['runs'] and len(calls) == 4
    fewer = run_benchmark(replace(config, methods=('learnability', 'joint')), out, resume=True,
                          progress=False)
    assert {r['method'] for r in fewer['runs']} == {'uniform', 'learnability', 'joint'}
    assert len(fewer['runs']) == 4 and len(calls) == 4


@needs_fashion_mnist
def test_demo_prints_the_three_speedups_and_the_step_costs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(['--quick', '--limit', '2000', '--steps', '4', '--eval-every', '2',
                      '--reference-steps', '5', '--num-workers', '0',
                      '--data-dir', str(tmp_path / 'fm'), '--out', str(tmp_path / 'out')]) == 0
    printed = capsys.readouterr().out
    assert 'several GB' in printed and 'uniform sampling against learnability' in printed
    assert '[1/2] classification f=0.8 seed 0 uniform' in printed
    assert '[2/2] classification f=0.8 seed 0 learnability' in printed
    verdict = next(line for line in printed.splitlines() if line.startswith('learnability ('))
    assert 'A step cost' in verdict and 'train' in verdict and 'wait' in verdict
    assert 'steps' in verdict and ('FLOPs' in verdict or 'did not reach' in verdict)
    saved = json.loads((tmp_path / 'out' / 'demo_quick.json').read_text())
    assert saved['config']['methods'] == ['learnability'] and saved['complete']
    assert (tmp_path / 'out' / 'demo_quick.png').is_file()

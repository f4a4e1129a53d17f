"""The learning-efficiency benchmark's pieces, and a smoke run of it on a tiny pool."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.contrastive import (
    ADJECTIVES,
    CLASS_PHRASES,
    MAX_TOKENS,
    TEMPLATES,
    VOCABULARY,
    caption,
    class_prompt_tokens,
    make_two_tower,
    pool_captions,
    random_captions,
    sigmoid_loss,
    tokenize,
    zero_shot_accuracy,
)
from benchmarks.fashion_mnist import DEFAULT_SOURCE_DIR, FILES, N_CLASSES, read_columns, source_dir
from benchmarks.learning_efficiency import (
    METHODS,
    Config,
    StoredReference,
    make_classifier,
    run_benchmark,
    steps_to_target,
    summarise,
)


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


def test_stored_reference_refuses_misaligned_samples() -> None:
    stored = StoredReference({'loss': torch.arange(5.0)}, torch.tensor([10, 11, 12, 13, 14]))
    out = stored.outputs({'train_index': torch.tensor([13, 10])}, torch.tensor([3, 0]))
    torch.testing.assert_close(out['loss'], torch.tensor([3.0, 0.0]))
    with pytest.raises(RuntimeError, match='not aligned'):
        stored.outputs({'train_index': torch.tensor([13, 11])}, torch.tensor([3, 0]))


def _run(method: str, seed: int, accuracy: list[float]) -> dict:
    return {'task': 'classification', 'method': method, 'ratio': 0.8, 'seed': seed,
            'steps': [0, 10, 20, 30, 40], 'accuracy': accuracy, 'noisy_fraction_overall': 0.1,
            'seconds_per_step': 0.01}


def test_summary_counts_steps_and_flops_to_uniform_final_accuracy() -> None:
    assert steps_to_target([0, 10, 20], [0.1, 0.5, 0.7], 0.5) == 10
    assert steps_to_target([0, 10, 20], [0.1, 0.5, 0.7], 0.8) is None
    config = Config(tasks=('classification',), ratios=(0.8,), seeds=(0, 1), steps=40,
                    eval_every=10)
    runs = [_run('uniform', 0, [0.1, 0.3, 0.4, 0.5, 0.6]),
            _run('uniform', 1, [0.1, 0.3, 0.4, 0.5, 0.6]),
            _run('learnability', 0, [0.1, 0.5, 0.6, 0.7, 0.7]),
            _run('learnability', 1, [0.1, 0.4, 0.55, 0.7, 0.7]),
            _run('hard_learner', 0, [0.1, 0.2, 0.2, 0.2, 0.2])]
    per_step = {'uniform': 100, 'learnability': 300, 'hard_learner': 300, 'easy_reference': 100}
    flops = {'classification': {'0.8': {name: {'per_step': value,
                                               'per_step_live_reference': 2 * value}
                                        for name, value in per_step.items()}}}
    entry = summarise(runs, flops, config)['classification']['0.8']
    assert entry['target_accuracy'] == pytest.approx(0.6)
    learn = entry['methods']['learnability']
    # Mean curve 0.1, 0.45, 0.575, 0.7: reaches 0.6 at step 30.
    assert learn['steps_to_target'] == 30
    assert learn['speedup_steps'] == pytest.approx(40 / 30)
    assert learn['speedup_flops'] == pytest.approx(40 * 100 / (30 * 300))
    assert learn['per_seed']['0']['steps_to_target'] == 20
    assert learn['per_seed']['1']['steps_to_target'] == 30
    hard = entry['methods']['hard_learner']
    assert hard['steps_to_target'] is None and hard['speedup_steps'] is None
    assert hard['seeds'] == [0] and hard['seeds_reaching_target'] == 0
    assert 'easy_reference' not in entry['methods']


@pytest.mark.skipif(not (source_dir() / FILES['train'][0]).is_file(),
                    reason=f'Fashion-MNIST is not installed under {DEFAULT_SOURCE_DIR}')
def test_smoke_run_on_a_tiny_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.learning_efficiency as benchmark
    from benchmarks.fashion_mnist import prepare

    real_prepare = prepare
    # 600 training images: a pool of 570 and a clean split of 30.
    monkeypatch.setattr(benchmark, 'prepare', lambda *a, **k: real_prepare(
        *a, **{**k, 'limit': 600}))
    config = Config(ratios=(0.5,), seeds=(0,), steps=4, eval_every=2, eval_size=50,
                    batch_size=8, n_chunks=4, reference_steps=3, reference_batch_size=16,
                    num_workers=0, data_dir=str(tmp_path / 'fm'))
    out = tmp_path / 'out'
    record = run_benchmark(config, out, progress=False)
    saved = json.loads((out / 'learning_efficiency.json').read_text())
    assert saved['complete'] and len(saved['runs']) == 8
    assert (out / 'learning_efficiency.png').is_file()
    for task in ('classification', 'contrastive'):
        entry = saved['summary'][task]['0.5']
        assert set(entry['methods']) == set(METHODS[task])
        for run in (r for r in saved['runs'] if r['task'] == task):
            assert run['steps'] == [0, 2, 4] and len(run['accuracy']) == 3
        flops = saved['flops'][task]['0.5']
        assert flops['uniform']['learner_scoring'] == 0
        # Learner scoring costs FLOPs on top of training, unless it is cheap (Flexi).
        assert all(flops[name]['per_step'] > flops['uniform']['per_step']
                   for name in METHODS[task]
                   if name not in ('uniform', 'easy_reference', 'flexi_joint'))
        assert flops['uniform']['per_step'] == flops['uniform']['train']
    cheap, full = (saved['flops']['contrastive']['0.5'][name] for name in ('flexi_joint', 'joint'))
    assert cheap['learner_scoring'] < 0.5 * full['learner_scoring']
    assert cheap['train'] < full['train']
    # The captioned pool holds, row for row, the captions the stored reference was built on.
    pool = read_columns(tmp_path / 'fm-captions' / 'pool', ['text', 'label'])
    np.testing.assert_array_equal(pool['text'], pool_captions(pool['label'], 0))

    # A resumed run keeps every finished run and trains nothing more.
    again = run_benchmark(replace(config), out, resume=True, progress=False)
    assert again['runs'] == record['runs']

"""The plain-PyTorch recipe (examples/pytorch_loop.py): interrupted and resumed, it trains on
exactly what the uninterrupted run trains on."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / 'examples' / 'pytorch_loop.py'


@pytest.fixture(autouse=True)
def one_thread():
    # The toy models are too small to gain from intra-op threads, and on a busy machine with
    # two cores threads that wait for each other make them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def recipe():
    spec = importlib.util.spec_from_file_location('pytorch_loop', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules['pytorch_loop'] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop('pytorch_loop', None)


def _config(recipe, **kwargs):
    # 4,000 pool samples in super-batches of 160: 25 per epoch; 30 steps cross an epoch.
    settings = {'steps': 30, 'checkpoint_every': 7}
    settings.update(kwargs)
    return recipe.LoopConfig(**settings)


def _run(recipe, workdir: Path, config, *, resume=False):
    result = recipe.train(workdir, config, resume=resume)
    gc.collect()
    return result


@pytest.mark.parametrize('num_workers', [0, 2])
def test_interrupted_and_resumed_run_trains_on_the_same_batches(recipe, tmp_path, num_workers):
    full = _run(recipe, tmp_path / 'full', _config(recipe, num_workers=num_workers))
    assert [r['step'] for r in full.records] == list(range(1, 31))
    assert {r['epoch'] for r in full.records} == {0, 1}
    assert all(len(r['sample_ids']) == 32 for r in full.records)

    # Stopped after step 17, so the last checkpoint (step 14) is 3 steps behind, as after a
    # crash: those steps are trained again, on the same batches.
    workdir = tmp_path / 'interrupted'
    first = _run(recipe, workdir, _config(recipe, num_workers=num_workers, stop_after=17))
    assert len(first.records) == 17
    resumed = _run(recipe, workdir, _config(recipe, num_workers=num_workers), resume=True)
    assert resumed.start_step == 14
    assert first.records[:14] + resumed.records == full.records
    for a, b in zip(resumed.model.parameters(), full.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Epoch 0 read every pool sample once: each trained example is unique within it.
    epoch0 = [i for r in full.records if r['epoch'] == 0 for i in r['sample_ids']]
    assert len(epoch0) == len(set(epoch0)) == 25 * 32


def test_learnability_trains_on_fewer_wrong_labels_than_uniform(recipe, tmp_path):
    selected = _run(recipe, tmp_path / 'a', _config(recipe, steps=20, checkpoint_every=20))
    uniform = _run(recipe, tmp_path / 'b', _config(recipe, steps=20, checkpoint_every=20,
                                                   criterion='uniform'))
    # 30% of the pool has a wrong label; the uniform baseline trains on about that many.
    assert 0.2 < uniform.noisy_fraction < 0.4
    assert selected.noisy_fraction < 0.15


def test_resume_refuses_a_different_seed(recipe, tmp_path):
    _run(recipe, tmp_path, _config(recipe, steps=7))
    with pytest.raises(ValueError, match='seed'):
        _run(recipe, tmp_path, _config(recipe, steps=10, seed=1), resume=True)

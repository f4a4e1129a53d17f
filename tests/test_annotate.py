"""The annotation job and its command line, resumption after SIGKILL, and the loader on a cache.

The model factories and forward functions below are imported by ``jest-stream annotate``
(in-process and in subprocesses) through their import paths ``test_annotate:...``.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from streaming import StreamingDataset
from torch import Tensor, nn
from torch.utils.data import get_worker_info

from helpers.data import N_CLASSES, N_FEATURES, features_and_labels, write_mds
from helpers.models import tiny_classifier
from helpers.segments import segments_of
from helpers.waits import wait_for
from jest_stream import ClassificationScorer, ContrastiveScorer, SelectiveLoader
from jest_stream.annotate import annotate
from jest_stream.cache import CacheError, IncompleteCache, ReferenceCache, model_checksum
from jest_stream.cache.annotate import AnnotationTimeout
from jest_stream.cli import main
from jest_stream.errors import SettingError, SettingTypeError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


pytestmark = pytest.mark.usefixtures('streaming_lock_files_in_tmp_path')


class SlowLinear(nn.Linear):
    """A linear classifier that takes its time, so a run can be killed half way."""

    def __init__(self, delay: float) -> None:
        super().__init__(N_FEATURES, N_CLASSES)
        self.delay = delay

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.delay)
        return super().forward(x)


def slow_classifier(delay: float = 0.0) -> nn.Module:
    return SlowLinear(delay)


class TwoTower(nn.Module):
    """Image tower on the features, text tower on the label: a tiny contrastive model."""

    def __init__(self, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image = nn.Linear(N_FEATURES, d)
        self.text = nn.Embedding(N_CLASSES, d)
        with torch.no_grad():
            self.image.weight.copy_(torch.randn(self.image.weight.shape, generator=generator))
            self.text.weight.copy_(torch.randn(self.text.weight.shape, generator=generator))
            self.image.bias.zero_()
        self.log_temperature = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-3.0))

    def forward(self, images: Tensor, texts: Tensor):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.log_temperature.exp(), self.bias)


def two_tower(d: int = 16, seed: int = 0) -> nn.Module:
    return TwoTower(d, seed)


def embed_features_and_labels(model: nn.Module, batch) -> tuple:
    return model(batch['x'], batch['y'])


class RoundedToHalf(nn.Module):
    """A live reference whose embeddings are rounded to float16, as the cache stores them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, texts: Tensor):
        image, text, temperature, bias = self.model(images, texts)
        return image.half().float(), text.half().float(), temperature, bias


def live_losses(model: nn.Module, n: int) -> Tensor:
    x, y = features_and_labels(n)
    with torch.no_grad():
        return F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), reduction='none')


def test_annotate_stores_exactly_the_live_losses(tmp_path, mds_dir):
    reference = tiny_classifier(1)
    result = annotate(out=tmp_path / 'ref', model=reference, transform_id='raw', local=mds_dir,
                      input_key='x', target_key='y', batch_size=32, num_workers=2,
                      part_size=64, progress=False)
    assert (result.parts_total, result.parts_written, result.parts_skipped) == (5, 5, 0)
    assert result.fingerprint.model == model_checksum(reference)
    assert reference.training  # the training flag is restored
    cache = ReferenceCache(tmp_path / 'ref', dataset=mds_dir,
                           model_checksum=model_checksum(reference), transform='raw')
    stored = cache.outputs(None, torch.arange(300))['loss']
    assert stored.dtype == torch.float32
    assert torch.equal(stored, live_losses(reference, 300))


def test_a_finished_annotation_is_not_redone_and_a_damaged_part_is(tmp_path, mds_dir):
    reference = tiny_classifier(1)
    settings = dict(out=tmp_path / 'ref', model=reference, transform_id='raw', local=mds_dir,
                    input_key='x', target_key='y', batch_size=50, num_workers=0, part_size=100,
                    progress=False)
    annotate(**settings)
    parts = sorted((tmp_path / 'ref' / 'parts').iterdir())
    before = {p.name: p.stat().st_ino for p in parts}
    again = annotate(**settings)
    assert (again.parts_written, again.parts_skipped) == (0, 3)
    assert {p.name: p.stat().st_ino for p in parts} == before
    parts[1].write_bytes(parts[1].read_bytes()[:-4])
    repaired = annotate(**settings)
    assert (repaired.parts_written, repaired.parts_skipped) == (1, 2)
    cache = ReferenceCache(tmp_path / 'ref', dataset=mds_dir,
                           model_checksum=model_checksum(reference), transform='raw')
    stored = torch.from_numpy(cache.read(range(300))['loss'])
    assert torch.equal(stored, live_losses(reference, 300))


def test_nan_outputs_are_never_stored(tmp_path):
    x, _ = features_and_labels(40)
    x[23, 0] = float('nan')
    directory = write_mds(tmp_path / 'mds', 40, extra={'z': ('ndarray:float32:8', x)})
    with pytest.raises(ValueError, match=r'NaN or inf loss for sample ids \[23\]'):
        annotate(out=tmp_path / 'ref', model=tiny_classifier(1), transform_id='raw',
                 local=directory, input_key='z', target_key='y', batch_size=8, num_workers=0,
                 part_size=16, progress=False)
    assert sorted(p.name for p in (tmp_path / 'ref' / 'parts').iterdir()) == ['part-000000.bin']
    with pytest.raises(IncompleteCache, match='1 of 3 parts'):
        ReferenceCache(tmp_path / 'ref', dataset=directory, model_checksum=None, transform='raw')


class StalledInWorkers(StreamingDataset):
    """A dataset whose DataLoader workers never deliver: each sample takes them a minute."""

    def get_item(self, sample_id: int):
        if get_worker_info() is not None:
            time.sleep(60)
        return super().get_item(sample_id)


def test_a_stalled_worker_raises_within_the_timeout_and_leaves_no_process(tmp_path, mds_dir):
    dataset = StalledInWorkers(local=str(mds_dir), batch_size=32, shuffle=False)
    before = set(multiprocessing.active_children())
    started = time.monotonic()
    with pytest.raises(AnnotationTimeout, match=r'within timeout=1 seconds') as raised:
        annotate(out=tmp_path / 'ref', model=tiny_classifier(1), transform_id='raw',
                 dataset=dataset, input_key='x', target_key='y', batch_size=32, num_workers=1,
                 part_size=64, progress=False, timeout=1)
    assert isinstance(raised.value, CacheError) and isinstance(raised.value, TimeoutError)
    assert time.monotonic() - started < 50  # not the worker's minute
    # The worker is shut down although the error is still held (a bounded wait for its exit).
    deadline = time.monotonic() + 30
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(multiprocessing.active_children()) - before


@pytest.mark.parametrize('timeout, error', [
    (True, SettingTypeError), ('5', SettingTypeError), (None, SettingTypeError),
    (-1, SettingError), (math.nan, SettingError), (math.inf, SettingError)])
def test_annotate_refuses_a_timeout_that_is_not_seconds(tmp_path, mds_dir, timeout, error):
    with pytest.raises(error, match=r'timeout=.*0 means no timeout'):
        annotate(out=tmp_path / 'ref', model=tiny_classifier(1), transform_id='raw',
                 local=mds_dir, input_key='x', target_key='y', num_workers=0, progress=False,
                 timeout=timeout)
    assert not (tmp_path / 'ref').exists()


def test_cli_annotates_embeddings_with_a_forward_function(tmp_path, mds_dir, capsys):
    model = two_tower(d=16, seed=2)
    torch.save(model.state_dict(), tmp_path / 'tower.pt')
    status = main([
        'annotate', '--local', str(mds_dir), '--model', 'test_annotate:two_tower',
        '--model-kwargs', '{"d": 16}', '--checkpoint', str(tmp_path / 'tower.pt'),
        '--forward', 'test_annotate:embed_features_and_labels', '--outputs', 'embeddings',
        '--transform-id', 'raw', '--out', str(tmp_path / 'ref'), '--batch-size', '64',
        '--workers', '1', '--part-size', '128', '--no-progress', '--keep-shared-memory'])
    assert status == 0
    printed = capsys.readouterr().out
    assert 'annotated 300 samples' in printed and model_checksum(model) in printed
    cache = ReferenceCache(tmp_path / 'ref', dataset=mds_dir,
                           model_checksum=model_checksum(tmp_path / 'tower.pt'), transform='raw',
                           kinds=['image_emb', 'text_emb'])
    x, y = features_and_labels(300)
    with torch.no_grad():
        image, text, temperature, bias = model(torch.from_numpy(x), torch.from_numpy(y))
    out = cache.outputs(None, torch.arange(300))
    assert out['image_emb'].dtype == torch.float16
    assert torch.equal(out['image_emb'], image.half())
    assert torch.equal(out['text_emb'], text.half())
    assert (out['temperature'], out['bias']) == (float(temperature), float(bias))


@pytest.mark.parametrize('args, message', [
    (['--model', 'no_such_module:factory', '--input-key', 'x', '--target-key', 'y'],
     "cannot import 'no_such_module'"),
    (['--model', 'test_annotate:slow_classifier', '--input-key', 'x'], 'needs target_key'),
    (['--model', 'test_annotate:slow_classifier', '--input-key', 'x', '--target-key', 'label'],
     "target_key='label' names no column"),
    (['--model', 'test_annotate:two_tower', '--input-key', 'x', '--target-key', 'y'],
     'does not fit the model'),
    (['--model', 'test_annotate:slow_classifier', '--input-key', 'x', '--target-key', 'y',
      '--local', '/no/such/dataset'], '/no/such/dataset/index.json does not exist'),
    (['--model', 'test_annotate:slow_classifier', '--input-key', 'x', '--target-key', 'y',
      '--timeout', '-1'], 'timeout=-1.0 must be a finite number >= 0'),
])
def test_cli_reports_bad_settings_in_one_line(tmp_path, mds_dir, capsys, args, message):
    torch.save(tiny_classifier(1).state_dict(), tmp_path / 'ref.pt')
    status = main(['annotate', '--local', str(mds_dir), '--checkpoint', str(tmp_path / 'ref.pt'),
                   '--transform-id', 'raw', '--out', str(tmp_path / 'ref'), '--workers', '0',
                   '--no-progress', '--keep-shared-memory', *args])
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith('jest-stream: error:') and message in error


def test_cli_clears_stale_shared_memory_unless_told_not_to(tmp_path, mds_dir, monkeypatch):
    import jest_stream.shm

    calls = []
    monkeypatch.setattr(jest_stream.shm, 'remove_stale_shared_memory',
                        lambda: calls.append(True))
    args = ['annotate', '--local', str(mds_dir), '--model', 'no_such_module:factory',
            '--transform-id', 'raw', '--out', str(tmp_path / 'ref')]
    assert main(args) == 1 and calls == [True]
    assert main([*args, '--keep-shared-memory']) == 1 and calls == [True]


def _cli(tmp_path: Path, mds: Path, out: Path, delay: float) -> list[str]:
    return [sys.executable, '-m', 'jest_stream.cli', 'annotate', '--local', str(mds),
            '--model', 'test_annotate:slow_classifier', '--model-kwargs', f'{{"delay": {delay}}}',
            '--checkpoint', str(tmp_path / 'ref.pt'), '--input-key', 'x', '--target-key', 'y',
            '--transform-id', 'raw', '--out', str(out), '--batch-size', '25',
            '--part-size', '50', '--workers', '2', '--no-progress', '--keep-shared-memory']


def test_sigkill_then_rerun_continues_and_matches_an_uninterrupted_run(tmp_path, child_tmpdir):
    mds = write_mds(tmp_path / 'mds', 600)
    reference = tiny_classifier(1)
    torch.save(reference.state_dict(), tmp_path / 'ref.pt')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(TESTS), str(REPO)]),
           'TMPDIR': str(child_tmpdir)}
    out = tmp_path / 'interrupted'

    # 12 parts of 2 batches; each batch takes 0.1 s: kill once 3 parts are on disk.
    process = subprocess.Popen(_cli(tmp_path, mds, out, delay=0.1), env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        wait_for(lambda: len(list((out / 'parts').glob('part-*.bin'))) >= 3, process, 120,
                 'the annotation writing three parts')
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the CLI and its DataLoader workers
        process.communicate()
    # SIGKILL skips streaming's clean-up at exit. Remove exactly what the killed run left
    # (clean_stale_shared_memory would also clear the segments of other live processes,
    # and may already have cleared these).
    for name in segments_of(mds):
        Path('/dev/shm', name).unlink(missing_ok=True)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in (out / 'parts').glob('part-*.bin')}
    assert 3 <= len(finished) < 12
    with pytest.raises(IncompleteCache):
        ReferenceCache(out, dataset=mds, model_checksum=None, transform='raw')

    rerun = subprocess.run(_cli(tmp_path, mds, out, delay=0.0), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f'{12 - len(finished)} parts written, {len(finished)} already done' in rerun.stdout
    for name, identity in finished.items():  # finished parts were neither redone nor replaced
        part = out / 'parts' / name
        assert (part.stat().st_ino, part.stat().st_mtime_ns) == identity
    assert not [p for p in (out / 'parts').iterdir() if not p.name.startswith('part-')]
    assert not segments_of(mds)  # the rerun released its own at exit

    whole = tmp_path / 'uninterrupted'
    annotate(out=whole, model=reference, transform_id='raw', local=mds, input_key='x',
             target_key='y', batch_size=25, part_size=50, num_workers=2, progress=False)
    for part in sorted((whole / 'parts').iterdir()):
        assert (out / 'parts' / part.name).read_bytes() == part.read_bytes(), part.name
    cache = ReferenceCache(out, dataset=mds, model_checksum=model_checksum(reference),
                           transform='raw')
    assert torch.equal(cache.outputs(None, torch.arange(600))['loss'], live_losses(reference, 600))


class _Raises(nn.Module):
    def forward(self, *args):
        raise AssertionError('the reference model ran although its outputs are cached')


def _selected(loader: SelectiveLoader) -> list[list[int]]:
    return [batch['sample_id'].tolist() for batch in loader]


@pytest.mark.parametrize('method', ['joint', 'topk'])
def test_loader_selects_the_same_from_the_cache_as_from_the_live_reference(
        tmp_path, mds_dir, make_streaming, method):
    reference = tiny_classifier(1)

    def run(ref) -> list[list[int]]:
        scorer = ClassificationScorer(tiny_classifier(0), ref, input_key='x', target_key='y')
        loader = SelectiveLoader(make_streaming(mds_dir, batch_size=60), batch_size=12,
                                 filter_ratio=0.8, scorer=scorer, method=method, n_chunks=4,
                                 num_workers=2, seed=5)
        return _selected(loader)

    live = run(reference)
    annotate(out=tmp_path / 'ref', model=reference, transform_id='raw', local=mds_dir,
             input_key='x', target_key='y', batch_size=64, num_workers=0, progress=False)
    reference.forward = _Raises().forward
    cache = ReferenceCache(tmp_path / 'ref', dataset=mds_dir,
                           model_checksum=model_checksum(reference), transform='raw',
                           kinds=['loss'])
    assert run(cache) == live
    assert cache.stats['parts_read'] == 1


def test_contrastive_loader_selects_the_same_from_a_float16_cache(tmp_path, mds_dir,
                                                                  make_streaming):
    reference = two_tower(d=16, seed=2)

    def run(ref) -> list[list[int]]:
        scorer = ContrastiveScorer(two_tower(d=16, seed=3), ref, image_key='x', text_key='y')
        loader = SelectiveLoader(make_streaming(mds_dir, batch_size=60), batch_size=12,
                                 filter_ratio=0.8, scorer=scorer, method='joint', n_chunks=3,
                                 seed=5)
        return _selected(loader)

    live = run(RoundedToHalf(reference))
    annotate(out=tmp_path / 'ref', model=reference, transform_id='raw', local=mds_dir,
             outputs='embeddings', image_key='x', text_key='y', batch_size=64, num_workers=0,
             progress=False)
    cache = ReferenceCache(tmp_path / 'ref', dataset=mds_dir,
                           model_checksum=model_checksum(reference), transform='raw')
    assert run(cache) == live

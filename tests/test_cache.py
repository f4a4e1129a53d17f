"""The reference cache store: round trips, fingerprints, and loud failures of every kind.

Every byte of both on-disk formats is checked: a damaged manifest or part raises a
CacheError naming the file, never another exception and never a wrong value.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from helpers.data import write_mds
from helpers.models import tiny_classifier
from jest_stream import ContrastiveScorer, get_criterion
from jest_stream.cache import (
    CacheError,
    CacheFolderNotEmpty,
    CacheWriter,
    CorruptManifest,
    CorruptPart,
    Fingerprint,
    FingerprintMismatch,
    IncompleteCache,
    OutputMismatch,
    ReferenceCache,
    dataset_fingerprint,
    model_checksum,
)
from jest_stream.cache.format import encode_manifest
from jest_stream.errors import JestStreamError

MODEL = 'a' * 64
TRANSFORM = 'raw-x'


pytestmark = pytest.mark.usefixtures('streaming_lock_files_in_tmp_path')


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return write_mds(tmp_path / 'mds', 100)


def outputs_for(n: int, group: str, d: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if group == 'loss':
        return {'loss': rng.exponential(size=n).astype(np.float32)}
    return {'image_emb': rng.standard_normal((n, d)).astype(np.float16),
            'text_emb': rng.standard_normal((n, d)).astype(np.float16)}


def build(path: Path, dataset: Path, *, group: str = 'loss', part_size: int = 32,
          n: int = 100, model: str = MODEL, transform: str = TRANSFORM, parts=None,
          finish: bool = True) -> dict[str, np.ndarray]:
    """A cache of ``n`` samples written part by part; returns the arrays it holds."""
    fingerprint = Fingerprint(dataset=dataset_fingerprint(dataset), model=model,
                              transform=transform)
    arrays = outputs_for(n, group)
    constants = {'temperature': 10.0, 'bias': -2.5} if group == 'embeddings' else None
    with CacheWriter(path, fingerprint=fingerprint, num_samples=n, group=group,
                     part_size=part_size) as writer:
        for part in range(writer.num_parts) if parts is None else parts:
            start, stop = writer.part_range(part)
            writer.write_part(part, {k: v[start:stop] for k, v in arrays.items()}, constants)
        if finish:
            writer.finish()
    return arrays


def open_cache(path: Path, dataset: Path, **kwargs) -> ReferenceCache:
    options = {'model_checksum': MODEL, 'transform': TRANSFORM, **kwargs}
    return ReferenceCache(path, dataset=dataset, **options)


@pytest.mark.parametrize('group', ['loss', 'embeddings'])
def test_round_trip_by_sample_id(tmp_path, dataset_dir, group):
    arrays = build(tmp_path / 'ref', dataset_dir, group=group)
    cache = open_cache(tmp_path / 'ref', dataset_dir)
    ids = torch.tensor([99, 0, 31, 32, 64, 5, 5, 98])  # across every part, one repeated
    out = cache.outputs(None, ids)
    for kind, array in arrays.items():
        assert out[kind].dtype == torch.from_numpy(array).dtype
        assert torch.equal(out[kind], torch.from_numpy(array[ids.numpy()]))
    if group == 'embeddings':
        assert (out['temperature'], out['bias']) == (10.0, -2.5)
        assert cache.kinds == ('image_emb', 'text_emb')
    else:
        assert set(out) == {'loss'}
    assert len(cache) == 100 and cache.stats['parts_read'] == 4


def test_fingerprint_helpers_agree_across_forms(tmp_path, dataset_dir, make_streaming):
    model = tiny_classifier(3)
    torch.save(model.state_dict(), tmp_path / 'ref.pt')
    checksum = model_checksum(model)
    assert checksum == model_checksum(model.state_dict()) == model_checksum(tmp_path / 'ref.pt')
    assert checksum != model_checksum(tiny_classifier(4))
    dataset = make_streaming(dataset_dir, batch_size=10)
    assert dataset_fingerprint(dataset) == dataset_fingerprint(dataset_dir)
    assert dataset_fingerprint(dataset_dir) == dataset_fingerprint(dataset_dir / 'index.json')
    other = write_mds(tmp_path / 'other', 100, seed=1)
    assert dataset_fingerprint(other) == dataset_fingerprint(dataset_dir)  # same index layout
    assert dataset_fingerprint(write_mds(tmp_path / 'bigger', 101)) != dataset_fingerprint(other)


@pytest.mark.parametrize('field', ['dataset', 'model', 'transform'])
def test_a_cache_of_another_dataset_model_or_transform_is_refused(tmp_path, dataset_dir, field):
    build(tmp_path / 'ref', dataset_dir)
    other_dataset = write_mds(tmp_path / 'other', 120)
    kwargs = {'dataset': other_dataset} if field == 'dataset' else {
        'model': {'model_checksum': 'b' * 64}, 'transform': {'transform': 'augmented'},
    }[field]
    dataset = kwargs.pop('dataset', dataset_dir)
    with pytest.raises(FingerprintMismatch) as error:
        open_cache(tmp_path / 'ref', dataset, **kwargs)
    message = str(error.value)
    stored = {'dataset': dataset_fingerprint(dataset_dir), 'model': MODEL,
              'transform': TRANSFORM}[field]
    expected = {'dataset': dataset_fingerprint(other_dataset), 'model': 'b' * 64,
                'transform': 'augmented'}[field]
    assert f'another {field}' in message
    assert stored in message and expected in message and 're-annotate' in message


def test_none_skips_a_check_only_when_given_explicitly(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir)
    open_cache(tmp_path / 'ref', dataset_dir, model_checksum=None, transform=None)
    with pytest.raises(TypeError):
        ReferenceCache(tmp_path / 'ref', dataset=dataset_dir)  # no silent default


def test_a_cache_of_format_version_1_asks_to_re_annotate(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir)
    manifest = json.loads((tmp_path / 'ref' / 'manifest.json').read_text())
    del manifest['digest']  # version 1 had none
    manifest['format_version'] = manifest['fingerprint']['format_version'] = 1
    (tmp_path / 'ref' / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(FingerprintMismatch, match='format version 1;.*Re-annotate'):
        open_cache(tmp_path / 'ref', dataset_dir)
    with pytest.raises(FingerprintMismatch, match='format version 1'):  # nor continued
        build(tmp_path / 'ref', dataset_dir)


def test_another_format_version_is_refused(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir)
    manifest = json.loads((tmp_path / 'ref' / 'manifest.json').read_text())
    manifest['format_version'] = 99
    (tmp_path / 'ref' / 'manifest.json').write_bytes(encode_manifest(manifest))
    with pytest.raises(FingerprintMismatch, match='format version 99'):
        open_cache(tmp_path / 'ref', dataset_dir)


def test_a_folder_without_a_cache_is_refused(tmp_path, dataset_dir):
    with pytest.raises(IncompleteCache, match='jest-stream annotate'):
        open_cache(tmp_path / 'nothing', dataset_dir)


def test_an_unfinished_annotation_is_refused_at_open(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir, parts=[0, 2], finish=False)
    with pytest.raises(IncompleteCache, match=r'2 of 4 parts.*missing: \[1, 3\]'):
        open_cache(tmp_path / 'ref', dataset_dir)


def test_ids_of_missing_parts_raise_at_first_use(tmp_path, dataset_dir):
    arrays = build(tmp_path / 'ref', dataset_dir, parts=[0, 2], finish=False)
    cache = open_cache(tmp_path / 'ref', dataset_dir, allow_incomplete=True)
    ok = cache.outputs(None, torch.tensor([0, 70]))['loss']
    assert torch.equal(ok, torch.from_numpy(arrays['loss'][[0, 70]]))
    with pytest.raises(IncompleteCache, match=r'sample ids 32\.\.63 .*part-000001\.bin is missing'):
        cache.outputs(None, torch.tensor([0, 40]))


def test_a_deleted_part_is_found_at_open(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir)
    (tmp_path / 'ref' / 'parts' / 'part-000003.bin').unlink()
    with pytest.raises(IncompleteCache, match=r'missing: \[3\]'):
        open_cache(tmp_path / 'ref', dataset_dir)


@pytest.mark.parametrize('ids', [[0, 100], [-1, 3], [5, 10_000]])
def test_ids_beyond_the_cache_raise(tmp_path, dataset_dir, ids):
    build(tmp_path / 'ref', dataset_dir)
    cache = open_cache(tmp_path / 'ref', dataset_dir)
    with pytest.raises(IncompleteCache, match=r'outside the reference cache .* ids 0\.\.99'):
        cache.outputs(None, torch.tensor(ids))


def damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == 'truncated':
        file.write_bytes(bytes(data[:-5]))
    elif how == 'flipped':
        data[-3] ^= 0xFF
        file.write_bytes(bytes(data))
    elif how == 'empty':
        file.write_bytes(b'')
    elif how == 'header':
        file.write_bytes(bytes(data[:20]))
    elif how == 'trailing':
        file.write_bytes(bytes(data) + b'\0' * 7)


@pytest.mark.parametrize('how, message', [
    ('truncated', 'truncated'), ('flipped', 'checksum'), ('empty', 'magic'),
    ('header', 'truncated'), ('trailing', '7 bytes after its end'),
])
def test_a_damaged_part_raises_at_first_use(tmp_path, dataset_dir, how, message):
    build(tmp_path / 'ref', dataset_dir)
    damage(tmp_path / 'ref' / 'parts' / 'part-000001.bin', how)
    cache = open_cache(tmp_path / 'ref', dataset_dir)
    cache.outputs(None, torch.tensor([0, 99]))  # the intact parts still read
    with pytest.raises(CorruptPart, match=message) as error:
        cache.outputs(None, torch.tensor([40]))
    assert 'part-000001.bin' in str(error.value) and 'annotate' in str(error.value)


def test_a_part_of_another_cache_or_position_is_refused(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir)
    build(tmp_path / 'other', dataset_dir, model='c' * 64)
    parts = tmp_path / 'ref' / 'parts'
    shutil.copy(tmp_path / 'other' / 'parts' / 'part-000001.bin', parts / 'part-000001.bin')
    shutil.copy(parts / 'part-000000.bin', parts / 'part-000002.bin')
    cache = open_cache(tmp_path / 'ref', dataset_dir)
    with pytest.raises(CorruptPart, match='belongs to another cache'):
        cache.outputs(None, torch.tensor([40]))
    with pytest.raises(CorruptPart, match='holds part 0'):
        cache.outputs(None, torch.tensor([70]))


def test_a_missing_kind_is_refused_at_open_and_at_first_use(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir, group='loss')
    with pytest.raises(CacheError, match=r"stores \['loss'\], not \['image_emb', 'text_emb'\]"):
        open_cache(tmp_path / 'ref', dataset_dir, kinds=['image_emb', 'text_emb'])
    cache = open_cache(tmp_path / 'ref', dataset_dir)
    scorer = ContrastiveScorer(None, reference=cache, image_key='x', text_key='y')
    batch = {'x': torch.zeros(4, 8), 'y': torch.zeros(4, dtype=torch.long)}
    with pytest.raises(KeyError, match='image_emb'):
        scorer(batch, torch.arange(4), get_criterion('easy_reference'))


def test_the_writer_refuses_to_mix_annotations(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir, finish=False, parts=[0])
    fingerprint = Fingerprint(dataset=dataset_fingerprint(dataset_dir), model='d' * 64,
                              transform=TRANSFORM)
    with pytest.raises(FingerprintMismatch, match='another --out'):
        CacheWriter(tmp_path / 'ref', fingerprint=fingerprint, num_samples=100, group='loss',
                    part_size=32)
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('mine')
    with pytest.raises(CacheFolderNotEmpty, match='not empty .*notes.txt') as error:
        CacheWriter(tmp_path / 'busy', fingerprint=fingerprint, num_samples=100, group='loss')
    assert isinstance(error.value, FileExistsError)


def test_the_writer_checks_shapes_and_constants(tmp_path, dataset_dir):
    fingerprint = Fingerprint(dataset=dataset_fingerprint(dataset_dir), model=MODEL,
                              transform=TRANSFORM)
    writer = CacheWriter(tmp_path / 'ref', fingerprint=fingerprint, num_samples=100,
                         group='embeddings', part_size=50)
    emb = outputs_for(100, 'embeddings')
    writer.write_part(0, {k: v[:50] for k, v in emb.items()}, {'temperature': 1.0, 'bias': 0.0})
    with pytest.raises(OutputMismatch, match='temperature was 1.0'):
        writer.write_part(1, {k: v[50:] for k, v in emb.items()},
                          {'temperature': 2.0, 'bias': 0.0})
    wider = outputs_for(100, 'embeddings', d=7)
    with pytest.raises(OutputMismatch, match=r'shape \[7\]'):
        writer.write_part(1, {k: v[50:] for k, v in wider.items()},
                          {'temperature': 1.0, 'bias': 0.0})
    nan = {k: v[50:].copy() for k, v in emb.items()}
    nan['text_emb'][3, 1] = np.nan
    with pytest.raises(OutputMismatch, match='NaN or inf'):
        writer.write_part(1, nan, {'temperature': 1.0, 'bias': 0.0})
    with pytest.raises(IncompleteCache, match=r'parts \[1\]'):
        writer.finish()
    writer.close()


def test_decompressed_parts_are_bounded_in_memory(tmp_path, dataset_dir):
    arrays = build(tmp_path / 'ref', dataset_dir, group='embeddings', part_size=10)
    part_bytes = 10 * 6 * 2 * 2
    cache = open_cache(tmp_path / 'ref', dataset_dir, max_bytes=3 * part_bytes)
    for part in range(10):
        cache.read([part * 10])
        assert cache._held_bytes <= 3 * part_bytes
    cache.read([95])  # still held: a hit
    cache.read([5])   # evicted long ago: read again
    assert cache.stats == {'parts_read': 11, 'bytes_read': cache.stats['bytes_read'],
                           'hits': 1, 'misses': 11}
    assert np.array_equal(cache.read([5])['text_emb'], arrays['text_emb'][[5]])


class _Lookup(Dataset):
    def __init__(self, cache: ReferenceCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.cache.read([index])['loss'])


def test_pickles_and_reads_in_dataloader_workers(tmp_path, dataset_dir):
    arrays = build(tmp_path / 'ref', dataset_dir)
    cache = open_cache(tmp_path / 'ref', dataset_dir)
    cache.read([0, 50])  # buffers are not pickled
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.stats['parts_read'] == 0 and np.array_equal(copy.read([7])['loss'],
                                                            arrays['loss'][[7]])
    loader = DataLoader(_Lookup(cache), batch_size=25, num_workers=2)
    values = torch.cat([batch.flatten() for batch in loader])
    assert torch.equal(values, torch.from_numpy(arrays['loss']))


def test_cache_errors_are_jest_stream_errors():
    assert issubclass(CacheError, JestStreamError) and issubclass(CacheError, RuntimeError)
    for kind in (FingerprintMismatch, IncompleteCache, CorruptPart, CorruptManifest,
                 CacheFolderNotEmpty, OutputMismatch):
        assert issubclass(kind, CacheError)


# --- damage: every byte of every file is checked ----------------------------------------

def _stored(cache: ReferenceCache, n: int) -> dict:
    """Everything a reader hands out: arrays as (dtype, shape, bytes), and the constants."""
    out = cache.outputs(None, torch.arange(n))
    return {kind: (value.dtype, tuple(value.shape), value.numpy().tobytes())
            if isinstance(value, torch.Tensor) else value for kind, value in out.items()}


@pytest.mark.parametrize('group', ['loss', 'embeddings'])
@pytest.mark.parametrize('target', ['manifest.json', 'parts/part-000000.bin'])
def test_every_single_bit_flip_raises_a_cache_error_or_reads_exactly(tmp_path, group, target):
    dataset = write_mds(tmp_path / 'mds', 4)
    n = 3
    fingerprint = Fingerprint(dataset=dataset_fingerprint(dataset), model=MODEL,
                              transform=TRANSFORM)
    with CacheWriter(tmp_path / 'ref', fingerprint=fingerprint, num_samples=n, group=group,
                     part_size=n) as writer:
        writer.write_part(0, outputs_for(n, group, d=2),
                          {'temperature': 10.0, 'bias': -2.5} if group == 'embeddings' else None)
        writer.finish()
    baseline = _stored(open_cache(tmp_path / 'ref', dataset), n)
    file = tmp_path / 'ref' / target
    original = file.read_bytes()
    detected, wrong = 0, []
    for bit in range(len(original) * 8):
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        file.write_bytes(bytes(damaged))
        try:
            values = _stored(open_cache(tmp_path / 'ref', dataset), n)
        except CacheError as error:
            assert str(file.name) in str(error), (bit, str(error))
            detected += 1
            continue
        except Exception as error:  # noqa: BLE001 - any other exception is the failure sought
            wrong.append((bit, repr(error)))
            continue
        if values != baseline:
            wrong.append((bit, 'read back different values without an error'))
    assert not wrong, wrong[:10]
    assert detected == len(original) * 8  # every flip is detected, none is silently accepted


def test_a_byte_swapped_dtype_is_never_read(tmp_path, dataset_dir):
    build(tmp_path / 'ref', dataset_dir)
    file = tmp_path / 'ref' / 'manifest.json'
    text = file.read_bytes()
    assert text.count(b'"<f4"') == 1
    file.write_bytes(text.replace(b'"<f4"', b'">f4"'))  # one bit: '<' ^ 0x02 == '>'
    with pytest.raises(CorruptManifest, match='fails its digest'):
        open_cache(tmp_path / 'ref', dataset_dir)
    # Even a manifest whose digest was recomputed must store what the format requires.
    manifest = json.loads(text)
    manifest['outputs']['loss']['dtype'] = '>f4'
    file.write_bytes(encode_manifest(manifest))
    with pytest.raises(CorruptManifest, match="loss is stored as '>f4'.*'<f4'"):
        open_cache(tmp_path / 'ref', dataset_dir)


@pytest.mark.parametrize('change, message', [
    (lambda m: m['outputs']['loss'].update(shape=[2]), r'per-sample shape \[2\], not \[\]'),
    (lambda m: m.update(part_size=0), 'part_size=0 is not a positive integer'),
    (lambda m: m.update(extra=1), 'its fields are'),
    (lambda m: m.update(group='embeddings'), r"outputs must be exactly \['image_emb'"),
    (lambda m: m['constants'].update(bias=1.0), r"constants must be a subset of \[\]"),
    (lambda m: m.update(complete='yes'), 'complete is not a boolean'),
    (lambda m: m['fingerprint'].update(model=''), 'model is not a non-empty string'),
])
def test_a_manifest_breaking_the_schema_is_refused(tmp_path, dataset_dir, change, message):
    build(tmp_path / 'ref', dataset_dir)
    file = tmp_path / 'ref' / 'manifest.json'
    manifest = json.loads(file.read_text())
    change(manifest)
    file.write_bytes(encode_manifest(manifest))
    with pytest.raises(CorruptManifest, match=message) as error:
        open_cache(tmp_path / 'ref', dataset_dir)
    assert 'manifest.json is damaged' in str(error.value)


def test_embedding_constants_must_be_finite_and_shapes_known_when_complete(tmp_path,
                                                                          dataset_dir):
    build(tmp_path / 'ref', dataset_dir, group='embeddings')
    file = tmp_path / 'ref' / 'manifest.json'
    manifest = json.loads(file.read_text())
    file.write_bytes(file.read_bytes().replace(b'10.0', b'1e999'))
    with pytest.raises(CorruptManifest, match='not ASCII JSON'):
        open_cache(tmp_path / 'ref', dataset_dir)
    manifest['constants']['temperature'] = 10  # an int: not what the writer stores
    file.write_bytes(encode_manifest(manifest))
    with pytest.raises(CorruptManifest, match='temperature=10 is not a finite float'):
        open_cache(tmp_path / 'ref', dataset_dir)
    manifest['constants']['temperature'] = 10.0
    manifest['outputs']['text_emb']['shape'] = None
    file.write_bytes(encode_manifest(manifest))
    with pytest.raises(CorruptManifest, match='marked complete but the shape of text_emb'):
        open_cache(tmp_path / 'ref', dataset_dir)

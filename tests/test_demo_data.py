"""Data preparation of the benchmarks (``benchmarks.common.data``): IDX, label noise, MDS shards."""

from __future__ import annotations

import gc
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import StreamingDataset

from benchmarks.common import data as fashion_mnist
from benchmarks.common.data import (
    CLEAN_COLUMNS,
    DEFAULT_SOURCE_DIR,
    FILES,
    MEAN,
    POOL_COLUMNS,
    SOURCE_ENV_VAR,
    STD,
    build_atomically,
    load_fashion_mnist,
    open_streaming,
    prepare,
    read_columns,
    read_idx,
    symmetric_label_noise,
    to_float_images,
)

_IDX_CODES = {np.dtype('uint8'): 0x08, np.dtype('int32'): 0x0C, np.dtype('float32'): 0x0D}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as a gzipped IDX file (big-endian values after the header)."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype='>u4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(array.dtype.newbyteorder('>')).tobytes())
    return path


def write_fake_fashion_mnist(folder: Path, *, n_train: int, n_test: int, seed: int = 0
                             ) -> dict[str, np.ndarray]:
    """Random images and labels in the four files of the real data set."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (('train', n_train), ('test', n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        image_file, label_file = FILES[split]
        write_idx(folder / image_file, images)
        write_idx(folder / label_file, labels)
        arrays[f'{split}_images'], arrays[f'{split}_labels'] = images, labels.astype(np.int64)
    return arrays


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    arrays = write_fake_fashion_mnist(tmp_path / 'raw', n_train=200, n_test=30)
    monkeypatch.setenv(SOURCE_ENV_VAR, str(tmp_path / 'raw'))
    return arrays


# Label noise


@pytest.mark.parametrize(('n', 'rate'), [(1000, 0.4), (999, 0.4), (57, 0.05), (10, 0.0),
                                         (10, 1.0), (333, 0.37)])
def test_noise_corrupts_exactly_the_rounded_fraction(n, rate):
    labels = np.random.default_rng(1).integers(0, 10, size=n)
    noisy, corrupted = symmetric_label_noise(labels, rate, seed=0)
    assert corrupted.dtype == bool and noisy.dtype == np.int64
    assert corrupted.sum() == round(rate * n)
    np.testing.assert_array_equal(noisy != labels, corrupted)
    assert noisy.min() >= 0 and noisy.max() < 10


def test_noise_moves_to_every_other_class_uniformly():
    labels = np.zeros(9000, dtype=np.int64)
    noisy, corrupted = symmetric_label_noise(labels, 1.0, seed=5)
    assert corrupted.all()
    counts = np.bincount(noisy, minlength=10)
    assert counts[0] == 0
    # 1000 expected per class; 6 standard deviations is far outside chance.
    assert np.all(np.abs(counts[1:] - 1000) < 6 * np.sqrt(1000 * 8 / 9))


def test_noise_with_two_classes_swaps_them():
    labels = np.array([0, 1] * 50)
    noisy, corrupted = symmetric_label_noise(labels, 1.0, seed=0, n_classes=2)
    np.testing.assert_array_equal(noisy, 1 - labels)
    assert corrupted.all()


def test_noise_is_reproducible_per_seed_and_leaves_global_state_alone():
    labels = np.random.default_rng(2).integers(0, 10, size=500)
    numpy_state = np.random.get_state()[1].copy()
    torch_state = torch.random.get_rng_state()
    first = symmetric_label_noise(labels, 0.4, seed=11)
    again = symmetric_label_noise(labels, 0.4, seed=11)
    other = symmetric_label_noise(labels, 0.4, seed=12)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)


@pytest.mark.parametrize(('labels', 'rate', 'n_classes', 'match'), [
    (np.array([0, 1, 2]), 1.5, 10, 'rate'),
    (np.array([0, 1, 10]), 0.5, 10, r'0\.\.9'),
    (np.array([0.0, 1.0]), 0.5, 10, 'integer'),
    (np.array([0, 0]), 0.5, 1, 'n_classes'),
])
def test_noise_rejects_bad_input(labels, rate, n_classes, match):
    with pytest.raises(ValueError, match=match):
        symmetric_label_noise(labels, rate, seed=0, n_classes=n_classes)


# IDX files


@pytest.mark.parametrize('array', [
    np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
    np.array([3, -7, 70000], dtype=np.int32),
    np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
])
def test_read_idx_round_trips(tmp_path, array):
    values = read_idx(write_idx(tmp_path / 'x-idx.gz', array))
    assert values.dtype == array.dtype and values.dtype.isnative
    np.testing.assert_array_equal(values, array)


def test_read_idx_reads_uncompressed_files(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    packed = write_idx(tmp_path / 'x-idx.gz', array)
    plain = tmp_path / 'x-idx'
    plain.write_bytes(gzip.decompress(packed.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), array)


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path):
    bad = tmp_path / 'bad.gz'
    with gzip.open(bad, 'wb') as f:
        f.write(b'\x01\x02\x08\x01' + b'\x00' * 8)
    with pytest.raises(ValueError, match='magic number'):
        read_idx(bad)
    short = tmp_path / 'short.gz'
    with gzip.open(short, 'wb') as f:
        f.write(bytes([0, 0, 0x08, 1]) + np.array([10], '>u4').tobytes() + b'\x00' * 4)
    with pytest.raises(ValueError, match='damaged'):
        read_idx(short)


def test_missing_files_name_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(SOURCE_ENV_VAR, str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist('train')
    message = str(info.value)
    assert 'train-images-idx3-ubyte.gz' in message
    assert 'sudo apt-get install dataset-fashion-mnist' in message
    assert SOURCE_ENV_VAR in message


def test_load_checks_images_and_labels_match(tmp_path):
    write_idx(tmp_path / FILES['test'][0], np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / FILES['test'][1], np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match='labels of shape'):
        load_fashion_mnist('test', directory=tmp_path)


def test_real_fashion_mnist_when_installed(monkeypatch):
    monkeypatch.delenv(SOURCE_ENV_VAR, raising=False)
    if not all((DEFAULT_SOURCE_DIR / name).is_file() for pair in FILES.values() for name in pair):
        pytest.skip(f'the Debian package dataset-fashion-mnist is not installed '
                    f'(no files in {DEFAULT_SOURCE_DIR})')
    images, labels = load_fashion_mnist('test')
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


# Float images


def test_to_float_images_normalises_and_adds_the_channel():
    pixels = torch.tensor([[[0, 255]] * 2], dtype=torch.uint8).expand(3, 2, 2)
    images = to_float_images(pixels)
    assert images.shape == (3, 1, 2, 2) and images.dtype == torch.float32
    torch.testing.assert_close(images[0, 0, 0], torch.tensor([-MEAN / STD, (1 - MEAN) / STD]))
    assert to_float_images(np.zeros((2, 1, 28, 28), np.uint8)).shape == (2, 1, 28, 28)
    with pytest.raises(TypeError, match='uint8'):
        to_float_images(images)


# prepare()


def _read_streaming(directory: Path) -> list[dict]:
    dataset = StreamingDataset(local=str(directory), batch_size=8, shuffle=False,
                               num_canonical_nodes=1)
    try:
        return [dataset[i] for i in range(len(dataset))]
    finally:
        del dataset
        gc.collect()


def test_prepare_builds_pool_and_clean_split(tmp_path, fake_source):
    data = prepare(tmp_path / 'out', noise_rate=0.4, clean_fraction=0.1, seed=3, limit=160,
                   size_limit=1 << 14, progress=False)
    assert (data.n_pool, data.n_clean, data.n_corrupted) == (144, 16, round(0.4 * 144))
    np.testing.assert_array_equal(data.test_images, fake_source['test_images'])
    np.testing.assert_array_equal(data.test_labels, fake_source['test_labels'])
    index = json.loads((data.pool_dir / 'index.json').read_text())
    assert len(index['shards']) > 3
    assert json.loads((tmp_path / 'out' / 'prepared.json').read_text())['counts']['pool'] == 144

    pool = _read_streaming(data.pool_dir)
    assert len(pool) == data.n_pool
    assert set(pool[0]) == set(POOL_COLUMNS)
    rows = np.array([s['train_index'] for s in pool])
    images = np.stack([s['image'] for s in pool])
    assert images.dtype == np.uint8 and images.shape == (144, 28, 28)
    np.testing.assert_array_equal(images, fake_source['train_images'][rows])
    clean_labels = np.array([s['clean_label'] for s in pool])
    labels = np.array([s['label'] for s in pool])
    np.testing.assert_array_equal(clean_labels, fake_source['train_labels'][rows])
    np.testing.assert_array_equal([s['corrupted'] for s in pool], labels != clean_labels)
    assert (labels != clean_labels).sum() == data.n_corrupted

    clean = read_columns(data.clean_dir)
    assert set(clean) == set(CLEAN_COLUMNS) and len(clean['label']) == data.n_clean
    np.testing.assert_array_equal(clean['label'], fake_source['train_labels'][clean['train_index']])
    assert set(rows.tolist()).isdisjoint(clean['train_index'].tolist())
    assert sorted([*rows.tolist(), *clean['train_index'].tolist()]) == list(range(160))


def test_prepare_is_cached_and_rebuilds_on_other_parameters(tmp_path, fake_source, monkeypatch):
    root = tmp_path / 'out'
    first = prepare(root, limit=100, size_limit=1 << 14, progress=False)
    files = {p: p.stat().st_mtime_ns for p in root.rglob('*')}

    def no_writing(*args, **kwargs):
        raise AssertionError('a cached prepare() must not write shards')

    with monkeypatch.context() as patch:
        patch.setattr(fashion_mnist, 'write_mds', no_writing)
        again = prepare(root, limit=100, size_limit=1 << 14, progress=False)
    assert again.summary() == first.summary()
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == files

    # A build whose shards were deleted is rebuilt, not reported as done.
    shutil.rmtree(first.pool_dir)
    rebuilt = prepare(root, limit=100, size_limit=1 << 14, progress=False)
    assert rebuilt.summary() == first.summary() and (first.pool_dir / 'index.json').is_file()

    other = prepare(root, limit=100, size_limit=1 << 14, seed=1, progress=False)
    assert other.seed == 1
    assert json.loads((root / 'prepared.json').read_text())['params']['seed'] == 1
    assert len(read_columns(other.pool_dir, ['label'])['label']) == other.n_pool
    # No half-built or stale folders are left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'raw']


def test_prepare_refuses_a_folder_it_did_not_build(tmp_path, fake_source):
    root = tmp_path / 'mine'
    root.mkdir()
    (root / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        prepare(root, limit=100, progress=False)
    assert (root / 'notes.txt').read_text() == 'keep me'


def test_prepare_rejects_a_split_that_leaves_nothing(tmp_path, fake_source):
    with pytest.raises(ValueError, match='clean_fraction'):
        prepare(tmp_path / 'out', limit=10, clean_fraction=0.01, progress=False)
    assert not (tmp_path / 'out').exists()


def test_read_columns_reads_the_first_samples_in_id_order(tmp_path, fake_source):
    data = prepare(tmp_path / 'out', limit=100, size_limit=1 << 14, progress=False)
    whole = read_columns(data.pool_dir, ['train_index', 'label'])
    first = read_columns(data.pool_dir, ['train_index', 'label'], limit=7)
    for name in ('train_index', 'label'):
        np.testing.assert_array_equal(first[name], whole[name][:7])
    with pytest.raises(KeyError, match='no columns'):
        read_columns(data.pool_dir, ['caption'], limit=3)


def test_build_atomically_replaces_a_build_and_leaves_nothing_behind_a_failure(tmp_path):
    root = tmp_path / 'built'

    def build(version: int):
        def write(folder: Path) -> dict:
            (folder / 'value.txt').write_text(str(version))
            return {'version': version}
        return write

    assert build_atomically(root, build(1)) == {'version': 1}
    assert build_atomically(root, build(2)) == {'version': 2}
    assert (root / 'value.txt').read_text() == '2'
    assert json.loads((root / 'prepared.json').read_text()) == {'version': 2}

    def failing(folder: Path) -> dict:
        (folder / 'half.txt').write_text('half')
        raise RuntimeError('interrupted')

    with pytest.raises(RuntimeError, match='interrupted'):
        build_atomically(root, failing)
    # The finished build stays; the interrupted one leaves no folder beside it.
    assert (root / 'value.txt').read_text() == '2'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['built']


def test_open_streaming_retries_a_shared_memory_race():
    calls = []

    def make():
        calls.append(1)
        if len(calls) < 2:
            raise FileExistsError('prefix taken')
        return 'dataset'

    assert open_streaming(make, attempts=2) == 'dataset' and len(calls) == 2

    def always_taken():
        raise FileExistsError('prefix taken')

    with pytest.raises(FileExistsError):
        open_streaming(always_taken, attempts=2)

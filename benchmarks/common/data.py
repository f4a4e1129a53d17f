"""Data of the benchmarks: Fashion-MNIST with symmetric label noise, as MDS shards.

The real data comes from Debian's ``dataset-fashion-mnist`` package (gzipped IDX
files under ``/usr/share/datasets/fashion-mnist``); set ``JEST_STREAM_FASHION_MNIST``
to read them from another folder. :func:`prepare` turns the train split into:

- ``root/pool``: the training pool (the train split minus the clean split), with a
  ``rate`` fraction of its labels replaced by a different class. Columns: ``image``
  (uint8[28, 28]), ``label`` (the noisy label the learner trains on), ``clean_label``,
  ``corrupted`` (1 where ``label != clean_label``) and ``train_index`` (the row in the
  original train split);
- ``root/clean``: a small split with its true labels, for training a reference model.

The test split stays in memory as numpy arrays: evaluation reads it whole and does
not need streaming. :func:`build_atomically` and :func:`write_mds` are the two steps of
every MDS build here (the captioned pool of :mod:`benchmarks.common.captions` too), and
:func:`open_streaming` opens a pool for a loader.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    'CLASS_NAMES',
    'CLEAN_COLUMNS',
    'DEFAULT_SOURCE_DIR',
    'FILES',
    'IMAGE_SHAPE',
    'MARKER',
    'MEAN',
    'N_CLASSES',
    'POOL_COLUMNS',
    'PreparedData',
    'SOURCE_ENV_VAR',
    'STD',
    'batch_logits',
    'build_atomically',
    'load_fashion_mnist',
    'open_streaming',
    'prepare',
    'read_columns',
    'read_idx',
    'read_marker',
    'source_dir',
    'split_clean',
    'symmetric_label_noise',
    'to_float_images',
    'write_mds',
]

SOURCE_ENV_VAR = 'JEST_STREAM_FASHION_MNIST'
DEFAULT_SOURCE_DIR = Path('/usr/share/datasets/fashion-mnist')
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
INSTALL_HINT = 'sudo apt-get install dataset-fashion-mnist'

N_CLASSES = 10
IMAGE_SHAPE = (28, 28)
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
# Pixel statistics of the 60k train images scaled to [0, 1].
MEAN = 0.2860
STD = 0.3530

POOL_COLUMNS = {
    'image': f'ndarray:uint8:{IMAGE_SHAPE[0]},{IMAGE_SHAPE[1]}',
    'label': 'int',
    'clean_label': 'int',
    'corrupted': 'int',
    'train_index': 'int',
}
CLEAN_COLUMNS = {
    'image': POOL_COLUMNS['image'],
    'label': 'int',
    'train_index': 'int',
}

MARKER = 'prepared.json'
# Bumped whenever the layout or the columns written by prepare() change.
FORMAT_VERSION = 1
# Independent random streams of prepare(), so changing one never shifts the other.
_SPLIT_STREAM = 0
_NOISE_STREAM = 1

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


def source_dir() -> Path:
    """The folder of the raw IDX files: ``$JEST_STREAM_FASHION_MNIST`` or Debian's."""
    override = os.environ.get(SOURCE_ENV_VAR)
    return Path(override) if override else DEFAULT_SOURCE_DIR


def _missing_message(path: Path) -> str:
    return (f'{path} is missing. Fashion-MNIST is read from {path.parent}: install it with '
            f'`{INSTALL_HINT}`, or set {SOURCE_ENV_VAR} to a folder holding the gzipped IDX '
            f'files {", ".join(name for pair in FILES.values() for name in pair)}.')


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in ``.gz``) into a numpy array.

    IDX starts with a magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian
    uint32 dimensions, then the values in row-major order.

    Args:
        path (str | Path): The file.

    Returns:
        np.ndarray: The values in native byte order, shape given by the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_message(path))
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path} is not an IDX file: bad magic number {data[:4].hex()!r} '
                         f'(expected 0000 then a type code and the number of dimensions)')
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f'{path} is truncated: its header names {ndim} dimensions')
    shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f'{path} holds {len(data) - header} bytes of values, but its header '
                         f'{shape} of {dtype.name} needs {expected}: the file is damaged')
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder('='), copy=True)


def load_fashion_mnist(split: str, *, directory: str | Path | None = None,
                       limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split.

    Args:
        split (str): ``train`` (60k) or ``test`` (10k).
        directory (str | Path, optional): Folder of the IDX files; :func:`source_dir` by default.
        limit (int, optional): Keep only the first ``limit`` examples.

    Returns:
        tuple[np.ndarray, np.ndarray]: Images ``uint8[N, 28, 28]`` and labels ``int64[N]``.
    """
    if split not in FILES:
        raise ValueError(f'split={split!r} is not known; choose one of {sorted(FILES)}')
    folder = Path(directory) if directory is not None else source_dir()
    image_file, label_file = (folder / name for name in FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise ValueError(f'{image_file} holds {images.dtype}{list(images.shape)}, not '
                         f'uint8[N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}] images')
    if labels.shape != (len(images),):
        raise ValueError(f'{label_file} holds labels of shape {list(labels.shape)} for '
                         f'{len(images)} images in {image_file}')
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise ValueError(f'{label_file} holds labels outside 0..{N_CLASSES - 1}')
    if limit is not None:
        if limit <= 0:
            raise ValueError(f'limit={limit} must be positive or None')
        images, labels = images[:limit], labels[:limit]
    return images, labels


def symmetric_label_noise(labels: np.ndarray, rate: float, *,
                          seed: int | np.random.SeedSequence,
                          n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Replace a ``rate`` fraction of labels by a uniformly random *different* class.

    Exactly ``round(rate * N)`` labels change; which ones, and to what, depends only on
    ``seed``.

    Args:
        labels (np.ndarray): Integer labels ``[N]`` in ``0..n_classes-1``.
        rate (float): Fraction to corrupt, in ``[0, 1]``.
        seed (int | np.random.SeedSequence): Seed of the private generator.
        n_classes (int): Number of classes, at least 2.

    Returns:
        tuple[np.ndarray, np.ndarray]: Noisy labels ``int64[N]`` and the mask ``bool[N]``
        of the corrupted ones.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f'labels must be a 1-D integer array, got {labels.dtype}{list(labels.shape)}')
    if n_classes < 2:
        raise ValueError(f'n_classes={n_classes} must be at least 2: a corrupted label needs '
                         f'another class to move to')
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f'labels must lie in 0..{n_classes - 1} (n_classes={n_classes})')
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'rate={rate} must be in [0, 1]')
    rng = np.random.default_rng(seed)
    n = labels.size
    chosen = rng.choice(n, size=round(rate * n), replace=False)
    # A shift in 1..n_classes-1 modulo n_classes reaches every other class exactly once.
    shift = rng.integers(1, n_classes, size=chosen.size)
    noisy = labels.astype(np.int64, copy=True)
    noisy[chosen] = (noisy[chosen] + shift) % n_classes
    corrupted = np.zeros(n, dtype=bool)
    corrupted[chosen] = True
    return noisy, corrupted


def split_clean(n: int, clean_fraction: float, *,
                seed: int | np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` at random into a pool and a clean split of ``round(fraction * n)``.

    Args:
        n (int): Number of examples.
        clean_fraction (float): Fraction kept clean, in ``(0, 1)``.
        seed (int | np.random.SeedSequence): Seed of the private generator.

    Returns:
        tuple[np.ndarray, np.ndarray]: Sorted indices ``int64[n - k]`` of the pool and
        ``int64[k]`` of the clean split.
    """
    if not 0.0 < clean_fraction < 1.0:
        raise ValueError(f'clean_fraction={clean_fraction} must be in (0, 1)')
    n_clean = round(clean_fraction * n)
    if not 0 < n_clean < n:
        raise ValueError(f'clean_fraction={clean_fraction} of {n} examples leaves {n_clean} '
                         f'clean and {n - n_clean} in the pool; both must be non-empty')
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_clean:]), np.sort(order[:n_clean])


def to_float_images(images: Tensor | np.ndarray) -> Tensor:
    """Normalised float images from uint8 pixels, on the device the pixels are on.

    Args:
        images (Tensor | np.ndarray): uint8 ``[B, 28, 28]`` or ``[B, 1, 28, 28]``.

    Returns:
        Tensor: float32 ``[B, 1, 28, 28]``, ``(pixels / 255 - MEAN) / STD``.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f'expected uint8 pixels, got {images.dtype}; the images are already '
                        f'converted, or come from another dataset')
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f'expected images [B, 28, 28] or [B, 1, 28, 28], got {list(images.shape)}')
    return (images.float() / 255.0 - MEAN) / STD


def batch_logits(model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits of a collated pool or clean batch: the ``forward`` of scorers and training loops.

    Args:
        model (nn.Module): Classifier of ``[B, 1, 28, 28]`` float images.
        batch (dict): Columns of a batch; ``image`` is uint8 ``[B, 28, 28]``.

    Returns:
        Tensor: Logits ``[B, n_classes]``.
    """
    return model(to_float_images(batch['image']))


@dataclass(frozen=True)
class PreparedData:
    """What :func:`prepare` built.

    Attributes:
        root (Path): The folder holding everything.
        pool_dir (Path): MDS dataset of the noisy training pool (:data:`POOL_COLUMNS`).
        clean_dir (Path): MDS dataset of the clean split (:data:`CLEAN_COLUMNS`).
        n_pool (int): Examples in the pool.
        n_clean (int): Examples in the clean split.
        n_corrupted (int): Pool examples whose label was corrupted.
        noise_rate (float): Fraction of the pool's labels corrupted.
        clean_fraction (float): Fraction of the train split kept clean.
        seed (int): Seed of the split and of the noise.
        test_images (np.ndarray): uint8 ``[N_test, 28, 28]``.
        test_labels (np.ndarray): int64 ``[N_test]``.
    """

    root: Path
    pool_dir: Path
    clean_dir: Path
    n_pool: int
    n_clean: int
    n_corrupted: int
    noise_rate: float
    clean_fraction: float
    seed: int
    test_images: np.ndarray = field(repr=False)
    test_labels: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Paths and counts as plain JSON-ready values (no arrays), for result files."""
        return {
            'root': str(self.root), 'pool_dir': str(self.pool_dir),
            'clean_dir': str(self.clean_dir), 'n_pool': self.n_pool, 'n_clean': self.n_clean,
            'n_corrupted': self.n_corrupted, 'n_test': int(self.test_labels.size),
            'noise_rate': self.noise_rate, 'clean_fraction': self.clean_fraction,
            'seed': self.seed,
        }


def _fingerprint(folder: Path) -> dict[str, Any]:
    """Identity of the raw files, cheap to compute: replacing them invalidates the cache."""
    files = {}
    for name in FILES['train']:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(_missing_message(path))
        stat = path.stat()
        files[name] = {'bytes': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    return {'folder': str(folder.resolve()), 'files': files}


def read_marker(root: Path) -> dict[str, Any] | None:
    """The ``prepared.json`` a finished build left in ``root``; None if there is none."""
    try:
        return json.loads((root / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_mds(directory: Path, columns: dict[str, str], rows: dict[str, np.ndarray], *,
              size_limit: int, desc: str, progress: bool) -> None:
    """Write aligned numpy columns as an uncompressed MDS dataset.

    Args:
        directory (Path): The new dataset's folder.
        columns (dict[str, str]): MDS column encodings, e.g. ``{'label': 'int'}``.
        rows (dict[str, np.ndarray]): One array per column, samples on the first axis;
            1-D arrays are written as Python ints.
        size_limit (int): Bytes per shard.
        desc (str): Label of the progress bar.
        progress (bool): Show the progress bar.
    """
    from streaming import MDSWriter  # streaming takes seconds to import; only writing needs it

    n = len(next(iter(rows.values())))
    with MDSWriter(out=str(directory), columns=columns, size_limit=size_limit,
                   compression=None) as writer:
        for i in tqdm(range(n), desc=desc, unit='sample', disable=not progress, mininterval=0.5):
            writer.write({name: values[i] if values.ndim > 1 else int(values[i])
                          for name, values in rows.items()})


def build_atomically(root: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build a folder in a temporary sibling, write its marker, and rename it into place.

    An interrupted build never looks complete, and a finished one replaces an older
    ``root`` in one rename.

    Args:
        root (Path): The folder to (re)build.
        build (Callable): ``build(folder) -> marker``: writes everything into ``folder``
            and returns what ``prepared.json`` records.

    Returns:
        dict: The marker.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (unlike mkdtemp) honours the umask, so the renamed folder gets normal permissions.
    building = root.parent / f'.{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    building.mkdir()
    try:
        marker = build(building)
        (building / MARKER).write_text(json.dumps(marker, indent=2) + '\n')
        if root.exists():
            stale = Path(tempfile.mkdtemp(prefix=f'.{root.name}.stale-', dir=root.parent))
            root.rename(stale / root.name)
            shutil.rmtree(stale)
        building.rename(root)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return marker


def prepare(root: str | Path, *, noise_rate: float = 0.4, clean_fraction: float = 0.05,
            seed: int = 0, limit: int | None = None, size_limit: int = 1 << 22,
            progress: bool = True) -> PreparedData:
    """Build the noisy pool and the clean split as MDS datasets under ``root``, once.

    A completed build leaves ``root/prepared.json`` with its parameters; a later call
    with the same parameters (and the same raw files) only reads the test split. The
    build happens in a temporary sibling folder renamed into place, so an interrupted
    build never looks complete. A ``root`` built with other parameters is replaced; a
    non-empty ``root`` that :func:`prepare` did not build is refused.

    Args:
        root (str | Path): Output folder.
        noise_rate (float): Fraction of pool labels corrupted, in ``[0, 1]``.
        clean_fraction (float): Fraction of the train split kept clean, in ``(0, 1)``.
        seed (int): Seed of the split and of the noise.
        limit (int, optional): Use only the first ``limit`` train images (small test builds).
        size_limit (int): Bytes per MDS shard; the 4 MiB default cuts the full pool into
            about a dozen shards.
        progress (bool): Show progress bars while writing.

    Returns:
        PreparedData: Paths, counts and the test split.
    """
    root = Path(root)
    folder = source_dir()
    params = {
        'format_version': FORMAT_VERSION,
        'noise_rate': float(noise_rate),
        'clean_fraction': float(clean_fraction),
        'seed': int(seed),
        'limit': limit,
        'size_limit': int(size_limit),
        'source': _fingerprint(folder),
    }
    test_images, test_labels = load_fashion_mnist('test', directory=folder)
    marker = read_marker(root)
    built = all((root / name / 'index.json').is_file() for name in ('pool', 'clean'))
    if marker is None or marker.get('params') != params or not built:
        if marker is None and root.exists() and any(root.iterdir()):
            raise FileExistsError(
                f'{root} is not empty and holds no {MARKER}, so prepare() did not build it; '
                f'refusing to overwrite it. Pass an empty or new folder as the data directory.')
        marker = _build(root, params, folder, progress=progress)
    counts = marker['counts']
    return PreparedData(
        root=root, pool_dir=root / 'pool', clean_dir=root / 'clean', n_pool=counts['pool'],
        n_clean=counts['clean'], n_corrupted=counts['corrupted'], noise_rate=float(noise_rate),
        clean_fraction=float(clean_fraction), seed=int(seed), test_images=test_images,
        test_labels=test_labels)


def _build(root: Path, params: dict[str, Any], folder: Path, *, progress: bool) -> dict[str, Any]:
    images, labels = load_fashion_mnist('train', directory=folder, limit=params['limit'])
    seed = params['seed']
    pool, clean = split_clean(len(labels), params['clean_fraction'],
                              seed=np.random.SeedSequence([seed, _SPLIT_STREAM]))
    noisy, corrupted = symmetric_label_noise(
        labels[pool], params['noise_rate'], seed=np.random.SeedSequence([seed, _NOISE_STREAM]))

    def write(building: Path) -> dict[str, Any]:
        write_mds(building / 'pool', POOL_COLUMNS, {
            'image': images[pool], 'label': noisy, 'clean_label': labels[pool],
            'corrupted': corrupted.astype(np.int64), 'train_index': pool,
        }, size_limit=params['size_limit'], desc='pool', progress=progress)
        write_mds(building / 'clean', CLEAN_COLUMNS, {
            'image': images[clean], 'label': labels[clean], 'train_index': clean,
        }, size_limit=params['size_limit'], desc='clean', progress=progress)
        return {'params': params,
                'counts': {'pool': int(pool.size), 'clean': int(clean.size),
                           'corrupted': int(corrupted.sum())}}

    return build_atomically(root, write)


def read_columns(directory: str | Path, columns: list[str] | None = None, *,
                 limit: int | None = None) -> dict[str, np.ndarray]:
    """Samples of a local MDS dataset as stacked numpy columns, in stored order.

    Stored order is global sample-id order for a dataset of one stream, so row ``i`` is
    the sample a ``StreamingDataset`` over the same folder calls id ``i``. Meant for small
    splits (the clean split) and probes that a plain loop reads whole; it needs no shared
    memory, unlike a ``StreamingDataset``.

    Args:
        directory (str | Path): Folder holding ``index.json`` and the shards.
        columns (list[str], optional): Columns to read; all by default.
        limit (int, optional): Read only the first ``limit`` samples.

    Returns:
        dict[str, np.ndarray]: Column name to an array with the samples on the first axis.
    """
    from streaming import LocalDataset

    dataset = LocalDataset(str(directory))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    samples = [dataset[i] for i in range(n)]
    if not samples:
        raise ValueError(f'the MDS dataset in {directory} is empty')
    names = list(samples[0]) if columns is None else columns
    missing = [name for name in names if name not in samples[0]]
    if missing:
        raise KeyError(f'{directory} has no columns {missing}; it has {sorted(samples[0])}')
    return {name: np.stack([np.asarray(s[name]) for s in samples]) for name in names}


def open_streaming(make: Callable[[], Any], attempts: int = 5) -> Any:
    """``make()`` (a ``StreamingDataset`` constructor call), retried on a shared-memory race.

    Streaming picks a free shared-memory prefix, then creates it: another process that
    starts a dataset between the two steps makes the creation fail with
    ``FileExistsError``. Picking again a moment later succeeds.

    Args:
        make (Callable): Builds the dataset.
        attempts (int): Tries before the error is raised.

    Returns:
        The dataset.
    """
    for attempt in range(attempts):
        try:
            return make()
        except FileExistsError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError('unreachable')

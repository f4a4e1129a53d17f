"""The reference cache: a frozen reference model's outputs, computed once, keyed by sample id.

A cache is a *sidecar* folder next to the dataset, never a column of it: MDS shards are
immutable and often remote, and one dataset can have caches of several reference models
side by side. Layout::

    <cache>/manifest.json          fingerprint, sizes, output kinds, constants, completeness
    <cache>/parts/part-000000.bin  sample ids [0, part_size)
    <cache>/parts/part-000001.bin  sample ids [part_size, 2 * part_size) ...

Each part holds the outputs of a contiguous range of global sample ids: a magic number,
a small JSON header (part number, id range, store digest, sizes, BLAKE2b checksum of the
payload) and a zstandard frame of the raw little-endian arrays, one per output kind, in
the manifest's order. Parts are written to a temporary file and renamed into place, so an
interrupted annotation never leaves a half part that looks finished.

The manifest's fingerprint ties the cache to the dataset (a hash of its ``index.json``
files), the reference model (a hash of its ``state_dict``), the input transform (a string
the user chooses) and the format version. :class:`ReferenceCache` checks it on opening,
checks every part when it first reads it, and raises :class:`CacheError` subclasses that
name the problem and the fix: nothing missing or damaged ever reads as zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor, nn

__all__ = [
    'FORMAT_VERSION',
    'OUTPUT_KINDS',
    'OUTPUT_GROUPS',
    'DEFAULT_PART_SIZE',
    'CacheError',
    'FingerprintMismatch',
    'IncompleteCache',
    'CorruptPart',
    'Fingerprint',
    'dataset_fingerprint',
    'model_checksum',
    'CacheWriter',
    'ReferenceCache',
]

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
PARTS = 'parts'
MAGIC = b'JSREFPT1'
DEFAULT_PART_SIZE = 8192
DEFAULT_MAX_BYTES = 512 << 20

# Stored dtype of each output kind. The per-example loss stays float32, so a cached
# reference scores exactly like the live one; embeddings are stored in float16.
OUTPUT_KINDS: dict[str, str] = {'loss': '<f4', 'image_emb': '<f2', 'text_emb': '<f2'}
# What `annotate --outputs` names: the kinds one kind of scorer needs.
OUTPUT_GROUPS: dict[str, tuple[str, ...]] = {
    'loss': ('loss',),
    'embeddings': ('image_emb', 'text_emb'),
}
# Scalars stored in the manifest, by output group.
CONSTANTS: dict[str, tuple[str, ...]] = {'loss': (), 'embeddings': ('temperature', 'bias')}

_REANNOTATE = ('run `jest-stream annotate` (or jest_stream.annotate.annotate) again with the '
               'same settings and --out')
_MISMATCH_FIX = {
    'dataset': 'The dataset changed since it was annotated (or this cache belongs to another '
               'one): open the cache that belongs to this dataset',
    'model': 'Pass the checksum of the reference model that was annotated '
             '(jest_stream.cache.model_checksum(checkpoint))',
    'transform': 'Pass the transform identity that was given to annotate',
}


class CacheError(RuntimeError):
    """A reference cache that cannot be used as asked."""


class FingerprintMismatch(CacheError):
    """The cache was made for another dataset, model, transform or format."""


class IncompleteCache(CacheError):
    """Outputs are missing: the annotation did not finish, or ids lie outside the cache."""


class CorruptPart(CacheError):
    """A part file is truncated, damaged, or belongs to another cache."""


@dataclass(frozen=True)
class Fingerprint:
    """What a cache's outputs depend on.

    Attributes:
        dataset (str): Hash of the dataset's ``index.json`` file(s) (:func:`dataset_fingerprint`).
        model (str): Hash of the reference model's ``state_dict`` (:func:`model_checksum`).
        transform (str): The user's name for the input transform the reference saw.
        format_version (int): Version of the cache format.
    """

    dataset: str
    model: str
    transform: str
    format_version: int = FORMAT_VERSION

    def digest(self) -> str:
        """A short hash of all fields; every part file carries it."""
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(text, digest_size=8).hexdigest()


def _index_files(dataset: Any) -> list[Path]:
    streams = getattr(dataset, 'streams', None)
    if streams is not None:  # a StreamingDataset: one index per stream, in stream order
        return [Path(stream.local) / (stream.split or '') / 'index.json' for stream in streams]
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        return [path if path.name == 'index.json' else path / 'index.json']
    raise TypeError(
        f'dataset must be a StreamingDataset or the local folder of an MDS dataset, got '
        f'{type(dataset).__name__}')


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of the dataset's ``index.json`` file(s): its shards, sample counts and columns.

    Args:
        dataset (StreamingDataset | str | PathLike): A ``StreamingDataset`` (every stream's
            index, in stream order), or the local folder of an MDS dataset.

    Returns:
        str: A hex SHA-256 digest; equal for a folder and a single-stream dataset over it.
    """
    digest = hashlib.sha256()
    for path in _index_files(dataset):
        if not path.is_file():
            raise FileNotFoundError(
                f'{path} is missing: the dataset fingerprint hashes the MDS index. Point at the '
                f'folder that holds index.json (a StreamingDataset downloads it on creation)')
        data = path.read_bytes()
        digest.update(struct.pack('<Q', len(data)))
        digest.update(data)
    return digest.hexdigest()


def model_checksum(model: nn.Module | Mapping[str, Tensor] | str | os.PathLike) -> str:
    """A hash of a model's ``state_dict``: names, dtypes, shapes and values.

    Args:
        model (nn.Module | Mapping[str, Tensor] | str | PathLike): The model, its
            ``state_dict``, or a checkpoint file saved with ``torch.save(model.state_dict())``.

    Returns:
        str: A hex SHA-256 digest. A model and the checkpoint it was loaded from hash alike
        (when the checkpoint holds the same entries in the same dtypes).
    """
    if isinstance(model, (str, os.PathLike)):
        model = torch.load(model, map_location='cpu', weights_only=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise TypeError(f'expected a model, a state_dict or a checkpoint of one, got '
                        f'{type(state).__name__}')
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, Tensor):
            raise TypeError(f'state_dict entry {name!r} is a {type(tensor).__name__}, not a Tensor')
        tensor = tensor.detach().to('cpu').contiguous()
        digest.update(f'{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _part_name(part: int) -> str:
    return f'part-{part:06d}.bin'


def _payload_checksum(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def _row_bytes(outputs: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(np.dtype(spec['dtype']).itemsize * int(np.prod(spec['shape'], dtype=np.int64))
               for spec in outputs.values())


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise IncompleteCache(
            f'{path} holds no reference cache ({MANIFEST} is missing); create it with '
            f'`jest-stream annotate --out {path} ...`') from None
    except json.JSONDecodeError as error:
        raise CorruptPart(f'{file} is not valid JSON ({error}); delete the folder and '
                          f'annotate again') from None


def _write_atomically(file: Path, data: bytes) -> None:
    tmp = file.with_name(f'.{file.name}.tmp-{os.getpid()}')
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _decode_part(file: Path, data: bytes, *, part: int, start: int, stop: int, store: str,
                 row_bytes: int) -> bytes:
    """The raw payload of a part file, after checking every field; :class:`CorruptPart` if not."""
    fix = f'delete {file} and {_REANNOTATE} (finished parts are kept)'
    if len(data) < len(MAGIC) + 4 or data[:len(MAGIC)] != MAGIC:
        raise CorruptPart(f'{file} is not a reference cache part (bad magic number); {fix}')
    (header_len,) = struct.unpack_from('<I', data, len(MAGIC))
    body = len(MAGIC) + 4 + header_len
    try:
        header = json.loads(data[len(MAGIC) + 4:body])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptPart(f'{file} has a damaged header (truncated?); {fix}') from None
    if header.get('store') != store:
        raise CorruptPart(f'{file} belongs to another cache (store {header.get("store")}, this '
                          f'cache is {store}); {fix}')
    if (header.get('part'), header.get('start'), header.get('stop')) != (part, start, stop):
        raise CorruptPart(f'{file} holds part {header.get("part")} (ids {header.get("start")}..'
                          f'{header.get("stop")}), not part {part} (ids {start}..{stop}); {fix}')
    payload = data[body:]
    if len(payload) != header['payload_bytes']:
        raise CorruptPart(f'{file} is truncated: {len(payload)} of {header["payload_bytes"]} '
                          f'payload bytes; {fix}')
    if _payload_checksum(payload) != header['checksum']:
        raise CorruptPart(f'{file} fails its checksum: the file is damaged; {fix}')
    expected = (stop - start) * row_bytes
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as error:
        raise CorruptPart(f'{file} does not decompress ({error}); {fix}') from None
    if len(raw) != expected:
        raise CorruptPart(f'{file} holds {len(raw)} bytes of outputs, not {expected} '
                          f'({stop - start} samples); {fix}')
    return raw


class _Layout:
    """Sizes shared by writer and reader, from a manifest."""

    def __init__(self, manifest: Mapping[str, Any]) -> None:
        self.num_samples = int(manifest['num_samples'])
        self.part_size = int(manifest['part_size'])
        self.num_parts = -(-self.num_samples // self.part_size)

    def part_range(self, part: int) -> tuple[int, int]:
        start = part * self.part_size
        return start, min(start + self.part_size, self.num_samples)


class CacheWriter:
    """Writes the parts of a cache, and resumes a cache that an earlier run left unfinished.

    The manifest is written on creation, so a resumed run can check that it continues
    the same annotation; output shapes and constants (temperature, bias) are recorded
    with the first part and checked against every later one.

    Args:
        path (str | PathLike): The cache folder (created if missing).
        fingerprint (Fingerprint): What the outputs depend on.
        num_samples (int): Samples in the dataset (ids ``0 .. num_samples - 1``).
        group (str): ``loss`` or ``embeddings`` (:data:`OUTPUT_GROUPS`).
        part_size (int): Samples per part file.
        level (int): zstandard compression level.
        info (Mapping, optional): Plain values recorded in the manifest for people to read
            (where the dataset and the model came from); never checked.

    Raises:
        FingerprintMismatch: ``path`` holds a cache of another dataset, model, transform,
            size or output kind.
    """

    def __init__(self, path: str | os.PathLike, *, fingerprint: Fingerprint, num_samples: int,
                 group: str, part_size: int = DEFAULT_PART_SIZE, level: int = 3,
                 info: Mapping[str, Any] | None = None) -> None:
        if group not in OUTPUT_GROUPS:
            raise ValueError(f'outputs={group!r} is not known; choose one of '
                             f'{sorted(OUTPUT_GROUPS)}')
        if num_samples <= 0:
            raise ValueError(f'the dataset has {num_samples} samples; there is nothing to annotate')
        if part_size <= 0:
            raise ValueError(f'part_size={part_size} must be positive')
        self.path = Path(path)
        self.parts_dir = self.path / PARTS
        self.level = level
        wanted = {
            'format_version': FORMAT_VERSION,
            'fingerprint': asdict(fingerprint),
            'num_samples': int(num_samples),
            'part_size': int(part_size),
            'group': group,
        }
        if (self.path / MANIFEST).exists():
            manifest = _read_manifest(self.path)
            for key, value in wanted.items():
                if manifest.get(key) != value:
                    raise FingerprintMismatch(
                        f'{self.path} already holds a cache with {key}={manifest.get(key)!r}, '
                        f'but this annotation has {key}={value!r}. Write to another --out, or '
                        f'delete {self.path} to start over')
            self.manifest = manifest
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(f'.{MANIFEST}.tmp-*'):
                stale.unlink()  # a run killed while writing its first manifest
            if any(self.path.iterdir()):
                raise FileExistsError(
                    f'{self.path} is not empty and holds no {MANIFEST}; refusing to write a '
                    f'cache into it. Choose an empty or new folder for --out')
            self.manifest = {
                **wanted,
                'outputs': {kind: {'dtype': OUTPUT_KINDS[kind], 'shape': None}
                            for kind in OUTPUT_GROUPS[group]},
                'constants': {},
                'compression': 'zstd',
                'complete': False,
                'info': dict(info or {}),
            }
            self._save_manifest()
        self.parts_dir.mkdir(exist_ok=True)
        for stale in self.parts_dir.glob('.*.tmp-*'):
            stale.unlink()  # a temporary part of a killed run; the part is redone
        self.layout = _Layout(self.manifest)
        self.store = Fingerprint(**self.manifest['fingerprint']).digest()
        self._done: set[int] = set()  # parts written or checked by this writer

    @property
    def num_parts(self) -> int:
        return self.layout.num_parts

    def part_range(self, part: int) -> tuple[int, int]:
        """Sample ids ``[start, stop)`` of ``part``."""
        return self.layout.part_range(part)

    def _save_manifest(self) -> None:
        _write_atomically(self.path / MANIFEST,
                          (json.dumps(self.manifest, indent=2) + '\n').encode())

    def is_done(self, part: int) -> bool:
        """Whether ``part`` is on disk and passes every check (a damaged one is redone)."""
        file = self.parts_dir / _part_name(part)
        shapes_known = all(spec['shape'] is not None for spec in self.manifest['outputs'].values())
        if not file.exists() or not shapes_known:
            return False
        start, stop = self.part_range(part)
        try:
            _decode_part(file, file.read_bytes(), part=part, start=start, stop=stop,
                         store=self.store, row_bytes=_row_bytes(self.manifest['outputs']))
        except CorruptPart:
            return False
        return True

    def pending_parts(self) -> list[int]:
        """Parts still to write, in order; each part on disk is checked once per writer."""
        self._done.update(part for part in range(self.num_parts)
                          if part not in self._done and self.is_done(part))
        return [part for part in range(self.num_parts) if part not in self._done]

    def write_part(self, part: int, arrays: Mapping[str, np.ndarray],
                   constants: Mapping[str, float] | None = None) -> Path:
        """Write one part atomically.

        Args:
            part (int): Part number.
            arrays (Mapping[str, np.ndarray]): Every output kind of the cache, each
                ``[stop - start, *shape]`` (cast to the stored dtype).
            constants (Mapping[str, float], optional): Temperature and bias, for embeddings.

        Returns:
            Path: The part file.
        """
        start, stop = self.part_range(part)
        outputs = self.manifest['outputs']
        if set(arrays) != set(outputs):
            raise ValueError(f'part {part} has outputs {sorted(arrays)}; the cache holds '
                             f'{sorted(outputs)}')
        changed = False
        chunks = []
        for kind, spec in outputs.items():
            array = np.ascontiguousarray(arrays[kind], dtype=np.dtype(spec['dtype']))
            if array.shape[0] != stop - start:
                raise ValueError(f'part {part} needs {stop - start} rows of {kind!r}, got '
                                 f'{array.shape[0]}')
            if spec['shape'] is None:
                spec['shape'] = list(array.shape[1:])
                changed = True
            elif list(array.shape[1:]) != spec['shape']:
                raise ValueError(f'{kind!r} has shape {list(array.shape[1:])} per sample in '
                                 f'part {part} but {spec["shape"]} in the cache')
            chunks.append(array.tobytes())
        for name in CONSTANTS[self.manifest['group']]:
            value = None if constants is None else constants.get(name)
            if value is None:
                raise ValueError(f'embeddings caches store the reference {name}; part {part} '
                                 f'came without it')
            stored = self.manifest['constants'].get(name)
            if stored is None:
                self.manifest['constants'][name] = float(value)
                changed = True
            elif stored != float(value):
                raise ValueError(
                    f'the reference {name} was {stored} for earlier parts but {float(value)} for '
                    f'part {part}: a frozen reference has one {name}; check that the model is '
                    f'not training')
        if changed:
            self._save_manifest()
        payload = zstandard.ZstdCompressor(level=self.level).compress(b''.join(chunks))
        header = json.dumps({
            'part': part, 'start': start, 'stop': stop, 'store': self.store,
            'payload_bytes': len(payload), 'checksum': _payload_checksum(payload),
        }, sort_keys=True).encode()
        file = self.parts_dir / _part_name(part)
        _write_atomically(file, MAGIC + struct.pack('<I', len(header)) + header + payload)
        self._done.add(part)
        return file

    def finish(self) -> None:
        """Mark the cache complete; every part must be on disk and valid."""
        missing = self.pending_parts()
        if missing:
            raise IncompleteCache(f'{self.path}: parts {_describe(missing)} are missing or '
                                  f'damaged; {_REANNOTATE}')
        self.manifest['complete'] = True
        self._save_manifest()


def _describe(values: Sequence[int], limit: int = 8) -> str:
    shown = ', '.join(map(str, values[:limit]))
    return f'[{shown}{", ..." if len(values) > limit else ""}] ({len(values)})'


class ReferenceCache:
    """Stored reference outputs, read by sample id: a ``ReferenceTable`` for the scorers.

    Plug it in where a reference model would go::

        cache = ReferenceCache('data/pool.ref', dataset=dataset,
                               model_checksum=model_checksum('reference.pt'),
                               transform='fmnist-normalised')
        scorer = ClassificationScorer(learner, reference=cache, input_key=..., target_key=...)

    Opening reads only the manifest and checks the fingerprint; part files are opened
    when first needed, checked (size, checksum, id range) and kept decompressed in a
    bounded LRU cache. The object pickles without its buffers, so it can be sent to
    DataLoader workers or another process.

    Args:
        path (str | PathLike): The cache folder written by ``jest-stream annotate``.
        dataset (StreamingDataset | str | PathLike): The dataset being trained on, or its
            local folder: its index must be the one annotated.
        model_checksum (str | None): :func:`model_checksum` of the reference model (or of its
            checkpoint). Pass None explicitly to skip this check.
        transform (str | None): The transform identity given to ``annotate``. Pass None
            explicitly to skip this check.
        kinds (Sequence[str], optional): Output kinds the caller needs (``loss``, or
            ``image_emb`` and ``text_emb``); checked on opening.
        max_bytes (int): Bound on the decompressed parts held in memory.
        allow_incomplete (bool): Open a cache whose annotation has not finished; ids of
            missing parts then raise when read.

    Raises:
        FingerprintMismatch: The cache is of another dataset, model, transform or format.
        IncompleteCache: The annotation did not finish, or part files are missing.
        CacheError: A requested kind is not stored.
    """

    def __init__(self, path: str | os.PathLike, *, dataset: Any, model_checksum: str | None,
                 transform: str | None, kinds: Iterable[str] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        version = manifest.get('format_version')
        if version != FORMAT_VERSION:
            raise FingerprintMismatch(
                f'{self.path} has cache format version {version!r}; this jest_stream reads '
                f'version {FORMAT_VERSION}. Re-annotate the dataset with this version')
        self.fingerprint = Fingerprint(**manifest['fingerprint'])
        expected = {'dataset': dataset_fingerprint(dataset), 'model': model_checksum,
                    'transform': transform}
        for field, value in expected.items():
            stored = getattr(self.fingerprint, field)
            if value is not None and stored != value:
                origin = manifest.get('info', {}).get(field)
                raise FingerprintMismatch(
                    f'the reference cache {self.path} was made for another {field}: stored '
                    f'{field} {stored!r}'
                    + (f' (annotated from {origin})' if origin else '')
                    + f', expected {value!r}. '
                    + _MISMATCH_FIX[field] + f'; or re-annotate: run `jest-stream annotate` '
                    f'with the current {field} into a new --out folder')
        self.manifest = manifest
        self.layout = _Layout(manifest)
        self.store = self.fingerprint.digest()
        self.kinds = tuple(manifest['outputs'])
        self.constants = dict(manifest['constants'])
        missing_kinds = [kind for kind in (kinds or ()) if kind not in self.kinds]
        if missing_kinds:
            raise CacheError(
                f'the reference cache {self.path} stores {list(self.kinds)}, not '
                f'{missing_kinds}: annotate with --outputs '
                f'{"embeddings" if "loss" in self.kinds else "loss"} for that scorer')
        if not allow_incomplete:
            self._check_complete()
        self.max_bytes = int(max_bytes)
        self._row_bytes = _row_bytes(manifest['outputs'])
        self._reset()

    def _check_complete(self) -> None:
        names = {p.name for p in (self.path / PARTS).glob('part-*.bin')}
        missing = [part for part in range(self.layout.num_parts) if _part_name(part) not in names]
        if not self.manifest.get('complete') or missing:
            done = self.layout.num_parts - len(missing)
            raise IncompleteCache(
                f'the reference cache {self.path} is incomplete: {done} of '
                f'{self.layout.num_parts} parts are on disk'
                + (f' (missing: {_describe(missing)})' if missing else '')
                + f'. The annotation did not finish; {_REANNOTATE} to complete it '
                f'(or pass allow_incomplete=True to read the finished parts only)')

    def _reset(self) -> None:
        self._parts: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._held_bytes = 0
        self._lock = threading.Lock()
        self.stats = {'parts_read': 0, 'bytes_read': 0, 'hits': 0, 'misses': 0}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ('_parts', '_held_bytes', '_lock', 'stats'):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    def __len__(self) -> int:
        return self.layout.num_samples

    def __repr__(self) -> str:
        return (f'ReferenceCache({str(self.path)!r}, kinds={list(self.kinds)}, '
                f'num_samples={self.num_samples}, part_size={self.layout.part_size})')

    def _load(self, part: int) -> dict[str, np.ndarray]:
        start, stop = self.layout.part_range(part)
        file = self.path / PARTS / _part_name(part)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise IncompleteCache(
                f'sample ids {start}..{stop - 1} are not in the reference cache {self.path}: '
                f'{file.name} is missing (the annotation did not finish, or the file was '
                f'removed); {_REANNOTATE} to complete it') from None
        raw = _decode_part(file, data, part=part, start=start, stop=stop, store=self.store,
                           row_bytes=self._row_bytes)
        arrays, offset = {}, 0
        for kind, spec in self.manifest['outputs'].items():
            dtype = np.dtype(spec['dtype'])
            count = (stop - start) * int(np.prod(spec['shape'], dtype=np.int64))
            arrays[kind] = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(
                stop - start, *spec['shape'])
            offset += count * dtype.itemsize
        self.stats['parts_read'] += 1
        self.stats['bytes_read'] += len(data)
        return arrays

    def _part(self, part: int) -> dict[str, np.ndarray]:
        with self._lock:
            arrays = self._parts.get(part)
            if arrays is not None:
                self._parts.move_to_end(part)
                self.stats['hits'] += 1
                return arrays
        arrays = self._load(part)
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:
            self.stats['misses'] += 1
            if part not in self._parts:
                self._parts[part] = arrays
                self._held_bytes += size
            # Keep at least the part just read, even when it alone exceeds the bound.
            while self._held_bytes > self.max_bytes and len(self._parts) > 1:
                _, old = self._parts.popitem(last=False)
                self._held_bytes -= sum(a.nbytes for a in old.values())
        return arrays

    def read(self, sample_ids: Tensor | np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """The stored arrays of ``sample_ids``, in their order.

        Args:
            sample_ids (LongTensor[B] | array | list): Global sample ids.

        Returns:
            dict[str, np.ndarray]: Each kind as ``[B, *shape]`` in its stored dtype.
        """
        if isinstance(sample_ids, Tensor):
            sample_ids = sample_ids.detach().to('cpu')
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        bad = (ids < 0) | (ids >= self.num_samples)
        if bad.any():
            shown = _describe(ids[bad].tolist())
            raise IncompleteCache(
                f'sample ids {shown} are outside the reference cache {self.path}, which holds '
                f'ids 0..{self.num_samples - 1}: the cache was annotated for a smaller dataset '
                f'(or the ids are not global sample ids); re-annotate this dataset')
        out = {kind: np.empty((len(ids), *spec['shape']), dtype=np.dtype(spec['dtype']))
               for kind, spec in self.manifest['outputs'].items()}
        parts = ids // self.layout.part_size
        for part in np.unique(parts).tolist():
            rows = np.nonzero(parts == part)[0]
            arrays = self._part(part)
            local = ids[rows] - part * self.layout.part_size
            for kind, array in arrays.items():
                out[kind][rows] = array[local]
        return out

    def outputs(self, batch: Any, sample_ids: Tensor) -> dict[str, Any]:
        """The ``ReferenceTable`` protocol: stored outputs of the batch's samples.

        Args:
            batch (Batch): The super-batch (unused: outputs are found by id).
            sample_ids (LongTensor[B]): Global sample ids of its rows.

        Returns:
            dict: ``loss`` (``Tensor[B]`` float32), or ``image_emb`` and ``text_emb``
            (``Tensor[B, d]`` float16) with ``temperature`` and ``bias`` (floats).
        """
        out: dict[str, Any] = {kind: torch.from_numpy(array)
                               for kind, array in self.read(sample_ids).items()}
        out.update(self.constants)
        return out


"""The on-disk format of the reference cache: constants, fingerprint, manifest and part files.

A cache is a folder::

    <cache>/manifest.json          fingerprint, sizes, output kinds, constants, completeness
    <cache>/parts/part-000000.bin  sample ids [0, part_size)
    <cache>/parts/part-000001.bin  sample ids [part_size, 2 * part_size) ...

Every byte of both files is checked when it is read, so damage raises a
:class:`~jest_stream.cache.errors.DamagedCache` naming the file, never another exception and
never a wrong value:

- The manifest is ASCII JSON with a ``digest`` field, the BLAKE2b-128 of the canonical JSON
  (sorted keys, no spaces) of every other field, and it must match a schema: known keys
  only, types and ranges, and each output kind's dtype and shape as the format requires.
- A part file is ``MAGIC`` (8 bytes), the header length (uint32) and the payload length
  (uint64), a canonical JSON header (part, start, stop, store), the payload (one zstandard
  frame of the raw little-endian arrays, one per output kind in :data:`OUTPUT_GROUPS`
  order), and a BLAKE2b-128 checksum of every byte before it.

The functions here are pure over bytes and paths; the writer and the reader call them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor, nn

from jest_stream.cache.errors import (
    CorruptManifest,
    CorruptPart,
    FingerprintMismatch,
    IncompleteCache,
)
from jest_stream.errors import JestStreamError, SettingTypeError

__all__ = [
    'FORMAT_VERSION',
    'MANIFEST',
    'PARTS',
    'MAGIC',
    'DEFAULT_PART_SIZE',
    'DEFAULT_MAX_BYTES',
    'OUTPUT_KINDS',
    'OUTPUT_GROUPS',
    'CONSTANTS',
    'REANNOTATE',
    'DatasetIndexNotFound',
    'Fingerprint',
    'dataset_fingerprint',
    'model_checksum',
    'Layout',
    'part_name',
    'row_bytes',
    'encode_manifest',
    'read_manifest',
    'check_manifest',
    'encode_part',
    'decode_part',
    'write_atomically',
    'describe',
]

logger = logging.getLogger(__name__)

# Version 2: manifest digest and schema, whole-file checksum of parts, fixed payload order.
FORMAT_VERSION = 2
MANIFEST = 'manifest.json'
PARTS = 'parts'
MAGIC = b'JSREFPT2'
_OLD_MAGICS = {b'JSREFPT1': 1}
_PREFIX = struct.Struct('<8sIQ')  # magic, header bytes, payload bytes
_CHECKSUM_BYTES = 16
DEFAULT_PART_SIZE = 8192
DEFAULT_MAX_BYTES = 512 << 20
_MAX_WIDTH = 1 << 20  # the largest embedding width a manifest may declare

# Stored dtype of each output kind. The per-example loss stays float32, so a cached
# reference scores exactly like the live one; embeddings are stored in float16.
OUTPUT_KINDS: dict[str, str] = {'loss': '<f4', 'image_emb': '<f2', 'text_emb': '<f2'}
# Shape of one sample's output of each kind: () a scalar, ('d',) a vector of any width.
_SAMPLE_RANK: dict[str, int] = {'loss': 0, 'image_emb': 1, 'text_emb': 1}
# What `annotate --outputs` names: the kinds one kind of scorer needs, in payload order.
OUTPUT_GROUPS: dict[str, tuple[str, ...]] = {
    'loss': ('loss',),
    'embeddings': ('image_emb', 'text_emb'),
}
# Scalars stored in the manifest, by output group.
CONSTANTS: dict[str, tuple[str, ...]] = {'loss': (), 'embeddings': ('temperature', 'bias')}

REANNOTATE = ('run `jest-stream annotate` (or jest_stream.annotate) again with the same '
              'settings and --out')
_MANIFEST_KEYS = frozenset({'format_version', 'fingerprint', 'num_samples', 'part_size', 'group',
                            'outputs', 'constants', 'compression', 'complete', 'info', 'digest'})
_HEADER_KEYS = frozenset({'part', 'start', 'stop', 'store'})
_HEX = re.compile(r'[0-9a-f]+')


class DatasetIndexNotFound(JestStreamError, FileNotFoundError):
    """The ``index.json`` of an MDS dataset is not where the caller pointed."""


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
        """A short hash of all fields; every part file carries it (16 hex digits)."""
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(text, digest_size=8).hexdigest()


def _index_files(dataset: Any) -> list[Path]:
    streams = getattr(dataset, 'streams', None)
    if streams is not None:  # a StreamingDataset: one index per stream, in stream order
        return [Path(stream.local) / (stream.split or '') / 'index.json' for stream in streams]
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        return [path if path.name == 'index.json' else path / 'index.json']
    raise SettingTypeError(
        f'dataset must be a StreamingDataset or the local folder of an MDS dataset, got '
        f'{type(dataset).__name__}')


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of the dataset's ``index.json`` file(s): its shards, sample counts and columns.

    Args:
        dataset (StreamingDataset | str | PathLike): A ``StreamingDataset`` (every stream's
            index, in stream order), or the local folder of an MDS dataset.

    Returns:
        str: A hex SHA-256 digest; equal for a folder and a single-stream dataset over it.

    Raises:
        DatasetIndexNotFound: An ``index.json`` is missing.
        SettingTypeError: ``dataset`` is neither a dataset nor a path.
    """
    digest = hashlib.sha256()
    for path in _index_files(dataset):
        if not path.is_file():
            raise DatasetIndexNotFound(
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

    Raises:
        SettingTypeError: ``model`` (or the checkpoint's content) is not a state_dict of tensors.
    """
    if isinstance(model, (str, os.PathLike)):
        model = torch.load(model, map_location='cpu', weights_only=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise SettingTypeError(f'expected a model, a state_dict or a checkpoint of one, got '
                               f'{type(state).__name__}')
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, Tensor):
            raise SettingTypeError(
                f'state_dict entry {name!r} is a {type(tensor).__name__}, not a Tensor')
        tensor = tensor.detach().to('cpu').contiguous()
        digest.update(f'{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Layout:
    """Sizes shared by writer and reader, from a checked manifest.

    Args:
        manifest (Mapping): A manifest that passed :func:`check_manifest`.
    """

    def __init__(self, manifest: Mapping[str, Any]) -> None:
        self.num_samples = int(manifest['num_samples'])
        self.part_size = int(manifest['part_size'])
        self.num_parts = -(-self.num_samples // self.part_size)

    def part_range(self, part: int) -> tuple[int, int]:
        """Sample ids ``[start, stop)`` of ``part``."""
        start = part * self.part_size
        return start, min(start + self.part_size, self.num_samples)


def part_name(part: int) -> str:
    """The file name of part number ``part``."""
    return f'part-{part:06d}.bin'


def row_bytes(outputs: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes of one sample's outputs, all kinds together (shapes must be known)."""
    return sum(np.dtype(spec['dtype']).itemsize * int(np.prod(spec['shape'], dtype=np.int64))
               for spec in outputs.values())


def describe(values: Sequence[int], limit: int = 8) -> str:
    """``[a, b, ...] (n)``: the first ``limit`` values and the count."""
    shown = ', '.join(map(str, values[:limit]))
    return f'[{shown}{", ..." if len(values) > limit else ""}] ({len(values)})'


def write_atomically(file: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``file``, flush it to disk, rename it over.

    The temporary file is ``.<name>.tmp-<pid>``; only the writer that holds the cache's
    lock removes such files (see :mod:`jest_stream.cache.lock`).
    """
    tmp = file.with_name(f'.{file.name}.tmp-{os.getpid()}')
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


# --- strict JSON -------------------------------------------------------------------------

def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=True,
                      allow_nan=False).encode('ascii')


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError('a key appears twice')
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f'{name} is not a JSON number')


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f'{text} is beyond the range of a float')
    return value


def _strict_json(data: bytes) -> Any:
    """Parse ASCII JSON, refusing NaN, infinities and repeated keys (``ValueError``)."""
    return json.loads(data.decode('ascii'), object_pairs_hook=_no_duplicates,
                      parse_constant=_refuse_constant, parse_float=_finite_float)


def _is_int(value: Any, low: int, high: int = (1 << 62)) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# --- the manifest ------------------------------------------------------------------------

def _manifest_digest(fields: Mapping[str, Any]) -> str:
    return hashlib.blake2b(_canonical(dict(fields)), digest_size=16).hexdigest()


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The bytes of ``manifest`` (without ``digest``) as stored: ASCII JSON with its digest.

    Args:
        manifest (Mapping): Every manifest field but ``digest``.

    Returns:
        bytes: Indented ASCII JSON whose ``digest`` covers every other field.
    """
    fields = {key: value for key, value in manifest.items() if key != 'digest'}
    stored = {**fields, 'digest': _manifest_digest(fields)}
    return (json.dumps(stored, indent=2, ensure_ascii=True, allow_nan=False) + '\n').encode()


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the cache folder ``path`` (without its ``digest``).

    Args:
        path (Path): The cache folder.

    Returns:
        dict: The manifest's fields.

    Raises:
        IncompleteCache: The folder holds no manifest.
        FingerprintMismatch: The cache was written in another format version.
        CorruptManifest: The manifest does not parse, fails its digest, or breaks the schema.
    """
    file = path / MANIFEST
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise IncompleteCache(
            f'{path} holds no reference cache ({MANIFEST} is missing); create it with '
            f'`jest-stream annotate --out {path} ...`') from None
    fix = f'delete {path} and annotate again'
    try:
        stored = _strict_json(data)
    except ValueError as error:  # also UnicodeDecodeError
        raise CorruptManifest(f'{file} is damaged: it is not ASCII JSON ({error}); {fix}') from None
    if not isinstance(stored, dict):
        raise CorruptManifest(f'{file} is damaged: it holds a {type(stored).__name__}, not an '
                              f'object; {fix}')
    version = stored.get('format_version')
    if 'digest' not in stored and _is_int(version, 0) and version < FORMAT_VERSION:
        raise FingerprintMismatch(
            f'{path} has cache format version {version}; this jest_stream reads version '
            f'{FORMAT_VERSION}. Re-annotate the dataset with this version: run `jest-stream '
            f'annotate` into a new --out folder (or delete {path} first)')
    fields = {key: value for key, value in stored.items() if key != 'digest'}
    if stored.get('digest') != _manifest_digest(fields):
        raise CorruptManifest(f'{file} is damaged: it fails its digest (it was changed after it '
                              f'was written); {fix}')
    if version != FORMAT_VERSION:
        raise FingerprintMismatch(
            f'{path} has cache format version {version!r}; this jest_stream reads version '
            f'{FORMAT_VERSION}. Use the jest_stream that wrote it, or re-annotate the dataset '
            f'into a new --out folder')
    problem = check_manifest(fields)
    if problem:
        raise CorruptManifest(f'{file} is damaged: {problem}; {fix}')
    return fields


def check_manifest(manifest: Mapping[str, Any]) -> str | None:
    """What breaks the manifest schema (None if nothing does).

    Args:
        manifest (Mapping): Every manifest field but ``digest``.

    Returns:
        str | None: The first problem found, in words.
    """
    keys = set(manifest) | {'digest'}
    if keys != _MANIFEST_KEYS:
        return (f'its fields are {sorted(keys)}, not {sorted(_MANIFEST_KEYS)}')
    problem = _check_fingerprint(manifest['fingerprint'])
    if problem:
        return problem
    for name in ('num_samples', 'part_size'):
        if not _is_int(manifest[name], 1):
            return f'{name}={manifest[name]!r} is not a positive integer'
    group = manifest['group']
    if group not in OUTPUT_GROUPS:
        return f'group={group!r} is not one of {sorted(OUTPUT_GROUPS)}'
    if manifest['compression'] != 'zstd':
        return f'compression={manifest["compression"]!r} is not zstd'
    if not isinstance(manifest['complete'], bool) or not isinstance(manifest['info'], dict):
        return 'complete is not a boolean or info is not an object'
    return (_check_outputs(manifest['outputs'], group, manifest['complete'])
            or _check_constants(manifest['constants'], group, manifest['complete']))


def _check_fingerprint(fingerprint: Any) -> str | None:
    fields = {'dataset', 'model', 'transform', 'format_version'}
    if not isinstance(fingerprint, dict) or set(fingerprint) != fields:
        return f'the fingerprint is not an object with fields {sorted(fields)}'
    if fingerprint['format_version'] != FORMAT_VERSION:
        return f'the fingerprint has format_version {fingerprint["format_version"]!r}'
    for name in ('dataset', 'model', 'transform'):
        if not isinstance(fingerprint[name], str) or not fingerprint[name]:
            return f'the fingerprint {name} is not a non-empty string'
    return None


def _check_outputs(outputs: Any, group: str, complete: bool) -> str | None:
    kinds = OUTPUT_GROUPS[group]
    if not isinstance(outputs, dict) or set(outputs) != set(kinds):
        return f'outputs must be exactly {list(kinds)} for group {group!r}'
    for kind in kinds:
        spec = outputs[kind]
        if not isinstance(spec, dict) or set(spec) != {'dtype', 'shape'}:
            return f'outputs[{kind!r}] is not an object with fields dtype and shape'
        if spec['dtype'] != OUTPUT_KINDS[kind]:
            return (f'{kind} is stored as {spec["dtype"]!r}, but the format stores it as '
                    f'{OUTPUT_KINDS[kind]!r}')
        shape = spec['shape']
        if shape is None:
            if complete:
                return f'the cache is marked complete but the shape of {kind} is unknown'
            continue
        rank = _SAMPLE_RANK[kind]
        if (not isinstance(shape, list) or len(shape) != rank
                or not all(_is_int(size, 1, _MAX_WIDTH) for size in shape)):
            wanted = '[]' if rank == 0 else f'[d] with 1 <= d <= {_MAX_WIDTH}'
            return f'{kind} has per-sample shape {shape!r}, not {wanted}'
    return None


def _check_constants(constants: Any, group: str, complete: bool) -> str | None:
    names = set(CONSTANTS[group])
    if not isinstance(constants, dict) or not set(constants) <= names:
        return f'constants must be a subset of {sorted(names)} for group {group!r}'
    for name, value in constants.items():
        if not isinstance(value, float) or not math.isfinite(value):
            return f'the constant {name}={value!r} is not a finite float'
    if complete and set(constants) != names:
        return f'the cache is marked complete but constants {sorted(names - set(constants))} ' \
               f'are missing'
    return None


# --- part files --------------------------------------------------------------------------

def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECKSUM_BYTES).digest()


def encode_part(*, part: int, start: int, stop: int, store: str,
                arrays: Mapping[str, np.ndarray], group: str, level: int) -> bytes:
    """The bytes of a part file.

    Args:
        part (int): Part number.
        start (int): First sample id.
        stop (int): One past the last sample id.
        store (str): :meth:`Fingerprint.digest` of the cache.
        arrays (Mapping[str, np.ndarray]): Each kind of ``group`` as ``[stop - start, *shape]``
            in its stored dtype.
        group (str): Output group; its kinds are stored in :data:`OUTPUT_GROUPS` order.
        level (int): zstandard compression level.

    Returns:
        bytes: Prefix, header, payload and checksum.
    """
    raw = b''.join(np.ascontiguousarray(arrays[kind]).tobytes() for kind in OUTPUT_GROUPS[group])
    payload = zstandard.ZstdCompressor(level=level).compress(raw)
    header = _canonical({'part': part, 'start': start, 'stop': stop, 'store': store})
    body = _PREFIX.pack(MAGIC, len(header), len(payload)) + header + payload
    return body + _checksum(body)


def decode_part(file: Path, data: bytes, *, part: int, start: int, stop: int, store: str,
                group: str, outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The arrays of a part file, after checking every byte of it.

    Args:
        file (Path): The file (named in errors).
        data (bytes): Its content.
        part (int): The part number it must hold.
        start (int): Its first sample id.
        stop (int): One past its last sample id.
        store (str): The cache's :meth:`Fingerprint.digest`.
        group (str): The cache's output group.
        outputs (Mapping): The manifest's checked ``outputs`` (dtype, known shape per kind).

    Returns:
        dict[str, np.ndarray]: Each kind as a read-only ``[stop - start, *shape]`` array.

    Raises:
        CorruptPart: Any byte of the file is not what the format and the cache require.
    """
    fix = f'delete {file} and {REANNOTATE} (finished parts are kept)'
    header, payload = _checked_body(file, data, fix)
    if header.get('store') != store:
        raise CorruptPart(f'{file} belongs to another cache (store {header.get("store")}, this '
                          f'cache is {store}); {fix}')
    if (header['part'], header['start'], header['stop']) != (part, start, stop):
        raise CorruptPart(f'{file} holds part {header["part"]} (ids {header["start"]}..'
                          f'{header["stop"]}), not part {part} (ids {start}..{stop}); {fix}')
    rows = stop - start
    expected = rows * row_bytes(outputs)
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as error:
        raise CorruptPart(f'{file} does not decompress ({error}); {fix}') from None
    if len(raw) != expected:
        raise CorruptPart(f'{file} holds {len(raw)} bytes of outputs, not {expected} '
                          f'({rows} samples); {fix}')
    arrays, offset = {}, 0
    for kind in OUTPUT_GROUPS[group]:
        spec = outputs[kind]
        dtype = np.dtype(spec['dtype'])
        count = rows * int(np.prod(spec['shape'], dtype=np.int64))
        arrays[kind] = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(
            rows, *spec['shape'])
        offset += count * dtype.itemsize
    return arrays


def _checked_body(file: Path, data: bytes, fix: str) -> tuple[dict[str, int | str], bytes]:
    """Header and payload of a part whose size, checksum and header schema are right."""
    if data[:len(MAGIC)] != MAGIC:
        version = _OLD_MAGICS.get(data[:len(MAGIC)])
        if version is not None:
            raise CorruptPart(f'{file} was written in cache format version {version}, this '
                              f'jest_stream reads version {FORMAT_VERSION}; {fix}')
        raise CorruptPart(f'{file} is not a reference cache part (bad magic number); {fix}')
    minimum = _PREFIX.size + _CHECKSUM_BYTES
    if len(data) < minimum:
        raise CorruptPart(f'{file} is truncated: {len(data)} bytes, less than the {minimum} '
                          f'of an empty part; {fix}')
    _, header_bytes, payload_bytes = _PREFIX.unpack_from(data)
    expected = minimum + header_bytes + payload_bytes
    if len(data) < expected:
        raise CorruptPart(f'{file} is truncated: {len(data)} of {expected} bytes (or its size '
                          f'fields are damaged); {fix}')
    if len(data) > expected:
        raise CorruptPart(f'{file} has {len(data) - expected} bytes after its end ({len(data)} '
                          f'bytes, {expected} expected; or its size fields are damaged); {fix}')
    body = memoryview(data)[:-_CHECKSUM_BYTES]
    if _checksum(body) != data[-_CHECKSUM_BYTES:]:
        raise CorruptPart(f'{file} fails its checksum: the file is damaged; {fix}')
    header_end = _PREFIX.size + header_bytes
    try:
        header = _strict_json(data[_PREFIX.size:header_end])
    except ValueError as error:
        raise CorruptPart(f'{file} has a damaged header ({error}); {fix}') from None
    if (not isinstance(header, dict) or set(header) != _HEADER_KEYS
            or not all(_is_int(header[key], 0) for key in ('part', 'start', 'stop'))
            or not isinstance(header['store'], str) or not _HEX.fullmatch(header['store'])):
        raise CorruptPart(f'{file} has a damaged header (not the fields part, start, stop, '
                          f'store); {fix}')
    return header, data[header_end:-_CHECKSUM_BYTES]

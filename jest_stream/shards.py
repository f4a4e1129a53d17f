"""Checking MDS shards on disk: whole datasets, single shards before first use, failed samples.

mosaicml-streaming checks a shard's hash only when it downloads (or decompresses) it, so
a shard that is damaged once it sits in the local folder is read as it is: a flipped bit
in a sample gives a wrong value, a flipped bit in the offsets table gives another
sample's bytes, and the error (if any) surfaces later naming no shard. This module gives:

- :func:`validate_mds`: check every byte of an MDS dataset folder (``jest-stream validate``):
  the index parses and matches the shard files present; each shard's size, hashes (when
  the index records them), offsets table (monotone, within the file, consistent with the
  sample count), column config, and every sample's sizes and decoding.
- :func:`require_hashes` and :func:`check_local_shard`: what
  :class:`~jest_stream.source.SampleIdStreamingDataset` built with ``validate_hash`` runs at
  construction and before it reads a local shard for the first time.
- :func:`sample_error`: the :class:`ShardError` that names the shard file, the sample and the
  fix, raised when a sample does not decode inside the loader.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from streaming.base.compression import decompress
from streaming.base.format.mds.encodings import (
    is_mds_encoding,
    is_mds_encoding_safe,
    mds_decode,
)
from streaming.base.hashing import get_hash, is_hash
from tqdm import tqdm

from jest_stream.errors import DataError, SettingError

__all__ = [
    'ShardError',
    'NoShardHashes',
    'ShardReport',
    'DatasetReport',
    'validate_mds',
    'validate_shard',
    'require_hashes',
    'check_local_shard',
    'sample_error',
]

logger = logging.getLogger(__name__)

INDEX = 'index.json'
_ENTRY_KEYS = ('column_encodings', 'column_names', 'column_sizes', 'compression', 'format',
               'hashes', 'size_limit', 'version')  # what a shard also stores as its config
_UINT32 = np.dtype('<u4')


class ShardError(DataError):
    """An MDS shard (or one of its samples) is damaged, missing or does not match its index.

    Attributes:
        shard (str | None): The shard file.
        sample_id (int | None): Global id of the sample that failed, if one did.
        index (int | None): Its index inside the shard.
    """

    def __init__(self, message: str, *, shard: str | None = None, sample_id: int | None = None,
                 index: int | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.sample_id = sample_id
        self.index = index


class NoShardHashes(SettingError):
    """``validate_hash`` names an algorithm that the dataset's index records no hashes of."""


def _fix(folder: Path | str) -> str:
    return (f'run `jest-stream validate {folder}` to list every damaged shard and sample, then '
            f'delete the damaged shard files so that streaming downloads them again from the '
            f'remote, or rewrite the dataset with streaming.MDSWriter')


# --- reports -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardReport:
    """What :func:`validate_shard` found in one shard.

    Attributes:
        name (str): The shard's file name in the index.
        samples (int): Samples the index records for it.
        bytes (int): Size of its raw (uncompressed) data as found, 0 when unreadable.
        hashes (tuple[str, ...]): Hash algorithms checked (none when the index records none).
        problems (tuple[str, ...]): What is wrong with the shard as a whole.
        bad_samples (tuple[tuple[int, str], ...]): ``(index in the shard, what is wrong)``.
    """

    name: str
    samples: int
    bytes: int = 0
    hashes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    bad_samples: tuple[tuple[int, str], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_samples


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`validate_mds` found in a dataset folder.

    Attributes:
        path (Path): The folder.
        problems (tuple[str, ...]): Problems of the index or of the folder as a whole.
        shards (tuple[ShardReport, ...]): One report per shard of the index, in index order.
        hashes_recorded (bool): Whether the index records hashes for every shard.
    """

    path: Path
    problems: tuple[str, ...] = ()
    shards: tuple[ShardReport, ...] = field(default_factory=tuple)
    hashes_recorded: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and all(shard.ok for shard in self.shards)

    @property
    def bad_shards(self) -> list[ShardReport]:
        return [shard for shard in self.shards if not shard.ok]

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


# --- the whole folder --------------------------------------------------------------------

def _read_index(index: Path) -> tuple[list[Any], str | None]:
    """The index's shard entries, or the problem that stops reading it."""
    try:
        obj = json.loads(index.read_bytes())
    except FileNotFoundError:
        return [], f'{index} is missing: this is not the folder of an MDS dataset'
    except (ValueError, OSError) as error:  # also UnicodeDecodeError
        return [], f'{index} does not parse as JSON ({error}): rewrite or re-download it'
    if not isinstance(obj, dict) or obj.get('version') != 2 or not isinstance(
            obj.get('shards'), list):
        return [], (f'{index} is not an MDS index of version 2 (an object with "version": 2 '
                    f'and a list of "shards")')
    return obj['shards'], None


def _entry_files(entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return []
    return [info['basename'] for info in (entry.get('raw_data'), entry.get('zip_data'))
            if isinstance(info, dict) and isinstance(info.get('basename'), str)]


def _unlisted_files(folder: Path, entries: Sequence[Any]) -> list[str]:
    listed = {name for entry in entries for name in _entry_files(entry)}
    present = {str(p.relative_to(folder)) for p in folder.rglob('*.mds*') if p.is_file()}
    return sorted(present - listed)


def validate_mds(path: str | os.PathLike, *, allow_unsafe_types: bool = False,
                 progress: bool = False) -> DatasetReport:
    """Check every shard of the MDS dataset in the local folder ``path``.

    Args:
        path (str | PathLike): The folder holding ``index.json`` (or the index itself).
        allow_unsafe_types (bool): Decode pickled columns too (runs the pickled code);
            otherwise their sizes are checked but they are not decoded.
        progress (bool): Show a progress bar over the shards.

    Returns:
        DatasetReport: Problems of the index and one :class:`ShardReport` per shard.
    """
    folder = Path(path)
    if folder.name == INDEX:
        folder = folder.parent
    entries, problem = _read_index(folder / INDEX)
    if problem:
        return DatasetReport(path=folder, problems=(problem,))
    problems = []
    unlisted = _unlisted_files(folder, entries)
    if unlisted:
        problems.append(f'shard files not in {INDEX}: {", ".join(unlisted)} (the index does '
                        f'not match the shards present)')
    names = [name for entry in entries for name in _entry_files(entry)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f'{INDEX} lists {", ".join(repeated)} more than once')
    reports = []
    for number, entry in enumerate(tqdm(entries, desc='validate', unit='shard',
                                        disable=not progress, dynamic_ncols=True)):
        reports.append(validate_shard(folder, entry, number=number,
                                      allow_unsafe_types=allow_unsafe_types))
    hashes_recorded = bool(reports) and all(report.hashes for report in reports)
    return DatasetReport(path=folder, problems=tuple(problems), shards=tuple(reports),
                         hashes_recorded=hashes_recorded)


# --- one shard ---------------------------------------------------------------------------

def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return 'its index entry is not an object'
    if entry.get('format') != 'mds' or entry.get('version') != 2:
        return (f'its index entry has format {entry.get("format")!r} version '
                f'{entry.get("version")!r}; only MDS version 2 is checked')
    columns = [entry.get(key) for key in ('column_names', 'column_encodings', 'column_sizes')]
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
        return 'its index entry has no matching column names, encodings and sizes'
    if not all(isinstance(e, str) and is_mds_encoding(e) for e in entry['column_encodings']):
        return f'its index entry has unknown column encodings {entry["column_encodings"]}'
    if any(size is not None and not isinstance(size, int) for size in entry['column_sizes']):
        return f'its index entry has column sizes {entry["column_sizes"]}, not ints or null'
    raw = entry.get('raw_data')
    if (not isinstance(raw, dict) or not isinstance(raw.get('basename'), str)
            or not isinstance(raw.get('bytes'), int) or not isinstance(raw.get('hashes'), dict)):
        return 'its index entry has no raw_data with basename, bytes and hashes'
    if not isinstance(entry.get('samples'), int) or entry['samples'] < 0:
        return 'its index entry has no sample count'
    return None


def _checked_bytes(file: Path, info: Mapping[str, Any], problems: list[str]) -> bytes | None:
    """The file's bytes if its size and every recorded hash match ``info``."""
    try:
        data = file.read_bytes()
    except OSError as error:
        problems.append(f'{file.name} cannot be read ({error})')
        return None
    if len(data) != info['bytes']:
        problems.append(f'{file.name} is {len(data)} bytes, the index records {info["bytes"]}')
    for algo, expected in sorted(info.get('hashes', {}).items()):
        if not is_hash(algo):
            problems.append(f'the index records a {algo!r} hash, which streaming does not know')
        elif get_hash(algo, data) != expected:
            problems.append(f'{file.name} fails its {algo} hash (damaged)')
    return data


def _shard_bytes(folder: Path, entry: Mapping[str, Any], problems: list[str]) -> bytes | None:
    """The raw shard data: the raw file, or the compressed one decompressed."""
    raw_info, zip_info = entry['raw_data'], entry.get('zip_data')
    raw_file = folder / raw_info['basename']
    if raw_file.exists() or not isinstance(zip_info, dict):
        if not raw_file.exists():
            problems.append(f'{raw_file.name} is missing')
            return None
        return _checked_bytes(raw_file, raw_info, problems)
    zip_file = folder / zip_info['basename']
    if not zip_file.exists():
        problems.append(f'{raw_file.name} and {zip_file.name} are both missing')
        return None
    packed = _checked_bytes(zip_file, zip_info, problems)
    if packed is None or problems:
        return None
    try:
        data = decompress(entry.get('compression'), packed)
    except Exception as error:  # noqa: BLE001 - any codec's failure means the same here
        problems.append(f'{zip_file.name} does not decompress ({type(error).__name__}: {error})')
        return None
    before = len(problems)
    _compare_with_index(raw_file.name, data, raw_info, problems)
    return data if len(problems) == before else None


def _compare_with_index(name: str, data: bytes, info: Mapping[str, Any],
                        problems: list[str]) -> None:
    if len(data) != info['bytes']:
        problems.append(f'{name} is {len(data)} bytes, the index records {info["bytes"]}')
    for algo, expected in sorted(info.get('hashes', {}).items()):
        if is_hash(algo) and get_hash(algo, data) != expected:
            problems.append(f'{name} fails its {algo} hash (damaged)')


def _offsets(data: bytes, entry: Mapping[str, Any], problems: list[str]) -> np.ndarray | None:
    """The offsets table, if the header and the column config agree with the index."""
    samples = entry['samples']
    header_end = 4 + 4 * (samples + 1)
    if len(data) < header_end:
        problems.append(f'it is {len(data)} bytes, too short for the offsets of {samples} '
                        f'samples ({header_end} bytes)')
        return None
    (stored,) = np.frombuffer(data, _UINT32, count=1)
    if int(stored) != samples:
        problems.append(f'it records {int(stored)} samples, the index {samples}')
        return None
    offsets = np.frombuffer(data, _UINT32, count=samples + 1, offset=4).astype(np.int64)
    if not header_end <= offsets[0] <= len(data):
        problems.append(f'its first sample starts at byte {int(offsets[0])}, outside '
                        f'{header_end}..{len(data)}')
        return None
    try:
        config = json.loads(data[header_end:offsets[0]])
    except ValueError:
        config = None
    if not isinstance(config, dict) or any(config.get(k) != entry.get(k) for k in _ENTRY_KEYS):
        problems.append('the column config stored in it differs from its index entry')
    if offsets[-1] != len(data):
        problems.append(f'its offsets end at byte {int(offsets[-1])}, the file has {len(data)}')
    return offsets


def _sample_problem(sample: bytes, entry: Mapping[str, Any], allow_unsafe_types: bool
                    ) -> str | None:
    """What is wrong with one sample's bytes (None if they decode)."""
    sizes, at = [], 0
    for size in entry['column_sizes']:
        if size is None:
            if at + 4 > len(sample):
                return f'{len(sample)} bytes, too short for its column sizes'
            size = int(np.frombuffer(sample, _UINT32, count=1, offset=at)[0])
            at += 4
        sizes.append(size)
    if at + sum(sizes) != len(sample):
        return f'{len(sample)} bytes, but its columns need {at + sum(sizes)}'
    for name, encoding, size in zip(entry['column_names'], entry['column_encodings'], sizes,
                                    strict=True):
        if allow_unsafe_types or is_mds_encoding_safe(encoding):
            try:
                mds_decode(encoding, sample[at:at + size])
            except Exception as error:  # noqa: BLE001 - any decoder's failure is reported
                return f'column {name!r} ({encoding}) does not decode: {type(error).__name__}: ' \
                       f'{error}'
        at += size
    return None


def _check_samples(data: bytes, offsets: np.ndarray, entry: Mapping[str, Any],
                   allow_unsafe_types: bool) -> list[tuple[int, str]]:
    bad = []
    for index in range(entry['samples']):
        begin, end = int(offsets[index]), int(offsets[index + 1])
        if not offsets[0] <= begin < end <= len(data):
            bad.append((index, f'its offsets {begin}..{end} are out of order or outside the '
                               f'file ({len(data)} bytes)'))
            continue
        problem = _sample_problem(data[begin:end], entry, allow_unsafe_types)
        if problem:
            bad.append((index, problem))
    return bad


def validate_shard(folder: str | os.PathLike, entry: Any, *, number: int = 0,
                   allow_unsafe_types: bool = False) -> ShardReport:
    """Check one shard of an MDS dataset against its index entry.

    Args:
        folder (str | PathLike): The dataset folder.
        entry (Any): The shard's entry of ``index.json``.
        number (int): Its position in the index (names it when the entry is unreadable).
        allow_unsafe_types (bool): Decode pickled columns too.

    Returns:
        ShardReport: What was checked and what is wrong.
    """
    names = _entry_files(entry)
    name = names[0] if names else f'shard #{number}'
    problem = _entry_problem(entry)
    if problem:
        return ShardReport(name=name, samples=0, problems=(problem,))
    problems: list[str] = []
    hashes = tuple(sorted(entry['raw_data']['hashes']))
    data = _shard_bytes(Path(folder), entry, problems)
    if data is None:
        return ShardReport(name=name, samples=entry['samples'], hashes=hashes,
                           problems=tuple(problems))
    offsets = _offsets(data, entry, problems)
    bad = [] if offsets is None else _check_samples(data, offsets, entry, allow_unsafe_types)
    return ShardReport(name=name, samples=entry['samples'], bytes=len(data), hashes=hashes,
                       problems=tuple(problems), bad_samples=tuple(bad))


# --- a StreamingDataset's local shards ---------------------------------------------------

def _shard_file(dataset: Any, shard_id: int) -> tuple[Any, Path]:
    stream = dataset.streams[int(dataset.stream_per_shard[shard_id])]
    raw_info, _ = dataset.shards[shard_id].file_pairs[0]
    return stream, Path(stream.local) / (stream.split or '') / raw_info.basename


def require_hashes(dataset: Any) -> None:
    """Check that the index of every stream with ``validate_hash`` records that hash.

    Args:
        dataset (StreamingDataset): The dataset, after construction.

    Raises:
        NoShardHashes: A stream asks for a hash its index does not record (written
            without ``MDSWriter(hashes=[...])``), or for an algorithm streaming does not know.
    """
    for stream_id, stream in enumerate(dataset.streams):
        algo = stream.validate_hash
        if not algo:
            continue
        index = Path(stream.local) / (stream.split or '') / INDEX
        if not is_hash(algo):
            raise NoShardHashes(f'validate_hash={algo!r} is not a hash streaming knows; use one '
                                f'that {index} records')
        first = int(dataset.shard_offset_per_stream[stream_id])
        count = int(dataset.shards_per_stream[stream_id])
        for shard in dataset.shards[first:first + count]:
            for raw_info, zip_info in shard.file_pairs:
                for info in (raw_info, zip_info):
                    if info is not None and algo not in info.hashes:
                        recorded = sorted(info.hashes) or 'none'
                        raise NoShardHashes(
                            f'validate_hash={algo!r}, but {index} records no {algo} hash for '
                            f'{info.basename} (it records: {recorded}): the dataset was written '
                            f'without MDSWriter(hashes=[{algo!r}]), so its shards cannot be '
                            f'checked by hash. Rewrite it with MDSWriter(..., '
                            f'hashes=[{algo!r}]), pass a validate_hash it records, or drop '
                            f'validate_hash (`jest-stream validate {index.parent}` still checks '
                            f'the structure and decoding of every shard)')


def check_local_shard(dataset: Any, shard_id: int) -> None:
    """Check a shard already in the local folder against its index hash, before its first read.

    A shard that is not local yet is left to streaming, which checks the hash when it
    downloads or decompresses it.

    Args:
        dataset (StreamingDataset): The dataset.
        shard_id (int): The shard's number in the dataset.

    Raises:
        ShardError: The local file's size or hash differs from the index.
    """
    stream, file = _shard_file(dataset, shard_id)
    algo = stream.validate_hash
    if not algo:
        return
    for raw_info, _ in dataset.shards[shard_id].file_pairs:
        path = file.with_name(raw_info.basename)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # streaming fetches it and checks the hash it downloads
        expected = raw_info.hashes.get(algo)
        if len(data) != raw_info.bytes or get_hash(algo, data) != expected:
            raise ShardError(
                f'{path} fails its {algo} hash ({len(data)} bytes, the index records '
                f'{raw_info.bytes} bytes and {algo} {expected}): the local copy of the shard is '
                f'damaged; {_fix(path.parent)}', shard=str(path))
        logger.debug('%s: %s hash checked', path, algo)


def sample_error(dataset: Any, shard_id: int, index: int, sample_id: int,
                 error: BaseException) -> ShardError:
    """The :class:`ShardError` for a sample that failed to decode inside the loader.

    Args:
        dataset (StreamingDataset): The dataset.
        shard_id (int): The shard's number in the dataset.
        index (int): The sample's index in the shard.
        sample_id (int): Its global sample id.
        error (BaseException): What decoding raised.

    Returns:
        ShardError: Names the shard file, the sample and the fix.
    """
    _, file = _shard_file(dataset, shard_id)
    return ShardError(
        f'sample {index} of shard {file} (global sample id {sample_id}) does not decode '
        f'({type(error).__name__}: {error}): the shard is damaged; {_fix(file.parent)}',
        shard=str(file), sample_id=sample_id, index=index)

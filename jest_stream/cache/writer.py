"""Writing a reference cache part by part, resumably, by one writer at a time."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from jest_stream.cache.errors import (
    CacheFolderNotEmpty,
    CorruptPart,
    FingerprintMismatch,
    IncompleteCache,
    OutputMismatch,
)
from jest_stream.cache.format import (
    CONSTANTS,
    DEFAULT_PART_SIZE,
    FORMAT_VERSION,
    MANIFEST,
    OUTPUT_GROUPS,
    OUTPUT_KINDS,
    PARTS,
    REANNOTATE,
    Fingerprint,
    Layout,
    decode_part,
    describe,
    encode_manifest,
    encode_part,
    part_name,
    read_manifest,
    write_atomically,
)
from jest_stream.cache.lock import LOCK_FILES, WriterLock
from jest_stream.errors import SettingError, SettingTypeError, UsageError

__all__ = ['CacheWriter']

logger = logging.getLogger(__name__)


def _check_settings(group: str, num_samples: int, part_size: int,
                    info: Mapping[str, Any] | None) -> None:
    if group not in OUTPUT_GROUPS:
        raise SettingError(f'outputs={group!r} is not known; choose one of {sorted(OUTPUT_GROUPS)}')
    if num_samples <= 0:
        raise SettingError(f'the dataset has {num_samples} samples; there is nothing to annotate')
    if part_size <= 0:
        raise SettingError(f'part_size={part_size} must be positive')
    try:
        json.dumps(dict(info or {}), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise SettingTypeError(f'info must hold plain JSON values (str, numbers, lists, dicts): '
                               f'{error}') from None


class CacheWriter:
    """Writes the parts of a cache, and resumes a cache that an earlier run left unfinished.

    The manifest is written on creation, so a resumed run can check that it continues
    the same annotation; output shapes and constants (temperature, bias) are recorded
    with the first part and checked against every later one.

    A writer holds the folder's lock (:mod:`jest_stream.cache.lock`) from creation until
    :meth:`finish` or :meth:`close` (or a ``with`` block's end): a second writer of the
    same folder waits at most ``lock_timeout`` seconds, then raises :class:`CacheLocked`.
    Temporary files of killed runs are removed only under the lock, so a live writer's
    files are never touched.

    Args:
        path (str | PathLike): The cache folder (created if missing).
        fingerprint (Fingerprint): What the outputs depend on.
        num_samples (int): Samples in the dataset (ids ``0 .. num_samples - 1``).
        group (str): ``loss`` or ``embeddings`` (:data:`OUTPUT_GROUPS`).
        part_size (int): Samples per part file.
        level (int): zstandard compression level.
        info (Mapping, optional): Plain JSON values recorded in the manifest for people to
            read (where the dataset and the model came from); never checked.
        lock_timeout (float): Seconds to wait for another writer of ``path`` (0: refuse at once).

    Raises:
        SettingError: A size or the group is not valid.
        CacheLocked: Another writer holds ``path``.
        FingerprintMismatch: ``path`` holds a cache of another dataset, model, transform,
            size, output kind or format version.
        CacheFolderNotEmpty: ``path`` holds other files and no cache.
        CorruptManifest: ``path`` holds a damaged manifest.
    """

    def __init__(self, path: str | os.PathLike, *, fingerprint: Fingerprint, num_samples: int,
                 group: str, part_size: int = DEFAULT_PART_SIZE, level: int = 3,
                 info: Mapping[str, Any] | None = None, lock_timeout: float = 0.0) -> None:
        _check_settings(group, num_samples, part_size, info)
        self.path = Path(path)
        self.parts_dir = self.path / PARTS
        self.level = level
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path, timeout=lock_timeout)
        self._lock.acquire()
        try:
            self._remove_temporaries()
            self.manifest = self._open_or_create(fingerprint, int(num_samples), int(part_size),
                                                 group, info)
            self.parts_dir.mkdir(exist_ok=True)
        except BaseException:
            self._lock.release()
            raise
        self.layout = Layout(self.manifest)
        self.group = group
        self.store = Fingerprint(**self.manifest['fingerprint']).digest()
        self._done: set[int] = set()  # parts written or checked by this writer

    def _remove_temporaries(self) -> None:
        """Remove the temporary files of killed runs: no live writer has any (we hold the lock)."""
        stale = [*self.path.glob('.*.tmp-*'), *self.parts_dir.glob('.*.tmp-*')]
        for file in stale:
            file.unlink(missing_ok=True)
        if stale:
            logger.info('%s: removed %d temporary files of an interrupted run', self.path,
                        len(stale))

    def _open_or_create(self, fingerprint: Fingerprint, num_samples: int, part_size: int,
                        group: str, info: Mapping[str, Any] | None) -> dict[str, Any]:
        wanted = {
            'format_version': FORMAT_VERSION,
            'fingerprint': asdict(fingerprint),
            'num_samples': num_samples,
            'part_size': part_size,
            'group': group,
        }
        if (self.path / MANIFEST).exists():
            manifest = read_manifest(self.path)
            for key, value in wanted.items():
                if manifest[key] != value:
                    raise FingerprintMismatch(
                        f'{self.path} already holds a cache with {key}={manifest[key]!r}, '
                        f'but this annotation has {key}={value!r}. Write to another --out, or '
                        f'delete {self.path} to start over')
            return manifest
        others = sorted(p.name for p in self.path.iterdir() if p.name not in LOCK_FILES)
        if others:
            raise CacheFolderNotEmpty(
                f'{self.path} is not empty and holds no {MANIFEST} (it holds '
                f'{_describe_names(others)}); refusing to write a cache into it. Choose an empty '
                f'or new folder for --out')
        manifest = {
            **wanted,
            'outputs': {kind: {'dtype': OUTPUT_KINDS[kind], 'shape': None}
                        for kind in OUTPUT_GROUPS[group]},
            'constants': {},
            'compression': 'zstd',
            'complete': False,
            'info': dict(info or {}),
        }
        write_atomically(self.path / MANIFEST, encode_manifest(manifest))
        return manifest

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the folder's lock; finished parts stay, and a later writer continues."""
        self._lock.release()

    def _check_open(self) -> None:
        if not self._lock.held:
            raise UsageError(f'the writer of {self.path} is closed (finish() or close() was '
                             f'called); open a new CacheWriter to write more')

    @property
    def num_parts(self) -> int:
        return self.layout.num_parts

    def part_range(self, part: int) -> tuple[int, int]:
        """Sample ids ``[start, stop)`` of ``part``."""
        return self.layout.part_range(part)

    def _save_manifest(self) -> None:
        write_atomically(self.path / MANIFEST, encode_manifest(self.manifest))

    def is_done(self, part: int) -> bool:
        """Whether ``part`` is on disk and passes every check (a damaged one is redone)."""
        file = self.parts_dir / part_name(part)
        outputs = self.manifest['outputs']
        shapes_known = all(spec['shape'] is not None for spec in outputs.values())
        if not file.exists() or not shapes_known:
            return False
        start, stop = self.part_range(part)
        try:
            decode_part(file, file.read_bytes(), part=part, start=start, stop=stop,
                        store=self.store, group=self.group, outputs=outputs)
        except CorruptPart as error:
            logger.warning('%s; it is written again', error)
            return False
        return True

    def pending_parts(self) -> list[int]:
        """Parts still to write, in order; each part on disk is checked once per writer."""
        self._done.update(part for part in range(self.num_parts)
                          if part not in self._done and self.is_done(part))
        return [part for part in range(self.num_parts) if part not in self._done]

    def _record_shapes(self, part: int, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The arrays in payload order and stored dtypes; records shapes the first time."""
        start, stop = self.part_range(part)
        outputs = self.manifest['outputs']
        if set(arrays) != set(outputs):
            raise OutputMismatch(f'part {part} has outputs {sorted(arrays)}; the cache holds '
                                 f'{sorted(outputs)}')
        stored = []
        for kind in OUTPUT_GROUPS[self.group]:
            spec = outputs[kind]
            array = np.ascontiguousarray(arrays[kind], dtype=np.dtype(spec['dtype']))
            if array.ndim == 0 or array.shape[0] != stop - start:
                raise OutputMismatch(f'part {part} needs {stop - start} rows of {kind!r}, got '
                                     f'shape {list(array.shape)}')
            if not np.isfinite(array).all():
                raise OutputMismatch(f'{kind!r} of part {part} holds NaN or inf (in '
                                     f'{spec["dtype"]}); the cache never stores such values')
            if spec['shape'] is None:
                spec['shape'] = list(array.shape[1:])
            elif list(array.shape[1:]) != spec['shape']:
                raise OutputMismatch(f'{kind!r} has shape {list(array.shape[1:])} per sample in '
                                     f'part {part} but {spec["shape"]} in the cache')
            stored.append(array)
        return stored

    def _record_constants(self, part: int, constants: Mapping[str, float] | None) -> None:
        for name in CONSTANTS[self.group]:
            value = None if constants is None else constants.get(name)
            if value is None:
                raise OutputMismatch(f'embeddings caches store the reference {name}; part '
                                     f'{part} came without it')
            value = float(value)
            if not math.isfinite(value):
                raise OutputMismatch(f'the reference {name} is {value} for part {part}; the '
                                     f'cache stores finite values only')
            stored = self.manifest['constants'].get(name)
            if stored is None:
                self.manifest['constants'][name] = value
            elif stored != value:
                raise OutputMismatch(
                    f'the reference {name} was {stored} for earlier parts but {value} for '
                    f'part {part}: a frozen reference has one {name}; check that the model is '
                    f'not training')

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

        Raises:
            OutputMismatch: The arrays or constants do not fit the cache (kinds, rows,
                shape, non-finite values, a constant that changed).
            UsageError: The writer is closed.
        """
        self._check_open()
        if not 0 <= part < self.num_parts:
            raise OutputMismatch(f'part {part} does not exist; the cache has parts '
                                 f'0..{self.num_parts - 1}')
        before = copy.deepcopy(self.manifest)
        try:
            stored = self._record_shapes(part, arrays)
            self._record_constants(part, constants)
        except OutputMismatch:
            self.manifest = before  # nothing half-recorded
            raise
        if self.manifest != before:
            self._save_manifest()
        start, stop = self.part_range(part)
        data = encode_part(part=part, start=start, stop=stop, store=self.store,
                           arrays=dict(zip(OUTPUT_GROUPS[self.group], stored, strict=True)),
                           group=self.group, level=self.level)
        file = self.parts_dir / part_name(part)
        write_atomically(file, data)
        self._done.add(part)
        return file

    def finish(self) -> None:
        """Mark the cache complete and let go of the lock; every part must be on disk and valid.

        Raises:
            IncompleteCache: Parts are missing or damaged (the lock is kept: write them).
        """
        self._check_open()
        missing = self.pending_parts()
        if missing:
            raise IncompleteCache(f'{self.path}: parts {describe(missing)} are missing or '
                                  f'damaged; {REANNOTATE}')
        self.manifest['complete'] = True
        self._save_manifest()
        self.close()


def _describe_names(names: list[str], limit: int = 5) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')

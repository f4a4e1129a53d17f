"""Reading a reference cache by sample id: the ``ReferenceTable`` the scorers take."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jest_stream.cache.errors import CacheError, FingerprintMismatch, IncompleteCache
from jest_stream.cache.format import (
    DEFAULT_MAX_BYTES,
    OUTPUT_GROUPS,
    PARTS,
    REANNOTATE,
    Fingerprint,
    Layout,
    dataset_fingerprint,
    decode_part,
    describe,
    part_name,
    read_manifest,
)

__all__ = ['ReferenceCache']

logger = logging.getLogger(__name__)

_MISMATCH_FIX = {
    'dataset': 'The dataset changed since it was annotated (or this cache belongs to another '
               'one): open the cache that belongs to this dataset',
    'model': 'Pass the checksum of the reference model that was annotated '
             '(jest_stream.cache.model_checksum(checkpoint))',
    'transform': 'Pass the transform identity that was given to annotate',
}


class ReferenceCache:
    """Stored reference outputs, read by sample id: a ``ReferenceTable`` for the scorers.

    Plug it in where a reference model would go::

        cache = ReferenceCache('data/pool.ref', dataset=dataset,
                               model_checksum=model_checksum('reference.pt'),
                               transform='fmnist-normalised')
        scorer = ClassificationScorer(learner, reference=cache, input_key=..., target_key=...)

    Opening reads only the manifest and checks its digest, its schema and the fingerprint;
    part files are opened when first needed, checked byte for byte (size, checksum, header,
    id range, store) and kept decompressed in a bounded LRU cache. The object pickles
    without its buffers, so it can be sent to DataLoader workers or another process.

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
        CorruptManifest: The manifest is damaged.
        CacheError: A requested kind is not stored.
    """

    def __init__(self, path: str | os.PathLike, *, dataset: Any, model_checksum: str | None,
                 transform: str | None, kinds: Iterable[str] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.fingerprint = Fingerprint(**manifest['fingerprint'])
        self._check_fingerprint(manifest, {'dataset': dataset_fingerprint(dataset),
                                           'model': model_checksum, 'transform': transform})
        self.manifest = manifest
        self.layout = Layout(manifest)
        self.group = manifest['group']
        self.store = self.fingerprint.digest()
        self.kinds = OUTPUT_GROUPS[self.group]
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
        self._reset()

    def _check_fingerprint(self, manifest: dict[str, Any], expected: dict[str, str | None]
                           ) -> None:
        for field, value in expected.items():
            stored = getattr(self.fingerprint, field)
            if value is not None and stored != value:
                origin = manifest['info'].get(field)
                raise FingerprintMismatch(
                    f'the reference cache {self.path} was made for another {field}: stored '
                    f'{field} {stored!r}'
                    + (f' (annotated from {origin})' if origin else '')
                    + f', expected {value!r}. '
                    + _MISMATCH_FIX[field] + '; or re-annotate: run `jest-stream annotate` '
                    f'with the current {field} into a new --out folder')

    def _check_complete(self) -> None:
        names = {p.name for p in (self.path / PARTS).glob('part-*.bin')}
        missing = [part for part in range(self.layout.num_parts) if part_name(part) not in names]
        if not self.manifest['complete'] or missing:
            done = self.layout.num_parts - len(missing)
            raise IncompleteCache(
                f'the reference cache {self.path} is incomplete: {done} of '
                f'{self.layout.num_parts} parts are on disk'
                + (f' (missing: {describe(missing)})' if missing else '')
                + f'. The annotation did not finish; {REANNOTATE} to complete it '
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
        file = self.path / PARTS / part_name(part)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise IncompleteCache(
                f'sample ids {start}..{stop - 1} are not in the reference cache {self.path}: '
                f'{file.name} is missing (the annotation did not finish, or the file was '
                f'removed); {REANNOTATE} to complete it') from None
        arrays = decode_part(file, data, part=part, start=start, stop=stop, store=self.store,
                             group=self.group, outputs=self.manifest['outputs'])
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

        Raises:
            IncompleteCache: Ids outside the cache, or ids of a part that is missing.
            CorruptPart: A part they need is damaged.
        """
        if isinstance(sample_ids, Tensor):
            sample_ids = sample_ids.detach().to('cpu')
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        bad = (ids < 0) | (ids >= self.num_samples)
        if bad.any():
            shown = describe(ids[bad].tolist())
            raise IncompleteCache(
                f'sample ids {shown} are outside the reference cache {self.path}, which holds '
                f'ids 0..{self.num_samples - 1}: the cache was annotated for a smaller dataset '
                f'(or the ids are not global sample ids); re-annotate this dataset')
        if any(spec['shape'] is None for spec in self.manifest['outputs'].values()):
            raise IncompleteCache(f'the reference cache {self.path} holds no part yet; '
                                  f'{REANNOTATE} to complete it')
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

"""The reference cache: a frozen reference model's outputs, computed once, keyed by sample id.

A cache is a *sidecar* folder next to the dataset, never a column of it: MDS shards are
immutable and often remote, and one dataset can have caches of several reference models
side by side. The package is split by concern:

- :mod:`~jest_stream.cache.format`: constants, the fingerprint, the manifest and the part
  files, every byte of which is checked when read;
- :mod:`~jest_stream.cache.lock`: one writer per cache folder;
- :mod:`~jest_stream.cache.writer`: :class:`CacheWriter`, resumable, atomic part by part;
- :mod:`~jest_stream.cache.reader`: :class:`ReferenceCache`, the scorers' ``ReferenceTable``;
- :mod:`~jest_stream.cache.annotate`: :func:`annotate`, the job that fills a cache;
- :mod:`~jest_stream.cache.errors`: :class:`CacheError` and its kinds.

Nothing missing or damaged ever reads as zeros or as a wrong value: it raises a
:class:`CacheError` subclass that names the file, the problem and the fix.
"""

from jest_stream.cache import errors as _errors
from jest_stream.cache.annotate import AnnotationResult, annotate, import_object, load_model
from jest_stream.cache.errors import *  # noqa: F403 - the error kinds, as errors.__all__ lists
from jest_stream.cache.format import (
    CONSTANTS,
    DEFAULT_MAX_BYTES,
    DEFAULT_PART_SIZE,
    FORMAT_VERSION,
    OUTPUT_GROUPS,
    OUTPUT_KINDS,
    DatasetIndexNotFound,
    Fingerprint,
    dataset_fingerprint,
    model_checksum,
)
from jest_stream.cache.reader import ReferenceCache
from jest_stream.cache.writer import CacheWriter

__all__ = [
    *_errors.__all__,
    'FORMAT_VERSION',
    'OUTPUT_KINDS',
    'OUTPUT_GROUPS',
    'CONSTANTS',
    'DEFAULT_PART_SIZE',
    'DEFAULT_MAX_BYTES',
    'DatasetIndexNotFound',
    'Fingerprint',
    'dataset_fingerprint',
    'model_checksum',
    'CacheWriter',
    'ReferenceCache',
    'annotate',
    'AnnotationResult',
    'load_model',
    'import_object',
]

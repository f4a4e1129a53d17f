"""The errors of the reference cache: every one is a :class:`CacheError`.

:class:`CacheError` derives from :class:`jest_stream.errors.JestStreamError` and, as it always
did, from ``RuntimeError``. A subclass also derives from the built-in exception that code
written before it would catch (``FileExistsError`` for a folder that is not empty,
``ValueError`` for outputs that do not fit the cache).
"""

from __future__ import annotations

from jest_stream.errors import JestStreamError

__all__ = [
    'AnnotationTimeout',
    'CacheError',
    'FingerprintMismatch',
    'IncompleteCache',
    'DamagedCache',
    'CorruptPart',
    'CorruptManifest',
    'CacheFolderNotEmpty',
    'CacheLocked',
    'OutputMismatch',
]


class CacheError(JestStreamError, RuntimeError):
    """A reference cache that cannot be used as asked."""


class FingerprintMismatch(CacheError):
    """The cache was made for another dataset, model, transform, size or format version."""


class IncompleteCache(CacheError):
    """Outputs are missing: the annotation did not finish, or ids lie outside the cache."""


class DamagedCache(CacheError):
    """A file of the cache is truncated, damaged, or belongs to another cache."""


class CorruptPart(DamagedCache):
    """A part file is truncated, damaged, or belongs to another cache or position."""


class CorruptManifest(DamagedCache):
    """The manifest does not parse, fails its digest, or breaks the manifest's schema."""


class CacheFolderNotEmpty(CacheError, FileExistsError):
    """The folder given for a new cache holds other files."""


class CacheLocked(CacheError):
    """Another writer holds the cache folder (and did not let go within the wait allowed)."""


class OutputMismatch(CacheError, ValueError):
    """Outputs handed to the writer do not fit the cache: kinds, rows, shape or constants."""


class AnnotationTimeout(CacheError, TimeoutError):
    """A DataLoader worker of :func:`~jest_stream.cache.annotate.annotate` delivered no batch
    within ``timeout`` seconds: it hangs, was stopped (SIGSTOP), or reads too slowly. The
    finished parts are kept."""

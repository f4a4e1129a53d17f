"""The errors jest_stream raises: one base class, a few kinds.

Every error the library raises derives from :class:`JestStreamError`, so a training script
can catch everything jest_stream reports with one ``except``. Each kind also derives from
the built-in exception a Python user would expect for it (``ValueError`` for a bad setting,
``KeyError`` for a missing column, ...), so code written against those keeps working.

Messages name the setting or the file, the value, and the fix.
"""

from __future__ import annotations

__all__ = [
    'JestStreamError',
    'SettingError',
    'SettingTypeError',
    'DataError',
    'MissingColumnError',
    'ScoreError',
    'StateError',
    'UnknownLengthError',
    'UsageError',
]


class JestStreamError(Exception):
    """Base class of every error jest_stream raises."""


class SettingError(JestStreamError, ValueError):
    """A setting has a value jest_stream cannot use (raised at construction)."""


class SettingTypeError(JestStreamError, TypeError):
    """A setting has a type jest_stream cannot use (raised at construction)."""


class DataError(JestStreamError, ValueError):
    """Something only the data can show: a label out of range, ids that are not integers."""


class MissingColumnError(JestStreamError, KeyError):
    """A column or field named by a setting is not in the batch."""

    def __str__(self) -> str:
        # KeyError quotes its argument; these carry a sentence.
        return str(self.args[0]) if self.args else ''


class ScoreError(DataError):
    """A scorer or its model returned something selection cannot use: wrong shape, dtype,
    count of outputs, unnormalised embeddings, NaN or inf."""


class StateError(JestStreamError, ValueError):
    """A saved state (``load_state_dict``) that this object must refuse."""


class UsageError(JestStreamError, RuntimeError):
    """An API used in an order it does not support (e.g. loading state after iterating)."""


class UnknownLengthError(JestStreamError, TypeError):
    """``len()`` of something whose length is not known (a loader over an iterable dataset);
    a ``TypeError``, as ``len()`` and ``operator.length_hint`` expect."""

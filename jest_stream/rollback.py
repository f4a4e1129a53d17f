"""Loading several saved states as one: all of them, or none.

A resume loads the states of several parts in turn (the policy, a learning scorer, the
selection log); each checks its own, so a part can refuse after others have changed.
:func:`all_or_nothing` puts the earlier parts back when a later one refuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ['Stateful', 'all_or_nothing']


class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)``."""

    def state_dict(self) -> Any:
        """Its state."""

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`."""


@contextlib.contextmanager
def all_or_nothing(*parts: Stateful) -> Iterator[None]:
    """Run the body, which loads states into ``parts``; if it raises, load every part's
    state from before the body back, and re-raise.

    The states taken before are what ``state_dict()`` returns, so each part must return
    copies (or values its loading does not change), as torch's modules and optimizers,
    :class:`~jest_stream.policies.SelectionPolicy` and
    :class:`~jest_stream.scoring.proxy.ProxyScorer` do.
    """
    before = [(part, part.state_dict()) for part in parts]
    try:
        yield
    except BaseException:
        for part, state in before:
            part.load_state_dict(state)
        raise

"""Bounded waits on a child process, which say what the child printed when they give up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def _output(process: subprocess.Popen) -> str:
    """What the (now ended) process wrote to its pipes, as text."""
    out, err = process.communicate(timeout=30)
    text = '\n'.join(part if isinstance(part, str) else part.decode(errors='replace')
                     for part in (out, err) if part)
    return text[-4000:]


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, seconds: float,
             what: str) -> None:
    """Polls ``condition`` every 20 ms until it holds.

    Fails the test when ``process`` exits first, or when ``seconds`` pass; a process still
    running then is killed, with its whole group when it leads one (started with
    ``start_new_session=True``), and the message ends with what it printed.
    """
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f'{what}: the process exited with {process.returncode} first\n'
                                 f'{_output(process)}')
        if time.monotonic() > deadline:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # not a group leader: the process alone
            process.kill()
            raise AssertionError(f'{what}: not within {seconds:g} s\n{_output(process)}')
        time.sleep(0.02)

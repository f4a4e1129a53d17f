"""What DataLoader worker processes need from the system, checked before any starts.

On Linux, torch's default ``file_descriptor`` sharing strategy hands each tensor a worker
produces to the main process through a Unix socket that multiprocessing binds in its folder
under the temp dir: ``<tempdir>/pymp-<8 characters>/listener-<8 characters>``. A socket path
may not exceed 107 bytes, so with a temp dir longer than 75 bytes every hand-over fails inside
the worker's feeder thread: nothing reaches the main process, which waits until its timeout
(forever without one) and then blames the worker. This check names the cause at once. It
measures the folder multiprocessing really uses (:func:`multiprocessing.util.get_temp_dir`,
which forked workers inherit; it creates the folder now, and multiprocessing removes it at
exit), so a Python that falls back to a shorter folder passes.
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
import tempfile

import torch.multiprocessing

from jest_stream.errors import SettingError

__all__ = ['MAX_SOCKET_PATH_BYTES', 'check_worker_temp_dir']

#: Longest Unix socket path (bytes): ``sun_path`` holds 108 with the terminating zero.
MAX_SOCKET_PATH_BYTES = 107
#: What multiprocessing adds to its folder for a socket: ``/listener-`` and 8 characters.
_LISTENER_BYTES = len('/listener-') + 8


def check_worker_temp_dir(num_workers: int, setting: str = 'num_workers') -> None:
    """Refuses worker processes that could not hand their tensors over.

    Args:
        num_workers (int): DataLoader worker processes to be started (0: none, no check).
        setting (str): The setting's name, for the message.

    Raises:
        SettingError: ``num_workers > 0``, torch shares tensors by file descriptor (Linux's
            default), and multiprocessing's folder is too long for a socket path of
            :data:`MAX_SOCKET_PATH_BYTES` bytes (a temp dir over 75 bytes).
    """
    if num_workers == 0 or not sys.platform.startswith('linux'):
        return
    if torch.multiprocessing.get_sharing_strategy() != 'file_descriptor':
        return
    folder = multiprocessing.util.get_temp_dir()
    length = len(os.fsencode(folder)) + _LISTENER_BYTES
    if length > MAX_SOCKET_PATH_BYTES:
        raise SettingError(
            f'{setting}={num_workers}: worker processes hand tensors over through Unix sockets '
            f'in {folder!r}, whose paths would be {length} bytes long, over the '
            f'{MAX_SOCKET_PATH_BYTES} allowed: the temp dir {tempfile.gettempdir()!r} is too '
            f'long. Set TMPDIR to a shorter folder (at most 75 bytes), or {setting}=0')

"""What DataLoader worker processes need from the system, checked before any starts.

On Linux, torch's default ``file_descriptor`` sharing strategy hands each tensor a worker
produces to the main process through a Unix socket that multiprocessing binds in a folder
under the temp dir: ``<tempdir>/pymp-<8 characters>/listener-<8 characters>``. A socket path may not
exceed 107 bytes, so with a temp dir longer than 75 bytes every hand-over fails inside the
worker's feeder thread: nothing reaches the main process, which waits until its timeout
(forever without one) and then blames the worker. This check names the cause at once.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch.multiprocessing

from jest_stream.errors import SettingError

__all__ = ['MAX_TEMP_DIR_BYTES', 'check_worker_temp_dir']

#: Longest temp dir (bytes) under which the sockets fit: 107 bytes less ``/pymp-`` and
#: ``/listener-`` with their 8 random characters each.
MAX_TEMP_DIR_BYTES = 107 - 14 - 18


def check_worker_temp_dir(num_workers: int, setting: str = 'num_workers') -> None:
    """Refuses worker processes that could not hand their tensors over.

    Args:
        num_workers (int): DataLoader worker processes to be started (0: none, no check).
        setting (str): The setting's name, for the message.

    Raises:
        SettingError: ``num_workers > 0``, torch shares tensors by file descriptor (Linux's
            default), and the temp dir (``TMPDIR``) is longer than
            :data:`MAX_TEMP_DIR_BYTES` bytes.
    """
    if num_workers == 0 or not sys.platform.startswith('linux'):
        return
    if torch.multiprocessing.get_sharing_strategy() != 'file_descriptor':
        return
    folder = tempfile.gettempdir()
    length = len(os.fsencode(folder))
    if length > MAX_TEMP_DIR_BYTES:
        raise SettingError(
            f'{setting}={num_workers}: worker processes hand tensors over through Unix sockets '
            f'under the temp dir, whose paths may not exceed 107 bytes, but the temp dir '
            f'{folder!r} is {length} bytes long (at most {MAX_TEMP_DIR_BYTES} fit). Set TMPDIR '
            f'to a shorter folder, or {setting}=0')

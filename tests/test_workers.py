"""DataLoader workers under a temp dir too long for their sockets: refused at construction."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.data import write_mds
from helpers.models import tiny_classifier
from jest_stream import SelectiveLoader
from jest_stream.annotate import annotate
from jest_stream.errors import SettingError, SettingTypeError
from jest_stream.workers import MAX_TEMP_DIR_BYTES, check_worker_temp_dir

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith('linux')
    or torch.multiprocessing.get_sharing_strategy() != 'file_descriptor',
    reason="sockets carry tensors only under Linux's file_descriptor sharing strategy")

# Two workers each hand a tensor over, within the seconds given.
READ_TWO = textwrap.dedent('''
    import sys
    import torch
    from torch.utils.data import DataLoader
    loader = DataLoader(torch.arange(4.0), batch_size=2, num_workers=2,
                        timeout=float(sys.argv[1]))
    print(sum(float(batch.sum()) for batch in loader))
''')


def _folder_of_length(base: Path, length: int) -> Path:
    """A folder under ``base`` whose path is ``length`` bytes long."""
    pad = length - len(str(base)) - 1
    assert pad > 0, base
    folder = base / ('d' * pad)
    folder.mkdir()
    return folder


def _read_under(temp_dir: Path, seconds: float) -> subprocess.CompletedProcess:
    # A fresh process: a forked worker would reuse its parent's multiprocessing folder.
    return subprocess.run([sys.executable, '-c', READ_TWO, str(seconds)],
                          env={'TMPDIR': str(temp_dir), 'PATH': '/usr/bin:/bin'},
                          capture_output=True, text=True, timeout=120)


def test_the_bound_is_where_workers_stop_handing_tensors_over(child_tmpdir):
    fits = _read_under(_folder_of_length(child_tmpdir, MAX_TEMP_DIR_BYTES), 60)
    assert fits.returncode == 0 and fits.stdout.strip() == '6.0', fits.stderr
    # Nothing arrives: the DataLoader gives up after its timeout.
    too_long = _read_under(_folder_of_length(child_tmpdir, MAX_TEMP_DIR_BYTES + 1), 3)
    assert too_long.returncode != 0
    assert 'AF_UNIX path too long' in too_long.stderr


@pytest.fixture
def long_temp_dir(tmp_path, child_tmpdir, monkeypatch) -> Path:
    # tmp_path first: pytest places its own folders under the temp dir it sees first.
    folder = _folder_of_length(child_tmpdir, MAX_TEMP_DIR_BYTES + 1)
    monkeypatch.setattr(tempfile, 'tempdir', str(folder))
    return folder


def test_the_loader_refuses_workers_and_names_the_fix(long_temp_dir):
    data = torch.utils.data.TensorDataset(torch.arange(40.0))
    with pytest.raises(SettingError, match=r'num_workers=2: .*Set TMPDIR to a shorter folder, '
                                           r'or num_workers=0') as error:
        SelectiveLoader(data, batch_size=4, super_batch_size=8, criterion='uniform',
                        num_workers=2)
    assert str(long_temp_dir) in str(error.value)
    SelectiveLoader(data, batch_size=4, super_batch_size=8, criterion='uniform', num_workers=0)


def test_annotate_refuses_workers_before_it_writes_anything(long_temp_dir, tmp_path):
    mds = write_mds(tmp_path / 'mds', 20)
    with pytest.raises(SettingError, match='num_workers=2: '):
        annotate(out=tmp_path / 'ref', model=tiny_classifier(), transform_id='raw', local=mds,
                 input_key='x', target_key='y', num_workers=2, progress=False)
    assert not (tmp_path / 'ref').exists()


@pytest.mark.parametrize('value, error', [(True, SettingTypeError), (-1, SettingError)])
def test_annotate_checks_its_worker_count_and_batch_size(tmp_path, value, error):
    mds = write_mds(tmp_path / 'mds', 20)
    for setting in ('num_workers', 'batch_size'):
        with pytest.raises(error, match=f'{setting}={value!r} must be an int'):
            annotate(out=tmp_path / 'ref', model=tiny_classifier(), transform_id='raw',
                     local=mds, input_key='x', target_key='y', progress=False,
                     **{setting: value})


def test_no_workers_need_no_check(long_temp_dir):
    check_worker_temp_dir(0)

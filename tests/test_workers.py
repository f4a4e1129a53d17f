"""DataLoader workers under a temp dir too long for their sockets: refused at construction.

Each case runs in a fresh process with its own ``TMPDIR``: multiprocessing settles its folder
once per process (and forked workers inherit it), so only a fresh process sees a new one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.data import write_mds
from helpers.models import tiny_classifier
from jest_stream import SelectiveLoader
from jest_stream.annotate import annotate
from jest_stream.errors import SettingError, SettingTypeError
from jest_stream.workers import check_worker_temp_dir

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith('linux')
    or torch.multiprocessing.get_sharing_strategy() != 'file_descriptor',
    reason="sockets carry tensors only under Linux's file_descriptor sharing strategy")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# What the check says, and whether two workers then hand a tensor over each (in 10 s).
CHECK_THEN_READ = textwrap.dedent('''
    import json, multiprocessing.util, os, tempfile
    import torch
    from torch.utils.data import DataLoader
    from jest_stream.errors import SettingError
    from jest_stream.workers import check_worker_temp_dir
    under_tmpdir = multiprocessing.util.get_temp_dir().startswith(tempfile.gettempdir())
    try:
        check_worker_temp_dir(2)
        allowed = True
    except SettingError:
        allowed = False
    try:
        loader = DataLoader(torch.arange(4.0), batch_size=2, num_workers=2, timeout=10)
        delivered = sum(float(batch.sum()) for batch in loader) == 6.0
    except RuntimeError:
        delivered = False
    print(json.dumps({'allowed': allowed, 'delivered': delivered,
                      'under_tmpdir': under_tmpdir}))
''')

# The loader and annotate, each asked for two workers.
BUILD_BOTH = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from helpers.models import tiny_classifier
    from jest_stream import SelectiveLoader
    from jest_stream.annotate import annotate
    from jest_stream.errors import SettingError
    mds, out = sys.argv[1], Path(sys.argv[2])
    errors = {}
    try:
        SelectiveLoader(torch.utils.data.TensorDataset(torch.arange(40.0)), batch_size=4,
                        super_batch_size=8, criterion='uniform', num_workers=2)
    except SettingError as error:
        errors['loader'] = str(error)
    try:
        annotate(out=out, model=tiny_classifier(), transform_id='raw', local=mds,
                 input_key='x', target_key='y', num_workers=2, progress=False)
    except SettingError as error:
        errors['annotate'] = str(error)
    errors['annotate_wrote'] = out.exists()
    print(json.dumps(errors))
''')


def _folder_of_length(base: Path, length: int) -> Path:
    """A folder under ``base`` whose path is ``length`` bytes long."""
    pad = length - len(str(base)) - 1
    assert pad > 0, f'the temp dir {base} is too long for this test'
    folder = base / ('d' * pad)
    folder.mkdir()
    return folder


def _run_under(temp_dir: Path, script: str, *args: str) -> dict:
    env = {'TMPDIR': str(temp_dir), 'PATH': '/usr/bin:/bin',
           'PYTHONPATH': f'{TESTS}:{REPO}'}
    done = subprocess.run([sys.executable, '-c', script, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize('length', [75, 76])
def test_the_check_allows_exactly_what_workers_can_hand_over(child_tmpdir, length):
    seen = _run_under(_folder_of_length(child_tmpdir, length), CHECK_THEN_READ)
    assert seen['allowed'] == seen['delivered']
    # Where multiprocessing's folder is under the temp dir (it is, unless a newer Python falls
    # back to a shorter one), 75 bytes is the bound.
    if seen['under_tmpdir']:
        assert seen['allowed'] == (length == 75)


def test_the_loader_and_annotate_refuse_workers_and_name_the_fix(child_tmpdir, tmp_path):
    mds = write_mds(tmp_path / 'mds', 20)
    errors = _run_under(_folder_of_length(child_tmpdir, 76), BUILD_BOTH, str(mds),
                        str(tmp_path / 'ref'))
    for where in ('loader', 'annotate'):
        assert errors[where].startswith('num_workers=2: worker processes hand tensors over')
        assert errors[where].endswith('Set TMPDIR to a shorter folder (at most 75 bytes), or '
                                      'num_workers=0')
    assert not errors['annotate_wrote']  # refused before anything was written


@pytest.mark.parametrize('value, error', [(True, SettingTypeError), (-1, SettingError)])
def test_annotate_checks_its_worker_count_and_batch_size(tmp_path, value, error):
    mds = write_mds(tmp_path / 'mds', 20)
    for setting in ('num_workers', 'batch_size'):
        with pytest.raises(error, match=f'{setting}={value!r} must be an int'):
            annotate(out=tmp_path / 'ref', model=tiny_classifier(), transform_id='raw',
                     local=mds, input_key='x', target_key='y', progress=False,
                     **{setting: value})


def test_no_workers_need_no_check():
    check_worker_temp_dir(0)
    SelectiveLoader(torch.utils.data.TensorDataset(torch.arange(40.0)), batch_size=4,
                    super_batch_size=8, criterion='uniform', num_workers=0)

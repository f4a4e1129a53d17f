"""The install routes the README gives work: a wheel built with ``python -m build`` and a
``git+`` requirement of the repository, each installed into a fresh environment, import the
library and the Composer integration and run the ``jest-stream`` command.

The fresh environments reach the project environment's packages (torch, Composer, ...)
through a ``.pth`` line, so nothing is downloaded; jest_stream itself comes only from what
was installed, never from the source tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ('import jest_stream, jest_stream.integrations.composer as c; '
         'print(jest_stream.__file__); print(c.__file__)')


def _fresh_env(path: Path) -> Path:
    """A venv without pip whose site-packages also sees this environment's packages."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True)
    python = path / 'bin' / 'python'
    packages = subprocess.run([str(python), '-c', 'import site; '
                               'print(site.getsitepackages()[0])'], check=True,
                              capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()['purelib']
    # A plain path line: the editable install's finder (a .pth of this environment) is not
    # run, so jest_stream cannot come from the source tree.
    (Path(packages) / 'project_dependencies.pth').write_text(ours + '\n')
    return python


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a process group of its own, killed whole after 5 minutes."""
    process = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args, out, err)
    return subprocess.CompletedProcess(args, 0, out, err)


def _install(python: Path, requirement: str, tmp_path: Path) -> None:
    _run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--quiet',
          '--no-deps', '--no-build-isolation', requirement], cwd=tmp_path)


def _check(python: Path, tmp_path: Path) -> None:
    out = subprocess.run([str(python), '-c', CHECK], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout.split()
    installed = str(python.parent.parent)
    assert all(path.startswith(installed) for path in out), out
    result = subprocess.run([str(python.parent / 'jest-stream'), '--help'], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ('annotate', 'validate'))


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('dist')
    build = tmp_path_factory.mktemp('build')
    shutil.copytree(ROOT, build / 'src', symlinks=True,
                    ignore=shutil.ignore_patterns('.venv', 'data', 'results', '.git',
                                                  '__pycache__', '*.egg-info', 'build'))
    subprocess.run([sys.executable, '-m', 'build', '--wheel', '--no-isolation', '--outdir',
                    str(out), str(build / 'src')], check=True, capture_output=True, text=True)
    wheels = list(out.glob('jest_stream-*.whl'))
    assert len(wheels) == 1
    return wheels[0]


def test_the_wheel_installs_and_runs(wheel: Path, tmp_path: Path):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for module in ('jest_stream/step.py', 'jest_stream/process/child.py',
                   'jest_stream/cache/reader.py', 'jest_stream/scoring/proxy.py',
                   'jest_stream/flexi/patch_resize.py',
                   'jest_stream/integrations/composer/algorithm.py'):
        assert module in names, module
    python = _fresh_env(tmp_path / 'env')
    _install(python, str(wheel), tmp_path)
    _check(python, tmp_path)


def test_a_git_requirement_installs_and_runs(tmp_path: Path):
    if not (ROOT / '.git').exists():
        pytest.skip('the source tree is not a git clone')
    # The committed tree, in a repository of its own: pip clones with a partial-clone filter,
    # which a shallow clone (as CI may check out) cannot serve.
    repo = tmp_path / 'repo'
    repo.mkdir()
    tar = subprocess.run(['git', '-C', str(ROOT), 'archive', 'HEAD'], check=True,
                         capture_output=True, timeout=120).stdout
    subprocess.run(['tar', '-x', '-C', str(repo)], input=tar, check=True, timeout=120)
    for args in (['init', '--quiet'], ['add', '--all'],
                 ['-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '--quiet', '-m', 'x']):
        subprocess.run(['git', '-C', str(repo), *args], check=True, capture_output=True,
                       timeout=120)
    python = _fresh_env(tmp_path / 'env')
    _install(python, f'jest-stream @ git+file://{repo}', tmp_path)
    _check(python, tmp_path)

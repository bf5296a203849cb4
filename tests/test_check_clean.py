"""`make check-clean` can fail: in a throwaway clone of the repository (the real tree is never touched), with this
project's venv, it must fail when nbdev-export crashes, when nbdev-clean crashes, and when export changes a file that
was already modified (same `git status`, other content); and pass on the clean clone.

The recipe under test is the working tree's Makefile; `S3_CHECK_CLEAN_MAKEFILE=PATH` tests another one instead (to see
these tests fail on an older recipe, e.g. `git show f924d0e^:Makefile > /tmp/Makefile.old`)."""
import os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # the venv running the tests (make's default is .venv)

pytestmark = pytest.mark.slow  # four nbdev-export + nbdev-clean runs over the whole project


@pytest.fixture
def clone(tmp_path):
    "A clone of the repository's HEAD with the Makefile under test."
    if shutil.which('git') is None or shutil.which('make') is None: pytest.skip('needs git and make')
    d = tmp_path/'clone'
    subprocess.run(['git', 'clone', '-q', '--no-hardlinks', str(ROOT), str(d)], check=True, timeout=300)
    shutil.copy(os.environ.get('S3_CHECK_CLEAN_MAKEFILE') or ROOT/'Makefile', d/'Makefile')
    subprocess.run(['git', 'update-index', '--assume-unchanged', 'Makefile'], cwd=d, check=True)  # the recipe is not the change under test
    return d


def check_clean(d: Path) -> subprocess.CompletedProcess:
    "`make check-clean` in `d` with this venv; `-o` keeps make from re-running the pip set-up (the clone's files are newer than its stamp)."
    env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
    args = ['make', '--no-print-directory', f'VENV={VENV}', '-o', f'{VENV}/.s3-setup-stamp', 'check-clean']
    dry = subprocess.run([*args[:-1], '-n', 'check-clean'], cwd=d, env=env, capture_output=True, text=True, timeout=60)
    assert 'pip' not in dry.stdout, f'make would re-run the set-up:\n{dry.stdout}'
    return subprocess.run(args, cwd=d, env=env, capture_output=True, text=True, timeout=600)


def test_clean_clone_passes(clone):
    r = check_clean(clone)
    assert r.returncode == 0 and 'notebooks clean and modules in sync' in r.stdout, r.stdout + r.stderr


def test_fails_when_nbdev_export_fails(clone):
    (clone/'nbs'/'api'/'99_broken.ipynb').write_text('{"cells": [')  # not JSON: nbdev-export stops with an error
    r = check_clean(clone)
    assert r.returncode != 0 and 'nbdev-export failed' in r.stdout + r.stderr, r.stdout + r.stderr


def test_fails_when_nbdev_clean_fails(clone):
    # nbdev-export skips files starting with '_', nbdev-clean opens every *.ipynb: a dangling link makes only clean crash
    (clone/'nbs'/'_gone.ipynb').symlink_to(clone/'nbs'/'no-such-notebook.ipynb')
    r = check_clean(clone)
    assert r.returncode != 0 and 'nbdev-clean failed' in r.stdout + r.stderr, r.stdout + r.stderr


def test_fails_when_export_changes_an_already_modified_file(clone):
    "The notebook and its module are both edited (differently): export rewrites the module, `git status` stays ' M'."
    nb, mod = clone/'nbs'/'api'/'00_config.ipynb', clone/'s3_nbs'/'config.py'
    text = nb.read_text()
    assert text.count("YAML configs.") == 1
    nb.write_text(text.replace("YAML configs.", "YAML config files.", 1))
    mod.write_text(mod.read_text() + '\n# a hand edit that the notebook does not have\n')
    status = lambda: subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True, text=True).stdout
    before = status()
    r = check_clean(clone)
    assert status() == before, 'the case needs the same git status before and after'
    assert r.returncode != 0 and 'changed files' in r.stdout + r.stderr, r.stdout + r.stderr
    assert 'YAML config files.' in mod.read_text() and 'hand edit' not in mod.read_text()  # export did change the module

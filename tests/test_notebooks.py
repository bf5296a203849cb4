"""Run each library notebook's tests (nbdev's runner) as one pytest item, so CI reads pytest's summary line.

Cells flagged `slow`, `gpu` or `service` are skipped unless named in the env var S3_TEST_FLAGS (e.g. "slow service")."""
import os
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook_tests

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT/'nbs'/'api').glob('[0-9]*.ipynb'))
ALL_FLAGS = ('slow', 'gpu', 'service')


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb):
    force = os.environ.get('S3_TEST_FLAGS', '').split()
    ok, secs = run_notebook_tests(nb, skip_flags=[f for f in ALL_FLAGS if f not in force], force_flags=force, showerr=True)
    assert ok, f"{nb.name}: a cell failed (traceback above)"


def test_every_module_has_a_notebook():
    mods = {p.stem for p in (ROOT/'s3_nbs').glob('*.py') if not p.stem.startswith('_')}
    exported = {nb.stem.split('_', 1)[1] for nb in NOTEBOOKS}
    assert mods <= exported, f"modules without a notebook (edit notebooks, never s3_nbs/*.py): {sorted(mods - exported)}"

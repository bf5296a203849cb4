"Shared pytest setup: offline environment, project paths, and the --runslow switch."
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
for k, v in dict(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='offline',
                 VLLM_NO_USAGE_STATS='1', TOKENIZERS_PARALLELISM='false').items():
    os.environ.setdefault(k, v)


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', help='also run tests marked slow/service')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'): return
    skip = pytest.mark.skip(reason='slow/service test: run with --runslow (make test-all)')
    for it in items:
        if 'slow' in it.keywords or 'service' in it.keywords: it.add_marker(skip)


@pytest.fixture
def tmp_outputs(tmp_path, monkeypatch):
    "Send run outputs to a temporary folder."
    d = tmp_path/'outputs'
    monkeypatch.setenv('S3_NBS_OUTPUTS', str(d))
    return d

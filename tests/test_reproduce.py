"""`s3 reproduce TABLE` runs a paper-table notebook end to end with papermill: the paper's numbers, ours beside them
from a finished evaluation run, blank where nothing was measured."""
import json, os, subprocess
from pathlib import Path
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
S3 = str(ROOT/'.venv'/'bin'/'s3')


def finished_eval_run(outputs: Path, run_id: str, rows) -> Path:
    "A finished 06_evaluate run folder with a results table (what the reproduce notebooks read)."
    d = outputs/'runs'/'06_evaluate'/run_id
    (d/'artifacts').mkdir(parents=True)
    cfg = {'name': 'smoke', 'searcher': {'model': 'smollm2-135m-instruct', 'retrieved_per_search': 8, 'max_selected': 3, 'max_turns': 3,
                                          'begin_with_search': True},
           'generator': {'model': 'smollm2-135m-instruct'}, 'data': {'qa': 'demo', 'corpus': 'demo'}, 'reward': {'accuracy': 'span'}}
    (d/'manifest.json').write_text(json.dumps({'status': 'ok', 'started': '2026-12-02T00:00:00', 'config': cfg, 'metrics': {}}))
    pd.DataFrame([dict(method=m, dataset=ds, seed=42, n=n, genacc=v) for m, ds, n, v in rows]).to_csv(d/'artifacts'/'table.csv', index=False)
    return d


@pytest.mark.slow
def test_reproduce_general_qa_end_to_end(tmp_path):
    finished_eval_run(tmp_path, 'e1', [('rag_dense', 'fanoutqa-sub', 40, 0.25), ('rag_dense', 'avg', 40, 0.25),
                                        ('s3', 'fanoutqa-sub', 40, 0.3), ('s3', 'avg', 40, 0.3)])
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(tmp_path)}
    r = subprocess.run([S3, 'reproduce', 'general_qa', '--quiet'], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    t = pd.read_csv(tmp_path/'tables'/'general_qa.csv', index_col=0)
    assert t.loc['s3 (7B, 2.4k)', 'paper: avg'] == 58.9 and t.loc['s3 (7B, 2.4k)', 'ours: avg'] == 30.0
    assert t.loc['RAG-E5', 'ours: fanoutqa-sub'] == 25.0
    assert t['ours: avg'].isna().sum() == len(t) - 2  # every other method: blank, not invented
    assert 'smollm2-135m-instruct' in t.loc['s3 (7B, 2.4k)', 'ours: measured with']
    assert (tmp_path/'tables'/'general_qa.png').stat().st_size > 1000
    man = json.loads(next((tmp_path/'runs'/'01_general_qa').glob('*/manifest.json')).read_text())
    assert man['status'] == 'ok' and man['metrics']['rows_measured'] == 2

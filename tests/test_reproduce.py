"""`s3 reproduce TABLE` runs a paper-table notebook end to end with papermill: the paper's numbers, ours beside them
from a finished evaluation run, blank where nothing was measured."""
import json, os, subprocess
from pathlib import Path
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
S3 = str(ROOT/'.venv'/'bin'/'s3')


def finished_eval_run(outputs: Path, run_id: str, rows, searcher=None, started='2026-12-02T00:00:00', upstream=None) -> Path:
    """A finished 06_evaluate run folder with a results table (what the reproduce notebooks read). `rows`: (method,
    dataset, n, genacc[, context_tokens]); `searcher`: fields that replace or add to the searcher config."""
    d = outputs/'runs'/'06_evaluate'/run_id
    (d/'artifacts').mkdir(parents=True)
    cfg = {'name': 'smoke', 'searcher': {'model': 'smollm2-135m-instruct', 'retrieved_per_search': 8, 'max_selected': 3, 'max_turns': 3,
                                          'begin_with_search': True, **(searcher or {})},
           'generator': {'model': 'smollm2-135m-instruct'}, 'data': {'qa': 'demo', 'corpus': 'demo'}, 'reward': {'accuracy': 'span'}}
    (d/'manifest.json').write_text(json.dumps({'status': 'ok', 'started': started, 'config': cfg, 'metrics': {}, 'upstream': upstream or {}}))
    pd.DataFrame([dict(method=r[0], dataset=r[1], seed=42, n=r[2], genacc=r[3], **({'context_tokens': r[4]} if len(r) > 4 else {}))
                  for r in rows]).to_csv(d/'artifacts'/'table.csv', index=False)
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


@pytest.mark.slow
def test_reproduce_component_ablation_end_to_end(tmp_path):
    "Each evaluation fills the row of its searcher's protocol (begin-with-search, selection); the other rows stay blank."
    train = tmp_path/'runs'/'04_train'/'t1'
    train.mkdir(parents=True)
    (train/'manifest.json').write_text(json.dumps({'status': 'ok', 'config': {'searcher': {'begin_with_search': True, 'selection': False}}}))
    # recorded before searcher.selection existed (no such key): it selected, so it is the full protocol
    finished_eval_run(tmp_path, 'full', [('s3', 'fanoutqa-sub', 40, 0.3, 100.0), ('s3', 'avg', 40, 0.3, 100.0)], started='2026-12-01T00:00:00')
    finished_eval_run(tmp_path, 'nosel', [('rag_dense', 'fanoutqa-sub', 40, 0.25, 90.0), ('s3', 'fanoutqa-sub', 40, 0.4, 310.0),
                                           ('s3', 'avg', 40, 0.4, 310.0)], searcher={'selection': False}, upstream={'04_train': str(train)})
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(tmp_path)}
    r = subprocess.run([S3, 'reproduce', 'component_ablation', '--quiet'], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    t = pd.read_csv(tmp_path/'tables'/'component_ablation.csv', index_col=0)
    assert t.loc['without selection', 'paper: 2wikimultihopqa'] == 58.9  # the paper's numbers stay
    assert (t.loc['full', 'ours: avg'], t.loc['without selection', 'ours: avg']) == (30.0, 40.0)
    assert (t.loc['full', 'ours: context tokens'], t.loc['without selection', 'ours: context tokens']) == (100.0, 310.0)
    assert t.loc[['without begin-with-search', 'without both'], ['ours: avg', 'ours: context tokens']].isna().all().all()  # blank, not invented
    man = json.loads(next((tmp_path/'runs'/'06_component_ablation').glob('*/manifest.json')).read_text())
    v = man['metrics']['variants']
    assert (v['without selection']['run'], v['without selection']['selection'], v['full']['run'], v['full']['selection']) == ('nosel', False, 'full', True)
    assert v['without selection']['trained_as'] == 't1: begin_with_search=True, selection=False' and v['full']['trained_as'] is None

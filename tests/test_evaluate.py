"""Slow system tests of the evaluator (`s3_nbs.evaluate`, stage 06_evaluate) with the real SmolLM2 generator on demo data.

The fast, hand-computed tests (fake generator, missing contexts, resume, MIRAGE, the table) are in nbs/api/70_evaluate.ipynb."""
import json, os, subprocess, sys, time
from pathlib import Path
import pytest
from s3_nbs.config import load_config, override_config
from s3_nbs.corpus import format_docs
from s3_nbs.data import read_qa_jsonl, write_jsonl
from s3_nbs.evaluate import evaluate_records, sample_questions
from s3_nbs.metrics import exact_match, f1_score, span_check
from s3_nbs.retrieval import connect_retriever

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')
pytestmark = pytest.mark.slow  # SmolLM2 generations on 2 CPU cores: a minute or more


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "Demo data (300 passages) and its BM25 index, built in a temporary folder, laid out as stage-1 and stage-2 runs."
    from s3_nbs.demo import build_demo_set
    from s3_nbs.bm25 import build_bm25_index
    d = tmp_path_factory.mktemp('demo')
    data = d/'runs'/'01'/'artifacts'/'data'
    build_demo_set(data, max_passages=300)
    idx = build_bm25_index(data/'corpus.jsonl', d/'bm25', show_progress=False)
    (d/'runs'/'02').mkdir(parents=True)
    (d/'runs'/'02'/'metrics.json').write_text(json.dumps({'indexes': {'bm25': str(idx)}}))
    retr = connect_retriever(idx)
    def rag(qs, method='rag_like'):
        "Top-3 BM25 records of `qs` (a RAG-like method)."
        hits = retr.batch_search_sync([q.question for q in qs], 3)
        return [{'id': q.id, 'question': q.question, 'golden_answers': q.golden_answers, 'dataset': q.dataset, 'method': method,
                 'context': format_docs(h), 'context_docs': [x['document'] for x in h]} for q, h in zip(qs, hits)]
    test = read_qa_jsonl(data/'test.jsonl')
    qs = [q for q in test if q.metadata.get('answer_in_evidence')][:4]
    return {'data_run': d/'runs'/'01', 'index_run': d/'runs'/'02', 'questions': qs, 'rag': rag(qs),
            'sampled': sample_questions(test, 2, 42), 'rag_of': rag}


def test_smollm2_direct_and_rag(demo, tmp_path):
    "Four demo questions, direct and a RAG-like record, answered by SmolLM2 in process: grades, token counts, resume."
    qs, direct = demo['questions'], [{'id': q.id, 'method': 'direct', 'answer_prompt': 'direct'} for q in demo['questions']]
    cfg = override_config(load_config('smoke'), {'reward.accuracy': 'span', 'eval.batch_size': 4})
    t0 = time.time()
    ev = evaluate_records(demo['rag'] + direct, qs, cfg, methods='direct,rag_like', store=tmp_path/'e.jsonl')
    secs = time.time() - t0
    print(f"SmolLM2: {len(ev.rows)} rows in {secs:.1f} s")
    print(ev.table()[['method', 'dataset', 'n', 'span', 'em', 'f1', 'docs', 'context_tokens']].round(3).to_string())
    assert len(ev.rows) == 8 and ev.missing == [] and ev.tokens == 'tokenizer' and ev.calls['answer'] == 8
    by = {(r['method'], r['id']): r for r in ev.rows}
    for q in qs:
        for m in ('direct', 'rag_like'):
            r = by[m, q.id]
            assert isinstance(r['answer'], str) and r['answer'].strip(), r
            assert (r['span'], r['em'], r['f1']) == (span_check(r['answer'], q.golden_answers), exact_match(r['answer'], q.golden_answers),
                                                   f1_score(r['answer'], q.golden_answers))
    for rec in demo['rag']: assert by['rag_like', rec['id']]['n_docs'] == len(rec['context_docs']) > 0  # BM25 may find fewer than 3
    for q in qs:
        assert by['rag_like', q.id]['context_tokens'] > by['direct', q.id]['context_tokens'] + 50  # the passages are in the input
    again = evaluate_records(demo['rag'] + direct, qs, cfg, methods='direct,rag_like', store=tmp_path/'e.jsonl')
    assert (again.computed, again.reused) == (0, 8)
    assert again.table().equals(ev.table())


def s3(outputs, *args, timeout=1500):
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(outputs)}
    return subprocess.run([S3, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_stage_reports_missing_and_resumes(demo, tmp_path):
    "Stage 06 with a baseline, s3 contexts lacking one question, and a records file; run again in its folder: nothing recomputed."
    s3_file, extra = tmp_path/'s3_contexts.jsonl', tmp_path/'extra.jsonl'
    sampled = demo['sampled']  # what the stage samples with max_per_dataset=2 and seed 42
    assert len(sampled) >= 2
    s3_recs = demo['rag_of'](sampled[1:], 's3')  # the first sampled question has no s3 context
    write_jsonl(s3_recs, s3_file)
    write_jsonl(demo['rag_of'](sampled), extra)
    args = ['run', '06_evaluate', '-p', 'max_per_dataset=2', '-p', 'methods=direct,s3,rag_like', '-p', f's3_contexts={s3_file}',
            '-p', f'records={extra}', '-p', f"data_run={demo['data_run']}", '-p', f"index_run={demo['index_run']}", '--quiet']
    r = s3(tmp_path/'out', *args, '--run-id', 'ev1')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path/'out'/'runs'/'06_evaluate'/'ev1'
    man = json.loads((run/'manifest.json').read_text())
    m = man['metrics']
    assert man['status'] == 'ok' and m['methods'] == ['direct', 's3', 'rag_like'] and m['requests']['answer'] > 0
    rows = [json.loads(x) for x in open(run/'artifacts'/'results.jsonl')]
    missing = [json.loads(x) for x in open(run/'artifacts'/'missing.jsonl')]
    # s3 misses exactly the question without an s3 record: reported and left out, not scored
    assert missing == [{'method': 's3', 'id': sampled[0].id, 'dataset': sampled[0].dataset, 'seed': 42}] and m['missing'] == {'s3': 1}
    assert {(x['method'], x['id']) for x in rows} == {(mt, q.id) for q in sampled for mt in ('direct', 's3', 'rag_like')} - {('s3', sampled[0].id)}
    t = {(x['method'], x['dataset']): x for x in (json.loads(l) for l in open(run/'artifacts'/'table.jsonl'))}
    assert t['s3', sampled[0].dataset]['n_missing'] == 1 and t['s3', 'avg']['n'] == len(sampled) - 1
    table = (run/'artifacts'/'table.csv').read_text()
    assert (run/'artifacts'/'genacc.png').stat().st_size > 1000 and (run/'artifacts'/'table.parquet').is_file()
    r2 = s3(tmp_path/'out', *args[:2], '--resume', 'ev1', '--quiet')
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    m2 = json.loads((run/'manifest.json').read_text())['metrics']
    assert m2['computed'] == 0 and m2['reused'] == m['computed'] + m['reused']
    assert all(b['computed'] == 0 for b in m2['baselines'].values()), (m['baselines'], m2['baselines'])
    assert (run/'artifacts'/'table.csv').read_text() == table

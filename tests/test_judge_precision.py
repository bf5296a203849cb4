"""Stage 03_rag_cache with a judge-based accuracy, through the `s3` command: the judge's precision is measured on the
split's answers, and a judge below `reward.judge_min_precision` makes the stage fall back to span - loudly, with a
span-graded cache (no new generator calls) and `accuracy_used` recorded. Hand-made stage-1 and stage-2 runs (a real
BM25 index over a few passages), the tiny random Llama as generator and judge."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')

pytestmark = pytest.mark.slow  # a real stage-3 run with a generator and a judge (make test-all, .ci/run)

PASSAGES = [('Paris', 'Paris is the capital and largest city of France.'),
            ('Hamlet', 'Hamlet is a tragedy written by William Shakespeare around 1600.'),
            ('Danube', 'The Danube flows through Vienna, Budapest and Belgrade.'),
            ('Mount Everest', "Mount Everest is Earth's highest mountain above sea level."),
            ('Nile', 'The Nile flows through Cairo into the Mediterranean Sea.'),
            ('Mona Lisa', 'The Mona Lisa is a portrait painted by Leonardo da Vinci.')]
QUESTIONS = [('q0', 'What is the capital of France?', ['Paris']), ('q1', 'Who wrote Hamlet?', ['William Shakespeare']),
             ('q2', 'Which river flows through Vienna?', ['Danube']), ('q3', 'What is the highest mountain?', ['Mount Everest']),
             ('q4', 'Which river flows through Cairo?', ['Nile']), ('q5', 'Who painted the Mona Lisa?', ['Leonardo da Vinci'])]


def s3(outputs, *args, timeout=900):
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(outputs)}
    return subprocess.run([S3, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def latest_run(outputs, stage='03_rag_cache'):
    d = outputs/'runs'/stage
    return d/(d/'latest').read_text().strip()


def latest_metrics(outputs, stage='03_rag_cache'):
    return json.loads((latest_run(outputs, stage)/'manifest.json').read_text())['metrics']


@pytest.fixture
def runs(tmp_path):
    "A stage-1 run folder with a train split and a stage-2 run folder whose metrics point at a real BM25 index."
    from s3_nbs.corpus import make_contents, write_corpus
    from s3_nbs.bm25 import build_bm25_index
    data = tmp_path/'run01'/'artifacts'/'data'
    data.mkdir(parents=True)
    (data/'train.jsonl').write_text(''.join(json.dumps({'id': i, 'question': q, 'golden_answers': g, 'dataset': 'demo'}) + '\n'
                                            for i, q, g in QUESTIONS))
    write_corpus([{'id': str(k), 'contents': make_contents(t, x)} for k, (t, x) in enumerate(PASSAGES)], tmp_path/'corpus.jsonl')
    idx = build_bm25_index(tmp_path/'corpus.jsonl', tmp_path/'bm25', backend='bm25s', show_progress=False)
    (tmp_path/'run02').mkdir()
    (tmp_path/'run02'/'metrics.json').write_text(json.dumps({'indexes': {'bm25': str(idx)}}))
    return tmp_path


def test_untrusted_judge_falls_back_to_span(runs):
    out = runs/'outputs'
    args = ['run', '03_rag_cache', '-p', f'data_run="{runs/"run01"}"', '-p', f'index_run="{runs/"run02"}"', '-p', 'retriever=bm25',
            '-p', 'model=tiny-llama', '--set', 'generator.max_tokens=6', '--set', 'reward.accuracy=genacc',
            '--set', 'reward.judge_min_precision=0.9']
    r = s3(out, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = latest_metrics(out)
    # the tiny random model is no judge: it is measured, found wanting, and the stage falls back to span
    assert (m['accuracy'], m['accuracy_used'], m['judge_min_precision']) == ('genacc', 'span', 0.9)
    assert set(m['judge']) >= {'precision', 'recall', 'n_right', 'n_wrong', 'yes_wrong', 'by_kind', 'false_yes'}
    assert m['judge']['precision'] is None or m['judge']['precision'] < 0.9
    assert m['cache_path'] != m['judge_cache_path'] and Path(m['judge_cache_path']).exists()
    printed = (latest_run(out)/'03_rag_cache.ipynb').read_text()
    assert 'JUDGE NOT TRUSTED' in printed and 'reward.accuracy=span' in printed  # said loudly in the executed notebook
    judged = {e['id']: e for e in map(json.loads, open(m['judge_cache_path']))}
    span = [json.loads(l) for l in open(m['cache_path'])]
    assert sorted(e['id'] for e in span) == sorted(judged) == [q[0] for q in QUESTIONS]
    for e in span:  # the same answers, graded by the span check alone
        assert e['accuracy'] == 'span' and e['acc'] == float(e['span'])
        assert e['answer'] == judged[e['id']]['answer'] and judged[e['id']]['accuracy'] == 'genacc'
    assert m['answer_calls'] == len(QUESTIONS) and m['judge_calls'] == sum(not e['span'] for e in judged.values())
    assert m['prompts'] == 'original' and m['max_tokens'] == 6
    # a re-run computes nothing, asks the judge nothing (its report is kept next to the cache) and decides the same
    r = s3(out, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m2 = latest_metrics(out)
    assert (m2['computed'], m2['judge_check_calls'], m2['judge_calls']) == (0, 0, 0)
    assert (m2['accuracy_used'], m2['cache_path'], m2['judge']) == ('span', m['cache_path'], m['judge'])

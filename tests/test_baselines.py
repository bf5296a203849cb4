"""Every baseline, run for real: SmolLM2-135M-Instruct in-process on two demo questions (issue 14).

The notebook `nbs/api/60_baselines.ipynb` tests each method's control flow with a scripted LLM; this system test runs
the embedded default (`configs/smoke.yaml`, the LLMs of `cfg.baselines` loaded in-process) over the demo data of the
latest stage-1 and stage-2 runs (a tiny built-in corpus when there are none) and checks what must hold whatever the
model writes: records in question order, the right answer prompt, de-duplicated documents that are exactly the top-k
of the queries the method says it searched, step budgets kept, fallbacks counted, JSON-serialisable records.
SmolLM2 follows none of these protocols well, so the queries and documents are printed rather than judged."""
import json, time
from pathlib import Path
import pytest

from s3_nbs.baselines import BASELINES, run_baseline, summarize_records
from s3_nbs.config import load_config, override_config
from s3_nbs.corpus import format_docs, write_corpus
from s3_nbs.data import QAExample, read_qa_jsonl
from s3_nbs.bm25 import build_bm25_index
from s3_nbs.index import build_dense_index, load_retriever
from s3_nbs.pipeline import latest_run
from s3_nbs.searcher import doc_key

pytestmark = pytest.mark.slow
MAX_STEPS, STEP_TOKENS, TOPK = 2, 32, 3
PASSAGES = [('Gustave Eiffel', 'Gustave Eiffel was a French civil engineer born in Dijon in 1832.'),
            ('Dijon', 'Dijon is a city in eastern France, famous for its mustard.'),
            ('Warsaw', 'Warsaw is the capital and largest city of Poland.'),
            ('Marie Curie', 'Marie Curie was a physicist and chemist born in Warsaw.')]


def _demo():
    "Two test questions and the dense/BM25 indexes of the latest demo runs, or None."
    data, idx = latest_run('01_prepare_data', required=False), latest_run('02_build_index', required=False)
    if data is None or idx is None: return None
    metrics = idx/'metrics.json'
    indexes = json.loads(metrics.read_text()).get('indexes', {}) if metrics.exists() else {}
    if not all(Path(indexes.get(k, '')).is_dir() for k in ('dense', 'bm25')): return None
    return read_qa_jsonl(data/'artifacts'/'data'/'test.jsonl')[:2], {k: load_retriever(indexes[k]) for k in ('dense', 'bm25')}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    got = _demo()
    if got is None:  # no demo runs here: a tiny corpus of our own
        d = tmp_path_factory.mktemp('baselines')
        write_corpus([{'id': f'p{i}', 'title': a, 'text': b} for i, (a, b) in enumerate(PASSAGES)], d/'corpus.jsonl')
        got = ([QAExample('q0', 'Where was Gustave Eiffel born?', ['Dijon'], 'tiny'),
                QAExample('q1', 'What is the capital of Poland?', ['Warsaw'], 'tiny')],
               {'dense': load_retriever(build_dense_index(d/'corpus.jsonl', d/'dense', show_progress=False)),
                'bm25': load_retriever(build_bm25_index(d/'corpus.jsonl', d/'bm25', show_progress=False))})
    cfg = override_config(load_config('smoke'), {'baselines.max_steps': MAX_STEPS, 'baselines.max_step_tokens': STEP_TOKENS,
                                                 'baselines.topk': TOPK})
    return got[0], got[1], cfg


def _top(retriever, query):
    return [h['document'] for h in retriever.batch_search([query], TOPK)[0]]


@pytest.mark.parametrize('method', BASELINES)
def test_baseline_with_smollm2(setup, method):
    questions, retrievers, cfg = setup
    t0 = time.time()
    recs = run_baseline(method, questions, cfg, retrievers, progress=False)
    secs = time.time() - t0
    assert [(r['id'], r['method']) for r in recs] == [(q.id, method) for q in questions]
    json.dumps(recs)  # the records go to jsonl files as they are
    kind = 'bm25' if method in ('rag_bm25', 'deepretrieval') else 'dense'
    for r in recs:
        print(f"{method:14s} {r['id']} {secs:5.1f}s docs={len(r['context_docs'])} steps={r['steps']} fallbacks={r['fallbacks']} "
              f"finish={r['finish']} self={r['self_answer']!r} queries={[q[:60] for q in r['queries']]}")
        assert r['answer_prompt'] == {'direct': 'direct', 'cot': 'cot'}.get(method, 'rag')
        assert r['context'] == format_docs(r['context_docs'])
        keys = [doc_key(d) for d in r['context_docs']]
        assert len(keys) == len(set(keys)), 'duplicate documents in a context'
        if method in ('direct', 'cot'):
            assert (r['context_docs'], r['queries'], r['steps']) == ([], [], 0)
            continue
        # the context is exactly the de-duplicated top-k of the queries the method searched, in order
        want = []
        for q in r['queries']:
            for d in _top(retrievers[kind], q):
                if doc_key(d) not in {doc_key(x) for x in want}: want.append(d)
        assert [doc_key(d) for d in r['context_docs']] == [doc_key(d) for d in want]
        assert 0 <= r['fallbacks'] <= len(r['queries'])
        assert r['self_answer'] is None or method == 'search_r1'
        if method in ('rag_dense', 'rag_bm25'): assert r['queries'] == [r['question']] and r['steps'] == 0
        elif method == 'deepretrieval': assert len(r['queries']) == 1 and r['steps'] == 1
        elif method == 'ircot': assert r['queries'][0] == r['question'] and 1 <= r['steps'] <= MAX_STEPS and len(r['queries']) <= 1 + r['steps']
        elif method == 'search_o1': assert 1 <= r['steps'] <= MAX_STEPS and len(r['queries']) <= r['steps']
        elif method == 'search_r1':
            assert 1 <= r['steps'] <= MAX_STEPS + 1 and len(r['queries']) <= min(r['steps'], MAX_STEPS)
            assert (r['finish'] == 'answer') == (r['self_answer'] is not None)
        if method in ('ircot', 'search_o1', 'search_r1', 'deepretrieval'): assert r['trace']
    print(summarize_records(recs)[method])

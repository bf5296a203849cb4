"""System test of the reward service: a real `s3 serve-reward` process (in-process tiny Llama as generator and judge)
over a hand-built naive-RAG cache, hit by concurrent one-rollout requests (micro-batched), a rollout whose context is
the RAG context (no generator call), and malformed requests (each a 4xx, then a good request is served); a service
started over a cache built another way refuses to start. Each test starts a server process: marked `service`
(run by `make test-all`). The default run pins a reward on real model output through the service path in
`nbs/api/31_reward_service.ipynb`."""
import json, os, signal, socket, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest

httpx = pytest.importorskip('httpx')
pytest.importorskip('fastapi')

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')


SETTINGS = ['--set', 'generator.model=tiny-llama', '--set', 'generator.max_tokens=6']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _doc(i):
    return {'id': str(i), 'contents': f'"Passage {i}"\nPassage number {i} mentions the colour {["red", "blue", "green"][i % 3]}.'}


def _write_cache(cache) -> list[dict]:
    "A naive-RAG cache for q0..q7, recorded as built with the service's settings (`SETTINGS` over the smoke config)."
    from s3_nbs.config import parse_assignments, resolve_config
    from s3_nbs.reward import RagBaseline, make_grader
    cfg = resolve_config('smoke', cli=parse_assignments([a for a in SETTINGS if a != '--set']))
    base = RagBaseline(cache, make_grader(cfg), topk=cfg.retrieval.naive_topk, index_id='hand-made-index')
    rows = [base.entry(f'q{i}', f'Which colour does passage {i} mention?', ['red'], acc=float(i % 2)) for i in range(8)]
    rows[0] = base.entry('q0', rows[0]['question'], ['red'], [_doc(0), _doc(1), _doc(2)], answer='red', span=True, judge=None,
                         judged=False, genacc=True, em=1.0, f1=1.0, acc=1.0)
    base.store.append(rows)
    return rows


@pytest.fixture(scope='module')
def service(tmp_path_factory):
    "`s3 serve-reward` on a free loopback port; the cache holds q0..q7 (q0 with its answer and prompt address)."
    d = tmp_path_factory.mktemp('reward')
    cache = d/'rag.jsonl'
    rows = _write_cache(cache)
    port = _free_port()
    proc = subprocess.Popen([S3, 'serve-reward', '--rag-cache', str(cache), '--port', str(port), '--wait-ms', '200', *SETTINGS],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode(errors='replace')[-3000:]
            try:
                if httpx.get(f'{url}/health', timeout=5).status_code == 200: break
            except httpx.TransportError: pass
            assert time.time() < deadline, 'the reward service did not start'
            time.sleep(0.3)
        yield url, rows
    finally:
        os.killpg(proc.pid, signal.SIGTERM); proc.wait(30)


def _item(row, docs):
    return {'id': row['id'], 'question': row['question'], 'golden_answers': row['golden_answers'], 'docs': docs}


@pytest.mark.service
def test_concurrent_requests_are_batched(service):
    url, rows = service
    items = [_item(r, [_doc(i + 3), _doc(i + 4)]) for i, r in enumerate(rows)]
    with ThreadPoolExecutor(8) as ex:
        resps = list(ex.map(lambda it: httpx.post(f'{url}/score', json={'items': [it]}, timeout=300), items))
    assert [r.status_code for r in resps] == [200] * 8, [r.text for r in resps]
    res = [r.json()['results'][0] for r in resps]
    assert [r['id'] for r in res] == [r['id'] for r in rows]
    for r, row in zip(res, rows):
        assert r['acc_rag'] == row['acc'] and r['mode'] == 'gbr' and isinstance(r['s3_answer'], str)
        assert r['reward'] == r['acc_s3'] - r['acc_rag'] and r['acc_s3'] == float(r['s3_genacc'])
    h = httpx.get(f'{url}/health').json()
    assert h['batching']['requests'] >= 8 and h['batching']['batches'] < h['batching']['requests'], h['batching']
    assert h['calls']['answer'] + h['calls']['answer_coalesced'] >= 8
    assert h['info']['config']['generator']['model'] == 'tiny-llama' and h['info']['config']['reward']['mode'] == 'gbr'


@pytest.mark.service
def test_rag_context_needs_no_generator_call(service):
    url, rows = service
    before = httpx.get(f'{url}/health').json()['calls']
    r = httpx.post(f'{url}/score', json={'items': [_item(rows[0], [_doc(0), _doc(1), _doc(2)])]}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()['results'][0]
    assert (res['s3_answer'], res['acc_s3'], res['acc_rag'], res['reward']) == ('red', 1.0, 1.0, 0.0)
    after = httpx.get(f'{url}/health').json()['calls']
    assert after['answer_reused'] == before['answer_reused'] + 1 and after['answer'] == before['answer']


@pytest.mark.service
def test_malformed_requests_get_4xx_then_service_goes_on(service):
    url, rows = service
    good = _item(rows[1], [_doc(5)])
    no_gold = 'golden_answers holds no non-empty answer'
    bad = [(b'{"items": [', 400, ''), (b'[]', 422, ''), (json.dumps({'items': []}).encode(), 422, ''),
           (json.dumps({'items': [good | {'question': ''}]}).encode(), 422, 'question'),
           (json.dumps({'items': [good | {'docs': [{'id': '1'}]}]}).encode(), 422, 'docs[0]'),
           (json.dumps({'items': [good | {'golden_answers': None}]}).encode(), 422, 'golden_answers'),
           (json.dumps({'items': [good | {'golden_answers': []}]}).encode(), 422, no_gold),
           (json.dumps({'items': [good | {'golden_answers': ['']}]}).encode(), 422, no_gold),
           (json.dumps({'items': [good | {'golden_answers': ['  ', '\n']}]}).encode(), 422, no_gold),
           (json.dumps({'items': [good | {'question': 'Which colour does passage 9 mention?'}]}).encode(), 422, "holds id 'q1'"),
           (json.dumps({'items': [good | {'id': 'not-cached'}]}).encode(), 422, 'not in the naive-RAG cache'),
           (json.dumps({'items': [good], 'extra': 1}).encode(), 422, 'extra')]
    for body, status, words in bad:
        r = httpx.post(f'{url}/score', content=body, headers={'content-type': 'application/json'}, timeout=60)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert r.json()['error'] and words in r.json()['error'], (words, r.text)
    r = httpx.post(f'{url}/score', content=json.dumps({'items': [good]}), headers={'content-type': 'text/plain'})
    assert r.status_code == 415
    assert httpx.get(f'{url}/nope').status_code == 404
    r = httpx.post(f'{url}/score', json={'items': [good]}, timeout=300)
    assert r.status_code == 200 and r.json()['results'][0]['id'] == 'q1'


@pytest.mark.service
def test_verl_compute_score_through_the_service(service):
    "verl's per-sample contract, concurrent calls, through the running service."
    import asyncio
    from s3_nbs.reward_service import compute_score
    url, rows = service
    async def run():
        return await asyncio.gather(*[compute_score('demo', 'not read', {'target': r['golden_answers']},
                                                    {'index': r['id'], 'question': r['question'], 'docs': [_doc(7)], 'reward_url': url})
                                      for r in rows[:4]])
    outs = asyncio.run(run())
    assert [set(o) for o in outs] == [{'score', 'acc_s3', 'acc_rag'}] * 4
    assert [o['acc_rag'] for o in outs] == [r['acc'] for r in rows[:4]]
    assert all(o['score'] == o['acc_s3'] - o['acc_rag'] for o in outs)


@pytest.mark.service
def test_cache_built_another_way_is_refused_at_start(tmp_path):
    "A cache recorded as built with another answer cap: `s3 serve-reward` refuses to start, naming the field and the fix."
    cache = tmp_path/'rag.jsonl'
    _write_cache(cache)
    r = subprocess.run([S3, 'serve-reward', '--rag-cache', str(cache), '--port', str(_free_port()), *SETTINGS,
                        '--set', 'generator.max_tokens=7'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "was built with max_tokens 6" in r.stderr and 'uses max_tokens 7' in r.stderr and 'generator.max_tokens' in r.stderr, r.stderr[-3000:]

"""System test of the reward service: a real `s3 serve-reward` process (in-process tiny Llama as generator and judge)
over a hand-built naive-RAG cache, hit by concurrent one-rollout requests (micro-batched), a rollout whose context is
the RAG context (no generator call), and malformed requests (each a 4xx, then a good request is served)."""
import json, os, signal, socket, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest

httpx = pytest.importorskip('httpx')
pytest.importorskip('fastapi')

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _doc(i):
    return {'id': str(i), 'contents': f'"Passage {i}"\nPassage number {i} mentions the colour {["red", "blue", "green"][i % 3]}.'}


@pytest.fixture(scope='module')
def service(tmp_path_factory):
    "`s3 serve-reward` on a free loopback port; the cache holds q0..q7 (q0 with its answer and prompt address)."
    from s3_nbs.corpus import format_docs
    from s3_nbs.reward import prompt_sha
    d = tmp_path_factory.mktemp('reward')
    cache = d/'rag.jsonl'
    rows = [{'id': f'q{i}', 'question': f'Which colour does passage {i} mention?', 'golden_answers': ['red'], 'acc': float(i % 2)}
            for i in range(8)]
    q0 = rows[0]
    q0.update(doc_ids=['0', '1', '2'], prompt_sha=prompt_sha(q0['question'], format_docs([_doc(0), _doc(1), _doc(2)])),
              answer='red', span=True, judge=None, judged=False, genacc=True, em=1.0, f1=1.0, acc=1.0)
    cache.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    port = _free_port()
    proc = subprocess.Popen([S3, 'serve-reward', '--rag-cache', str(cache), '--port', str(port), '--wait-ms', '200',
                             '--set', 'generator.model=tiny-llama', '--set', 'generator.max_tokens=6'],
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


def test_rag_context_needs_no_generator_call(service):
    url, rows = service
    before = httpx.get(f'{url}/health').json()['calls']
    r = httpx.post(f'{url}/score', json={'items': [_item(rows[0], [_doc(0), _doc(1), _doc(2)])]}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()['results'][0]
    assert (res['s3_answer'], res['acc_s3'], res['acc_rag'], res['reward']) == ('red', 1.0, 1.0, 0.0)
    after = httpx.get(f'{url}/health').json()['calls']
    assert after['answer_reused'] == before['answer_reused'] + 1 and after['answer'] == before['answer']


def test_malformed_requests_get_4xx_then_service_goes_on(service):
    url, rows = service
    good = _item(rows[1], [_doc(5)])
    bad = [(b'{"items": [', 400), (b'[]', 422), (json.dumps({'items': []}).encode(), 422),
           (json.dumps({'items': [good | {'question': ''}]}).encode(), 422),
           (json.dumps({'items': [good | {'docs': [{'id': '1'}]}]}).encode(), 422),
           (json.dumps({'items': [good | {'golden_answers': None}]}).encode(), 422),
           (json.dumps({'items': [good | {'id': 'not-cached'}]}).encode(), 422),
           (json.dumps({'items': [good], 'extra': 1}).encode(), 422)]
    for body, status in bad:
        r = httpx.post(f'{url}/score', content=body, headers={'content-type': 'application/json'}, timeout=60)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert r.json()['error'], r.text
    r = httpx.post(f'{url}/score', content=json.dumps({'items': [good]}), headers={'content-type': 'text/plain'})
    assert r.status_code == 415
    assert httpx.get(f'{url}/nope').status_code == 404
    r = httpx.post(f'{url}/score', json={'items': [good]}, timeout=300)
    assert r.status_code == 200 and r.json()['results'][0]['id'] == 'q1'


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

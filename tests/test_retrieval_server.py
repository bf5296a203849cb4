"""System tests of the retrieval server: a real uvicorn process on a loopback port serving real dense and BM25
indexes over 200 passages, hit by concurrent clients, malformed requests and the original s3 client's request.
The tests that need the server process are marked `service` (run by `make test-all`)."""
import json, os, random, socket, subprocess, sys, textwrap, threading, time
from pathlib import Path
import pytest

requests = pytest.importorskip('requests')
pytest.importorskip('fastapi')
pytest.importorskip('uvicorn')
pytest.importorskip('bm25s')

ROOT = Path(__file__).resolve().parents[1]
ANIMALS = ['otter', 'falcon', 'badger', 'heron', 'lynx', 'walrus', 'gecko', 'marmot', 'ibis', 'tapir', 'bison', 'okapi']
CITIES = ['Lisbon', 'Oslo', 'Quito', 'Hanoi', 'Dakar', 'Perth', 'Lima', 'Riga', 'Bern', 'Cairo', 'Seoul', 'Tunis', 'Accra']
N_PASSAGES = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stderr.read().decode(errors='replace')[-3000:]}")
        try:
            r = requests.get(f"{url}/health", timeout=2)
            if r.status_code == 200: return r.json()
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server at {url} did not become healthy in {timeout} s")


@pytest.fixture(scope='module')
def indexes(tmp_path_factory):
    "A 200-passage wiki-18 style corpus with a bm25s and a dense (MiniLM, Flat) index."
    from s3_nbs.corpus import write_corpus
    from s3_nbs.bm25 import build_bm25_index
    from s3_nbs.index import build_dense_index
    d = tmp_path_factory.mktemp('retrieval')
    recs = [{'id': str(i), 'title': f'{ANIMALS[i % 12].title()} of {CITIES[i % 13]}',
             'text': f'The {ANIMALS[i % 12]} colony of {CITIES[i % 13]} was counted in survey {i}; '
                     f'it had {i * 7 % 101} members and lived near the {["river", "coast", "hills", "forest"][i % 4]}.'}
            for i in range(N_PASSAGES)]
    write_corpus(recs, d/'corpus.jsonl')
    bm25 = build_bm25_index(d/'corpus.jsonl', d/'bm25', show_progress=False)
    dense = build_dense_index(d/'corpus.jsonl', d/'dense', show_progress=False)
    return {'bm25': bm25, 'dense': dense}


@pytest.fixture(scope='module')
def server(indexes):
    "`serve(dense, bm25)` in its own process on a free loopback port."
    port = _free_port()
    code = textwrap.dedent(f"""
        from s3_nbs.server import serve
        serve({str(indexes['dense'])!r}, {str(indexes['bm25'])!r}, host='127.0.0.1', port={port}, log_level='warning')
    """)
    env = {**os.environ, 'TOKENIZERS_PARALLELISM': 'false'}
    env.pop('S3_RETRIEVER_TOKEN', None)
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        health = _wait_healthy(url, proc)
        yield {'url': url, 'health': health, 'proc': proc}
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()


@pytest.fixture(scope='module')
def local(indexes):
    "The same indexes loaded in this process as `serve` loads them (dense: bf16 where the CPU has it, length buckets)."
    from s3_nbs.index import load_retriever
    return {k: load_retriever(v, bf16='auto', length_buckets=True) for k, v in indexes.items()}


@pytest.mark.service
def test_health(server):
    h = server['health']
    assert h['status'] == 'ok' and h['default'] == 'dense'
    assert set(h['retrievers']) == {'dense', 'bm25'}
    assert h['retrievers']['dense']['count'] == h['retrievers']['bm25']['count'] == N_PASSAGES
    assert h['retrievers']['dense']['encoder'] == 'all-minilm-l6-v2'
    assert h['retrievers']['bm25']['kind'] == 'bm25'


@pytest.mark.service
def test_index_ids_come_from_the_manifests(server, indexes, local):
    "`/health` reports each retriever's index id (its manifest's hash): what a client reads, the same as in process, not the URL."
    from s3_nbs.index_folder import read_manifest
    from s3_nbs.retrieval import RetrievalClient, manifest_id, retriever_index_id
    h = server['health']
    for name in ('dense', 'bm25'):
        want = manifest_id(read_manifest(indexes[name]))
        assert h['retrievers'][name]['index_id'] == want == retriever_index_id(local[name])
        with RetrievalClient(server['url'], retriever=name) as c: assert retriever_index_id(c) == want
    assert h['retrievers']['dense']['index_id'] != h['retrievers']['bm25']['index_id']
    with RetrievalClient(server['url'] + '/retrieve/dense') as c:  # another URL of the same server and index
        assert c.index_id() == h['retrievers']['dense']['index_id']


@pytest.mark.service
def test_original_s3_client_request(server, local):
    "The request exactly as s3's generation code writes it, and its reading of the answer (plus Search-R1's shape)."
    url = server['url'] + '/retrieve'
    queries = ['Where does the otter colony of Lisbon live?', 'heron of Hanoi survey']
    payload = {"queries": queries, "topk": 3, "return_scores": True}
    out = requests.post(url, json=payload).json()
    for i in range(len(queries)):
        assert len(out['result'][i]) == 3
        for j, doc_item in enumerate(out['result'][i]):
            content = doc_item['document']['contents']
            title = content.split("\n")[0]
            text = "\n".join(content.split("\n")[1:])
            assert title.startswith('"') and text.startswith('The ')
            assert isinstance(doc_item['score'], float)
    want = local['dense'].batch_search(queries, 3)
    assert [[d['document']['id'] for d in row] for row in out['result']] == [[h['document']['id'] for h in row] for row in want]
    assert out['result'][0][0]['document']['contents'].startswith('"Otter of Lisbon"')
    # return_scores false: bare documents, as the original server answers
    bare = requests.post(url, json={**payload, 'return_scores': False}).json()['result']
    assert bare == [[d['document'] for d in row] for row in out['result']]
    # topk omitted -> the server default (3); BM25 by path and by body field
    assert [len(r) for r in requests.post(url, json={'queries': queries}).json()['result']] == [3, 3]
    by_path = requests.post(url + '/bm25', json=payload).json()['result']
    by_field = requests.post(url, json={**payload, 'retriever': 'bm25'}).json()['result']
    assert by_path == by_field == local['bm25'].batch_search(queries, 3)


@pytest.mark.service
def test_concurrent_clients(server, local):
    "16 concurrent clients x 200 requests (BM25, and dense for 1 in 40; 1-3 queries each, mostly uncached): zero errors."
    url = server['url'] + '/retrieve'
    n_clients, n_requests = 16, 200
    errors, checked, lock = [], [], threading.Lock()

    def client(c):
        rng = random.Random(c)
        with requests.Session() as s:
            for i in range(n_requests):
                name = 'dense' if i % 40 == 0 else 'bm25'
                qs = [f"{rng.choice(ANIMALS)} {rng.choice(CITIES)} survey {rng.randrange(1000)}" for _ in range(rng.randint(1, 3))]
                topk = rng.choice([3, 5, 8])
                try:
                    r = s.post(f"{url}/{name}", json={'queries': qs, 'topk': topk, 'return_scores': True}, timeout=60)
                    if r.status_code != 200:
                        with lock: errors.append((c, i, r.status_code, r.text[:200])); continue
                    res = r.json()['result']
                    if len(res) != len(qs) or any(len(row) != topk for row in res):
                        with lock: errors.append((c, i, 'shape', [len(x) for x in res]))
                    elif i % 25 == 0:
                        with lock: checked.append((name, qs, topk, res))
                except Exception as e:  # noqa: BLE001 - every failure counts
                    with lock: errors.append((c, i, type(e).__name__, str(e)[:200]))

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    secs = time.time() - t0
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    # the answers are the retriever's own (BM25 exactly; dense ids with scores to float tolerance)
    for name, qs, topk, res in checked:
        want = local[name].batch_search(qs, topk)
        if name == 'bm25': assert res == want
        else:  # batched with other requests: float differences (bf16: larger), so compare the scores with a tolerance
            tol = 2e-2 if local['dense'].encoder.bf16 else 2e-4
            for row, wrow in zip(res, want):
                assert [h['score'] for h in row] == pytest.approx([h['score'] for h in wrow], abs=tol)
    h = requests.get(server['url'] + '/health').json()
    stats = h['retrievers']['bm25']
    print(f"\n{n_clients * n_requests} requests in {secs:.1f} s ({n_clients * n_requests / secs:.0f} req/s); "
          f"bm25: {stats['requests']} requests in {stats['batches']} batches (largest {stats['max_batch_queries']} queries)")
    assert stats['batches'] < stats['requests'], "concurrent requests were never batched together"


BAD_REQUESTS = [
    # (description, kwargs for requests.request, expected status, a word the message must contain)
    ('invalid JSON', dict(data=b'{"queries": ["a"', headers={'content-type': 'application/json'}), 400, 'not valid JSON'),
    ('empty body', dict(data=b'', headers={'content-type': 'application/json'}), 400, 'empty'),
    ('invalid UTF-8', dict(data=b'\xff\xfe{}', headers={'content-type': 'application/json'}), 400, 'UTF-8'),
    ('a JSON list', dict(json=[{'queries': ['a']}]), 422, 'JSON object'),
    ('a JSON string', dict(json='who wrote hamlet?'), 422, 'JSON object'),
    ('no queries', dict(json={'topk': 3}), 422, "missing field 'queries'"),
    ('queries is a string', dict(json={'queries': 'who wrote hamlet?'}), 422, "'queries' must be a list"),
    ('queries is null', dict(json={'queries': None}), 422, "'queries' must be a list"),
    ('no query', dict(json={'queries': []}), 422, "'queries' is empty"),
    ('a number in queries', dict(json={'queries': ['ok', 42]}), 422, "'queries[1]' must be a string"),
    ('null in queries', dict(json={'queries': [None]}), 422, "'queries[0]' must be a string"),
    ('a list in queries', dict(json={'queries': [['nested']]}), 422, "'queries[0]' must be a string"),
    ('an empty query', dict(json={'queries': ['ok', '']}), 422, "'queries[1]' is empty"),
    ('a blank query', dict(json={'queries': ['   \n\t']}), 422, "'queries[0]' is empty"),
    ('too many queries', dict(json={'queries': ['otter'] * 513}), 422, 'limit of 512'),
    ('an over-long query', dict(json={'queries': ['otter ' * 400]}), 422, 'limit of 2000'),
    ('topk 0', dict(json={'queries': ['otter'], 'topk': 0}), 422, "'topk' must be between 1 and 100"),
    ('topk negative', dict(json={'queries': ['otter'], 'topk': -3}), 422, "'topk' must be between 1 and 100"),
    ('topk huge', dict(json={'queries': ['otter'], 'topk': 10 ** 9}), 422, "'topk' must be between 1 and 100"),
    ('topk a string', dict(json={'queries': ['otter'], 'topk': '3'}), 422, "'topk' must be an integer"),
    ('topk fractional', dict(json={'queries': ['otter'], 'topk': 2.5}), 422, "'topk' must be an integer"),
    ('topk a boolean', dict(json={'queries': ['otter'], 'topk': True}), 422, "'topk' must be an integer"),
    ('return_scores a string', dict(json={'queries': ['otter'], 'return_scores': 'yes'}), 422, "'return_scores'"),
    ('unknown retriever field', dict(json={'queries': ['otter'], 'retriever': 'splade'}), 422, "unknown retriever 'splade'"),
    ('retriever not a string', dict(json={'queries': ['otter'], 'retriever': 3}), 422, "'retriever' must be a string"),
    ('unknown retriever path', dict(json={'queries': ['otter']}, path='/retrieve/splade'), 404, "unknown retriever 'splade'"),
    ('wrong content type', dict(data=b'{"queries": ["otter"]}', headers={'content-type': 'text/plain'}), 415, 'application/json'),
    ('form data', dict(data={'queries': 'otter'}), 415, 'application/json'),
    ('GET instead of POST', dict(method='GET'), 405, 'not allowed'),
    ('no such route', dict(json={'queries': ['otter']}, path='/search'), 404, 'POST /retrieve'),
    ('a 9 MB body', dict(data=b'{"queries": ["' + b'a' * (9 << 20) + b'"]}', headers={'content-type': 'application/json'}),
     413, 'limit of'),
]


@pytest.mark.service
@pytest.mark.parametrize('desc,kw,status,words', BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_malformed_request(server, desc, kw, status, words):
    "Each malformed request gets a 4xx JSON answer that says what is wrong; a good request is served right after."
    kw = dict(kw)
    method, path = kw.pop('method', 'POST'), kw.pop('path', '/retrieve')
    r = requests.request(method, server['url'] + path, timeout=30, **kw)
    assert r.status_code == status, (desc, r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body.get('error'), str) and words in body['error'], (desc, body)
    ok = requests.post(server['url'] + '/retrieve', json={'queries': ['otter of Lisbon'], 'topk': 2, 'return_scores': True}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()['result'][0]) == 2


@pytest.mark.service
def test_async_client_against_server(server, local):
    "`RetrievalClient` (pooled async HTTP) over the live server: 64 concurrent searches match the retriever."
    import asyncio
    from s3_nbs.retrieval import RetrievalClient

    async def main():
        async with RetrievalClient(server['url'], retriever='bm25', max_connections=16) as c:
            qs = [[f"{a} {b}"] for a in ANIMALS[:8] for b in CITIES[:8]]
            return qs, await asyncio.gather(*[c.batch_search(q, 4) for q in qs])
    qs, res = asyncio.run(main())
    assert [r[0] for r in res] == [local['bm25'].search(q[0], 4) for q in qs]


@pytest.mark.service
def test_same_answers_as_baseline(server, indexes, local):
    """Our server's answers parse to exactly what the baseline (built like the original: pydantic body, dicts, FastAPI's
    JSON encoding) returns for the same request: BM25 against the live server, dense with both apps over one fp32
    retriever (the live server's dense scores are bf16 where the CPU has it)."""
    from s3_nbs.index import load_retriever
    from s3_nbs.server import ServerThread, baseline_app, create_app
    qs = ['Where does the otter colony of Lisbon live?', 'heron of Hanoi survey', 'bison Quito survey 17', 'zzzz', 'gecko']
    with ServerThread(baseline_app(local['bm25'])) as base:
        for rs in (True, False):
            body = {'queries': qs, 'topk': 5, 'return_scores': rs}
            ours, want = requests.post(server['url'] + '/retrieve/bm25', json=body), requests.post(base.url + '/retrieve', json=body)
            assert ours.status_code == want.status_code == 200
            assert ours.json() == want.json() and ours.content == want.content
    fp32 = load_retriever(indexes['dense'])
    with ServerThread(create_app({'dense': fp32})) as ours_srv, ServerThread(baseline_app(fp32)) as base:
        for rs in (True, False):
            body = {'queries': qs, 'topk': 4, 'return_scores': rs}
            ours, want = requests.post(ours_srv.url + '/retrieve', json=body), requests.post(base.url + '/retrieve', json=body)
            assert ours.json() == want.json() and ours.content == want.content

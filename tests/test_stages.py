"End-to-end runs of the pipeline stages through the `s3` command, on the embedded demo data (small settings)."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import nbformat, pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')

pytestmark = pytest.mark.slow  # real stage runs on the demo data: minutes on 2 cores (make test-all, .ci/run)


def s3(outputs, *args, timeout=900, **popen):
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(outputs)}
    return subprocess.run([S3, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def latest(outputs, stage):
    d = outputs/'runs'/stage
    return d/(d/'latest').read_text().strip()


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
    "One stage-1 and one stage-2 run shared by the tests of this module."
    out = tmp_path_factory.mktemp('outputs')
    r = s3(out, 'run', '01_prepare_data', '-p', 'max_passages=300', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    r = s3(out, 'run', '02_build_index', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_prepare_data(outputs):
    run_dir = latest(outputs, '01_prepare_data')
    man = json.loads((run_dir/'manifest.json').read_text())
    assert man['status'] == 'ok' and man['config']['data']['max_passages'] == 300
    assert man['metrics']['passages'] == 300
    q = man['metrics']['questions']
    assert q['train'] > q['dev'] > 0 and q['test'] > 0
    assert man['git']['sha'] is None or len(man['git']['sha']) == 40
    assert 'torch' in man['packages'] and man['seed'] == 42 and man['seconds'] > 0
    data = Path(man['metrics']['data_dir'])
    assert {p.name for p in data.iterdir()} >= {'corpus.jsonl', 'train.jsonl', 'dev.jsonl', 'test.jsonl', 'data_card.md'}
    assert 'CC BY-SA' in (data/'data_card.md').read_text()
    assert yaml.safe_load((run_dir/'params.yaml').read_text())['parameters'] == {'max_passages': 300}
    nb = nbformat.read(run_dir/'01_prepare_data.ipynb', as_version=4)
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
    assert (run_dir/'artifacts'/'counts.png').stat().st_size > 1000


def test_build_index(outputs):
    man = json.loads((latest(outputs, '02_build_index')/'manifest.json').read_text())
    assert man['status'] == 'ok' and set(man['metrics']['indexes']) == {'dense', 'bm25'}
    assert man['upstream']['01_prepare_data'] == str(latest(outputs, '01_prepare_data'))
    # the evidence pages are in the corpus, so a real retriever must find many of them
    assert man['metrics']['evidence_recall_at_8']['dense'] > 0.5 and man['metrics']['evidence_recall_at_8']['bm25'] > 0.3
    r = s3(outputs, 'run', '02_build_index', '--quiet')  # content-addressed: a re-run reuses the indexes
    assert r.returncode == 0, r.stderr
    man2 = json.loads((latest(outputs, '02_build_index')/'manifest.json').read_text())
    assert man2['metrics']['indexes'] == man['metrics']['indexes'] and man2['seconds'] < man['seconds']


def test_rag_cache_resumes_after_kill(outputs):
    "Kill the stage (whole process group) mid-way; the re-run finishes the cache with nothing lost or duplicated."
    n = 60
    args = ['run', '03_rag_cache', '-p', f'max_questions={n}', '-p', 'chunk_size=2', '-p', 'retriever=bm25',
            '-p', 'model=tiny-llama', '--set', 'generator.max_tokens=8', '--quiet']
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(outputs)}
    p = subprocess.Popen([S3, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cache_dir, deadline = outputs/'rag_cache', time.time() + 300
    lines = lambda: sum(1 for f in cache_dir.glob('*.jsonl') for _ in open(f)) if cache_dir.exists() else 0
    while lines() < 6 and time.time() < deadline and p.poll() is None: time.sleep(0.2)
    assert p.poll() is None, f'the stage ended (exit {p.returncode}) before it could be killed: run it by hand to see why'
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    killed_at = lines()
    assert 0 < killed_at < n, f'the kill should land mid-way (cache had {killed_at} of {n} entries)'
    r = s3(outputs, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    man = json.loads((latest(outputs, '03_rag_cache')/'manifest.json').read_text())
    m = man['metrics']
    assert m['cached_before'] >= killed_at - 2 and m['cached_before'] + m['computed'] == n == m['questions']
    rows = [json.loads(l) for l in open(m['cache_path'])]
    assert len(rows) == len({r['id'] for r in rows}) == n, 'no duplicates, nothing missing'
    assert all(set(r) >= {'answer', 'genacc', 'em', 'doc_ids', 'acc'} and len(r['doc_ids']) == 3 for r in rows)
    r = s3(outputs, *args)  # a third run computes nothing
    assert r.returncode == 0 and json.loads((latest(outputs, '03_rag_cache')/'manifest.json').read_text())['metrics']['computed'] == 0


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_search_stage_against_retrieval_server(outputs):
    "Stage 5 through a real `s3 serve-retriever` process: every question gets a record and a context, none missing."
    import httpx
    idx = json.loads((latest(outputs, '02_build_index')/'manifest.json').read_text())['metrics']['indexes']
    port = _free_port()
    srv = subprocess.Popen([S3, 'serve-retriever', '--index', f"dense={idx['dense']}", '--port', str(port)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert srv.poll() is None, srv.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f'http://127.0.0.1:{port}/health', timeout=5).status_code == 200: break
            except httpx.TransportError: pass
            assert time.time() < deadline, 'the retrieval server did not start'
            time.sleep(0.3)
        n = 5
        args = ['run', '05_search', '-p', 'searcher="tiny-llama"', '-p', f'max_questions={n}', '-p', 'batch_size=3',
                '-p', f'retrieval_url="http://127.0.0.1:{port}"', '--set', 'searcher.max_step_tokens=24', '--quiet']
        r = s3(outputs, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        first = latest(outputs, '05_search')
        r = s3(outputs, *args)  # same content key: everything comes from the search log, nothing is searched again
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.killpg(srv.pid, signal.SIGTERM); srv.wait(30)
    run_dir = latest(outputs, '05_search')
    man = json.loads((run_dir/'manifest.json').read_text())
    m = man['metrics']
    assert man['status'] == 'ok' and m['questions'] == n and m['empty_context'] == 0
    assert (m['computed'], m['cached_before']) == (0, n) and run_dir != first
    m1 = json.loads((first/'manifest.json').read_text())['metrics']
    assert (m1['computed'], m1['cached_before']) == (n, 0) and m1['search_log'] == m['search_log']
    assert (first/'artifacts'/'contexts.jsonl').read_text() == (run_dir/'artifacts'/'contexts.jsonl').read_text()
    assert man['config']['searcher']['model'] == 'tiny-llama' and man['config']['retrieval']['url'] == f'http://127.0.0.1:{port}'
    test_qs = [json.loads(l) for l in open(Path(latest(outputs, '01_prepare_data'))/'artifacts'/'data'/'test.jsonl')][:n]
    ctx = [json.loads(l) for l in open(run_dir/'artifacts'/'contexts.jsonl')]
    assert [c['id'] for c in ctx] == [q['id'] for q in test_qs], 'one context per question, in order'
    res = [json.loads(l) for l in open(run_dir/'artifacts'/'results.jsonl')]
    for c, rr in zip(ctx, res):
        assert len(c['context_docs']) >= 3 and c['context'].startswith('Doc 1 (Title: ')  # D0 at least
        assert rr['n_turns'] >= 1 and rr['finish_reason'] in ('complete', 'max_turns', 'context_full')
        assert rr['generated_tokens'] > 0 and len(rr['turns']) == rr['n_turns']
    summary = json.loads((run_dir/'artifacts'/'summary.json').read_text())
    assert summary['questions'] == n and sum(summary['turns_hist'].values()) == n
    assert (run_dir/'artifacts'/'summary.png').stat().st_size > 1000


def test_search_stage_without_selection(outputs):
    "Stage 5 with `searcher.selection=false`: recorded in the results, no selection asked, D_s3 = D0 + every retrieved document, its own search log."
    args = ['run', '05_search', '-p', 'searcher="tiny-llama"', '-p', 'max_questions=2', '-p', 'batch_size=2',
            '--set', 'searcher.max_step_tokens=16', '--quiet']
    r = s3(outputs, *args, '--set', 'searcher.selection=false')
    assert r.returncode == 0, r.stdout + r.stderr
    off = latest(outputs, '05_search')
    man = json.loads((off/'manifest.json').read_text())
    assert man['status'] == 'ok' and man['config']['searcher']['selection'] is False
    res = [json.loads(l) for l in open(off/'artifacts'/'results.jsonl')]
    assert len(res) == 2
    for rr in res:
        assert rr['protocol']['selection'] is False and 'important_info' not in rr['prompt']
        every = [d['id'] for d in rr['d0']] + [i for b in rr['blocks'] for i in b['doc_ids']]
        assert [d['id'] for d in rr['context_docs']] == list(dict.fromkeys(every))
    assert json.loads((off/'artifacts'/'summary.json').read_text())['protocol']['selection'] is False
    r = s3(outputs, *args)  # with selection (the default): another content key, so another search log
    assert r.returncode == 0, r.stdout + r.stderr
    on = json.loads((latest(outputs, '05_search')/'manifest.json').read_text())
    assert on['config']['searcher']['selection'] is True and on['metrics']['search_log'] != man['metrics']['search_log']
    assert all('important_info' in json.loads(l)['prompt'] for l in open(latest(outputs, '05_search')/'artifacts'/'results.jsonl'))


def test_train_stage(outputs):
    "Stages 3b and 4 on the stage-3 cache above: two PPO steps of the tiny Llama, a checkpoint per step, curves, metrics."
    r = s3(outputs, 'run', '03_rag_cache', '-p', 'max_questions=20', '-p', 'retriever=bm25', '-p', 'model=tiny-llama',
           '--set', 'generator.max_tokens=8', '--quiet')  # (entries the kill test above cached are reused)
    assert r.returncode == 0, r.stdout + r.stderr
    r = s3(outputs, 'run', '03b_training_set', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    args = ['run', '04_train', '-p', 'searcher="tiny-llama"', '-p', 'steps=2', '-p', 'dev_questions=2',
            '--set', 'retrieval.retriever=bm25', '--set', 'generator.model=tiny-llama', '--set', 'generator.max_tokens=8',
            '--set', 'train.batch_size=2', '--set', 'train.ppo_mini_batch_size=2', '--set', 'train.ppo_micro_batch_size=2',
            '--set', 'train.save_every=1', '--set', 'train.wandb=disabled', '--set', 'searcher.max_step_tokens=16',
            '--set', 'searcher.max_turns=1', '--quiet']
    r = s3(outputs, *args, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = latest(outputs, '04_train')
    man = json.loads((run_dir/'manifest.json').read_text())
    m = man['metrics']
    assert man['status'] == 'ok' and m['steps'] == 2 and m['algorithm'] == 'ppo' and m['accuracy'] == 'span'
    steps = [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines()]
    assert [s['step'] for s in steps] == [1, 2] and all(s['trajectories'] == 2 for s in steps)
    assert sorted(p.name for p in (run_dir/'checkpoints').iterdir()) == ['step_000001', 'step_000002']
    assert (Path(m['checkpoint'])/'actor'/'config.json').is_file() and (Path(m['checkpoint'])/'COMPLETE').is_file()
    assert (run_dir/'artifacts'/'training_curves.png').stat().st_size > 1000
    assert set(man['upstream']) >= {'01_prepare_data', '02_build_index', '03_rag_cache', '03b_training_set'}
    # `s3 train --resume`: the same folder, config and parameters, one more step from the last checkpoint
    r = s3(outputs, 'train', '--resume', run_dir.name, '--steps', '3', '--quiet', timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    man = json.loads((run_dir/'manifest.json').read_text())
    steps = [json.loads(l) for l in (run_dir/'metrics.jsonl').read_text().splitlines()]
    assert man['attempt'] == 2 and man['metrics']['steps'] == 3 and [s['step'] for s in steps] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir/'checkpoints').iterdir()) == ['step_000002', 'step_000003']  # keep-last 2
    assert (run_dir/'04_train.attempt1.ipynb').is_file()
    # stage 05 loads the trained searcher by run id
    r = s3(outputs, 'run', '05_search', '-p', f'searcher="{run_dir.name}"', '-p', 'max_questions=2', '--set', 'retrieval.retriever=bm25',
           '--set', 'searcher.max_step_tokens=16', '--set', 'searcher.max_turns=1', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    man5 = json.loads((latest(outputs, '05_search')/'manifest.json').read_text())
    assert man5['metrics']['searcher'] == str(run_dir/'checkpoints'/'step_000003'/'actor')
    assert man5['upstream']['04_train'] == str(run_dir)
    # the same config and inputs again: the finished run is taken over (checkpoints hard-linked), not trained again
    r = s3(outputs, *[a if a != 'steps=2' else 'steps=3' for a in args], timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    again = latest(outputs, '04_train')
    m2 = json.loads((again/'manifest.json').read_text())['metrics']
    assert again != run_dir and m2['reused_from'] == str(run_dir) and m2['inputs_key'] == man['metrics']['inputs_key']
    assert m2['steps'] == 3 and [json.loads(l)['step'] for l in (again/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]
    w = next((run_dir/'checkpoints'/'step_000003'/'actor').glob('*.safetensors'))
    assert (again/'checkpoints'/'step_000003'/'actor'/w.name).is_file() and m2['seconds'] < m['seconds']

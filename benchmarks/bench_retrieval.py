#!/usr/bin/env python
"""Retrieval server benchmark: our micro-batched server (`s3_nbs.server.create_app`) vs. a baseline built the way the
original s3 / Search-R1 server is (`s3_nbs.server.baseline_app`: every request searched on its own in FastAPI's thread
pool, fp32 query encoding, BM25 one query at a time in a loop, the response built as Python dicts).

Our server loads the dense retriever the way `s3 serve-retriever` does: bf16 autocast where the CPU has native bf16
units (AMX / AVX512-BF16; `Encoder(bf16='auto')`) and token-length buckets (`length_buckets=True`); BM25 batches
are tokenised once and scored in one vectorised pass. Because bf16 changes the dense scores slightly, the benchmark
also prints the top-k agreement of our answers with the fp32 baseline's (shared doc ids per query, on requests
not used for timing).

Measures throughput (queries/s) and p50/p99 latency of requests of `--batch` queries (120, s3's training batch) at
`--topk` 8, for dense (MiniLM, FAISS Flat) and BM25 (bm25s), with 1 and 16 concurrent clients, on the demo corpus
(a `--passages` subset). Each server runs in its own process; the clients run in this one. Every query of a
measurement is distinct (the result cache never hits; on a small corpus the passage spans that serve as queries
start closer together, and a run that still runs out of distinct queries says so), and ours and the baseline are
measured alternately, round by round, on the same queries, so load from other processes on the machine hits both
alike. Prints one table and the ratios from this one run; `--json` also writes them, with the machine and the
command.

    .venv/bin/python benchmarks/bench_retrieval.py            # 2,000 passages, 4 rounds (~10 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_retrieval.py --quick    # 500 passages, 2 rounds (~3 min)
    .venv/bin/python benchmarks/bench_retrieval.py --quick --json benchmarks/results/bench_retrieval/quick.json  # the committed figures (nbs/api/11_server)
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, random, re, socket, subprocess, sys, threading, time
from pathlib import Path

for k, v in dict(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false').items():
    os.environ.setdefault(k, v)


# ---------------------------------------------------------------------------------------------------- server side
def serve_one(kind: str, index_dir: str, port: int) -> None:
    "Run one server (`ours` or `baseline`) over one index folder in this process (the `--serve` mode)."
    import uvicorn
    from s3_nbs.index import load_retriever
    from s3_nbs.server import baseline_app, create_app
    # the original encodes in chunks of up to 512 queries, in fp32 on a CPU; ours as `s3 serve-retriever` loads it
    kw = dict(bf16='auto', length_buckets=True) if kind == 'ours' else {}
    r = load_retriever(index_dir, batch_size=512, **kw)
    app = create_app({r.kind: r}) if kind == 'ours' else baseline_app(r)
    uvicorn.run(app, host='127.0.0.1', port=port, log_level='warning', timeout_keep_alive=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    "A server process (ours or the baseline) over one index."
    def __init__(self, kind: str, index_dir: Path):
        self.kind, self.port = kind, _free_port()
        self.url = f"http://127.0.0.1:{self.port}/retrieve"
        self.proc = subprocess.Popen([sys.executable, __file__, '--serve', kind, '--index', str(index_dir), '--port', str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, timeout: float = 300.0) -> None:
        import httpx
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server died:\n{self.proc.stderr.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.post(self.url, json={'queries': ['warm up'], 'topk': 1}, timeout=60).status_code == 200: return
            except httpx.TransportError: pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.kind} server did not start")

    def cpu_s(self) -> float:
        "CPU seconds (user + system, all threads) the server process has used so far."
        f = Path(f'/proc/{self.proc.pid}/stat').read_text().rsplit(')', 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')

    def stop(self) -> None:
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()


# ---------------------------------------------------------------------------------------------------- client side
def run_clients(url: str, batches: list[list[str]], n_clients: int, topk: int) -> dict:
    """`n_clients` threads, each with its own pooled connection, send their share of `batches` one after another.
    Returns the wall time, per-request latencies and the number of errors."""
    import httpx
    share = [batches[c::n_clients] for c in range(n_clients)]
    lat, errors, lock = [], [], threading.Lock()
    barrier = threading.Barrier(n_clients + 1)

    def client(mine):
        with httpx.Client(timeout=600) as c:
            barrier.wait()
            for k, qs in enumerate(mine):
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json={'queries': qs, 'topk': topk, 'return_scores': True})
                    ok = r.status_code == 200
                    if ok and k == 0:  # check the shape of each client's first answer
                        res = r.json()['result']
                        ok = len(res) == len(qs) and all(0 < len(row) <= topk for row in res)
                except httpx.HTTPError as e:
                    ok, r = False, e
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    if not ok: errors.append(str(getattr(r, 'status_code', r))[:200])

    threads = [threading.Thread(target=client, args=(m,)) for m in share]
    for t in threads: t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads: t.join()
    return dict(wall_s=time.perf_counter() - t0, latencies=lat, errors=errors, queries=sum(map(len, batches)))


def agreement(urls: dict, batches: list[list[str]], topk: int) -> dict:
    "Top-k agreement of our answers with the baseline's: mean fraction of shared doc ids per query, and identical lists."
    import httpx
    ids = {}
    for k, url in urls.items():
        with httpx.Client(timeout=600) as c:
            ids[k] = [[d['document']['id'] for d in row] for qs in batches
                      for row in c.post(url, json={'queries': qs, 'topk': topk, 'return_scores': True}).json()['result']]
    o, b = ids['ours'], ids['baseline']
    shared = [len(set(x) & set(y)) / max(1, len(y)) for x, y in zip(o, b)]
    return dict(queries=len(b), shared_ids=sum(shared) / max(1, len(shared)), identical=sum(x == y for x, y in zip(o, b)) / max(1, len(b)))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def host() -> dict:
    "The machine's details for the JSON file: CPU model and cores, platform, python/torch versions, date, load."
    import torch
    from s3_nbs.models import cpu_has_fast_bf16
    cpu = next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    return dict(date=datetime.date.today().isoformat(), node=platform.node(), platform=platform.platform(), cpu=cpu,
                cpus=os.cpu_count(), fast_bf16=cpu_has_fast_bf16(), python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), load_before=os.getloadavg())


# ---------------------------------------------------------------------------------------------------- data
def prepare(n_passages: int, need: int = 0) -> tuple[dict, list[str]]:
    """The demo corpus subset, its dense (MiniLM, Flat) and BM25 (bm25s) indexes (cached), and a pool of distinct
    queries, at least `need` where the passages allow (spans start closer together on a small corpus)."""
    from s3_nbs.config import cache_dir
    from s3_nbs.data import read_qa_jsonl
    from s3_nbs.demo import build_demo_set
    from s3_nbs.bm25 import build_bm25_index
    from s3_nbs.index import build_dense_index
    from s3_nbs.corpus import read_corpus, split_contents
    d = cache_dir('bench', f'retrieval-{n_passages or "all"}')
    build_demo_set(d/'demo', max_passages=n_passages or None)
    corpus = d/'demo'/'corpus.jsonl'
    t0 = time.time()
    idx = {'dense': build_dense_index(corpus, d/'dense', encoder='all-minilm-l6-v2', index_type='flat', show_progress=True),
           'bm25': build_bm25_index(corpus, d/'bm25', backend='bm25s', show_progress=False)}
    print(f"indexes ready in {time.time() - t0:.0f} s: {d}", flush=True)
    # distinct, question-like queries: the demo questions, then 5-14-word spans of the passages
    questions = [e.question for s in ('train', 'dev', 'test') for e in read_qa_jsonl(d/'demo'/f'{s}.jsonl')]
    texts = [re.findall(r"[\w'-]+", split_contents(rec['contents'])[1]) for rec in read_corpus(corpus)]
    for stride in (9, 7, 5, 3, 2, 1):
        rng, qs = random.Random(0), list(questions)
        for words in texts:
            for start in range(0, max(1, len(words) - 5), stride):
                qs.append(' '.join(words[start:start + rng.randint(5, 14)]))
        qs = list(dict.fromkeys(q for q in qs if q.strip()))
        if len(qs) >= need: break
    rng.shuffle(qs)
    return idx, qs


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='500 passages, 2 rounds (~3 min)')
    ap.add_argument('--passages', type=int, default=None, help='demo corpus subset size (default 2000; 0 = all 10,033)')
    ap.add_argument('--retrievers', nargs='+', default=['dense', 'bm25'], choices=['dense', 'bm25'])
    ap.add_argument('--clients', nargs='+', type=int, default=[1, 16])
    ap.add_argument('--batch', type=int, default=120, help='queries per request (s3 training batch: 120)')
    ap.add_argument('--topk', type=int, default=8)
    ap.add_argument('--requests', type=int, default=None, help='requests per client and round (default 6 for 1 client, 2 for more)')
    ap.add_argument('--rounds', type=int, default=None, help='alternating rounds per setting, ours first in even rounds (default 4; --quick 2)')
    ap.add_argument('--json', default=None, help='also write the figures to this JSON file')
    ap.add_argument('--serve', choices=['ours', 'baseline'], help=argparse.SUPPRESS)
    ap.add_argument('--index', help=argparse.SUPPRESS)
    ap.add_argument('--port', type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve: serve_one(a.serve, a.index, a.port); return 0

    n_passages = a.passages if a.passages is not None else (500 if a.quick else 2000)
    rounds = a.rounds or (2 if a.quick else 4)
    n_req = lambda nc: a.requests or (2 if a.quick and nc > 1 else 6 if nc == 1 else 2)
    need = len(a.retrievers) * a.batch * (6 + 4 + rounds * sum(n_req(nc) * nc for nc in a.clients))  # warm-up, agreement, timing
    idx, pool = prepare(n_passages, need)
    import torch
    machine = (f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPU cores | "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads) | python {platform.python_version()}")
    info = host()
    print(f"machine: {machine}; load average (1 min) {os.getloadavg()[0]:.1f}\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
          f"corpus: {n_passages or 'all'} demo passages; requests of {a.batch} distinct queries, topk {a.topk}; "
          f"{rounds} alternating round(s); query pool {len(pool):,} for {need:,} queries", flush=True)

    rows, agree, off, wrapped = [], {}, 0, False
    def take(n_req):
        nonlocal off, wrapped
        k = n_req * a.batch
        if off + k > len(pool):  # the corpus is too small for this many distinct queries: our result cache may then hit
            off, wrapped = 0, True
            print("  WARNING: query pool exhausted, queries repeat from here (ours may answer them from its cache)", flush=True)
        b = [pool[off + i * a.batch: off + (i + 1) * a.batch] for i in range(n_req)]
        off += k
        return b

    for name in a.retrievers:
        servers = {k: Server(k, idx[name]) for k in ('ours', 'baseline')}
        try:
            for s in servers.values(): s.wait()
            warm = take(6)
            for s in servers.values():  # warm-up (the same full-size requests for both), not timed
                run_clients(s.url, warm[:4], 1, a.topk); run_clients(s.url, warm[4:], 2, a.topk)
            for nc in a.clients:
                acc = {k: dict(wall_s=0.0, latencies=[], errors=[], queries=0, cpu_s=0.0) for k in servers}
                for r in range(rounds):
                    batches = take(n_req(nc) * nc)
                    order = ('ours', 'baseline') if r % 2 == 0 else ('baseline', 'ours')
                    for k in order:
                        c0 = servers[k].cpu_s()
                        res = run_clients(servers[k].url, batches, nc, a.topk)
                        acc[k]['cpu_s'] += servers[k].cpu_s() - c0
                        for f in ('wall_s', 'queries'): acc[k][f] += res[f]
                        acc[k]['latencies'] += res['latencies']; acc[k]['errors'] += res['errors']
                for k, m in acc.items():
                    rows.append(dict(retriever=name, clients=nc, server=k, requests=len(m['latencies']), errors=len(m['errors']),
                                     qps=m['queries'] / m['wall_s'], p50_ms=1000 * pct(m['latencies'], 50),
                                     p99_ms=1000 * pct(m['latencies'], 99), cpu_ms_per_q=1000 * m['cpu_s'] / m['queries']))
                    x = rows[-1]
                    print(f"  {name:5} {nc:2} client(s) {k:8}: {x['qps']:8.1f} q/s  p50 {x['p50_ms']:8.1f} ms  p99 {x['p99_ms']:8.1f} ms  "
                          f"server CPU {x['cpu_ms_per_q']:6.2f} ms/query  ({x['requests']} requests, {x['errors']} errors)", flush=True)
            agree[name] = agreement({k: s.url for k, s in servers.items()}, take(4), a.topk)
            print(f"  {name:5} top-{a.topk} agreement of ours with the baseline on {agree[name]['queries']} queries: "
                  f"{agree[name]['shared_ids']:.4f} of doc ids shared, {agree[name]['identical']:.4f} of lists identical", flush=True)
        finally:
            for s in servers.values(): s.stop()

    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"\n{'retriever':9} {'clients':>7} | {'ours q/s':>9} {'base q/s':>9} {'x thr':>6} | {'ours p50':>9} {'base p50':>9} "
          f"{'x p50':>6} | {'ours p99':>9} {'base p99':>9} {'x p99':>6} | {'x CPU':>6} | errors")
    summary = []
    for name in a.retrievers:
        for nc in a.clients:
            o, b = [next(x for x in rows if x['retriever'] == name and x['clients'] == nc and x['server'] == k) for k in ('ours', 'baseline')]
            s = dict(retriever=name, clients=nc, throughput_x=o['qps'] / b['qps'], p50_x=b['p50_ms'] / o['p50_ms'],
                     p99_x=b['p99_ms'] / o['p99_ms'], cpu_x=b['cpu_ms_per_q'] / max(1e-9, o['cpu_ms_per_q']),
                     errors=o['errors'] + b['errors'])
            summary.append(s)
            print(f"{name:9} {nc:>7} | {o['qps']:9.1f} {b['qps']:9.1f} {s['throughput_x']:5.2f}x | {o['p50_ms']:7.1f}ms {b['p50_ms']:7.1f}ms "
                  f"{s['p50_x']:5.2f}x | {o['p99_ms']:7.1f}ms {b['p99_ms']:7.1f}ms {s['p99_x']:5.2f}x | {s['cpu_x']:5.2f}x | {s['errors']}")
    print(f"(x thr = our throughput / baseline's; x p50, x p99 = baseline latency / ours, per request of {a.batch} queries; "
          "x CPU = baseline server CPU time per query / ours)")
    targets = [('dense', 16, 2.0), ('bm25', 1, 5.0), ('bm25', 16, 5.0)]
    for name, g in agree.items():
        print(f"top-{a.topk} agreement {name}: ours vs baseline share {g['shared_ids']:.4f} of doc ids ({g['identical']:.4f} of lists identical; "
              f"{g['queries']} queries) -> {'ok' if g['shared_ids'] >= 0.95 else 'BELOW 0.95'}")
    for name, nc, t in targets:
        s = next((x for x in summary if x['retriever'] == name and x['clients'] == nc), None)
        if s: print(f"target {name} x{t:g} with {nc} client(s): {s['throughput_x']:.2f}x -> {'met' if s['throughput_x'] >= t else 'NOT met'}")
    if a.json:  # everything the table and the ratios above show, with the machine and the command
        info['load_after'] = os.getloadavg()
        cmd = ' '.join([Path(sys.executable).name, *sys.argv])
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(host=info, machine=machine, command=cmd, argv=sys.argv, passages=n_passages,
                                                rounds=rounds, batch=a.batch, topk=a.topk, encoder='all-minilm-l6-v2',
                                                query_pool=len(pool), queries_needed=need, queries_repeated=wrapped,
                                                ours_bf16=info['fast_bf16'], rows=rows, summary=summary, agreement=agree), indent=1))
        print(f"wrote {a.json}")
    return 0 if all(s['errors'] == 0 for s in summary) else 1


if __name__ == '__main__':
    sys.exit(main())

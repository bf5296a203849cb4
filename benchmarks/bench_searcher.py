"""Searcher rollout throughput: the batched loop (one generation + one retrieval per turn for all questions) against
one question at a time, with the same policy, retriever and questions. Prints trajectories/s for both and the ratio.

    python benchmarks/bench_searcher.py                       # 32 demo test questions, SmolLM2-135M, bm25s over HTTP
    python benchmarks/bench_searcher.py --in-process          # search the index in-process instead of via the server
    python benchmarks/bench_searcher.py --questions 8 --max-step-tokens 48 --json out.json

Data: the latest `01_prepare_data` run (else the demo set is built into the cache). Index: bm25s over its corpus,
built once into the cache. Decoding is greedy, so both modes do the same work (token counts are printed to compare).
"""
from __future__ import annotations
import argparse, json, os, platform, sys, time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def data_dir() -> Path:
    from s3_nbs.pipeline import latest_run
    run = latest_run('01_prepare_data', required=False)
    if run is not None and (run/'artifacts'/'data'/'test.jsonl').is_file(): return run/'artifacts'/'data'
    from s3_nbs.config import cache_dir
    from s3_nbs.demo import build_demo_set
    out = cache_dir('bench', 'demo-data')
    build_demo_set(out, max_passages=2000)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--questions', type=int, default=32, help='questions (from the test split, then dev/train if short)')
    ap.add_argument('--model', default='smollm2-135m-instruct', help='searcher policy (name, folder or checkpoint)')
    ap.add_argument('--device', default=None, help='cpu | cuda (default: CUDA when present)')
    ap.add_argument('--dtype', default='inference', help="model dtype for both modes: inference (bf16 on CUDA and on CPUs with native bf16, else fp32) | float32 | bfloat16")
    ap.add_argument('--max-turns', type=int, default=3, help='Z')
    ap.add_argument('--retrieved-per-search', type=int, default=8, help='X')
    ap.add_argument('--max-selected', type=int, default=3, help='Y')
    ap.add_argument('--max-step-tokens', type=int, default=96, help='tokens per generation step (smoke config: 96)')
    ap.add_argument('--max-obs-tokens', type=int, default=600)
    ap.add_argument('--max-context-tokens', type=int, default=2048)
    ap.add_argument('--max-initial-prompt-tokens', type=int, default=1024)
    ap.add_argument('--batch-size', type=int, default=0, help='rows per batched rollout (0 = all questions)')
    ap.add_argument('--in-process', action='store_true', help='search the index in-process (default: a loopback /retrieve server)')
    ap.add_argument('--skip-sequential', action='store_true', help='only the batched run')
    ap.add_argument('--repeat', type=int, default=1, help='alternate the two modes this many times; the fastest run of each counts')
    ap.add_argument('--json', default='', help='write the numbers to this JSON file')
    a = ap.parse_args(argv)

    import torch
    from s3_nbs.config import SearcherConfig, cache_dir, seed_everything
    from s3_nbs.corpus import corpus_hash
    from s3_nbs.data import read_qa_jsonl
    from s3_nbs.index import BM25sRetriever, build_bm25_index
    from s3_nbs.rollout import HFPolicy, run_searcher, summarize

    seed_everything(0)
    d = data_dir()
    qs = []
    for split in ('test', 'dev', 'train'):
        qs += read_qa_jsonl(d/f'{split}.jsonl')
        if len(qs) >= a.questions: break
    qs = qs[:a.questions]
    corpus = d/'corpus.jsonl'
    idx = build_bm25_index(corpus, cache_dir('bench', f'bm25s-{corpus_hash(corpus)[:16]}'), show_progress=False)
    local = BM25sRetriever(idx)
    cfg = SearcherConfig(model=a.model, max_turns=a.max_turns, retrieved_per_search=a.retrieved_per_search,
                         max_selected=a.max_selected, max_step_tokens=a.max_step_tokens, max_obs_tokens=a.max_obs_tokens,
                         max_context_tokens=a.max_context_tokens, max_initial_prompt_tokens=a.max_initial_prompt_tokens)
    t = time.perf_counter()
    policy = HFPolicy(a.model, device=a.device, dtype=a.dtype)
    print(f"policy {a.model} on {policy.model.device} ({policy.model.dtype}) loaded in {time.perf_counter() - t:.1f} s; {len(qs)} questions; "
          f"X-Y-Z {cfg.retrieved_per_search}-{cfg.max_selected}-{cfg.max_turns}; step {cfg.max_step_tokens} tokens; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    server = None
    if a.in_process: retriever, where = local, 'in-process bm25s'
    else:
        from s3_nbs.retrieval import RetrievalClient
        from s3_nbs.server import ServerThread, create_app
        server = ServerThread(create_app(local)).start()
        retriever, where = RetrievalClient(server.url), f'bm25s behind {server.url}/retrieve'
    print(f"retriever: {where}", flush=True)

    def run(label, batch_size):
        st = {}
        policy.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_searcher(qs, policy, retriever, cfg=cfg, greedy=True, batch_size=batch_size, stats=st)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = summarize(res)
        row = dict(mode=label, batch_size=batch_size, seconds=round(secs, 2), trajectories_per_s=round(len(res) / secs, 4),
                   cpu_seconds=round(cpu, 2), trajectories_per_cpu_s=round(len(res) / cpu, 4),
                   generate_s=round(st['generate_s'], 2), retrieve_s=round(st['retrieve_s'], 3),
                   generate_calls=st['generate_calls'], retrieve_calls=st['retrieve_calls'],
                   generated_tokens=sum(r.generated_tokens for r in res), response_tokens=sum(r.response_tokens for r in res),
                   mean_turns=s['mean_turns'], mean_searches=s['mean_searches'], invalid_rate=s['invalid_rate'])
        print(f"{label:>10}: {len(res)} trajectories in {secs:8.1f} s = {row['trajectories_per_s']:.4f} traj/s, CPU time {cpu:.1f} s "
              f"(generate {row['generate_s']:.1f} s in {row['generate_calls']} calls, retrieve {row['retrieve_s']:.2f} s in "
              f"{row['retrieve_calls']} calls; {row['generated_tokens']} generated / {row['response_tokens']} response tokens; "
              f"turns {row['mean_turns']}, searches {row['mean_searches']})", flush=True)
        return row

    try:
        run_searcher(qs[:1], policy, retriever, cfg=replace(cfg, max_turns=1), greedy=True)  # warm-up
        runs = []
        for _ in range(max(1, a.repeat)):
            runs.append(run('batched', a.batch_size or len(qs)))
            if not a.skip_sequential: runs.append(run('sequential', 1))
    finally:
        if server is not None: server.stop()
    rows = [min((r for r in runs if r['mode'] == m), key=lambda r: r['seconds']) for m in ('batched', 'sequential')
            if any(r['mode'] == m for r in runs)]
    out = dict(rows=rows, runs=runs, questions=len(qs), model=a.model, device=str(policy.model.device), dtype=str(policy.model.dtype), retriever=where,
               config=dict(X=cfg.retrieved_per_search, Y=cfg.max_selected, Z=cfg.max_turns, turn_budget=cfg.turn_budget,
                           feedback=cfg.feedback, drop_eos=cfg.drop_eos, max_step_tokens=cfg.max_step_tokens),
               host=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads()))
    if len(rows) == 2:
        out['speedup'] = round(rows[0]['trajectories_per_s'] / rows[1]['trajectories_per_s'], 2)
        out['speedup_cpu_time'] = round(rows[0]['trajectories_per_cpu_s'] / rows[1]['trajectories_per_cpu_s'], 2)
        print(f"speedup batched / sequential: {out['speedup']:.2f}x wall-clock, {out['speedup_cpu_time']:.2f}x CPU time "
              f"(fastest of {max(1, a.repeat)} run(s) each; target >= 3x)")
    if a.json: Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == '__main__':
    main()

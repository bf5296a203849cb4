"""Searcher rollout throughput: the batched loop (one generation + one retrieval per turn for all questions) against
one question at a time, with the same policy, retriever and questions. Prints trajectories/s for both and the ratio.

The batched loop also runs on the key/value-cache variants of the `s3` engine, side by side: `buffer` (the default:
`BufferLayer`, a subclass of transformers' `DynamicLayer` written in place, and the `s3_gqa_sdpa` attention),
`dynamic` (transformers' own `DynamicLayer`, concatenated at each step, with `s3_gqa_sdpa`) and `library`
(`DynamicLayer` and transformers' `sdpa`: no transformers internals at all). `kv_layer_gain` and `library_gain` are
their wall-clock ratios to `buffer`.

    python benchmarks/bench_searcher.py                       # 32 demo test questions, SmolLM2-135M, bm25s over HTTP
    python benchmarks/bench_searcher.py --in-process          # search the index in-process instead of via the server
    python benchmarks/bench_searcher.py --questions 8 --max-step-tokens 48 --json out.json
    python benchmarks/bench_searcher.py --questions 12 --max-step-tokens 48 --repeat 2 \
        --json benchmarks/results/bench_searcher/kv_layer.json  # the committed figures (quoted by nbs/api/41_rollout)

Data: the latest `01_prepare_data` run (else the demo set is built into the cache). Index: bm25s over its corpus,
built once into the cache. Decoding is greedy, so both modes do the same work (token counts are printed to compare).
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, sys, time
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
    ap.add_argument('--skip-sequential', action='store_true', help='only the batched runs')
    ap.add_argument('--variants', default='buffer,dynamic,library',
                    help='key/value-cache variants of the batched run, comma-separated: buffer, dynamic, library (the first one is "batched")')
    ap.add_argument('--repeat', type=int, default=1,
                    help='run every mode this many times, in reversed order every other time; the fastest run of each counts')
    ap.add_argument('--json', default='', help='write the numbers to this JSON file')
    a = ap.parse_args(argv)

    import torch
    from s3_nbs.config import SearcherConfig, cache_dir, seed_everything
    from s3_nbs.corpus import corpus_hash
    from s3_nbs.data import read_qa_jsonl
    from s3_nbs.bm25 import BM25sRetriever, build_bm25_index
    import transformers
    from s3_nbs.rollout import HFPolicy, run_searcher, summarize_search

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
    variants = {'buffer': dict(kv_layer='buffer', gqa=True), 'dynamic': dict(kv_layer='dynamic', gqa=True),
                'library': dict(kv_layer='dynamic', gqa=False)}
    names = [v.strip() for v in a.variants.split(',') if v.strip()]
    if not names or any(v not in variants for v in names):
        ap.error(f"--variants: choose among {', '.join(variants)}, got {a.variants!r}")
    policies = {v: policy if v == 'buffer' else HFPolicy(policy.model, policy.tokenizer, **variants[v]) for v in names}
    tokens = {}

    def run(label, batch_size, variant):
        st, pol = {}, policies[variant]
        pol.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_searcher(qs, pol, retriever, cfg=cfg, greedy=True, batch_size=batch_size, stats=st)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = summarize_search(res)
        tokens.setdefault(label, [r.response_ids for r in res])
        row = dict(mode=label, variant=variant, **variants[variant], batch_size=batch_size, seconds=round(secs, 2),
                   trajectories_per_s=round(len(res) / secs, 4),
                   cpu_seconds=round(cpu, 2), trajectories_per_cpu_s=round(len(res) / cpu, 4),
                   generate_s=round(st['generate_s'], 2), retrieve_s=round(st['retrieve_s'], 3),
                   generate_calls=st['generate_calls'], retrieve_calls=st['retrieve_calls'],
                   generated_tokens=sum(r.generated_tokens for r in res), response_tokens=sum(r.response_tokens for r in res),
                   mean_turns=s['mean_turns'], mean_searches=s['mean_searches'], invalid_rate=s['invalid_rate'])
        print(f"{label:>17}: {len(res)} trajectories in {secs:8.1f} s = {row['trajectories_per_s']:.4f} traj/s, CPU time {cpu:.1f} s "
              f"(generate {row['generate_s']:.1f} s in {row['generate_calls']} calls, retrieve {row['retrieve_s']:.2f} s in "
              f"{row['retrieve_calls']} calls; {row['generated_tokens']} generated / {row['response_tokens']} response tokens; "
              f"turns {row['mean_turns']}, searches {row['mean_searches']})", flush=True)
        return row

    modes = [('batched' if i == 0 else f'batched {v}', a.batch_size or len(qs), v) for i, v in enumerate(names)]
    if not a.skip_sequential: modes.append(('sequential', 1, names[0]))
    load_before = os.getloadavg()
    try:
        for pol in policies.values(): run_searcher(qs[:1], pol, retriever, cfg=replace(cfg, max_turns=1), greedy=True)  # warm-up
        runs = []
        for rep in range(max(1, a.repeat)):  # alternate the order, so that no mode always runs first (or last)
            for label, bs, v in (modes if rep % 2 == 0 else modes[::-1]): runs.append(run(label, bs, v))
    finally:
        if server is not None: server.stop()
    mode_names = [m for m, _, _ in modes]
    rows = [min((r for r in runs if r['mode'] == m), key=lambda r: r['seconds']) for m in mode_names
            if any(r['mode'] == m for r in runs)]
    for r in rows: r['same_tokens_as_batched'] = tokens[r['mode']] == tokens['batched']
    cpu_model = next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    out = dict(rows=rows, runs=runs, questions=len(qs), model=a.model, device=str(policy.model.device), dtype=str(policy.model.dtype), retriever=where,
               config=dict(X=cfg.retrieved_per_search, Y=cfg.max_selected, Z=cfg.max_turns, turn_budget=cfg.turn_budget,
                           feedback=cfg.feedback, drop_eos=cfg.drop_eos, max_step_tokens=cfg.max_step_tokens),
               repeat=max(1, a.repeat), command=' '.join(['python', 'benchmarks/bench_searcher.py', *(argv if argv is not None else sys.argv[1:])]),
               host=dict(platform=platform.platform(), cpu=cpu_model, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                         load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()],
                         python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                         date=datetime.date.today().isoformat()))
    by_mode = {r['mode']: r for r in rows}
    if 'batched' in by_mode and 'sequential' in by_mode:
        b, s = by_mode['batched'], by_mode['sequential']
        out['speedup'] = round(b['trajectories_per_s'] / s['trajectories_per_s'], 2)
        out['speedup_cpu_time'] = round(b['trajectories_per_cpu_s'] / s['trajectories_per_cpu_s'], 2)
        print(f"speedup batched / sequential: {out['speedup']:.2f}x wall-clock, {out['speedup_cpu_time']:.2f}x CPU time "
              f"(fastest of {max(1, a.repeat)} run(s) each; target >= 3x)")
    for v, key in (('dynamic', 'kv_layer_gain'), ('library', 'library_gain')):
        if f'batched {v}' in by_mode and names[0] == 'buffer':
            other, b = by_mode[f'batched {v}'], by_mode['batched']
            out[key] = round(other['seconds'] / b['seconds'], 2)
            out[key + '_cpu_time'] = round(other['cpu_seconds'] / b['cpu_seconds'], 2)
            print(f"{key}: the buffer variant runs {out[key]:.2f}x as fast as {v} wall-clock, {out[key + '_cpu_time']:.2f}x in CPU "
                  f"time (fastest of {max(1, a.repeat)}; same tokens: {other['same_tokens_as_batched']})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + '\n')
    return out


if __name__ == '__main__':
    main()

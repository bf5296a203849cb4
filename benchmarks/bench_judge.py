"""How far the LLM judge agrees with the span check, and how precise it is, on the demo's naive-RAG answers.

For one split of the latest stage-1 run and the latest stage-2 index, the generator answers every question from
naive top-k retrieval (as stage 03 does). Then, for each judge prompt style, the judge is asked about *every*
answer (span hits too, not only misses as in GenAcc) and compared with the span check, and its precision is
measured on items whose truth is known without it (`s3_nbs.metrics.judge_precision`: span hits, clear misses,
answers against another question's golds). With `--max-tokens 32,64,500` it also reports, per answer cap, the span
accuracy, how long the answers are and how many hit the cap (what `generator.max_tokens` costs and buys).

Every generator and judge call goes through a content-addressed disk cache (`CachedChat`), so a re-run with other
judge styles does not answer again.

    .venv/bin/python benchmarks/bench_judge.py --answer-prompts original --judge-prompts v1,original
    .venv/bin/python benchmarks/bench_judge.py --max-tokens 32,16,64,500 --no-judge --max-questions 64

Results of the runs behind `configs/smoke.yaml`'s choices are in `benchmarks/results/bench_judge/` (2026-12-02, the
2-CPU VM under load 3-7; those files predate the `host` field): `before-strict*.json` (v1 answers, v1 judge without
retry: the code before the parity change; `-100` = at most 100 items per kind), `before-v1.json` (v1 answers, both
judges with one retry), `after-original.json` / `after-100.json` (original answers, both judges), `caps.json`
(answer caps 32/16/64/500 on 64 questions; the 32 row came from the cache, so its `seconds` is not a timing).
"""
import argparse, asyncio, json, os, platform, sys, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

from s3_nbs.config import cache_dir, load_config, outputs_dir
from s3_nbs.corpus import format_docs
from s3_nbs.data import read_qa_jsonl
from s3_nbs.chat_cache import CachedChat
from s3_nbs.generator import TransformersChat
from s3_nbs.index import load_retriever
from s3_nbs.pipeline import latest_run, read_json
from s3_nbs.reward import AnswerGrader


def _docs(hits): return [h['document'] if isinstance(h, dict) and 'document' in h else h for h in hits]


def agreement(spans, verdicts) -> dict:
    "The judge (asked about every answer) against the span check."
    hits = [v for s, v in zip(spans, verdicts) if s]
    misses = [v for s, v in zip(spans, verdicts) if not s]
    return {'n': len(spans), 'agree': sum((v is True) == s for s, v in zip(spans, verdicts)) / max(1, len(spans)),
            'span_hits': len(hits), 'yes_on_hits': sum(v is True for v in hits),
            'span_misses': len(misses), 'yes_on_misses': sum(v is True for v in misses),
            'unparsed': sum(v is None for v in verdicts)}


async def main(a):
    cfg = load_config(a.config)
    data_dir = latest_run('01_prepare_data')/'artifacts'/'data'
    qs = read_qa_jsonl(data_dir/f'{a.split}.jsonl')
    if a.max_questions: qs = qs[:a.max_questions]
    idx = read_json(latest_run('02_build_index')/'metrics.json')['indexes'][a.retriever or cfg.retrieval.retriever]
    search = load_retriever(idx)
    t0 = time.perf_counter()
    hits = search.batch_search([q.question for q in qs], cfg.retrieval.naive_topk)
    contexts = [format_docs(_docs(h)) for h in hits]
    print(f"{len(qs)} {a.split} questions, top-{cfg.retrieval.naive_topk} from {idx} in {time.perf_counter() - t0:.1f} s", flush=True)
    inner = TransformersChat(a.model, batch_size=a.batch_size)
    chat = CachedChat(inner, Path(a.cache) if a.cache else cache_dir('bench')/'judge.jsonl')
    questions, golds = [q.question for q in qs], [q.golden_answers for q in qs]
    out = {'split': a.split, 'n': len(qs), 'model': a.model, 'answer_prompts': a.answer_prompts, 'caps': {}, 'judges': {},
           'settings': {'judge_retries': a.judge_retries, 'max_per_kind': a.max_per_kind, 'judge_max_tokens': a.judge_max_tokens},
           'host': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'load': os.getloadavg()}}
    answers = None
    for cap in [int(x) for x in a.max_tokens.split(',')]:
        g = AnswerGrader(chat, accuracy='span', max_tokens=cap, prompts=a.answer_prompts)
        calls0, t0 = inner.n_calls, time.perf_counter()
        graded = await g.agrade(questions, golds, contexts)
        secs = time.perf_counter() - t0
        ntok = [len(inner.tokenizer(x.answer, add_special_tokens=False)['input_ids']) for x in graded]
        out['caps'][cap] = {'span': sum(x.span for x in graded) / len(graded), 'seconds': round(secs, 1),
                            'generated_now': inner.n_calls > calls0, 'mean_tokens': sum(ntok) / len(ntok),
                            'max_tokens_seen': max(ntok), 'at_cap': sum(n >= cap for n in ntok)}
        print(f"cap {cap}: span {out['caps'][cap]['span']:.3f}, mean {out['caps'][cap]['mean_tokens']:.1f} tokens, "
              f"{out['caps'][cap]['at_cap']} of {len(ntok)} at the cap, {secs:.0f} s", flush=True)
        if answers is None: answers = graded  # the first cap's answers are judged
    if not a.no_judge:
        spans, preds = [x.span for x in answers], [x.answer for x in answers]
        for style in a.judge_prompts.split(','):
            j = AnswerGrader(chat, prompts=style, judge_retries=a.judge_retries, judge_max_tokens=a.judge_max_tokens)
            t0 = time.perf_counter()
            verdicts = await j.ajudge(list(zip(questions, preds, golds)))
            agree = agreement(spans, verdicts)
            prec = await j.ajudge_precision(preds, golds, questions, max_per_kind=a.max_per_kind, n_examples=a.examples)
            out['judges'][style] = {'agreement': agree, 'precision': prec, 'calls': dict(j.calls),
                                    'seconds': round(time.perf_counter() - t0, 1)}
            print(f"judge {style}: agrees with span on {agree['agree']:.3f} of {agree['n']}; yes on {agree['yes_on_hits']}/"
                  f"{agree['span_hits']} span hits and {agree['yes_on_misses']}/{agree['span_misses']} span misses; "
                  f"{agree['unparsed']} unparsed after {j.calls['judge_retries']} retries", flush=True)
            p = prec
            fmt = lambda x: 'n/a' if x is None else f"{x:.3f}"
            print(f"  precision {fmt(p['precision'])}, recall {fmt(p['recall'])}, false-yes rate {fmt(p['false_yes_rate'])} "
                  f"({p['n_right']} known right, {p['n_wrong']} known wrong: {p['by_kind']})", flush=True)
            for ex in p['false_yes']: print(f"    false yes ({ex['kind']}): {ex['pred']!r} vs {ex['golds']}")
    print(f"cache {chat.path}: {chat.stats()}")
    path = Path(a.out) if a.out else outputs_dir()/f"bench_judge-{a.split}-{a.answer_prompts}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default='smoke')
    p.add_argument('--split', default='train')
    p.add_argument('--max-questions', type=int, default=0)
    p.add_argument('--retriever', default=None, help='dense | bm25 (default: the config)')
    p.add_argument('--model', default='smollm2-135m-instruct', help='generator and judge')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--answer-prompts', default='original', help='original | v1')
    p.add_argument('--judge-prompts', default='v1,original', help='comma-separated judge styles to measure')
    p.add_argument('--judge-retries', type=int, default=1)
    p.add_argument('--judge-max-tokens', type=int, default=8)
    p.add_argument('--max-tokens', default='32', help='comma-separated answer caps (the first one is judged)')
    p.add_argument('--max-per-kind', type=int, default=None, help='cap on each kind of known-truth item')
    p.add_argument('--examples', type=int, default=5)
    p.add_argument('--no-judge', action='store_true')
    p.add_argument('--cache', default='', help='generator-call cache (default: <cache dir>/bench/judge.jsonl)')
    p.add_argument('--out', default='')
    asyncio.run(main(p.parse_args()))

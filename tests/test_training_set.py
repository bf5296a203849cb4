"Stage 03b_training_set end to end through the `s3` command: hand-made stage-1 / stage-3 runs, FlashRAG files, real chain (slow)."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from s3_nbs.data import is_yes_no, read_qa_jsonl
from s3_nbs.pipeline import get_stage, list_stages

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')
FLASHRAG_TRAIN = ROOT/'tests'/'fixtures'/'flashrag_train'
STEPS = ('input', 'yes_no', 'after_yes_no', 'rag_correct', 'missing_from_rag_cache', 'after_rag_filter', 'final')


def s3(outputs, *args, timeout=900):
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(outputs)}
    return subprocess.run([S3, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def latest(outputs, stage):
    d = outputs/'runs'/stage
    return d/(d/'latest').read_text().strip()


def manifest(outputs, stage='03b_training_set'):
    return json.loads((latest(outputs, stage)/'manifest.json').read_text())


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


def fake_run(outputs, stage, run_id='20260101-000000-0000', **files):
    "A finished run folder as the runner leaves it (files: name -> JSON object, written to name.json), made the stage's latest."
    d = outputs/'runs'/stage/run_id
    (d/'artifacts').mkdir(parents=True)
    for name, obj in files.items(): (d/f'{name}.json').write_text(json.dumps(obj))
    (outputs/'runs'/stage/'latest').write_text(run_id + '\n')
    return d


# a prepared split as stage 1 writes it (already ending with '?'), and a naive-RAG cache as stage 3 writes it
QUESTIONS = [('q0', 'Who wrote Hamlet?', ['William Shakespeare'], 'fanoutqa-sub'),
             ('q1', 'Is Paris the capital of France?', ['yes'], 'fanoutqa-sub'),
             ('q2', 'In what year did the Second World War end?', ['1945'], 'fanoutqa-sub'),
             ('q3', 'Were all of these films released before 1990?', ['No'], 'fanoutqa-multi'),
             ('q4', 'Which river flows through Cairo?', ['Nile'], 'fanoutqa-sub'),
             ('q5', 'What is the combined population of the three largest cities of Nigeria?', ['23,000,000'], 'fanoutqa-multi'),
             ('q6', 'Who painted the Mona Lisa?', ['Leonardo da Vinci'], 'fanoutqa-sub'),
             ('q7', 'What is the tallest mountain in Africa?', ['Kilimanjaro'], 'fanoutqa-sub')]
GENACC = [('q0', 1.0), ('q2', 1.0), ('q2', 0.0), ('q3', 1.0), ('q5', 0.0), ('q6', 1.0), ('q7', 0.0), ('other', 1.0)]  # later lines win


def cache_row(qid, genacc):
    return {'id': qid, 'answer': 'x', 'genacc': genacc, 'span': genacc, 'em': 0.0, 'f1': 0.0, 'judge': None, 'judged': False,
            'acc': genacc, 'doc_ids': ['0', '1', '2']}


@pytest.fixture
def pipeline_runs(tmp_path):
    "Finished 01_prepare_data and 03_rag_cache runs (made by hand, in the runner's layout) under a temporary outputs folder."
    out = tmp_path/'outputs'
    d1 = fake_run(out, '01_prepare_data', manifest={'status': 'ok', 'parameters': {}})
    write_jsonl(d1/'artifacts'/'data'/'train.jsonl', [{'id': i, 'question': q, 'golden_answers': a, 'dataset': ds, 'metadata': {'hop': 'single'}}
                                                      for i, q, a, ds in QUESTIONS])
    cache = out/'rag_cache'/'train-0123456789abcdef.jsonl'
    write_jsonl(cache, [cache_row(i, g) for i, g in GENACC])
    fake_run(out, '03_rag_cache', manifest={'status': 'ok', 'parameters': {}}, metrics={'cache_path': str(cache), 'questions': 7},
             upstream={'01_prepare_data': str(d1)})
    return out


def test_stage_names_and_order():
    "`s3 run 03b_training_set`, `s3 run training_set` and `s3 run 03b` find the stage; `s3 run all` runs it right after 03_rag_cache."
    for name in ('03b_training_set', 'training_set', '03b'):
        assert get_stage(name).name == '03b_training_set'
    assert get_stage('03').name == '03_rag_cache'
    names = [s.name for s in list_stages()]
    assert names.index('03b_training_set') == names.index('03_rag_cache') + 1
    params = {p.name: p for p in get_stage('training_set').params}
    assert {k: params[k].config_key for k in ('n_train', 'drop_yes_no', 'drop_rag_correct', 'seed')} == {
        'n_train': 'data.n_train', 'drop_yes_no': 'data.drop_yes_no', 'drop_rag_correct': 'data.drop_rag_correct', 'seed': 'seed'}


@pytest.mark.slow  # a real stage-3b run (a kernel, papermill): > 10 s on 2 cores
def test_stage_on_latest_runs(pipeline_runs):
    "Defaults: the latest stage-1 split and the cache of the latest 03_rag_cache run; counts, missing ids and the output file."
    out = pipeline_runs
    r = s3(out, 'run', 'training_set', '-p', 'n_train=2', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = latest(out, '03b_training_set')
    man = manifest(out)
    m = man['metrics']
    assert man['status'] == 'ok' and man['config']['data']['n_train'] == 2
    assert man['upstream'] == {'01_prepare_data': str(latest(out, '01_prepare_data')), '03_rag_cache': str(latest(out, '03_rag_cache'))}
    assert m['counts'] == {'input': 8, 'yes_no': 2, 'after_yes_no': 6, 'rag_correct': 2, 'missing_from_rag_cache': 1,
                           'after_rag_filter': 3, 'final': 2}
    assert m['by_dataset'] == {
        'fanoutqa-sub': {'input': 6, 'yes_no': 1, 'after_yes_no': 5, 'rag_correct': 2, 'missing_from_rag_cache': 1, 'after_rag_filter': 2, 'final': 2},
        'fanoutqa-multi': {'input': 2, 'yes_no': 1, 'after_yes_no': 1, 'rag_correct': 0, 'missing_from_rag_cache': 0, 'after_rag_filter': 1, 'final': 0}}
    assert (m['missing_from_rag_cache'], m['missing_policy'], m['missing_ids_head']) == (1, 'drop', ['q4'])
    assert Path(m['missing_ids_file']).read_text() == 'q4\n'
    assert m['rag_cache'].endswith('train-0123456789abcdef.jsonl') and m['settings']['seed'] == 42
    # the training split, in the QA jsonl format of write_qa_jsonl
    assert m['train_filtered'] == str(run_dir/'artifacts'/'train_filtered.jsonl') and m['examples'] == 2
    rows = [json.loads(l) for l in open(m['train_filtered'])]
    assert [r['id'] for r in rows] == ['q2', 'q7'] and all(set(r) == {'id', 'question', 'golden_answers', 'dataset', 'metadata'} for r in rows)
    assert [e.question for e in read_qa_jsonl(m['train_filtered'])] == ['In what year did the Second World War end?', 'What is the tallest mountain in Africa?']
    assert (run_dir/'artifacts'/'training_set_counts.png').stat().st_size > 1000
    assert sorted(man['artifacts']) == ['artifacts/missing_from_rag_cache.txt', 'artifacts/train_filtered.jsonl', 'artifacts/training_set_counts.png']
    # the same settings give the same training set; filters switched off from the config keep everything
    r = s3(out, 'run', '03b_training_set', '--set', 'data.drop_yes_no=false', '--set', 'data.drop_rag_correct=false', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(out)['metrics']
    assert m['counts']['final'] == 8 and m['rag_cache'] is None and (m['missing_from_rag_cache'], m['missing_ids_file']) == (0, None)


@pytest.mark.slow  # a real stage-3b run (a kernel, papermill): > 10 s on 2 cores
def test_stage_refuses_a_cache_of_another_split(pipeline_runs):
    out = pipeline_runs
    d3 = latest(out, '03_rag_cache')
    (d3/'manifest.json').write_text(json.dumps({'status': 'ok', 'parameters': {'split': 'dev'}}))
    r = s3(out, 'run', '03b', '--quiet')
    assert r.returncode != 0 and "cached the 'dev' split, not 'train'" in r.stdout + r.stderr
    assert not (out/'runs'/'03b_training_set'/'latest').exists()


@pytest.mark.slow  # a real stage-3b run (a kernel, papermill): > 10 s on 2 cores
def test_stage_on_flashrag_files(tmp_path):
    "FlashRAG's NQ + HotpotQA train files (exact format) and a hand-made cache: yes/no golds, answered ids, missing ids, each policy."
    out, cache = tmp_path/'outputs', tmp_path/'rag_cache.jsonl'
    write_jsonl(cache, [cache_row(i, g) for i, g in [('nq-train_0', 1.0), ('nq-train_1', 0.0), ('nq-train_2', 1.0), ('nq-train_3', 0.0),
                                                     ('nq-train_4', 0.0), ('hotpotqa-train_0', 0.0), ('hotpotqa-train_1', 1.0),
                                                     ('hotpotqa-train_2', 0.0), ('hotpotqa-train_3', 0.0), ('train_6', 0.0)]])
    args = ['run', 'training_set', '-p', f'qa_path={FLASHRAG_TRAIN}', '-p', f'rag_cache={cache}', '--quiet']
    r = s3(out, *args, '-p', 'missing=error')
    assert r.returncode != 0 and '4 of 13 questions are not in the naive-RAG cache' in r.stdout + r.stderr
    r = s3(out, *args, '-p', 'missing=keep')
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(out)['metrics']
    assert m['counts'] == {'input': 16, 'yes_no': 3, 'after_yes_no': 13, 'rag_correct': 3, 'missing_from_rag_cache': 4,
                           'after_rag_filter': 10, 'final': 10}
    assert m['missing_ids_head'] == ['nq-train_5', 'nq-train_6', 'nq-train_7', 'hotpotqa-train_7']
    assert m['by_dataset']['hotpotqa']['yes_no'] == 3 and m['by_dataset']['nq']['rag_correct'] == 2
    train = read_qa_jsonl(m['train_filtered'])
    assert {e.dataset for e in train} == {'nq', 'hotpotqa'} and 'nq-train_5' in {e.id for e in train}
    assert all(e.question.endswith('?') and not e.question.endswith('??') for e in train)  # data.question_mark, applied once
    assert train[0].question == 'big little lies season 2 how many episodes?' and train[0].metadata['source_id'] == 'train_1'


@pytest.mark.slow
def test_stage_after_real_stages(tmp_path):
    "01 -> 02 (BM25 only) -> 03 (a tiny generator, part of the split) -> 03b on the demo: ids match, the uncached rest is reported."
    out, n = tmp_path/'outputs', 40
    for args in (['01_prepare_data', '-p', 'max_passages=300'], ['02_build_index', '-p', 'build_dense=false'],
                 ['03_rag_cache', '-p', f'max_questions={n}', '-p', 'retriever=bm25', '-p', 'model=tiny-llama', '--set', 'generator.max_tokens=8']):
        r = s3(out, 'run', *args, '--quiet')
        assert r.returncode == 0, r.stdout + r.stderr
    r = s3(out, 'run', 'training_set', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    man = manifest(out)
    c, m = man['metrics']['counts'], man['metrics']
    split = read_qa_jsonl(latest(out, '01_prepare_data')/'artifacts'/'data'/'train.jsonl')
    cached = {json.loads(l)['id']: json.loads(l)['acc'] for l in open(json.loads((latest(out, '03_rag_cache')/'manifest.json').read_text())['metrics']['cache_path'])}
    assert len(cached) == n and set(cached) <= {e.id for e in split}
    assert all(e.question.endswith('?') for e in split)  # stage 1 applied data.question_mark
    assert c['input'] == len(split) and c['after_yes_no'] == c['input'] - c['yes_no']
    assert c['missing_from_rag_cache'] == c['after_yes_no'] - sum(1 for e in split if e.id in cached and not is_yes_no(e.golden_answers))
    assert c['rag_correct'] == sum(1 for e in split if cached.get(e.id, 0) >= 1 and not is_yes_no(e.golden_answers))
    assert c['final'] == c['after_rag_filter'] == c['after_yes_no'] - c['rag_correct'] - c['missing_from_rag_cache'] > 0
    assert {e.id for e in read_qa_jsonl(m['train_filtered'])} <= set(cached)
    assert man['upstream']['03_rag_cache'] == str(latest(out, '03_rag_cache'))

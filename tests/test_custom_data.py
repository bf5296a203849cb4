"""A user's own corpus and QA file (issue 14, item 5): the file formats, malformed-line reports, the split, and the stages
01 -> 02 -> 03 on the tutorial's example files (nbs/tutorials/data/) in a temporary outputs folder."""
import json, os, subprocess, sys
from dataclasses import replace
from pathlib import Path
import pytest
from s3_nbs.config import find_config_file, load_config
from s3_nbs.corpus import attach_evidence, prepare_corpus, read_corpus
from s3_nbs.data import BadRecordsError, QAExample, read_qa_file, split_examples

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT/'nbs'/'tutorials'/'data'
CORPUS, QA_JSONL, QA_CSV = DATA/'tiny_corpus.jsonl', DATA/'tiny_qa.jsonl', DATA/'tiny_qa.csv'
S3 = str(Path(sys.executable).parent/'s3')


def test_csv_and_jsonl_give_the_same_examples():
    js, js_bad = read_qa_file(QA_JSONL)
    cs, cs_bad = read_qa_file(QA_CSV)
    assert js_bad == [] and cs_bad == [] and len(js) == len(cs) == 36
    # ids come from the line numbers: the CSV header is line 1, so its rows are one line further down
    assert [e.id for e in js][:3] == ['tiny_qa-1', 'tiny_qa-2', 'tiny_qa-3']
    assert [e.id for e in cs][:3] == ['tiny_qa-2', 'tiny_qa-3', 'tiny_qa-4']
    assert [replace(e, id='') for e in js] == [replace(e, id='') for e in cs]
    assert js[0] == QAExample('tiny_qa-1', 'Which river flows through ten countries before it empties into the Black Sea?',
                              ['Danube', 'Danube River'], 'tiny_qa', {'evidence_titles': ['Danube']})


def test_csv_and_jsonl_with_ids_are_identical(tmp_path):
    rows = [('q1', 'Who designed the Analytical Engine?', ['Charles Babbage', 'Babbage']),
            ('q2', 'What is the atomic number of gold?', ['79']),
            ('q3', 'Answers with a bar?', ['A|B', 'C'])]
    (tmp_path/'set.jsonl').write_text(''.join(json.dumps({'id': i, 'question': q, 'golden_answers': a}) + '\n' for i, q, a in rows))
    (tmp_path/'set.csv').write_text('id,question,answers\n' + ''.join(
        f'{i},{q},"{json.dumps(a).replace(chr(34), chr(34) * 2)}"\n' if any('|' in x for x in a) else f'{i},{q},{"|".join(a)}\n'
        for i, q, a in rows))
    js, cs = read_qa_file(tmp_path/'set.jsonl')[0], read_qa_file(tmp_path/'set.csv')[0]
    assert js == cs and [e.golden_answers for e in cs] == [a for _, _, a in rows] and {e.dataset for e in js} == {'set'}


def _broken_qa(tmp_path) -> Path:
    "The example questions with four malformed lines inserted (at lines 3, 4, 6 and 8 of the new file)."
    good = QA_JSONL.read_text().splitlines()
    lines = (good[:2] + ['{"question": "Who has no answer?"}', '{"question": "Unclosed", "answer": "x"'] + good[2:3]
             + ['{"question": "", "answer": "empty question"}'] + good[3:4] + ['["a", "list"]'] + good[4:])
    p = tmp_path/'broken_qa.jsonl'
    p.write_text('\n'.join(lines) + '\n')
    return p


EXPECTED_QA_BAD = [(3, "missing field 'golden_answers' (or 'answers' / 'answer')"), (4, "invalid JSON (Expecting ',' delimiter)"),
                   (6, "field 'question' must be a non-empty string"), (8, 'expected a JSON object, got list')]


def test_bad_qa_lines_fail_with_their_line_numbers(tmp_path):
    p = _broken_qa(tmp_path)
    with pytest.raises(BadRecordsError) as e:
        read_qa_file(p)
    assert [(b.line, b.reason) for b in e.value.bad] == EXPECTED_QA_BAD
    msg = str(e.value)
    assert msg.startswith(f"{p}: 4 malformed record(s):") and f"{p}:4: invalid JSON" in msg and f"{p}:8: expected a JSON object" in msg


def test_bad_qa_lines_skipped_and_reported(tmp_path):
    good, bad = read_qa_file(_broken_qa(tmp_path), on_bad_record='skip')
    assert len(good) == 36 and [(b.line, b.reason) for b in bad] == EXPECTED_QA_BAD
    assert bad[0].text == '{"question": "Who has no answer?"}'
    assert [e.id for e in good][:4] == ['broken_qa-1', 'broken_qa-2', 'broken_qa-5', 'broken_qa-7']  # ids are the good lines'


def test_bad_csv_rows_reported_with_file_lines(tmp_path):
    p = tmp_path/'qa.csv'
    p.write_text('question,answer\n"A question\nover two lines?",yes\nWho?,"[unclosed"\nToo,many,cells\n,no question\nWhere?,Here\n')
    good, bad = read_qa_file(p, on_bad_record='skip')
    assert [(e.id, e.question) for e in good] == [('qa-2', 'A question\nover two lines?'), ('qa-7', 'Where?')]
    assert [(b.line, b.field) for b in bad] == [(4, 'answer'), (5, None), (6, 'question')]


def test_bad_corpus_lines(tmp_path):
    lines = CORPUS.read_text().splitlines()
    lines[4] = '{"title": "No text"}'
    lines[9] = '{"title": "Unclosed", "text": "x"'
    lines.insert(20, '{"title": "Blank", "text": " "}')
    src, dst = tmp_path/'corpus.jsonl', tmp_path/'out'/'corpus.jsonl'
    src.write_text('\n'.join(lines) + '\n')
    with pytest.raises(BadRecordsError) as e:
        prepare_corpus(src, dst)
    assert [b.line for b in e.value.bad] == [5, 10, 21] and not dst.exists()
    n, bad = prepare_corpus(src, dst, on_bad_record='skip')
    assert n == 41 + 1 - 3 and [(b.line, b.reason) for b in bad] == [
        (5, "missing field 'contents' (wiki-18) or 'text' ({title, text} records)"), (10, "invalid JSON (Expecting ',' delimiter)"),
        (21, 'empty passage (no text)')]
    ids = [r['id'] for r in read_corpus(dst)]
    assert ids[:5] == ['0', '1', '2', '3', '5'] and ids[-1] == '41'  # positions in the file: skipping renumbers nothing


def test_split_is_deterministic_and_complete():
    qs = read_qa_file(QA_JSONL)[0]
    sp = split_examples(qs, (0.6, 0.2, 0.2), seed=42)
    ids = {s: [e.id for e in v] for s, v in sp.items()}
    assert {s: len(v) for s, v in ids.items()} == {'train': 22, 'dev': 7, 'test': 7}
    assert sorted(sum(ids.values(), [])) == sorted(e.id for e in qs)  # every question once: complete, no overlap
    assert split_examples(list(reversed(qs)), (0.6, 0.2, 0.2), seed=42) == {s: v[::-1] for s, v in sp.items()}
    assert split_examples(qs, (0.6, 0.2, 0.2), seed=43)['test'] != sp['test']
    assert ids['test'] == ['tiny_qa-10', 'tiny_qa-13', 'tiny_qa-16', 'tiny_qa-22', 'tiny_qa-23', 'tiny_qa-25', 'tiny_qa-30']


def test_example_files_are_consistent(tmp_path):
    "The example questions' evidence is in the example corpus and holds their answers; the example config points at them."
    n, bad = prepare_corpus(CORPUS, tmp_path/'corpus.jsonl')
    qs = read_qa_file(QA_JSONL)[0]
    rep = attach_evidence(qs, tmp_path/'corpus.jsonl')
    assert (n, bad, rep['with_evidence'], rep['evidence_found'], rep['answer_in_evidence']) == (41, [], 36, 36, 36)
    cfg = load_config(find_config_file('custom-example'))
    assert (ROOT/cfg.data.corpus).resolve() == CORPUS and (ROOT/cfg.data.qa).resolve() == QA_JSONL


# ---- the stages, through the `s3` command (slow: each stage is a papermill run)

def s3(outputs, *args, cwd=ROOT, timeout=900):
    env = {**os.environ, 'S3_NBS_OUTPUTS': str(outputs), 'PWD': str(cwd)}  # PWD as a shell sets it
    return subprocess.run([S3, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def latest(outputs, stage) -> Path:
    d = outputs/'runs'/stage
    return d/(d/'latest').read_text().strip()


def manifest(outputs, stage) -> dict:
    return json.loads((latest(outputs, stage)/'manifest.json').read_text())


DATA_SET = ['--set', f'data.corpus={CORPUS.relative_to(ROOT)}', '--set', f'data.qa={QA_JSONL.relative_to(ROOT)}']


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
    "Stages 01 and 02 (BM25 only) on the example files."
    out = tmp_path_factory.mktemp('outputs')
    r = s3(out, 'run', '01_prepare_data', *DATA_SET, '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    r = s3(out, 'run', '02_build_index', '-p', 'build_dense=False', *DATA_SET, '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_prepare_custom_data(outputs):
    man = manifest(outputs, '01_prepare_data')
    m = man['metrics']
    assert man['status'] == 'ok' and m['data'] == 'custom' and m['passages'] == 41
    assert m['questions'] == {'train': 22, 'dev': 7, 'test': 7} and m['questions_by_dataset'] == {'tiny_qa': m['questions']}
    assert m['bad_records'] == {'corpus': 0, 'qa': 0} and m['source']['qa'] == str(QA_JSONL)
    assert m['evidence']['evidence_found'] == 36
    data = Path(m['data_dir'])
    assert {p.name for p in data.iterdir()} == {'corpus.jsonl', 'train.jsonl', 'dev.jsonl', 'test.jsonl', 'data_card.md'}
    corpus = [json.loads(line) for line in (data/'corpus.jsonl').open()]
    assert corpus[0] == {'id': '0', 'contents': '"Danube"\n' + json.loads(CORPUS.open().readline())['text']}
    test = [json.loads(line) for line in (data/'test.jsonl').open()]
    assert [q['id'] for q in test] == ['tiny_qa-10', 'tiny_qa-13', 'tiny_qa-16', 'tiny_qa-22', 'tiny_qa-23', 'tiny_qa-25', 'tiny_qa-30']
    assert test[0]['metadata']['evidence_ids'] == ['8'] and all(q['question'].endswith('?') for q in test)
    assert (latest(outputs, '01_prepare_data')/'artifacts'/'bad_records.jsonl').read_text() == ''
    assert 'tiny_qa.jsonl' in (data/'data_card.md').read_text()


@pytest.mark.slow
def test_index_and_rag_cache_on_custom_data(outputs):
    man = manifest(outputs, '02_build_index')
    assert man['status'] == 'ok' and set(man['metrics']['indexes']) == {'bm25'} and man['metrics']['passages'] == 41
    assert man['upstream']['01_prepare_data'] == str(latest(outputs, '01_prepare_data'))
    assert man['metrics']['evidence_recall_at_8']['bm25'] > 0.5  # the evidence passages are there to be found
    r = s3(outputs, 'run', '03_rag_cache', '-p', 'max_questions=4', '-p', 'retriever=bm25', '-p', 'model=tiny-llama',
           '--set', 'generator.max_tokens=8', *DATA_SET, '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    man = manifest(outputs, '03_rag_cache')
    assert man['status'] == 'ok' and man['metrics']['questions'] == 4
    entries = [json.loads(line) for line in open(man['metrics']['cache_path'])]
    train = [json.loads(line) for line in (Path(manifest(outputs, '01_prepare_data')['metrics']['data_dir'])/'train.jsonl').open()]
    assert sorted(e['id'] for e in entries) == sorted(q['id'] for q in train[:4])


@pytest.mark.slow
def test_stage_fails_listing_bad_lines_then_skips_them(tmp_path):
    "From another folder, with paths relative to it: fail mode lists the bad lines; skip mode writes them with reasons."
    _broken_qa(tmp_path)
    out = tmp_path/'outputs'
    args = ['run', '01_prepare_data', '--set', f'data.corpus={CORPUS}', '--set', 'data.qa=broken_qa.jsonl', '--quiet']
    r = s3(out, *args, cwd=tmp_path)
    assert r.returncode != 0
    qa = tmp_path/'broken_qa.jsonl'
    assert f"4 malformed record(s):\n  {qa}:3: missing field 'golden_answers'" in r.stderr, r.stderr
    assert f"{qa}:8: expected a JSON object, got list" in r.stderr and '-p on_bad_record=skip' in r.stderr
    r = s3(out, *args, '-p', 'on_bad_record=skip', cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest(out, '01_prepare_data')['metrics']
    assert m['bad_records'] == {'corpus': 0, 'qa': 4} and sum(m['questions'].values()) == 36
    bad = [json.loads(line) for line in open(m['bad_records_file'])]
    assert [(b['kind'], b['path'], b['line'], b['reason']) for b in bad] == [('qa', str(qa), n, why) for n, why in EXPECTED_QA_BAD]


@pytest.mark.slow
def test_answer_in_evidence_only_needs_evidence(tmp_path):
    qa = tmp_path/'no_evidence.csv'
    qa.write_text('question,answer\nWhat is the capital of Australia?,Canberra\nWho invented the piano?,Bartolomeo Cristofori\n')
    r = s3(tmp_path/'outputs', 'run', '01_prepare_data', '--set', f'data.corpus={CORPUS}', '--set', f'data.qa={qa}',
           '--set', 'data.answer_in_evidence_only=true', '--quiet')
    assert r.returncode != 0 and 'no question of' in r.stderr and 'set data.answer_in_evidence_only=false' in r.stderr, r.stderr

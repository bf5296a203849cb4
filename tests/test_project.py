"System tests of the foundation: project configuration, the `s3` command, a real stage run, docs staging."
import json, os, re, subprocess, sys, tomllib
from pathlib import Path
import nbformat, pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
S3 = [str(Path(sys.executable).parent/'s3')]


def s3(*args, env=None, timeout=900):
    return subprocess.run([*S3, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_nbdev_config():
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())
    nb = cfg['tool']['nbdev']
    assert set(nb['tst_flags'].split()) == {'slow', 'gpu', 'service'}
    assert 'tags' in nb['allowed_cell_metadata_keys']
    assert cfg['project']['name'] == 's3-nbs' and cfg['project']['scripts']['s3'] == 's3_nbs.cli:main'
    assert not any((d/'settings.ini').exists() for d in [ROOT, *ROOT.parents]), 'nbdev 3 refuses to run with a settings.ini'


def test_lock_pins_cpu_torch():
    lock = (ROOT/'requirements'/'cpu.lock').read_text().splitlines()
    assert 'torch==2.13.0' in lock
    assert all('==' in l for l in lock if l.strip() and not l.startswith('#')), 'every lock line must be pinned'


def test_stage_notebooks_keep_parameters_tag_through_clean(tmp_path):
    from nbdev.clean import clean_nb
    from nbdev.config import get_config
    from s3_nbs.pipeline import list_stages
    stages = list_stages()
    assert stages, 'no stage notebooks found'
    for st in stages:
        nb = json.loads(st.path.read_text())
        clean_nb(nb, allowed_cell_metadata_keys=get_config().allowed_cell_metadata_keys)
        assert sum('parameters' in c.get('metadata', {}).get('tags', []) for c in nb['cells']) == 1, st.name


def test_unknown_parameter_is_refused():
    r = s3('run', '01_prepare_data', '-p', 'no_such_param=1')
    assert r.returncode == 2
    assert "no parameter 'no_such_param'" in r.stderr and 'max_passages' in r.stderr, r.stderr


def test_bad_config_value_is_refused_before_running(tmp_outputs):
    r = s3('run', '01_prepare_data', '--set', 'searcher.max_selected=99', env={'S3_NBS_OUTPUTS': str(tmp_outputs)})
    assert r.returncode == 2 and 'cannot exceed' in r.stderr, r.stderr
    assert not (tmp_outputs/'runs').exists() or not any((tmp_outputs/'runs').rglob('*.ipynb'))


@pytest.mark.slow  # stages every notebook for the docs: minutes on 2 cores
def test_docs_staging_runs_offline():
    r = subprocess.run([sys.executable, '-c', 'from nbdev.serve import proc_nbs; proc_nbs(n_workers=1, force=True)'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    staged = {p.relative_to(ROOT/'_proc') for p in (ROOT/'_proc').rglob('*.ipynb')}
    sources = {p.relative_to(ROOT/'nbs') for p in (ROOT/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts}
    assert sources <= staged, f"not staged: {sorted(map(str, sources - staged))}"
    assert 'Found cells containing imports and other code' not in r.stderr, r.stderr[-2000:]


RAW_TEXT_TAGS = re.compile(r'<(title|textarea|script|style|xmp|iframe|noscript|plaintext|template|noembed)\b', re.I)


def markdown_without_code(src: str) -> str:
    "A Markdown cell's text with fenced blocks and inline code spans removed (what a browser would parse as HTML)."
    return re.sub(r'`[^`\n]*`', '', re.sub(r'```.*?```', '', src, flags=re.S))


def test_markdown_has_no_raw_text_html_tags():
    "A bare `<title>` (or `<script>`, `<textarea>`...) in Markdown swallows the rest of its docs page in a browser."
    assert RAW_TEXT_TAGS.search(markdown_without_code('see "What is <title>?" here'))
    assert not RAW_TEXT_TAGS.search(markdown_without_code('see `What is <title>?` and\n```\n<script>\n```'))
    bad = [f"{p.relative_to(ROOT)} cell {i}: {m.group(0)}"
           for p in sorted((ROOT/'nbs').rglob('*.ipynb')) if '.ipynb_checkpoints' not in p.parts
           for i, c in enumerate(nbformat.read(p, as_version=4).cells) if c.cell_type == 'markdown'
           for m in RAW_TEXT_TAGS.finditer(markdown_without_code(c.source))]
    assert not bad, 'escape these tags (backticks or &lt;...&gt;): ' + '; '.join(bad)


def test_readme_results_table_is_rendered_from_the_committed_run(tmp_path, monkeypatch):
    "The README's demo-scale results block is exactly what docs/demo_results.py renders from docs/results/ (not typed)."
    sys.path.insert(0, str(ROOT/'docs'))
    try: import demo_results as dr
    finally: sys.path.remove(str(ROOT/'docs'))
    assert dr.readme_block((ROOT/'README.md').read_text()) == dr.render(), \
        'README results block differs from docs/results/: run `python docs/demo_results.py` to re-render it'
    import pandas as pd  # a changed figure in the committed table changes the render
    changed = tmp_path/'demo_eval.csv'
    t = pd.read_csv(dr.CSV); t.loc[0, 'genacc'] = 0.999; t.to_csv(changed, index=False)
    monkeypatch.setattr(dr, 'CSV', changed)
    assert dr.render() != dr.readme_block((ROOT/'README.md').read_text())

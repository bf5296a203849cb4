"""The README's demo-scale results table, from a finished `06_evaluate` run (never typed by hand).

    python docs/demo_results.py outputs/runs/06_evaluate/<run>   # copy its table and record, rewrite the README block
    python docs/demo_results.py --check                          # the README block is the render of the committed files

The run's `artifacts/table.csv` is copied to `docs/results/demo_eval.csv` and what it rests on (run id, config,
parameters, models, questions, git commit, machine, time) to `docs/results/demo_eval.json`; the README block between
`<!-- demo-results -->` and `<!-- /demo-results -->` is rendered from those two files."""
import argparse, csv, json, re, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT/'docs'/'results'
CSV, META = RESULTS/'demo_eval.csv', RESULTS/'demo_eval.json'
README = ROOT/'README.md'
BEGIN, END = '<!-- demo-results -->', '<!-- /demo-results -->'
LABELS = {'direct': 'Direct (no retrieval)', 'cot': 'CoT (no retrieval)', 'rag_dense': 'naive RAG, dense top-3',
          'rag_bm25': 'naive RAG, BM25 top-3', 'ircot': 'IRCoT', 'search_o1': 'Search-o1 (its documents)',
          'search_r1': 'Search-R1 (Ret: its documents)', 'search_r1_self': "Search-R1 (its own answer)",
          'deepretrieval': 'DeepRetrieval (BM25 query)', 's3': 's3'}


def record_run(run_dir: Path) -> None:
    "Copy a finished evaluation's table and the facts it rests on into `docs/results/`."
    man = json.loads((run_dir/'manifest.json').read_text())
    if man.get('stage') != '06_evaluate' or man.get('status') != 'ok':
        raise SystemExit(f"{run_dir}: not a finished 06_evaluate run (stage {man.get('stage')!r}, status {man.get('status')!r})")
    m = man['metrics']
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir/'artifacts'/'table.csv', CSV)
    meta = {'run_id': man['run_id'], 'config': man['config'].get('name'), 'config_source': man.get('config_source'),
            'parameters': man.get('parameters'), 'overrides': man.get('overrides'), 'split': m.get('split'),
            'questions': m.get('questions'), 'max_per_dataset': m.get('max_per_dataset'), 'generator': m.get('generator'),
            'accuracy': m.get('accuracy'), 's3': {'searcher': _rel((m.get('s3') or {}).get('searcher'))} if m.get('s3') else None, 'missing': m.get('missing'), 'git': man.get('git'),
            'host': man.get('host'), 'started': man.get('started'), 'seconds': man.get('seconds'),
            'answers_computed': m.get('computed'), 'answers_reused': m.get('reused')}
    META.write_text(json.dumps(meta, indent=1, default=str) + '\n')


def _rel(path) -> str | None:
    "A path under the project as a relative one (no machine's folder in a committed file)."
    if not path: return path
    p = Path(path)
    return p.relative_to(ROOT).as_posix() if p.is_absolute() and p.is_relative_to(ROOT) else str(path)


def _f(x: str, pct: bool = True) -> str:
    if x in ('', None): return ''
    return f"{100 * float(x):.1f}" if pct else f"{float(x):.1f}"


def render() -> str:
    "The Markdown block: one row per method, GenAcc per dataset and the paper-style average, documents and tokens."
    rows = list(csv.DictReader(CSV.open()))
    meta = json.loads(META.read_text())
    datasets = list(dict.fromkeys(r['dataset'] for r in rows if r['dataset'] != 'avg')) + ['avg']
    by = {(r['method'], r['dataset']): r for r in rows}
    methods = list(dict.fromkeys(r['method'] for r in rows))
    n = {d: max(int(float(by[m, d]['n']) + float(by[m, d]['n_missing'] or 0)) for m in methods if (m, d) in by) for d in datasets}
    head = ['method'] + [f"GenAcc {d} (n={n[d]})" if d != 'avg' else 'GenAcc avg' for d in datasets] + \
           ['EM avg', 'F1 avg', 'docs / question', 'generator input tokens', 'missing']
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for m in methods:
        a = by.get((m, 'avg'), {})
        cells = [LABELS.get(m, m)] + [_f(by.get((m, d), {}).get('genacc')) for d in datasets] + \
                [_f(a.get('em')), _f(a.get('f1')), _f(a.get('docs'), False), _f(a.get('context_tokens'), False),
                 str(int(float(a.get('n_missing') or 0)))]
        out.append('| ' + ' | '.join(cells) + ' |')
    s3 = meta.get('s3') or {}
    note = (f"Run `{meta['run_id']}` (config `{meta['config']}`, parameters `{json.dumps(meta.get('parameters'))}`), "
            f"split `{meta['split']}`, {sum((meta.get('questions') or {}).values())} questions, generator "
            f"`{meta['generator']}`, accuracy `{meta['accuracy']}` (GenAcc, EM, F1 in %; avg = mean over the datasets, "
            f"as the paper); git {str((meta.get('git') or {}).get('sha', ''))[:10]}, {(meta.get('host') or {}).get('cpus')} "
            f"CPUs, {meta.get('seconds')} s, started {meta.get('started')} (answers computed in it: {meta.get('answers_computed')}, "
            f"reused from the content-addressed logs: {meta.get('answers_reused')}). Files: `docs/results/demo_eval.csv`, "
            f"`docs/results/demo_eval.json`.")
    if s3: note += f" s3 searcher: `{s3.get('searcher')}`."
    return '\n'.join([BEGIN, *out, '', note, END])


def readme_block(text: str) -> str:
    m = re.search(re.escape(BEGIN) + r'.*?' + re.escape(END), text, flags=re.S)
    if not m: raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    return m.group(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run', nargs='?', help='a finished 06_evaluate run folder')
    p.add_argument('--check', action='store_true', help='only check that the README block is the render of docs/results/')
    a = p.parse_args(argv)
    text = README.read_text()
    if a.check:
        ok = readme_block(text) == render()
        print('demo results: README block matches docs/results/' if ok else
              'demo results: README block differs from docs/results/: run `python docs/demo_results.py RUN` or without RUN to re-render')
        return 0 if ok else 1
    if a.run: record_run(Path(a.run))
    README.write_text(text.replace(readme_block(text), render()))
    print(f"README block rendered from {CSV.relative_to(ROOT)} and {META.relative_to(ROOT)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())

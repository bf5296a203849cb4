"""Build the docs site offline: nbs/ notebooks -> Markdown pages -> mkdocs-material -> _site/.

    python docs/build_site.py [--jobs 2] [--force] [--no-exec] [--only GLOB]

Pages, in the order of the navigation:

- Home (`nbs/index.ipynb`) and Library (`nbs/api/`): processed with nbdev's own docs processors
  (`nbdev.processors.FilterDefaults`: `show_doc` for every exported function and class, front matter, hidden and
  exported cells removed, symbol links) plus a `show_doc` for every public method of an exported class, and executed
  (the cells `nbdev-test` runs; cells flagged slow/gpu/service are left out) so the examples show their outputs.
  One process per notebook (`docs/nbexec.py`), `--jobs` at a time; the result is cached under `_site_build/exec/`
  by the content of the notebook, the library and this builder, so a rebuild only re-runs what changed.
- Pipeline (`nbs/pipeline/`) and Reproducing the paper (`nbs/reproduce/`): never executed here. The executed copy of
  the newest successful run (`outputs/runs/<stage>/<run>/<stage>.ipynb`, as `s3_nbs.pipeline.latest_run` finds it)
  is shown, labelled with its run id, config and parameters; without one, the notebook itself with a note saying
  how to run it.
- Tutorials (`nbs/tutorials/`): shown as written (they run whole stages), with a note.

Each processed notebook becomes one Markdown page (`api/20_generator.ipynb` -> `api/generator.md`, nbdev's page
names), its images files beside it; `docs/mkdocs.yml` gets the navigation and `mkdocs build` writes `_site/`."""
import argparse, base64, fnmatch, hashlib, html, json, os, re, shutil, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = Path(__file__).resolve().parent
NBS = ROOT/'nbs'
SECTIONS = [('', 'Home'), ('api', 'Library'), ('pipeline', 'Pipeline'), ('reproduce', 'Reproducing the paper'),
            ('tutorials', 'Tutorials')]
EXECUTED_SECTIONS = ('', 'api')
RUN_SECTIONS = ('pipeline', 'reproduce')
MAX_TEXT_LINES = 200          # longer stream / text outputs are cut (head and tail kept)
ANSI = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')


# ----------------------------------------------------------------------------------------------------- the pages
@dataclass
class Page:
    "One notebook of nbs/ and the page made from it."
    src: Path                     # the notebook in nbs/
    section: str                  # '', 'api', 'pipeline', 'reproduce' or 'tutorials'
    md: str                       # page path inside the site's sources, e.g. 'api/reward.md'
    kind: str                     # 'exec' (executed here), 'run' (a stage run's copy) or 'static'
    nb: Path | None = None        # the processed notebook
    title: str = ''
    description: str = ''
    banner: str = ''              # Markdown shown under the title (where the outputs come from)
    info: dict = field(default_factory=dict)

    @property
    def rel(self) -> str: return self.src.relative_to(NBS).as_posix()


def page_path(rel: str) -> str:
    "nbdev's page name for notebook `rel` (numeric prefix dropped, lower case), as Markdown: api/20_generator.ipynb -> api/generator.md"
    p = Path(rel)
    return p.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', p.name.lower())).with_suffix('.md').as_posix()


def find_pages(only: str | None = None) -> list[Page]:
    "Every notebook of the sections under nbs/, in navigation order (checkpoints and private folders left out)."
    pages = []
    for sec, _ in SECTIONS:
        nbs = [NBS/'index.ipynb'] if sec == '' else sorted((NBS/sec).glob('*.ipynb'))
        for nb in nbs:
            if not nb.exists() or nb.name.startswith(('.', '_')): continue
            rel = nb.relative_to(NBS).as_posix()
            if only and not fnmatch.fnmatch(rel, only): continue
            kind = 'exec' if sec in EXECUTED_SECTIONS else 'run' if sec in RUN_SECTIONS else 'static'
            pages.append(Page(nb, sec, page_path(rel), kind))
    seen = {}
    for p in pages:
        if p.md in seen: raise SystemExit(f'build_site: {seen[p.md]} and {p.rel} would both become page {p.md}; rename one')
        seen[p.md] = p.rel
    return pages


# ------------------------------------------------------------------------------------------------- processing
def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts: h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:20]


_S3_IMPORT = re.compile(r'^\s*(?:from\s+(?:s3_nbs\.|\.)(\w+)\s+import|import\s+s3_nbs\.(\w+)|from\s+s3_nbs\s+import\s+([\w, ]+))', re.M)


def _s3_imports(text: str) -> set:
    "Names of the s3_nbs modules that `text` (a module or a notebook's code) imports."
    out = set()
    for a, b, c in _S3_IMPORT.findall(text):
        if a or b: out.add(a or b)
        else: out |= {x.strip() for x in c.split(',') if x.strip()}
    return out


def module_closure(nb_text: str) -> list[Path]:
    "The library modules a notebook (JSON text) depends on: its own (`default_exp`), those it imports, theirs, ..."
    lib = ROOT/'s3_nbs'
    code = '\n'.join(_text(c.get('source', '')) for c in json.loads(nb_text).get('cells', []) if c.get('cell_type') == 'code')
    todo = _s3_imports(code)
    if (m := re.search(r'#\|\s*default_exp\s+(\w+)', code)): todo.add(m.group(1))
    seen = set()
    while todo:
        m = todo.pop()
        f = lib/f'{m}.py'
        if m in seen or not f.exists(): continue
        seen.add(m)
        todo |= _s3_imports(f.read_text()) - seen
    return sorted(lib/f'{m}.py' for m in seen)


def result_files(nb_text: str) -> list[Path]:
    "The committed benchmark results a notebook may read: every file under `benchmarks/results/<bench>` for each bench it names."
    res = ROOT/'benchmarks'/'results'
    names = {n for n in set(re.findall(r'\b(bench_\w+)', nb_text)) if (res/n).is_dir()}
    return sorted(f for n in names for f in (res/n).rglob('*') if f.is_file())


def exec_key(src: Path, execute: bool) -> str:
    """Cache key of an executed notebook: the notebook, the modules it depends on, the benchmark results it reads, the
    configs, the builder's processor."""
    text = src.read_text()
    files = [*module_closure(text), *result_files(text), *sorted((ROOT/'configs').glob('*.y*ml')), ROOT/'pyproject.toml',
             DOCS/'nbexec.py']
    return _digest(text, execute, *[f.name.encode() + f.read_bytes() for f in files if f.exists()])


def run_nbexec(src: Path, dst: Path, execute: bool, skip_flags: str | None = None) -> dict:
    "Process (and execute) one notebook in its own process (`docs/nbexec.py`); the counts it reports."
    cmd = [sys.executable, str(DOCS/'nbexec.py'), str(src), str(dst)] + (['--exec'] if execute else [])
    if skip_flags is not None: cmd += ['--skip-flags', skip_flags]
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    line = next((l for l in r.stdout.splitlines()[::-1] if l.startswith('S3DOCS ')), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"processing {src.relative_to(ROOT)} failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}")
    return json.loads(line[7:])


def process_executed(page: Page, build: Path, force: bool, execute: bool) -> str:
    "Executed copy of an index/api notebook, re-made only when the notebook, a module it uses or the builder changed."
    dst = build/'exec'/Path(page.rel)
    key = exec_key(page.src, execute)
    stamp = dst.with_suffix('.json')
    if not force and dst.exists() and stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get('key') == key:
            page.nb, page.info = dst, info
            return 'cached'
    info = run_nbexec(page.src, dst, execute)
    info['key'], info['executed'] = key, execute
    info['built'] = time.strftime('%Y-%m-%d %H:%M', time.localtime())
    stamp.write_text(json.dumps(info, indent=1))
    page.nb, page.info = dst, info
    return 'executed' if execute else 'processed'


def newest_run(stage: str):
    "(run folder, manifest) of the newest successful run of `stage` that kept its executed notebook, or (None, None)."
    from s3_nbs.pipeline import latest_run, runs_dir
    cands = []
    d = latest_run(stage, required=False)
    if d is not None: cands.append(d)
    folder = runs_dir(stage)
    if folder.is_dir():
        others = [p for p in folder.iterdir() if p.is_dir() and p not in cands]
        cands += sorted(others, key=lambda p: (p/'manifest.json').stat().st_mtime if (p/'manifest.json').exists() else 0,
                        reverse=True)
    for d in cands:
        try: man = json.loads((d/'manifest.json').read_text())
        except (OSError, ValueError): continue
        if man.get('status') == 'ok' and (d/f'{stage}.ipynb').exists(): return d, man
    return None, None


def run_banner(stage: str, run_dir: Path, man: dict) -> str:
    "The label of a page shown from a stage run: run id, config, parameters, when, which commit."
    params = man.get('parameters') or {}
    overrides = man.get('overrides') or {}
    fin = (man.get('finished') or man.get('started') or '')[:16].replace('T', ' ')
    sha = ((man.get('git') or {}).get('sha') or '')[:8]
    dirty = ' (uncommitted changes)' if (man.get('git') or {}).get('dirty') else ''
    rows = [f"run `{man.get('run_id', run_dir.name)}` of `{stage}`, finished {fin} UTC in {man.get('seconds', '?')} s"
            + (f", commit `{sha}`{dirty}" if sha else ''),
            f"config `{man.get('config_source', '?')}`, seed {man.get('seed', '?')}"]
    if params: rows.append('parameters: ' + ', '.join(f'`{k}={_short(v)}`' for k, v in params.items()))
    if overrides: rows.append('overrides: ' + ', '.join(f'`{k}={_short(v)}`' for k, v in overrides.items()))
    rel = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir
    rows.append(f"executed notebook: `{rel}/{stage}.ipynb` (shown as it ran; not re-executed for the docs)")
    return '!!! info "Outputs of a real run"\n' + ''.join(f'    - {r}\n' for r in rows)


def _short(v, n=80) -> str:
    s = str(v)
    return s if len(s) <= n else '...' + s[-(n - 3):]


def process_run_page(page: Page, build: Path) -> str:
    "A pipeline/reproduce page: the newest successful run's executed copy, else the notebook with a note."
    stage = page.src.stem
    run_dir, man = newest_run(stage)
    dst = build/'runs'/Path(page.rel)
    if run_dir is not None:
        info = run_nbexec(run_dir/f'{stage}.ipynb', dst, execute=False)
        page.banner = run_banner(stage, run_dir, man)
        info['run'] = str(run_dir)
        status = f"run {man.get('run_id', run_dir.name)}"
    else:
        info = run_nbexec(page.src, dst, execute=False)
        cmd = f's3 run {stage}' if page.section == 'pipeline' else f"s3 reproduce {re.sub(r'^[0-9]+_', '', stage)}"
        page.banner = ('!!! warning "Not executed on this machine yet"\n'
                       f'    not executed on this machine yet: run `{cmd}` (then `make docs` again) to see its outputs here.\n')
        status = 'not executed yet'
    page.nb, page.info = dst, info
    return status


def process_static_page(page: Page, build: Path) -> str:
    info = run_nbexec(page.src, build/'static'/Path(page.rel), execute=False)
    page.nb, page.info = build/'static'/Path(page.rel), info
    page.banner = ('!!! note "Shown as written"\n    The docs build does not run the tutorials: open this one in JupyterLab '
                   '(`make lab`) and run it there to see its outputs.\n')
    return 'as written'


# ------------------------------------------------------------------------------------------ notebook -> Markdown
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')


def split_directives(src: str):
    "Quarto directives left in a processed cell (`#| echo: false`, ...) and the code without them."
    lines, d = src.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        d[m.group(1)] = m.group(2).strip().strip('"\'').lower() if m.group(2) else 'true'
        lines.pop(0)
    return d, '\n'.join(lines)


def fence(text: str, lang: str = 'text', cls: str = '') -> str:
    "A fenced block that no backtick run inside `text` can close."
    n = max([3] + [len(m) + 1 for m in re.findall(r'`{3,}', text)])
    attrs = f' {{ .{lang}{" ." + cls if cls else ""} }}' if cls else f'{lang}'
    return f"{'`' * n}{attrs}\n{text.rstrip()}\n{'`' * n}\n"


def cut_lines(text: str, n: int = MAX_TEXT_LINES) -> str:
    lines = text.splitlines()
    if len(lines) <= n: return text
    k = n // 2
    return '\n'.join(lines[:k] + [f'... ({len(lines) - 2 * k} lines left out) ...'] + lines[-k:])


def _text(v) -> str: return ''.join(v) if isinstance(v, list) else str(v)


class PageWriter:
    "Turns one processed notebook into Markdown, writing its images beside the page."
    def __init__(self, page: Page, docs_dir: Path, pages_by_src: dict, site_base: str, git_url: str):
        self.page, self.docs_dir, self.pages_by_src = page, docs_dir, pages_by_src
        self.site_base, self.git_url = site_base, git_url
        self.md_path = docs_dir/page.md
        self.files_dir = self.md_path.with_name(self.md_path.stem + '_files')
        self.n_img = 0

    # -- links
    def _rel_to_page(self, target_md: str, frag: str = '') -> str:
        rel = os.path.relpath(target_md, Path(self.page.md).parent.as_posix() or '.')
        return rel + (f'#{frag}' if frag else '')

    def fix_link(self, url: str) -> str:
        "nbdev's symbol links and notebook links -> pages of this site; other repository paths -> the repository."
        if url.startswith(self.site_base):
            path, _, frag = url[len(self.site_base):].lstrip('/').partition('#')
            md = re.sub(r'\.html$', '.md', path) or 'index.md'
            return self._rel_to_page(md, frag) if (self.docs_dir/md).exists() or md in self.pages_by_src.values() else url
        if re.match(r'^[a-z][a-z0-9+.-]*:', url, re.I) or url.startswith(('#', '/', 'mailto:')): return url
        path, _, frag = url.partition('#')
        if not path: return url
        target = (self.page.src.parent/path).resolve()
        if target.suffix == '.ipynb' and target in self.pages_by_src: return self._rel_to_page(self.pages_by_src[target], frag)
        if target.is_relative_to(ROOT) and self.git_url:
            kind = 'tree' if target.is_dir() else 'blob'
            return f"{self.git_url}/{kind}/main/{target.relative_to(ROOT).as_posix()}" + (f'#{frag}' if frag else '')
        return url

    def fix_links(self, md: str) -> str:
        return re.sub(r'(\]\()([^)\s]+)((?:\s+"[^"]*")?\))', lambda m: m.group(1) + self.fix_link(m.group(2)) + m.group(3), md)

    # -- Markdown cells
    def markdown(self, src: str) -> str:
        "Notebook (CommonMark-ish) Markdown made safe for Python-Markdown: blank lines before lists and tables."
        out, in_fence, prev = [], False, ''
        for line in src.splitlines():
            if re.match(r'^\s*(```|~~~)', line): in_fence = not in_fence
            if not in_fence and prev.strip() and not _is_block_start(prev) and (
                    re.match(r'^([-*+]|\d+[.)])\s+\S', line) or (line.startswith('|') and not prev.lstrip().startswith('|'))):
                out.append('')
            out.append(line)
            prev = line
        return self.fix_links('\n'.join(out))

    # -- outputs
    def image(self, data: str, ext: str, meta: dict) -> str:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.n_img += 1
        f = self.files_dir/f'output_{self.n_img}.{ext}'
        if ext == 'svg': f.write_text(_text(data))
        else: f.write_bytes(base64.b64decode(_text(data)))
        w = (meta or {}).get('width')
        size = f'{{ width="{int(w)}" }}' if isinstance(w, (int, float)) else ''
        return f'![output {self.n_img}]({self.files_dir.name}/{f.name}){size}\n'

    def output(self, o: dict, is_doc: bool) -> str:
        t = o.get('output_type')
        if t == 'stream':
            txt = ANSI.sub('', _text(o.get('text', '')))
            return fence(cut_lines(txt), 'text', 'nb-stderr' if o.get('name') == 'stderr' else 'nb-output') if txt.strip() else ''
        if t == 'error':
            tb = ANSI.sub('', '\n'.join(o.get('traceback') or [f"{o.get('ename')}: {o.get('evalue')}"]))
            body = fence(cut_lines(tb), 'text', 'nb-error')
            return f'!!! failure "{html.escape(o.get("ename", "Error"))}"\n' + ''.join('    ' + l + '\n' for l in body.splitlines())
        data, meta = o.get('data', {}), o.get('metadata', {})
        if 'text/markdown' in data:
            md = _text(data['text/markdown'])
            if is_doc: md = anchor_doc_headings(md)
            return self.fix_links(md) + '\n'
        for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/svg+xml', 'svg')):
            if mime in data and 'text/html' not in data: return self.image(data[mime], ext, meta.get(mime, {}))
        if 'text/html' in data:
            h = '\n'.join(l for l in _text(data['text/html']).splitlines() if l.strip())
            return f'<div class="nb-html" markdown="0">\n{h}\n</div>\n'
        if 'text/latex' in data: return _text(data['text/latex']) + '\n'
        if 'text/plain' in data:
            txt = ANSI.sub('', _text(data['text/plain']))
            return fence(cut_lines(txt), 'text', 'nb-output') if txt.strip() else ''
        return ''

    # -- cells
    def code_cell(self, cell: dict) -> str:
        d, code = split_directives(_text(cell.get('source', '')))
        if d.get('include') == 'false': return ''
        is_doc = bool(re.search(r'^\s*show_doc\(', code, re.M))
        parts = []
        if d.get('echo') != 'false' and code.strip():
            block = fence(code, 'python')
            if 'code-fold' in d:
                opener = '???+' if d['code-fold'] == 'show' else '???'
                summary = d.get('code-summary') or 'Source'
                block = f'{opener} note "{html.escape(summary)}"\n' + ''.join('    ' + l + '\n' for l in block.splitlines())
            tags = (cell.get('metadata') or {}).get('tags') or []
            if 'injected-parameters' in tags:
                block = '???+ example "Parameters this run was given"\n' + ''.join('    ' + l + '\n' for l in block.splitlines())
            parts.append(block)
        if d.get('output') != 'false':
            parts += [x for o in cell.get('outputs', []) if (x := self.output(o, is_doc))]
        return '\n'.join(parts)

    def write(self, nb: dict) -> str:
        p = self.page
        body = [f'# {p.title}\n']
        if p.description: body.append(f'{p.description}\n{{ .s3-lead }}\n')
        if p.banner: body.append(p.banner)
        for cell in nb['cells']:
            ct, src = cell.get('cell_type'), _text(cell.get('source', ''))
            if ct == 'markdown':
                if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
                body.append(self.markdown(src) + '\n')
            elif ct == 'code':
                x = self.code_cell(cell)
                if x: body.append(x)
        text = '\n'.join(body)
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        self.md_path.write_text(text)
        return text


def _is_block_start(line: str) -> bool:
    "A line after which a list or table may follow without a blank line (it is itself a list item or table row)."
    return bool(re.match(r'^\s*([-*+]|\d+[.)])\s', line) or line.lstrip().startswith('|') or line.startswith('    '))


def anchor_doc_headings(md: str) -> str:
    "`### AnswerGrader.agrade` -> with id `answergrader.agrade`, the anchor nbdev's symbol links point at."
    return re.sub(r'^(#{2,6}) +([A-Za-z_][\w.]*)\s*$', lambda m: f'{m.group(1)} {m.group(2)} {{ #{m.group(2).lower()} }}', md,
                  flags=re.M)


def page_title(page: Page, nb: dict) -> tuple[str, str]:
    "Title and summary from the notebook's front matter (nbdev moves `# Title` and `> summary` there)."
    fm = {}
    for cell in nb['cells']:
        if cell.get('cell_type') == 'raw':
            src = _text(cell.get('source', '')).strip()
            if src.startswith('---'):
                try: fm = yaml.safe_load(src.strip('-').strip()) or {}
                except yaml.YAMLError: fm = {}
                break
    title = fm.get('title') or page.info.get('title') or page.src.stem
    return str(title), str(fm.get('description') or page.info.get('description') or '')


# ------------------------------------------------------------------------------------------------------ the site
def nav(pages: list[Page]) -> list:
    out = []
    for sec, label in SECTIONS:
        ps = [p for p in pages if p.section == sec]
        if not ps: continue
        if sec == '': out.append({label: ps[0].md})
        else: out.append({label: [{p.title.replace('`', ''): p.md} for p in ps]})
    return out


def mathjax_source() -> Path | None:
    "MathJax's single-file TeX->SVG bundle from the `django-static-mathjax` wheel, if installed."
    try:
        import mathjax
        for base in mathjax.__path__:
            f = Path(base)/'static'/'mathjax'/'es5'/'tex-svg.js'
            if f.exists(): return f
    except ImportError: pass
    return None


def write_assets(docs_dir: Path) -> bool:
    a = docs_dir/'assets'
    a.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DOCS/'extra.css', a/'extra.css')
    mj = mathjax_source()
    cfg = ("window.MathJax = {tex: {inlineMath: [['\\\\(', '\\\\)']], displayMath: [['\\\\[', '\\\\]']],"
           " processEscapes: true, processEnvironments: true}, options: {ignoreHtmlClass: '.*|', processHtmlClass: 'arithmatex'}};\n")
    if mj:
        (a/'mathjax').mkdir(exist_ok=True)
        shutil.copy2(mj, a/'mathjax'/'tex-svg.js')
        cfg += ("(function(){var s=document.createElement('script');s.async=true;"
                "s.src=document.currentScript.src.replace(/mathjax-config\\.js.*$/, 'mathjax/tex-svg.js');"
                "document.head.appendChild(s);})();\n")
    (a/'mathjax-config.js').write_text(cfg)
    return mj is not None


def write_config(build: Path, site: Path, pages: list[Page]) -> Path:
    cfg = yaml.safe_load((DOCS/'mkdocs.yml').read_text())
    cfg['docs_dir'] = 'docs'
    cfg['site_dir'] = os.path.relpath(site, build)
    cfg['nav'] = nav(pages)
    out = build/'mkdocs.yml'
    out.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return out


def build(args) -> dict:
    t0 = time.time()
    build_dir, site = Path(args.build).resolve(), Path(args.site).resolve()
    pages = find_pages(args.only)
    if not pages: raise SystemExit(f'build_site: no notebook under {NBS} matches {args.only!r}')
    docs_dir = build_dir/'docs'
    if docs_dir.exists(): shutil.rmtree(docs_dir)
    docs_dir.mkdir(parents=True)
    n = len(pages)
    print(f'docs: {n} notebooks -> {site.relative_to(ROOT) if site.is_relative_to(ROOT) else site} '
          f'({args.jobs} at a time; api pages executed: {not args.no_exec})', flush=True)
    done, lock = [0], threading.Lock()

    def one(page: Page):
        t = time.time()
        if page.kind == 'exec': status = process_executed(page, build_dir, args.force, not args.no_exec)
        elif page.kind == 'run': status = process_run_page(page, build_dir)
        else: status = process_static_page(page, build_dir)
        i = page.info
        extra = ''
        if status in ('executed', 'cached') and i.get('executed'):
            extra = f": {i.get('ran', 0)} cells run, {i.get('skipped', 0)} left out (slow/gpu/service or eval: false)"
            if i.get('methods_added'): extra += f", {i['methods_added']} methods documented"
            if i.get('errors'): extra += f", {len(i['errors'])} cell(s) RAISED: " + '; '.join(i['errors'][:3])
        with lock:
            done[0] += 1
            sys.stdout.write(f'  [{done[0]:2d}/{n}] {page.rel:42s} {status}{extra} ({time.time() - t:.1f} s)\n')
            sys.stdout.flush()

    def last_seconds(page: Page) -> float:  # longest first, so the slow notebooks do not all end up last
        stamp = build_dir/'exec'/Path(page.rel).with_suffix('.json')
        try: return float(json.loads(stamp.read_text()).get('seconds', 1e9)) if page.kind == 'exec' else 0.0
        except (OSError, ValueError): return 1e9
    with ThreadPoolExecutor(max(1, args.jobs)) as ex: list(ex.map(one, sorted(pages, key=last_seconds, reverse=True)))

    pages_by_src = {p.src.resolve(): p.md for p in pages}
    from nbdev.config import get_config
    cfg = get_config()
    site_base = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}".rstrip('/') or 'https://invalid.example'
    git_url = (cfg.get('git_url') or '').rstrip('/')
    for p in pages:
        nb = json.loads(p.nb.read_text())
        p.title, p.description = page_title(p, nb)
        if p.kind == 'exec' and p.info.get('executed'):
            i = p.info
            note = f"Examples executed by `make docs` on {i.get('built', '?')}"
            if i.get('skipped'): note += f"; {i['skipped']} cell(s) not run, as in `make test` (flagged slow/gpu/service, or `eval: false`)"
            if i.get('errors'): note += f"; **{len(i['errors'])} cell(s) raised** (tracebacks below)"
            p.banner = f'{note}.\n{{ .s3-exec-note }}\n'
        PageWriter(p, docs_dir, pages_by_src, site_base, git_url).write(nb)
    math = write_assets(docs_dir)
    conf = write_config(build_dir, site, pages)
    print(f'docs: mkdocs build ({len(pages)} pages{", MathJax bundled" if math else ", no MathJax: formulas stay TeX"})', flush=True)
    if site.exists(): shutil.rmtree(site)
    env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1', 'DISABLE_MKDOCS_2_WARNING': 'true'}
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '-f', str(conf)], cwd=build_dir, env=env,
                       capture_output=True, text=True)
    warn = [l for l in (r.stderr + r.stdout).splitlines() if l.startswith(('WARNING', 'ERROR'))]
    for l in warn[:30]: print('  mkdocs:', l)
    if r.returncode != 0: raise SystemExit(f'build_site: mkdocs build failed:\n{(r.stderr or r.stdout)[-3000:]}')
    info = dict(pages=[dict(md=p.md, html=p.md[:-3] + '.html', src=p.rel, title=p.title, kind=p.kind,
                            run=p.info.get('run'), errors=p.info.get('errors', [])) for p in pages],
                seconds=round(time.time() - t0, 1), built=time.strftime('%Y-%m-%d %H:%M:%S'), mkdocs_warnings=warn)
    (site/'_build.json').write_text(json.dumps(info, indent=1))
    print(f'docs: site in {site} ({info["seconds"]} s); open {site/"index.html"} or serve it: '
          f'python -m http.server -d {site.relative_to(ROOT) if site.is_relative_to(ROOT) else site} -b 127.0.0.1 8000', flush=True)
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--jobs', type=int, default=int(os.environ.get('DOCS_JOBS', 2)), help='notebooks processed at once (default 2)')
    p.add_argument('--force', action='store_true', help='re-execute every notebook (ignore the cache)')
    p.add_argument('--no-exec', action='store_true', help='do not execute the api notebooks (show_doc output only)')
    p.add_argument('--only', default=None, help="only notebooks whose path under nbs/ matches this glob, e.g. 'api/30_*'")
    p.add_argument('--site', default=str(ROOT/'_site'), help='output folder (default _site/)')
    p.add_argument('--build', default=str(ROOT/'_site_build'), help='work folder: pages, executed notebooks (default _site_build/)')
    a = p.parse_args(argv)
    os.chdir(ROOT)
    build(a)


if __name__ == '__main__': main()

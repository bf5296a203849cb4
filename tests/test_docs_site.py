"""The offline docs site (`make docs` -> _site/) checked in a real browser: headless Chromium (Debian's `chromium`,
`make setup-docs`) driven by Playwright over http on 127.0.0.1.

Builds the site (or reuses a build newer than every notebook and the builder), serves it, loads every page and
checks: each has a <title>; every link to a page or anchor of the site resolves; nothing the pages load (CSS, JS,
images) is missing; the API pages document methods and show executed examples; the results pages show their table
and figure (when a run of them exists here); a screenshot of the landing page goes to _site/_screenshots/index.png."""
import functools, json, os, shutil, subprocess, sys, threading, time
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT/'_site'
INSTALL = "install it with `make setup-docs` (apt-get install -y chromium), or point S3_CHROMIUM at a Chromium binary"
RESULT_PAGES = ('reproduce/general_qa.html', 'pipeline/evaluate.html')

pytestmark = pytest.mark.slow


def chromium_path() -> str | None:
    "Debian's Chromium (or $S3_CHROMIUM)."
    env = os.environ.get('S3_CHROMIUM')
    if env: return env if Path(env).exists() else None
    return next((p for n in ('chromium', 'chromium-browser', 'google-chrome') if (p := shutil.which(n))), None)


def site_is_fresh() -> bool:
    "A finished build newer than every notebook and every file of the builder."
    stamp = SITE/'_build.json'
    if not stamp.exists(): return False
    srcs = [*(ROOT/'nbs').rglob('*.ipynb'), *(ROOT/'s3_nbs').glob('*.py'),
            *(p for p in (ROOT/'docs').iterdir() if p.suffix in ('.py', '.yml', '.css'))]
    return stamp.stat().st_mtime > max(p.stat().st_mtime for p in srcs)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture(scope='module')
def site():
    exe = chromium_path()
    if exe is None: pytest.skip(f'no Chromium for the docs browser test: {INSTALL}')
    try: import playwright.sync_api  # noqa: F401
    except ImportError: pytest.skip('playwright is not installed: `make setup` installs it from requirements/cpu.lock')
    if not site_is_fresh():
        r = subprocess.run([sys.executable, 'docs/build_site.py'], cwd=ROOT, capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, f"docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    info = json.loads((SITE/'_build.json').read_text())
    srv = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(SITE)))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try: yield dict(exe=exe, base=f'http://127.0.0.1:{srv.server_address[1]}', info=info)
    finally:
        srv.shutdown(); srv.server_close(); th.join(5)


@pytest.fixture(scope='module')
def crawl(site):
    "Every HTML page of the site loaded once in Chromium: status, title, links, ids, failed requests, figures, tables."
    from playwright.sync_api import sync_playwright
    base = site['base']
    pages = sorted(p.relative_to(SITE).as_posix() for p in SITE.rglob('*.html'))
    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=site['exe'], args=['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'])
        try:
            ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
            page = ctx.new_page()
            failed = []
            page.on('response', lambda r: failed.append((r.status, r.url)) if r.status >= 400 and r.url.startswith(base) else None)
            # a 404 shows as a response; a request cut short by going to the next page (ERR_ABORTED) is no failure
            page.on('requestfailed', lambda r: failed.append((r.failure, r.url))
                    if r.url.startswith(base) and 'ERR_ABORTED' not in (r.failure or '') else None)
            for rel in pages:
                failed.clear()
                resp = page.goto(f'{base}/{rel}', wait_until='load')
                if rel == 'index.html' or rel in RESULT_PAGES: page.wait_for_timeout(300)
                data = page.evaluate("""() => ({
                    title: document.title,
                    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
                    ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
                    imgs: Array.from(document.querySelectorAll('article img')).map(i => ({src: i.src, w: i.naturalWidth, done: i.complete})),
                    tables: document.querySelectorAll('article table').length,
                    text: document.querySelector('article') ? document.querySelector('article').innerText : '',
                    outputs: document.querySelectorAll('article .nb-output, article .nb-html').length,
                    math: document.querySelectorAll('mjx-container').length,
                })""")
                data.update(status=resp.status if resp else None, failed=list(failed))
                out[rel] = data
                if rel == 'index.html':
                    shots = SITE/'_screenshots'
                    shots.mkdir(exist_ok=True)
                    page.screenshot(path=str(shots/'index.png'), full_page=False)
        finally: browser.close()
    return out


def test_every_page_loads_with_a_title(site, crawl):
    built = {p['html'] for p in site['info']['pages']}
    assert built <= set(crawl), f"pages in the build record but not in _site/: {sorted(built - set(crawl))}"
    bad = {rel: (d['status'], d['title']) for rel, d in crawl.items() if d['status'] != 200 or not d['title'].strip()}
    assert not bad, f"pages without status 200 or without a <title>: {bad}"
    titles = {p['html']: p['title'].replace('`', '') for p in site['info']['pages']}  # Markdown code marks are dropped
    for rel, t in titles.items():  # the notebook's own `# Title` is the page's title
        assert t and t in crawl[rel]['title'], (rel, t, crawl[rel]['title'])
    print(f"{len(crawl)} pages loaded in Chromium, each with a <title>")


def test_internal_links_resolve(site, crawl):
    base = site['base']
    ids = {rel: set(d['ids']) for rel, d in crawl.items()}
    checked, broken = set(), []
    for rel, d in crawl.items():
        for href in d['links']:
            if not href.startswith(base): continue
            u = urlsplit(href)
            path = unquote(u.path).lstrip('/') or 'index.html'
            if path.endswith('/'): path += 'index.html'
            key = (path, u.fragment)
            if key in checked: continue
            checked.add(key)
            if not (SITE/path).is_file(): broken.append(f'{rel} -> {href} (no such file)'); continue
            if u.fragment and path in ids and unquote(u.fragment) not in ids[path]:
                broken.append(f'{rel} -> {href} (no element with id {u.fragment!r})')
    assert not broken, f"{len(broken)} broken internal links:\n" + '\n'.join(broken[:40])
    missing = [f'{rel}: {s} {url}' for rel, d in crawl.items() for s, url in d['failed']]
    assert not missing, "requests the pages made that failed:\n" + '\n'.join(missing[:40])
    print(f"{len(checked)} distinct internal links (page#anchor) resolved")


def test_api_pages_document_methods_and_show_outputs(site, crawl):
    raised = {p['src']: p['errors'] for p in site['info']['pages'] if p.get('errors')}
    assert not raised, f"cells that raised while the docs build executed them (their pages show the tracebacks): {raised}"
    reward, trainer = crawl['api/reward.html'], crawl['api/trainer.html']
    for rel, d, names in (('api/reward.html', reward, ['answergrader', 'answergrader.agrade', 'gbrreward.ascore']),
                          ('api/trainer.html', trainer, ['trainer', 'trainer.step', 'trainer.fit', 'trainer.save'])):
        missing = [n for n in names if n not in d['ids']]
        assert not missing, f"{rel} lacks the show_doc entries {missing}"
    assert reward['outputs'] > 5, "the reward page shows no executed example outputs"
    assert reward['math'] > 0, "the formulas of the reward page were not typeset (MathJax)"
    assert 'Gain Beyond RAG' in reward['text']


def test_results_page_shows_table_and_figure(site, crawl):
    shown = {p['html']: p for p in site['info']['pages']}
    ran = [rel for rel in RESULT_PAGES if rel in shown and shown[rel].get('run')]
    if not ran:
        for rel in RESULT_PAGES: assert 'not executed on this machine yet' in crawl[rel]['text'], rel
        pytest.skip('no run of reproduce/01_general_qa or pipeline/06_evaluate here: `s3 run 06_evaluate` and '
                    '`s3 reproduce general_qa` first (their pages say so)')
    for rel in ran:
        d = crawl[rel]
        assert d['tables'] > 0, f"{rel}: no table"
        imgs = [i for i in d['imgs'] if i['w'] > 0]
        assert imgs, f"{rel}: no figure loaded: {d['imgs']}"
        assert 'Outputs of a real run' in d['text'] and Path(shown[rel]['run']).name in d['text'], f"{rel}: run label missing"
    print(f"results pages with table and figure: {ran}")


def test_landing_page_screenshot(crawl):
    shot = SITE/'_screenshots'/'index.png'
    assert shot.exists() and shot.stat().st_size > 10_000, shot
    assert 's3_nbs' in crawl['index.html']['title']

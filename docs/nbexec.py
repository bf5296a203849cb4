"""Process one notebook the way nbdev stages it for the docs (`nbdev.processors.FilterDefaults`), optionally executing it.

nbdev's own staging (`proc_nbs` -> `_proc/`) runs only the `show_doc` cells and then deletes the source of exported
cells, so its output cannot be executed afterwards for the examples. This module runs the same processor chain on the
source notebook, with two changes:

- `add_method_docs` (after `add_show_docs`): a `show_doc(Cls.method)` cell for every public method defined in the
  body of an exported class whose `show_doc(Cls)` is on the page, so a class's methods are documented too;
- `exec_cells` replaces `exec_show_docs` when executing: every code cell `nbdev-test` would run (cells flagged with
  `tst_flags` -- slow, gpu, service -- and `#| eval: false` are left out) runs in one `CaptureShell`, from the
  notebook's own folder, keeping its outputs. A cell that raises keeps its traceback as output; the run goes on.

Run as `python docs/nbexec.py SRC DST [--exec] [--skip-flags "slow gpu service"]`: the processed notebook goes to DST
and a JSON line with the counts to stdout. One notebook per process, as `nbdev-test` does."""
import argparse, ast, json, os, sys, time, warnings
from pathlib import Path

from fastcore.basics import str2bool
from fastcore.nbio import read_nb, write_nb, mk_cell
from nbdev.config import get_config
from nbdev.frontmatter import nb_frontmatter
from nbdev.process import NBProcessor, Processor
from nbdev.processors import FilterDefaults, add_show_docs, exec_show_docs
from nbdev.showdoc import showdoc_nm


def _exported_classes(nb) -> dict:
    "Name -> public method names, for every class defined at the top level of an exported cell."
    out = {}
    for cell in nb.cells:
        d = getattr(cell, 'directives_', None) or {}
        if cell.cell_type != 'code' or not ({'export', 'exports'} & d.keys()) or 'hide' in d: continue
        try: tree = ast.parse(cell.source)
        except SyntaxError: continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
                out[node.name] = [b.name for b in node.body if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))
                                  and not b.name.startswith('_') and not _is_property_setter(b)]
    return out


def _is_property_setter(fn) -> bool:
    return any(isinstance(d, ast.Attribute) and d.attr in ('setter', 'deleter') for d in fn.decorator_list)


def _shown_names(nb) -> set:
    "Names already passed to `show_doc(...)` anywhere in the notebook."
    names = set()
    for cell in nb.cells:
        if cell.cell_type != 'code' or 'show_doc' not in (cell.source or ''): continue
        try: tree = ast.parse(cell.source)
        except SyntaxError: continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'show_doc' and n.args:
                names.add(ast.unparse(n.args[0]))
    return names


class add_method_docs(Processor):
    "After each `show_doc(Cls)` of an exported class, add `show_doc(Cls.meth)` for its public methods not shown yet."
    def begin(self):
        classes, shown = _exported_classes(self.nb), _shown_names(self.nb)
        self.added = 0
        cells = self.nb.cells
        for i in reversed(range(len(cells))):
            c = cells[i]
            if c.cell_type != 'code' or not (c.source or '').strip().startswith('show_doc('): continue
            try: arg = ast.unparse(ast.parse(c.source).body[0].value.args[0])
            except Exception: continue
            new = [f'{arg}.{m}' for m in classes.get(arg, []) if f'{arg}.{m}' not in shown]
            for j, nm in enumerate(new):
                nc = mk_cell(f'show_doc({nm}, title_level=4)')
                nc.has_sd = True
                nc.s3_mdoc = True  # a method doc added here: may name types defined further down (retried at the end)
                cells.insert(i + 1 + j, nc)
                shown.add(nm)
            self.added += len(new)
        self.nb.methods_added_ = self.added


class exec_cells(Processor):
    "Execute every cell `nbdev-test` would run (skipping `skip_flags`), keeping outputs; errors stay as outputs."
    skip_flags = ()
    def begin(self):
        from execnb.shell import CaptureShell
        from nbdev.test import _skip_cell
        self.fm = nb_frontmatter(self.nb) or {}
        self.skip = _skip_cell(self.nb, list(self.skip_flags), [])
        self.k = CaptureShell(getattr(self.nb, 'path_', None), profile=bool(get_config().exec_profile))
        self.k.run_cell('from nbdev.showdoc import show_doc')
        self.errors, self.ran, self.skipped, self.retry = [], 0, 0, []
        self.timeout = get_config().get('cell_timeout') or None

    def __call__(self, cell):
        if cell.cell_type != 'code': return
        if getattr(cell, 'has_sd', False): pass  # added show_doc cells always run
        elif self.skip(cell):
            self.skipped += 1
            return
        self.run(cell, retry_later=getattr(cell, 's3_mdoc', False))

    def run(self, cell, retry_later=False):
        self.k.cell(cell, timeout=int(self.timeout) if self.timeout else None)
        self.ran += 1
        if self.k.exc is not None:
            e = self.k.exc
            self.k.exc = None
            if retry_later and isinstance(e, NameError): self.retry.append(cell)  # a forward reference in a signature
            else: self.errors.append(f'cell {cell.idx_}: {type(e).__name__}: {str(e)[:300]}')

    def end(self):
        for cell in self.retry: self.run(cell)
        self.nb.exec_stats_ = dict(ran=self.ran, skipped=self.skipped, errors=self.errors)


def _procs(execute: bool, skip_flags):
    procs = list(FilterDefaults().procs())
    procs.insert(procs.index(add_show_docs) + 1, add_method_docs)
    if execute:
        ex = type('exec_cells', (exec_cells,), {'skip_flags': tuple(skip_flags)})
        procs[procs.index(exec_show_docs)] = ex
    else: procs.remove(exec_show_docs)
    return procs


def process_notebook(src: Path, dst: Path, execute: bool = False, skip_flags=('slow', 'gpu', 'service')) -> dict:
    "Process `src` with nbdev's docs processors (+ method docs, + execution when `execute`) into `dst`; the counts."
    src, dst = Path(src).resolve(), Path(dst)
    t0 = time.time()
    nb = read_nb(src)
    nb.path_ = str(src)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        cwd = os.getcwd()
        os.environ['IN_TEST'] = '1'
        try:
            os.chdir(src.parent)
            NBProcessor(nb=nb, procs=_procs(execute, skip_flags), rm_directives='quarto').process()
        finally: os.chdir(cwd)
    fm = getattr(nb, 'frontmatter_', {}) or {}
    stats = dict(src=str(src), title=fm.get('title', ''), description=fm.get('description', ''),
                 methods_added=getattr(nb, 'methods_added_', 0), seconds=round(time.time() - t0, 1),
                 **getattr(nb, 'exec_stats_', dict(ran=0, skipped=0, errors=[])))
    nb.metadata['s3_docs'] = {k: v for k, v in stats.items() if k != 'src'}
    for c in nb.cells:  # keep the file valid nbformat: nbdev's marker key and numeric timings are not allowed there
        c.pop('has_sd', None); c.pop('s3_mdoc', None)
        c.get('metadata', {}).pop('execution', None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src'); p.add_argument('dst')
    p.add_argument('--exec', action='store_true', help='execute the cells nbdev-test would run')
    p.add_argument('--skip-flags', default=None, help='cell flags to skip (default: tst_flags in pyproject.toml)')
    a = p.parse_args(argv)
    flags = a.skip_flags.split() if a.skip_flags is not None else str(get_config().tst_flags or '').split()
    stats = process_notebook(Path(a.src), Path(a.dst), execute=a.exec, skip_flags=flags)
    sys.stdout.write('S3DOCS ' + json.dumps(stats) + '\n')


if __name__ == '__main__': main()

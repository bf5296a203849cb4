"""`s3 run` run folders and endings, through the real command on a throwaway project (`S3_NBS_ROOT`) whose one stage
notebook can wait: an existing `--run-id` is refused unless `--overwrite`, and Ctrl-C or SIGTERM during a run ends
with exit status 130 and the manifest's status `interrupted` (never a `running` left behind)."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')


@pytest.fixture
def project(tmp_path):
    "A project folder with configs/smoke.yaml and one stage, 01_toy, that records its label and waits `wait_s` seconds."
    root = tmp_path/'project'
    (root/'configs').mkdir(parents=True)
    shutil.copy(ROOT/'configs'/'smoke.yaml', root/'configs'/'smoke.yaml')
    params = nbformat.v4.new_code_cell('config = "smoke"  # config name or YAML path\noverrides = ""  # dotted overrides\n'
                                       'run_dir = ""  # output folder\nlabel = "x"  # free text\nwait_s = 0.0  # seconds to wait')
    params.metadata['tags'] = ['parameters']
    body = nbformat.v4.new_code_cell('import time\nfrom pathlib import Path\nfrom s3_nbs.pipeline import start_stage, record_metrics\n'
                                     'cfg, rd = start_stage("01_toy", config, overrides, run_dir)\n'
                                     'record_metrics(rd, label=label)\n(Path(rd)/"started").touch()\ntime.sleep(wait_s)')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# Toy'), params, body])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    (root/'nbs'/'pipeline').mkdir(parents=True)
    nbformat.write(nb, root/'nbs'/'pipeline'/'01_toy.ipynb')
    return root


def env_for(project):
    return {**os.environ, 'S3_NBS_ROOT': str(project), 'S3_NBS_OUTPUTS': str(project/'outputs')}


def s3(project, *args):
    return subprocess.run([S3, *args], cwd=project, capture_output=True, text=True, timeout=600, env=env_for(project))


def manifest(project, run_id):
    return json.loads((project/'outputs'/'runs'/'01_toy'/run_id/'manifest.json').read_text())


def test_existing_run_id_is_refused_unless_overwrite(project):
    old = project/'outputs'/'runs'/'01_toy'/'mine'
    old.mkdir(parents=True)
    (old/'manifest.json').write_text('{"status": "ok", "note": "an earlier run"}')
    r = s3(project, 'run', 'toy', '--run-id', 'mine', '-p', 'label="second"', '--quiet')
    assert r.returncode == 2 and 'already exists' in r.stderr and '--overwrite' in r.stderr, r.stdout + r.stderr
    assert [p.name for p in old.iterdir()] == ['manifest.json'] and 'an earlier run' in (old/'manifest.json').read_text()
    r = s3(project, 'run', 'toy', '--run-id', 'mine', '-p', 'label="second"', '--overwrite', '--quiet')
    assert r.returncode == 0, r.stdout + r.stderr
    man = manifest(project, 'mine')
    assert man['status'] == 'ok' and man['metrics']['label'] == 'second' and 'note' not in man


@pytest.mark.parametrize('how', ['ctrl-c', 'sigterm'])
def test_interrupted_run_is_recorded(project, how):
    "Ctrl-C reaches the whole foreground process group (as a terminal sends it); SIGTERM only the `s3` process (as `kill` does)."
    run_dir = project/'outputs'/'runs'/'01_toy'/'cut'
    p = subprocess.Popen([S3, 'run', 'toy', '--run-id', 'cut', '-p', 'wait_s=300', '--quiet'], cwd=project, env=env_for(project),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir/'started').exists():
            assert p.poll() is None, p.communicate()
            assert time.time() < deadline, 'the stage did not start'
            time.sleep(0.2)
        if how == 'ctrl-c': os.killpg(p.pid, signal.SIGINT)
        else: p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    man = manifest(project, 'cut')
    assert man['status'] == 'interrupted', (man['status'], out, err)
    assert 'KeyboardInterrupt' in man['error'] and man['seconds'] < 300 and man['metrics'] == {'label': 'x'}
    assert p.returncode == 130 and "records status 'interrupted'" in err, (p.returncode, err[-2000:])
    assert not (project/'outputs'/'runs'/'01_toy'/'latest').exists(), 'an interrupted run must not become the latest'

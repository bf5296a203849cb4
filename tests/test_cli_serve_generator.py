"""`s3 serve-generator` (in-process backend, the tiny random Llama) and its bearer token: `--token` or env
`S3_GENERATOR_TOKEN` is required by the server, and binding off-loopback without one warns loudly."""
import os, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest

httpx = pytest.importorskip('httpx')
ROOT = Path(__file__).resolve().parents[1]
S3 = str(Path(sys.executable).parent/'s3')

pytestmark = pytest.mark.service  # starts real generator servers (a model load each): > 10 s on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start(*args, token_env=None):
    env = {k: v for k, v in os.environ.items() if k != 'S3_GENERATOR_TOKEN'}
    if token_env: env['S3_GENERATOR_TOKEN'] = token_env
    return subprocess.Popen([S3, 'serve-generator', '--backend', 'transformers', '--model', 'tiny-llama', *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_ready(proc) -> None:
    "Until the command prints its base URL (it does once the server answers)."
    line = proc.stdout.readline()
    assert line.startswith('base_url='), (line, proc.poll(), stop(proc))


def stop(proc) -> str:
    "Stop the server; its stderr."
    if proc.poll() is None: os.killpg(proc.pid, signal.SIGTERM)
    try: return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[1]


def chat(port, token=None):
    headers = {'Authorization': f'Bearer {token}'} if token else {}
    return httpx.post(f'http://127.0.0.1:{port}/v1/chat/completions', headers=headers, timeout=120,
                      json={'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 2})


def test_token_from_env_is_required():
    port = _free_port()
    proc = start('--port', str(port), token_env='sekrit')
    try:
        wait_ready(proc)
        assert chat(port).status_code == 401
        assert chat(port, 'wrong').status_code == 401
        r = chat(port, 'sekrit')
        assert r.status_code == 200 and r.json()['choices'][0]['message']['role'] == 'assistant', r.text
    finally:
        err = stop(proc)
    assert 'without a token' not in err, err


def test_off_loopback_without_token_warns():
    port = _free_port()
    proc = start('--host', '0.0.0.0', '--port', str(port))
    try: wait_ready(proc)
    finally: err = stop(proc)
    assert 'serving on 0.0.0.0 without a token' in err and 'S3_GENERATOR_TOKEN' in err, err
    assert err.count('without a token') == 1, err  # once, not once per layer

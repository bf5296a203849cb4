"""Reliability of the generator client against a real loopback HTTP server that misbehaves on purpose.

The server (stdlib `ThreadingHTTPServer`, OpenAI-compatible `/v1/chat/completions`) can answer, return 500s or 429s,
hang past the client's timeout, or be down. The client must retry with backoff and then fail with a clear
`GeneratorError`; the disk cache must survive a process killed while writing."""
import json, os, signal, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest
from s3_nbs.chat_cache import CachedChat
from s3_nbs.generator import GeneratorError, OpenAIChat
from s3_nbs.generator_server import free_port

FAST = dict(backoff_s=0.01, max_backoff_s=0.05)  # keep retries quick


def echo_answer(content: str, repeat: int = 1) -> str:
    "What the server answers to a user message (deterministic, so cached answers can be checked)."
    return ('echo:' + content + ';') * repeat


class Behaviour:
    "What the test server does; tests change it between calls."
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.fail_first = 0          # the first N requests get `fail_status`
        self.fail_status = 500
        self.fail_if = None          # a substring: requests whose user message contains it always get fail_status
        self.hang_first = 0          # the first N requests sleep `hang_s` before answering
        self.hang_s = 0.0
        self.delay_s = 0.0           # every request waits this long (for concurrency checks)
        self.retry_after = None      # a Retry-After header on failures
        self.repeat = 1              # answer size multiplier
        self.null_first = 0          # the first N requests get a 200 whose message content is null


def make_server(b: Behaviour) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        def log_message(self, *a): pass
        def _send(self, code, obj, headers=()):
            data = json.dumps(obj).encode()
            try:
                self.send_response(code)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                for k, v in headers: self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError): pass  # the client gave up (timeout)
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
            user = req['messages'][-1]['content']
            with b.lock:
                b.requests += 1; n = b.requests
                b.in_flight += 1; b.max_in_flight = max(b.max_in_flight, b.in_flight)
            try:
                if b.delay_s: time.sleep(b.delay_s)
                if n <= b.hang_first: time.sleep(b.hang_s)
                if n <= b.fail_first or (b.fail_if and b.fail_if in user):
                    hdr = [('Retry-After', str(b.retry_after))] if b.retry_after is not None else []
                    return self._send(b.fail_status, {'error': {'message': f'injected failure #{n}'}}, hdr)
                if n <= b.null_first:
                    return self._send(200, {'object': 'chat.completion', 'model': req['model'], 'choices': [{
                        'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': None}}]})
                self._send(200, {'object': 'chat.completion', 'model': req['model'],
                                 'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {
                                     'role': 'assistant', 'content': echo_answer(user, b.repeat)}}]})
            finally:
                with b.lock: b.in_flight -= 1
    class Quiet(ThreadingHTTPServer):
        daemon_threads, block_on_close = True, False
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], ConnectionError): super().handle_error(request, client_address)
    return Quiet(('127.0.0.1', 0), H)


@pytest.fixture
def server():
    b = Behaviour()
    srv = make_server(b)
    th = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True); th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", b
    srv.shutdown(); srv.server_close()


def msgs(q: str) -> list[dict]: return [{'role': 'user', 'content': q}]


def test_500s_then_success(server):
    url, b = server
    b.fail_first = 2
    c = OpenAIChat(url, 'm', max_retries=3, **FAST)
    assert c.chat([msgs('q')]) == [echo_answer('q')]
    assert (b.requests, c.n_retries) == (3, 2)


def test_500s_forever_raise_clear_error(server):
    url, b = server
    b.fail_first = 10**6
    c = OpenAIChat(url, 'm', max_retries=2, **FAST)
    t0 = time.time()
    with pytest.raises(GeneratorError) as ei:
        c.chat([msgs('q')])
    e = ei.value
    assert (e.status, e.attempts, e.url) == (500, 3, url + '/chat/completions')
    assert url + '/chat/completions' in str(e) and 'HTTP 500' in str(e) and 'injected failure #3' in str(e)
    assert b.requests == 3 and time.time() - t0 < 5


def test_server_down_raises_clear_error():
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    c = OpenAIChat(url, 'm', max_retries=2, **FAST)
    with pytest.raises(GeneratorError) as ei:
        c.chat([msgs('q'), msgs('r')])
    e = ei.value
    assert e.attempts == 3 and e.status is None
    assert f"127.0.0.1:{port}/v1/chat/completions" in str(e) and 'ConnectError' in str(e)
    assert '2 of 2 requests failed' in str(e)


def test_slow_response_times_out_then_retries(server):
    url, b = server
    b.hang_first, b.hang_s = 1, 3.0
    c = OpenAIChat(url, 'm', timeout_s=0.3, max_retries=2, **FAST)
    t0 = time.time()
    assert c.chat([msgs('slow')]) == [echo_answer('slow')]
    assert time.time() - t0 < 2.5          # did not wait for the hung response
    assert (b.requests, c.n_retries) == (2, 1)


def test_hanging_server_raises_timeout_error(server):
    url, b = server
    b.hang_first, b.hang_s = 10**6, 3.0
    c = OpenAIChat(url, 'm', timeout_s=0.2, max_retries=1, **FAST)
    t0 = time.time()
    with pytest.raises(GeneratorError, match=r'failed after 2 attempts: last error: timed out after 0.2 s'):
        c.chat([msgs('q')])
    assert time.time() - t0 < 2.5


def test_client_errors_are_not_retried(server):
    url, b = server
    b.fail_first, b.fail_status = 10**6, 400
    c = OpenAIChat(url, 'm', max_retries=4, **FAST)
    with pytest.raises(GeneratorError, match='HTTP 400') as ei:
        c.chat([msgs('q')])
    assert ei.value.attempts == 1 and b.requests == 1


def test_429_honours_retry_after(server):
    url, b = server
    b.fail_first, b.fail_status, b.retry_after = 1, 429, 0.3
    c = OpenAIChat(url, 'm', max_retries=2, backoff_s=0.01, max_backoff_s=5)
    t0 = time.time()
    assert c.chat([msgs('q')]) == [echo_answer('q')]
    assert time.time() - t0 >= 0.3 and b.requests == 2


def test_null_content_is_retried_not_graded_empty(server):
    "A 200 whose content is null is a failed attempt: retried, counted, and the real answer returned (never '')."
    url, b = server
    b.null_first = 2
    c = OpenAIChat(url, 'm', max_retries=3, **FAST)
    assert c.chat([msgs('q')]) == [echo_answer('q')]
    assert b.requests == 3
    assert c.stats() == dict(requests=3, retries=2, failed=0, no_content=2)


def test_null_content_forever_raises_clear_error(server):
    url, b = server
    b.null_first = 10**6
    c = OpenAIChat(url, 'm', max_retries=2, **FAST)
    with pytest.raises(GeneratorError, match=r'failed after 3 attempts: last status: HTTP 200 without an answer: '
                                             r'choices\[0\]\.message\.content is null') as ei:
        c.chat([msgs('q')])
    assert (ei.value.attempts, b.requests) == (3, 3)
    assert c.stats() == dict(requests=3, retries=2, failed=1, no_content=3)


def test_concurrency_is_bounded(server):
    url, b = server
    b.delay_s = 0.05
    c = OpenAIChat(url, 'm', concurrency=3, **FAST)
    qs = [f'q{i}' for i in range(12)]
    assert c.chat([msgs(q) for q in qs]) == [echo_answer(q) for q in qs]
    assert b.max_in_flight == 3


def test_partial_failure_keeps_successes_in_cache(server, tmp_path):
    url, b = server
    b.fail_if = 'bad'
    qs = ['good1', 'bad', 'good2']
    cc = CachedChat(OpenAIChat(url, 'm', max_retries=1, **FAST), tmp_path/'c.jsonl')
    with pytest.raises(GeneratorError, match='HTTP 500'):
        cc.chat([msgs(q) for q in qs])
    cc.close()
    b.fail_if = None
    again = CachedChat(OpenAIChat(url, 'm', **FAST), tmp_path/'c.jsonl')
    assert len(again) == 2
    before = b.requests
    assert again.chat([msgs(q) for q in qs]) == [echo_answer(q) for q in qs]
    assert b.requests - before == 1 and again.stats()['hits'] == 2  # only the failed one is sent again


WRITER = r"""
import sys
from s3_nbs.chat_cache import CachedChat
from s3_nbs.generator import OpenAIChat
url, path = sys.argv[1], sys.argv[2]
c = CachedChat(OpenAIChat(url, 'm', concurrency=4, backoff_s=0.01), path)
i = 0
while True:
    c.chat([[{'role': 'user', 'content': f'q{i}-{j}'}] for j in range(4)])
    i += 1
"""


BIG = 100_000  # ~2 MB answers: each cache line takes long enough to write that a kill can land inside it


def check_cache(path: Path, url: str, repeat: int) -> CachedChat:
    "Reopen the cache and check that every entry it returns is the right, complete answer."
    c = CachedChat(OpenAIChat(url, 'm'), path)
    lines = path.read_bytes().split(b'\n')                    # opening only reads: a partial last line stays
    assert c.skipped_lines == (lines[-1] != b'')              # ... and is ignored
    keys = {json.loads(ln)['key'] for ln in lines[:-1]}       # every complete line parses
    assert len(keys) == len(c) > 0
    n_ok = 0
    for i in range(1000):
        for j in range(4):
            q = f'q{i}-{j}'
            got = c.lookup(msgs(q))
            if got is not None:
                assert got == echo_answer(q, repeat), f"corrupt cached answer for {q}"
                n_ok += 1
    assert n_ok == len(c)
    return c


def tail_is_partial(path: Path) -> bool:
    with open(path, 'rb') as f:
        n = f.seek(0, 2)
        if n == 0: return False
        f.seek(n - 1)
        return f.read(1) != b'\n'


def test_cache_survives_kill_during_write(server, tmp_path):
    """A writer process is SIGKILLed the moment its cache file ends in an unfinished line; reopening drops that line
    and returns only complete, correct entries, and the cache keeps working. Repeated a few times; at least one kill
    must have landed inside a write (in practice nearly all do)."""
    url, b = server
    b.repeat = BIG
    partial_kills = 0
    for trial in range(3):
        path = tmp_path/f'gen{trial}.jsonl'
        p = subprocess.Popen([sys.executable, '-c', WRITER, url, str(path)], stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                assert p.poll() is None, p.stderr.read().decode()[-2000:]
                if path.exists() and path.stat().st_size > 4_000_000 + trial * 2_000_000 and tail_is_partial(path): break
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        partial_kills += tail_is_partial(path)
        c = check_cache(path, url, BIG)
        n = len(c)
        assert c.chat([msgs('after-crash')]) == [echo_answer('after-crash', BIG)]   # appends cleanly after the crash
        c.close()
        assert path.read_bytes().endswith(b'\n') and c.repaired_bytes == c.partial_bytes  # the append cut it first
        assert len(CachedChat(OpenAIChat(url, 'm'), path)) == n + 1
    assert partial_kills > 0, "no kill landed inside a write: the crash path was not exercised"


def test_cache_ignores_hand_truncated_last_line(server, tmp_path):
    url, b = server
    b.repeat = 2000
    path = tmp_path/'gen.jsonl'
    c = CachedChat(OpenAIChat(url, 'm'), path)
    c.chat([msgs(f'q0-{j}') for j in range(4)]); c.close()
    full = path.read_bytes()
    last_start = full.rstrip(b'\n').rfind(b'\n') + 1
    for cut in (last_start + 1, last_start + 5000, len(full) - 2):   # a write cut at various points
        path.write_bytes(full[:cut])
        c = check_cache(path, url, 2000)
        assert len(c) == 3 and c.skipped_lines == 1
        c.close()

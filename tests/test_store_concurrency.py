"""`JsonlStore` with a writer and a reader in two processes: the writer appends batches in a loop while the reader
opens the store again and again. A reader never changes the file (a batch still being written is ignored, not cut),
every open sees a gap-free prefix of complete records, and the final file holds every record.

The writer is the real `JsonlStore.append` (lock, repair, one `write` per batch), but its file writes go out in small
pieces with a short pause between them, as on a slow disk, so that the reader often opens the file while a batch is
half-written (on a fast disk that window is a fraction of a millisecond and a test would rarely hit it)."""
import json, subprocess, sys, textwrap
from pathlib import Path

N_BATCHES, PER_BATCH, PAD = 30, 10, 20_000  # 30 appends of ~200 KB each

WRITER = textwrap.dedent("""
    import builtins, sys, time
    import s3_nbs.store
    from s3_nbs.store import JsonlStore
    path, n, per, pad = sys.argv[1], *map(int, sys.argv[2:5])

    class SlowFile:
        "An appending binary file whose writes go out in 4 KB pieces with a pause between them (a slow disk)."
        def __init__(self, f): self.f = f
        def write(self, b):
            for i in range(0, len(b), 4096):
                self.f.write(b[i:i + 4096]); self.f.flush(); time.sleep(0.0003)
            return len(b)
        def __getattr__(self, name): return getattr(self.f, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()

    def slow_open(file, mode='r', *args, **kw):
        f = builtins.open(file, mode, *args, **kw)
        return SlowFile(f) if mode == 'ab' else f
    s3_nbs.store.open = slow_open  # the store's appends write slowly; everything else is the real code
    s = JsonlStore(path)
    for i in range(n):
        s.append([{'id': f'{i}-{j}', 'pad': 'x' * pad} for j in range(per)])
""")

READER = textwrap.dedent("""
    import json, os, sys, time
    from s3_nbs.store import JsonlStore
    path, done, n, per, pad = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    want = [f'{i}-{j}' for i in range(n) for j in range(per)]
    opens = in_flight = 0
    problems = []
    while True:
        finished = os.path.exists(done)  # read once more after the writer is done
        if os.path.exists(path):
            s = JsonlStore(path)
            opens += 1
            in_flight += s.dropped_bytes > 0
            ids = [r['id'] for r in s]
            if ids != want[:len(ids)]: problems.append(f'open {opens}: not a gap-free prefix ({len(ids)} records)')
            if any(len(r['pad']) != pad for r in s): problems.append(f'open {opens}: a record was cut')
            if s.skipped_lines: problems.append(f'open {opens}: {s.skipped_lines} broken lines')
        if finished: break
    print(json.dumps({'opens': opens, 'in_flight': in_flight, 'problems': problems[:5]}))
""")


def test_reader_never_cuts_a_record_in_flight(tmp_path):
    path, done = tmp_path/'log.jsonl', tmp_path/'writer-done'
    args = [str(N_BATCHES), str(PER_BATCH), str(PAD)]
    reader = subprocess.Popen([sys.executable, '-c', READER, str(path), str(done), *args], stdout=subprocess.PIPE, text=True)
    writer = subprocess.run([sys.executable, '-c', WRITER, str(path), *args], capture_output=True, text=True, timeout=300)
    done.touch()
    out, _ = reader.communicate(timeout=300)
    assert writer.returncode == 0, writer.stderr[-2000:]
    assert reader.returncode == 0, out
    seen = json.loads(out)
    print(f"\nthe reader opened the store {seen['opens']} times while the writer appended; {seen['in_flight']} opens saw a batch in flight")
    assert seen['problems'] == [], seen
    assert seen['in_flight'] > 0, 'the reader never opened the file during a write: this run checked nothing'  # slow writes make it likely
    # the file holds every record, each line whole, nothing torn
    lines = path.read_bytes().split(b'\n')
    assert lines.pop() == b'', 'the file must end with a newline'
    recs = [json.loads(l) for l in lines]
    assert [r['id'] for r in recs] == [f'{i}-{j}' for i in range(N_BATCHES) for j in range(PER_BATCH)]
    assert all(len(r['pad']) == PAD for r in recs)


def test_only_a_writer_holding_the_lock_repairs(tmp_path):
    "A torn last line left by a killed writer: readers leave it in place; the next append (under the lock) cuts it."
    from s3_nbs.store import JsonlStore
    p = tmp_path/'log.jsonl'
    JsonlStore(p).append([{'id': 'a'}])
    with open(p, 'ab') as f: f.write(b'{"id": "b", "pa')
    before = p.read_bytes()
    for _ in range(3):
        r = JsonlStore(p)
        assert (sorted(r.records), r.dropped_bytes) == (['a'], 15) and p.read_bytes() == before
    w = JsonlStore(p)
    w.append([{'id': 'c'}])
    assert p.read_bytes() == b'{"id": "a"}\n{"id": "c"}\n' and w.repaired_bytes == 15
    assert Path(str(p) + '.lock').exists()  # the lock is a file of its own next to the store (filelock)

"""Soak test: mixed operations through the official `e2b` Python SDK against a Vivarium server
(E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY), many clients at once.

Each worker keeps a few sandboxes of its own and picks operations at random: create, run a
command, write a file of a random size (0 B to MAX_BYTES, spread evenly over orders of
magnitude) whose SHA-256 is checked inside the guest (`sha256sum`) and again after reading it
back, read back an earlier file, pause and resume (files and a running process must survive),
fork (the child must hold the parent's files), kill. Every check that fails counts as a failed
operation; every byte that differs from what was written counts as a corrupt byte.

It prints ops/s, p50/p95 latency per operation kind, the failures and the corrupt bytes, and
exits 1 on any failure. OPS, CONCURRENCY, MAX_BYTES and SEED change the run.
"""

import hashlib
import json
import os
import random
import sys
import threading
import time
import traceback

from e2b import Sandbox

OPS = int(os.environ.get("OPS", "10000"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "8"))
MAX_BYTES = int(os.environ.get("MAX_BYTES", str(8 << 20)))
SEED = int(os.environ.get("SEED", str(int(time.time()))))
# Sandboxes a worker keeps at most; beyond that a create becomes a kill.
PER_WORKER = 2
TIMEOUT = 900

# Relative weights of the operation kinds.
WEIGHTS = {
    "create": 6,
    "run": 20,
    "write": 30,
    "read": 18,
    "pause_resume": 8,
    "fork": 5,
    "kill": 5,
}


class Failure(Exception):
    """An operation that did not do what it should (not an exception from the SDK)."""


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.started = 0
        self.latency = {kind: [] for kind in WEIGHTS}
        self.failed = {kind: 0 for kind in WEIGHTS}
        self.failures = []
        self.corrupt_bytes = 0
        self.bytes_written = 0
        self.bytes_read = 0

    def claim(self):
        with self.lock:
            if self.started >= OPS:
                return None
            self.started += 1
            return self.started

    def record(self, kind, seconds, error=None):
        with self.lock:
            self.latency[kind].append(seconds)
            if error is not None:
                self.failed[kind] += 1
                self.failures.append(f"{kind}: {error}")


STATS = Stats()


def random_size(rnd):
    """0 B to MAX_BYTES, log-uniform (as many small files as large ones), with the edges."""
    pick = rnd.random()
    if pick < 0.03:
        return 0
    if pick < 0.06:
        return MAX_BYTES
    return min(MAX_BYTES, int(2 ** rnd.uniform(0, MAX_BYTES.bit_length())))


def corrupt(expected, got):
    """Bytes of `got` that differ from `expected`, a missing or extra byte counting as one."""
    differing = sum(1 for a, b in zip(expected, got) if a != b)
    return differing + abs(len(expected) - len(got))


class Box:
    """A sandbox of one worker and what it is known to hold."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.files = {}  # path -> (sha256 hex, size)
        self.counter = 0

    @property
    def id(self):
        return self.sandbox.sandbox_id


class Worker:
    def __init__(self, index):
        self.index = index
        self.rnd = random.Random(SEED * 1000 + index)
        self.boxes = []
        # The sandbox the running operation works on.
        self.current = None

    def pick(self):
        kinds, weights = zip(*WEIGHTS.items())
        kind = self.rnd.choices(kinds, weights)[0]
        if not self.boxes:
            return "create"
        if kind == "create" and len(self.boxes) >= PER_WORKER:
            return "kill"
        if kind == "read" and not any(b.files for b in self.boxes):
            return "write"
        if kind == "kill" and len(self.boxes) == 1:
            return "run"
        return kind

    def run(self):
        while STATS.claim() is not None:
            kind = self.pick()
            self.current = None
            start = time.perf_counter()
            error = None
            try:
                getattr(self, "op_" + kind)()
            except Failure as e:
                error = str(e)
            except Exception as e:  # an SDK or server error: the operation failed
                error = f"{type(e).__name__}: {e}"[:500]
            STATS.record(kind, time.perf_counter() - start, error)
            if error is not None:
                print(f"worker {self.index}: {kind} FAILED: {error}", file=sys.stderr, flush=True)
                # Count each failure once: a sandbox an operation failed on is dropped (and
                # killed if it still exists), so its later operations do not fail in its wake.
                if self.current in self.boxes:
                    self.boxes.remove(self.current)
                    try:
                        self.current.sandbox.kill()
                    except Exception:
                        pass
        for box in self.boxes:
            try:
                box.sandbox.kill()
            except Exception:
                pass

    def box(self):
        self.current = self.rnd.choice(self.boxes)
        return self.current

    def op_create(self):
        sandbox = Sandbox.create(timeout=TIMEOUT)
        box = self.current = Box(sandbox)
        self.boxes.append(box)
        if sandbox.commands.run("echo ready").stdout != "ready\n":
            raise Failure(f"new sandbox {box.id} did not answer echo")

    def op_run(self):
        box = self.box()
        n = self.rnd.randint(1, 2000)
        result = box.sandbox.commands.run(f"seq 1 {n}; seq 1 {n} >&2; echo $(({n} * 2))")
        expected = "".join(f"{i}\n" for i in range(1, n + 1))
        if result.exit_code != 0 or result.stdout != expected + f"{n * 2}\n":
            raise Failure(f"{box.id}: seq {n} printed {len(result.stdout)} B on stdout, not the {len(expected)} expected")
        if result.stderr != expected:
            raise Failure(f"{box.id}: seq {n} >&2 printed {len(result.stderr)} B on stderr, not the {len(expected)} expected")

    def op_write(self):
        box = self.box()
        size = random_size(self.rnd)
        data = self.rnd.randbytes(size)
        digest = hashlib.sha256(data).hexdigest()
        box.counter += 1
        path = f"/home/user/soak/{self.index}-{box.counter}.bin"
        box.sandbox.files.write(path, data)
        with STATS.lock:
            STATS.bytes_written += size
        inside = box.sandbox.commands.run(f"sha256sum {path} && stat -c %s {path}").stdout.split()
        if inside[:1] != [digest] or inside[-1:] != [str(size)]:
            self.check_read(box, path, data)
            raise Failure(f"{box.id}: {path} ({size} B) in the guest is {inside}, expected {digest}")
        self.check_read(box, path, data)
        box.files[path] = (digest, size)
        if len(box.files) > 4:
            old = self.rnd.choice([p for p in box.files if p != path])
            box.sandbox.files.remove(old)
            del box.files[old]

    def check_read(self, box, path, data):
        back = bytes(box.sandbox.files.read(path, format="bytes"))
        with STATS.lock:
            STATS.bytes_read += len(back)
        if back != data:
            with STATS.lock:
                STATS.corrupt_bytes += corrupt(data, back)
            raise Failure(f"{box.id}: {path} read back {len(back)} B differing from the {len(data)} B written")

    def op_read(self):
        box = self.current = self.rnd.choice([b for b in self.boxes if b.files])
        path, (digest, size) = self.rnd.choice(sorted(box.files.items()))
        back = bytes(box.sandbox.files.read(path, format="bytes"))
        with STATS.lock:
            STATS.bytes_read += len(back)
        if hashlib.sha256(back).hexdigest() != digest:
            with STATS.lock:
                STATS.corrupt_bytes += max(1, abs(len(back) - size))
            raise Failure(f"{box.id}: {path} read back {len(back)} B with another SHA-256 than the {size} B written")

    def op_pause_resume(self):
        box = self.box()
        marker = f"/tmp/alive-{self.rnd.getrandbits(32):08x}"
        loop = box.sandbox.commands.run(f"while true; do date +%s%N > {marker}; sleep 0.1; done", background=True)
        before = self.wait_for_change(box.sandbox, marker, "")
        if before is None:
            raise Failure(f"{box.id}: the background process did not start")
        box.sandbox.pause()
        resumed = Sandbox.connect(box.id, timeout=TIMEOUT)
        box.sandbox = resumed
        at_resume = resumed.commands.run(f"cat {marker}").stdout
        if self.wait_for_change(resumed, marker, at_resume) is None:
            raise Failure(f"{box.id}: the background process did not run on after the resume")
        if not resumed.commands.kill(loop.pid):
            raise Failure(f"{box.id}: the background process {loop.pid} was gone after the resume")
        self.verify_files(box, resumed)

    @staticmethod
    def wait_for_change(sandbox, path, old, limit=30):
        """What `path` holds once it differs from `old` (None if it did not change in time)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            now = sandbox.commands.run(f"cat {path} 2>/dev/null || true").stdout
            if now and now != old:
                return now
            time.sleep(0.2)
        return None

    def verify_files(self, box, sandbox):
        if not box.files:
            return
        paths = sorted(box.files)
        out = sandbox.commands.run("sha256sum " + " ".join(paths)).stdout.split("\n")
        seen = dict(reversed(line.split()) for line in out if line.strip())
        for path in paths:
            if seen.get(path) != box.files[path][0]:
                raise Failure(f"{box.id}: {path} has another SHA-256 in the guest")

    def op_fork(self):
        box = self.box()
        results = box.sandbox.fork(count=1, timeout=TIMEOUT)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors or len(results) != 1:
            raise Failure(f"{box.id}: fork failed: {errors}")
        child = Box(results[0])
        child.files = dict(box.files)
        child.counter = box.counter + 1000
        try:
            self.verify_files(child, child.sandbox)
        except Exception:
            child.sandbox.kill()
            raise
        if len(self.boxes) >= PER_WORKER:
            child.sandbox.kill()
        else:
            self.boxes.append(child)

    def op_kill(self):
        box = self.box()
        self.boxes.remove(box)
        if not box.sandbox.kill():
            raise Failure(f"{box.id}: kill found no sandbox")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def main():
    print(f"soak: {OPS} operations, concurrency {CONCURRENCY}, files up to {MAX_BYTES} B, seed {SEED}", flush=True)
    workers = [Worker(i) for i in range(CONCURRENCY)]
    threads = [threading.Thread(target=w.run, name=f"worker-{w.index}") for w in workers]
    start = time.perf_counter()
    for t in threads:
        t.start()
    last = 0
    while any(t.is_alive() for t in threads):
        time.sleep(2)
        done = sum(len(v) for v in STATS.latency.values())
        if done - last >= max(50, OPS // 20):
            last = done
            print(f"  {done}/{OPS} operations, {sum(STATS.failed.values())} failed", flush=True)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    total = sum(len(v) for v in STATS.latency.values())
    failed = sum(STATS.failed.values())
    kinds = {}
    print(f"{'operation':<14}{'count':>7}{'failed':>8}{'p50 ms':>10}{'p95 ms':>10}")
    for kind, values in STATS.latency.items():
        if not values:
            continue
        p50, p95 = percentile(values, 0.5) * 1000, percentile(values, 0.95) * 1000
        kinds[kind] = {"count": len(values), "failed": STATS.failed[kind], "p50Ms": round(p50), "p95Ms": round(p95)}
        print(f"{kind:<14}{len(values):>7}{STATS.failed[kind]:>8}{p50:>10.0f}{p95:>10.0f}")
    report = {
        "ops": total,
        "concurrency": CONCURRENCY,
        "seconds": round(elapsed, 1),
        "opsPerSecond": round(total / elapsed, 2),
        "failedOps": failed,
        "corruptBytes": STATS.corrupt_bytes,
        "bytesWritten": STATS.bytes_written,
        "bytesRead": STATS.bytes_read,
        "seed": SEED,
        "kinds": kinds,
    }
    print(json.dumps(report))
    print(f"ops: {total}, ops/s: {total / elapsed:.2f}, failed ops: {failed}, corrupt bytes: {STATS.corrupt_bytes}")
    for line in STATS.failures[:50]:
        print(f"  FAILED {line}")
    sys.exit(1 if failed or STATS.corrupt_bytes or total < OPS else 0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)

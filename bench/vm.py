"""VM manager benchmark: drives a Vivarium server (VIV_API_URL, VIV_API_KEY) through its public
REST API only, booting the test ISO (VM_ISO, from tests/fixtures/vm-iso/build), and prints, with
the server's accelerator, p50/p95 of REPS repetitions (default 5) of:

- start to serial marker, under SeaBIOS and under UEFI: from `POST /vms/{id}/start` to
  `VIVARIUM-ISO-BOOTED` (the guest's /init runs) and to `VIVARIUM-ACPID-READY` (it answers the
  ACPI power button), read through the console WebSocket (`GET /vms/{id}/console`, which replays
  this run's output from its start, so a marker printed before the attach is still seen);
- stop (ACPI power button, the guest powers itself off; a forced power-off fails the run),
  restart (the request, then to the marker again) and kill;
- linked and full clone of a 1 GiB qcow2 disk holding DATA_MIB (default 256) MiB of random data,
  as operations (`POST /disks/{name}/clone` → `GET /operations/{id}/wait`);
- VM snapshots of a running VM with a qcow2 disk: revert with memory, save with memory right
  after a revert and right after another save (the first costs far more), disk-only save while
  running and while stopped, disk-only revert and delete (stopped);
- console attach latency: WebSocket connect (TCP, upgrade) to the first replayed byte;
- fork of a running VM (512 MiB guest, 1 GiB qcow2 disk): `POST /vms/{id}/fork` until the fork
  runs; and a VM made from a sandbox snapshot: `POST /vms` with `fromSnapshot`, start, until its
  first `POST /vms/{id}/exec` answers (`--only bridge` measures these two alone).

Every VM, disk and ISO it creates is killed and deleted on the way out, on failure and on ^C
too. The WebSocket client is a minimal RFC 6455 one over a socket (python3's stdlib has none).
`--json` prints the figures as JSON instead of the table."""

import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse

BOOTED = b"VIVARIUM-ISO-BOOTED"
READY = b"VIVARIUM-ACPID-READY"
# Bounds a hang, not a slow boot: TCG on a busy 2-core host takes seconds per boot.
DEADLINE = 300.0
PREFIX = "bench-vm"


class BenchError(Exception):
    pass


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def summary(values):
    return {"p50": round(statistics.median(values), 1), "p95": round(percentile(values, 0.95), 1), "n": len(values)}


def log(message):
    print(message, file=sys.stderr, flush=True)


class Api:
    """The REST API: JSON in and out, the API key in X-API-Key, a fresh connection per call."""

    def __init__(self, url, key):
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.key = key

    def call(self, method, path, body=None, expect=(200, 201, 202, 204), timeout=DEADLINE, raw=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            hdrs = {"X-API-Key": self.key}
            hdrs.update(headers or {})
            payload = raw
            if body is not None:
                payload = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=hdrs)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status not in expect:
            raise BenchError(f"{method} {path}: {response.status} {data[:500].decode(errors='replace')}")
        if data and response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(data)
        return data

    def timed(self, method, path, body=None, **kw):
        start = time.perf_counter()
        result = self.call(method, path, body, **kw)
        return (time.perf_counter() - start) * 1000, result


class Console:
    """A minimal RFC 6455 client of `GET /vms/{id}/console`: binary frames are console output;
    pings are answered; a close frame ends the stream."""

    def __init__(self, api, vm):
        self.sock = socket.create_connection((api.host, api.port), timeout=DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /vms/{urllib.parse.quote(vm)}/console HTTP/1.1\r\nHost: {api.host}:{api.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
            f"Sec-WebSocket-Version: 13\r\nX-API-Key: {api.key}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BenchError(f"console of {vm}: connection closed during the upgrade")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise BenchError(f"console of {vm}: {head.decode(errors='replace')} {self.buf[:300]!r}")
        accept = base64.b64encode(hashlib.sha1((nonce + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if b"sec-websocket-accept: " + accept.lower() not in head.lower():
            raise BenchError(f"console of {vm}: wrong Sec-WebSocket-Accept")
        self.closed = False

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("console: connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def output(self):
        """The next chunk of console output; None once the server closed the socket."""
        while not self.closed:
            b0, b1 = self._read(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", self._read(8))
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode in (0x0, 0x2):
                return payload
            if opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                self.closed = True
        return None

    def wait_for(self, markers, start):
        """Milliseconds from `start` (perf_counter) to each marker's first appearance."""
        seen, found = b"", {}
        self.sock.settimeout(DEADLINE)
        while len(found) < len(markers):
            chunk = self.output()
            if chunk is None:
                raise BenchError(f"console closed before {markers}; output: {seen[-2000:]!r}")
            seen += chunk
            now = (time.perf_counter() - start) * 1000
            for marker in markers:
                if marker not in found and marker in seen:
                    found[marker] = now
            if time.perf_counter() - start > DEADLINE:
                raise BenchError(f"no {markers} within {DEADLINE} s; output: {seen[-2000:]!r}")
        return [found[m] for m in markers]

    def close(self):
        try:
            if not self.closed:
                self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


class Bench:
    def __init__(self, api, reps):
        self.api = api
        self.reps = reps
        self.vms, self.disks, self.isos = [], [], []
        self.sandboxes, self.snapshots_made = [], []
        self.figures = {}

    def record(self, key, values):
        self.figures[key] = summary(values)
        s = self.figures[key]
        log(f"{key}: p50 {s['p50']:.0f} ms, p95 {s['p95']:.0f} ms (n={s['n']})")

    # -- resources, all deleted by cleanup() --------------------------------------------------

    def define(self, name, definition):
        vm = self.api.call("POST", "/vms", dict(definition, name=name))
        self.vms.append(vm["id"])
        return vm["id"]

    def upload_iso(self, path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        name = f"{PREFIX}-iso"
        with open(path, "rb") as f:
            self.api.call(
                "PUT",
                f"/isos/{name}",
                raw=f,
                headers={"X-Content-SHA256": digest.hexdigest(), "Content-Length": str(os.path.getsize(path))},
            )
        self.isos.append(name)
        return name

    def upload_disk(self, name, path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        with open(path, "rb") as f:
            self.api.call(
                "PUT",
                f"/disks/{name}/upload",
                raw=f,
                headers={
                    "X-Content-SHA256": digest.hexdigest(),
                    "Content-Length": str(os.path.getsize(path)),
                    "Content-Type": "application/octet-stream",
                },
            )
        self.disks.append(name)

    def cleanup(self):
        try:
            self.api.call("GET", "/health", timeout=10)
        except (BenchError, OSError):
            # A ^C reaches the server too: it stopped and killed its VMs (`--on-shutdown kill`);
            # bench/vm removes its data directory.
            log("cleanup: the server is gone (its VMs went with it)")
            return
        for vm in reversed(self.vms):
            try:
                state = self.api.call("GET", f"/vms/{vm}", timeout=30)["state"]
                if state in ("starting", "running", "paused", "stopping"):
                    self.api.call("POST", f"/vms/{vm}/kill", expect=(200, 409), timeout=60)
                self.api.call("DELETE", f"/vms/{vm}", expect=(204, 404), timeout=60)
            except (BenchError, OSError) as e:
                log(f"cleanup: VM {vm}: {e}")
        for sandbox in self.sandboxes:
            try:
                self.api.call("DELETE", f"/sandboxes/{sandbox}", expect=(204, 404), timeout=60)
            except (BenchError, OSError) as e:
                log(f"cleanup: sandbox {sandbox}: {e}")
        for snapshot in self.snapshots_made:
            try:
                self.api.call("DELETE", f"/snapshots/{snapshot}", expect=(204, 404), timeout=60)
            except (BenchError, OSError) as e:
                log(f"cleanup: snapshot {snapshot}: {e}")
        for disk in reversed(self.disks):
            try:
                self.api.call("DELETE", f"/disks/{disk}", expect=(204, 404), timeout=60)
            except (BenchError, OSError) as e:
                log(f"cleanup: disk {disk}: {e}")
        for iso in self.isos:
            try:
                self.api.call("DELETE", f"/isos/{iso}", expect=(204, 404), timeout=60)
            except (BenchError, OSError) as e:
                log(f"cleanup: ISO {iso}: {e}")

    # -- measurements -------------------------------------------------------------------------

    def start_to_markers(self, vm, path="start"):
        """POST /vms/{vm}/{path} (start or restart), then the console until both markers: the
        request's milliseconds and each marker's, all from the request."""
        start = time.perf_counter()
        self.api.call("POST", f"/vms/{vm}/{path}")
        request_ms = (time.perf_counter() - start) * 1000
        console = Console(self.api, vm)
        try:
            booted, ready = console.wait_for([BOOTED, READY], start)
        finally:
            console.close()
        return request_ms, booted, ready

    def stop(self, vm):
        ms, info = self.api.timed("POST", f"/vms/{vm}/stop?timeoutSecs=600")
        if info["state"] != "stopped" or "forced" in (info.get("lastExit") or ""):
            raise BenchError(f"stop of {vm}: {info['state']}, lastExit {info.get('lastExit')!r}")
        return ms

    def lifecycle(self, firmware, iso):
        """Per repetition, on a fresh VM (its first start, NVRAM included): start → markers,
        restart → markers, ACPI stop; then start again and kill."""
        results = {k: [] for k in ("start", "booted", "ready", "restart", "restart_booted", "restart_ready", "stop", "kill")}
        for i in range(self.reps):
            vm = self.define(f"{PREFIX}-{firmware}-{i}", {"firmware": firmware, "cdroms": [{"iso": iso}], "memoryMib": 512})
            request, booted, ready = self.start_to_markers(vm)
            results["start"].append(request)
            results["booted"].append(booted)
            results["ready"].append(ready)
            request, booted, ready = self.start_to_markers(vm, "restart")
            results["restart"].append(request)
            results["restart_booted"].append(booted)
            results["restart_ready"].append(ready)
            results["stop"].append(self.stop(vm))
            if i == 0:
                log(f"  after the stop, lastExit: {self.api.call('GET', f'/vms/{vm}').get('lastExit')!r}")
            self.start_to_markers(vm)
            ms, info = self.api.timed("POST", f"/vms/{vm}/kill")
            if info["state"] != "stopped":
                raise BenchError(f"kill of {vm}: {info['state']}")
            results["kill"].append(ms)
            log(
                f"  {firmware} {i + 1}/{self.reps}: start → {BOOTED.decode()} {results['booted'][-1]:.0f} ms, → "
                f"{READY.decode()} {results['ready'][-1]:.0f} ms; restart {results['restart'][-1]:.0f} ms (→ ready {results['restart_ready'][-1]:.0f} ms); "
                f"stop {results['stop'][-1]:.0f} ms; kill {ms:.0f} ms"
            )
            self.api.call("DELETE", f"/vms/{vm}")
            self.vms.remove(vm)
        self.record(f"{firmware}: POST start (QEMU runs the firmware)", results["start"])
        self.record(f"{firmware}: start → {BOOTED.decode()}", results["booted"])
        self.record(f"{firmware}: start → {READY.decode()}", results["ready"])
        self.record(f"{firmware}: stop (ACPI, guest powers off)", results["stop"])
        self.record(f"{firmware}: POST restart (stop + start)", results["restart"])
        self.record(f"{firmware}: restart → {READY.decode()}", results["restart_ready"])
        self.record(f"{firmware}: kill", results["kill"])

    def clones(self, data_mib, scratch):
        """Linked and full clones of a 1 GiB qcow2 holding `data_mib` MiB of random data."""
        raw = os.path.join(scratch, "src.raw")
        qcow = os.path.join(scratch, "src.qcow2")
        with open(raw, "wb") as f:
            f.truncate(1 << 30)
            # Spread over the disk: a MiB of random bytes every (1024 / data_mib) MiB.
            stride = max(1, 1024 // max(1, data_mib))
            for n in range(min(data_mib, 1024)):
                f.seek(n * stride << 20)
                f.write(os.urandom(1 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
        os.unlink(raw)
        source = f"{PREFIX}-clone-src"
        self.upload_disk(source, qcow)
        os.unlink(qcow)
        info = self.api.call("GET", f"/disks/{source}")
        log(f"  clone source: {info['format']}, {info['virtualSize']} bytes virtual, {info.get('actualSize')} allocated")
        for linked in (True, False):
            kind = "linked" if linked else "full"
            times = []
            for i in range(self.reps):
                name = f"{PREFIX}-{kind}-{i}"
                start = time.perf_counter()
                op = self.api.call("POST", f"/disks/{source}/clone", {"name": name, "linked": linked})
                self.disks.append(name)
                while op.get("state") == "running":
                    op = self.api.call("GET", f"/operations/{op['id']}/wait?timeout=600")
                times.append((time.perf_counter() - start) * 1000)
                if op["state"] != "succeeded":
                    raise BenchError(f"{kind} clone: {op}")
                log(f"  {kind} clone {i + 1}/{self.reps}: {times[-1]:.0f} ms")
                self.api.call("DELETE", f"/disks/{name}")
                self.disks.remove(name)
            self.record(f"{kind} clone of a 1 GiB qcow2 ({data_mib} MiB data)", times)

    def snapshots(self, iso):
        """Snapshots of a running VM booted from the ISO with a blank 1 GiB qcow2 disk."""
        disk = f"{PREFIX}-snap-disk"
        self.api.call("POST", "/disks", {"name": disk, "size": 1 << 30, "format": "qcow2"})
        self.disks.append(disk)
        vm = self.define(
            f"{PREFIX}-snap",
            {"cdroms": [{"iso": iso}], "disks": [{"disk": disk}], "bootOrder": ["cdrom", "disk"], "memoryMib": 512},
        )
        self.start_to_markers(vm)
        keys = ("mem_save_after_revert", "mem_save_after_save", "mem_revert", "disk_save_running")
        times = {k: [] for k in keys + ("disk_save_stopped", "disk_revert", "delete")}
        # A memory save right after a revert (or the first start on a disk that holds snapshots)
        # costs far more than one after another save, so each is timed on its own.
        first_ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots", {"name": "mem-first", "memory": True})
        self.figures["snapshot save with memory, the first on a fresh disk (ms, n=1)"] = round(first_ms, 1)
        log(f"  first memory snapshot on the fresh disk: {first_ms:.0f} ms")
        last = "mem-first"
        for i in range(self.reps):
            ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots/{last}/revert")
            times["mem_revert"].append(ms)
            state = self.api.call("GET", f"/vms/{vm}")["state"]
            if state != "running":
                raise BenchError(f"after a revert to a memory snapshot the VM is {state}")
            ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots", {"name": f"mem-a{i}", "memory": True})
            times["mem_save_after_revert"].append(ms)
            ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots", {"name": f"mem-b{i}", "memory": True})
            times["mem_save_after_save"].append(ms)
            last = f"mem-b{i}"
            ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots", {"name": f"disk-run-{i}", "memory": False})
            times["disk_save_running"].append(ms)
            log(
                f"  snapshot {i + 1}/{self.reps}: revert with memory {times['mem_revert'][-1]:.0f} ms, memory save "
                f"after it {times['mem_save_after_revert'][-1]:.0f} ms, another {times['mem_save_after_save'][-1]:.0f} ms; "
                f"disk-only save (running) {ms:.0f} ms"
            )
        attach = []
        for i in range(max(20, self.reps)):
            start = time.perf_counter()
            console = Console(self.api, vm)
            try:
                console.sock.settimeout(30)
                if not console.output():
                    raise BenchError("console: no replay")
                attach.append((time.perf_counter() - start) * 1000)
            finally:
                console.close()
        self.api.call("POST", f"/vms/{vm}/kill")
        for i in range(self.reps):
            ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots", {"name": f"disk-stopped-{i}", "memory": False})
            times["disk_save_stopped"].append(ms)
            ms, _ = self.api.timed("POST", f"/vms/{vm}/snapshots/disk-run-{i}/revert")
            times["disk_revert"].append(ms)
            ms, _ = self.api.timed("DELETE", f"/vms/{vm}/snapshots/disk-stopped-{i}")
            times["delete"].append(ms)
            log(
                f"  snapshot {i + 1}/{self.reps} (stopped): disk-only save {times['disk_save_stopped'][-1]:.0f} ms, "
                f"revert {times['disk_revert'][-1]:.0f} ms, delete {ms:.0f} ms"
            )
        self.record("snapshot save with memory after a save (512 MiB guest)", times["mem_save_after_save"])
        self.record("snapshot save with memory after a revert", times["mem_save_after_revert"])
        self.record("snapshot revert with memory (running VM)", times["mem_revert"])
        self.record("snapshot save disk-only (running)", times["disk_save_running"])
        self.record("snapshot save disk-only (stopped)", times["disk_save_stopped"])
        self.record("snapshot revert disk-only (stopped)", times["disk_revert"])
        self.record("snapshot delete disk-only (stopped)", times["delete"])
        self.record("console attach → first replayed byte", attach)

    def bridge(self, iso):
        """Forks of a running VM, and VMs made from a sandbox snapshot until they answer exec."""
        disk = f"{PREFIX}-fork-disk"
        self.api.call("POST", "/disks", {"name": disk, "size": 1 << 30, "format": "qcow2"})
        self.disks.append(disk)
        vm = self.define(
            f"{PREFIX}-fork",
            {"cdroms": [{"iso": iso}], "disks": [{"disk": disk}], "bootOrder": ["cdrom", "disk"], "memoryMib": 512},
        )
        self.start_to_markers(vm)
        forks = []
        for i in range(self.reps):
            ms, fork = self.api.timed("POST", f"/vms/{vm}/fork", {"name": f"{PREFIX}-twin-{i}"})
            self.vms.append(fork["id"])
            if fork["state"] != "running":
                raise BenchError(f"fork: {fork['state']}")
            forks.append(ms)
            log(f"  fork {i + 1}/{self.reps}: {ms:.0f} ms")
            self.api.call("POST", f"/vms/{fork['id']}/kill")
            self.api.call("DELETE", f"/vms/{fork['id']}?disks=delete")
            self.vms.remove(fork["id"])
        self.record("fork of a running VM (512 MiB guest, 1 GiB qcow2)", forks)

        sandbox = self.api.call("POST", "/sandboxes", {"templateID": "base", "timeout": 3600})["sandboxID"]
        self.sandboxes.append(sandbox)
        snap = self.api.call("POST", f"/sandboxes/{sandbox}/snapshots", {"name": f"{PREFIX}-snap"})
        self.snapshots_made.append(snap["snapshotID"])
        made = []
        for i in range(self.reps):
            start = time.perf_counter()
            created = self.api.call(
                "POST", "/vms", {"name": f"{PREFIX}-fromsnap-{i}", "fromSnapshot": snap["snapshotID"], "memoryMib": 512}
            )
            self.vms.append(created["id"])
            self.api.call("POST", f"/vms/{created['id']}/start")
            out = self.api.call("POST", f"/vms/{created['id']}/exec", {"command": "echo ok"})
            ms = (time.perf_counter() - start) * 1000
            if b'"exitCode":0' not in out:
                raise BenchError(f"exec in a VM from a sandbox snapshot: {out[:300]!r}")
            made.append(ms)
            log(f"  VM from a sandbox snapshot {i + 1}/{self.reps}: {ms:.0f} ms to the exec answer")
            self.api.call("POST", f"/vms/{created['id']}/kill")
            self.api.call("DELETE", f"/vms/{created['id']}?disks=delete")
            self.vms.remove(created["id"])
        self.record("VM from a sandbox snapshot: create → start → exec answers", made)


def main():
    as_json = "--json" in sys.argv[1:]
    only_bridge = "--only" in sys.argv[1:] and "bridge" in sys.argv[1:]
    reps = max(1, int(os.environ.get("REPS", "5")))
    data_mib = int(os.environ.get("DATA_MIB", "256"))
    iso_path = os.environ["VM_ISO"]
    api = Api(os.environ["VIV_API_URL"], os.environ["VIV_API_KEY"])
    # SIGTERM cleans up as ^C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    health = api.call("GET", "/health")
    accel = health.get("accel", "?")
    log(f"accel: {accel}; {reps} repetitions each")
    bench = Bench(api, reps)
    scratch = tempfile.mkdtemp(prefix="viv-bench-vm.")
    try:
        iso = bench.upload_iso(iso_path)
        if not only_bridge:
            for firmware in ("bios", "uefi"):
                bench.lifecycle(firmware, iso)
            bench.clones(data_mib, scratch)
            bench.snapshots(iso)
        bench.bridge(iso)
    finally:
        bench.cleanup()
        subprocess.run(["rm", "-rf", scratch], check=False)
    if as_json:
        print(json.dumps({"accel": accel, "repetitions": reps, "figures": bench.figures}, indent=2))
        return
    width = max(len(k) for k in bench.figures)
    attach = bench.figures.get("console attach → first replayed byte", {}).get("n", 0)
    print(f"VM manager benchmark — accel {accel}, {reps} repetitions (console attach: {attach})")
    print(f"{'measure':<{width}}  {'p50 ms':>9}  {'p95 ms':>9}")
    for key, s in bench.figures.items():
        if isinstance(s, dict):
            print(f"{key:<{width}}  {s['p50']:>9.1f}  {s['p95']:>9.1f}")
        else:
            print(f"{key:<{width}}  {s:>9.1f}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted; everything the benchmark created is gone")
        sys.exit(130)
    except BenchError as e:
        log(f"bench/vm: {e}")
        sys.exit(1)

"""A scratch `viv serve` for the SDK suites (tests/e2b, tests/code-interpreter).

`start(prefix, ...)` runs the server on a scratch data directory (the image cache is shared; with
`database`, its state is in that PostgreSQL database: servers sharing one form a cluster),
creates an API key, and returns a `Server`; `Server.stop()` stops it (its sandboxes go with it,
`--on-shutdown kill`) and removes its data. As root the server uses the isolated network mode
with the pool in VIV_TEST_NET_POOL (else `default_pool`). VIV_BIN names the binary (default:
target/debug/viv of this checkout).
"""

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIV = os.environ.get("VIV_BIN", str(ROOT / "target" / "debug" / "viv"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    key: str
    data: Path
    proc: subprocess.Popen

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """Runs `viv ARGS` as a client of this server."""
        env = dict(os.environ, VIV_API_URL=self.url, VIV_API_KEY=self.key)
        return subprocess.run([VIV, *args], env=env, **kw)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shm = "/dev/shm/vivarium-" + hashlib.sha256(str(self.data).encode()).hexdigest()[:8]
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(self.data, ignore_errors=True)


@dataclass
class Postgres:
    """A scratch PostgreSQL server on a Unix socket (Debian's binaries, as the `postgres` user
    under root), for suites run against a cluster."""

    dir: Path
    proc: subprocess.Popen

    def database(self, name: str) -> str:
        subprocess.run([str(_pg_bin() / "createdb"), "-h", str(self.dir), "-U", "viv", name], check=True)
        return f"host={self.dir} user=viv dbname={name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin() -> Path:
    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))[-1]


def start_postgres() -> Postgres:
    import pwd

    pg = pwd.getpwnam("postgres")
    run_as = lambda: (os.setgid(pg.pw_gid), os.setuid(pg.pw_uid))  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="viv-sdk-postgres-"))
    os.chown(work, pg.pw_uid, pg.pw_gid)
    subprocess.run([str(_pg_bin() / "initdb"), "-D", str(work / "data"), "-A", "trust", "-U", "viv"],
                   check=True, capture_output=True, preexec_fn=run_as)
    proc = subprocess.Popen(
        [str(_pg_bin() / "postgres"), "-D", str(work / "data"), "-k", str(work), "-c", "listen_addresses=",
         "-c", "fsync=off", "-c", "dynamic_shared_memory_type=mmap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=run_as)
    deadline = time.time() + 60
    while not (work / ".s.PGSQL.5432").exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("PostgreSQL did not start")
        time.sleep(0.1)
    return Postgres(dir=work, proc=proc)


def start(prefix: str, default_pool: str, extra_args: list[str] = (), memory_mib: int = 512,
          database: str | None = None) -> Server:
    data = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VIV_LOG=os.environ.get("VIV_LOG", "warn"))
    if database:
        env["VIV_DATABASE"] = database
    log = open(data / "serve.log", "wb")
    args = [
        VIV, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
        "--accel", os.environ.get("VIV_ACCEL", "auto"), "--memory-mib", str(memory_mib),
        # The suite's server takes its sandboxes along when it stops.
        "--on-shutdown", "kill",
        *extra_args,
    ]
    # Root gets the production network mode (a namespace per sandbox, egress rules).
    if os.geteuid() == 0:
        args += ["--network", "isolated", "--net-pool", os.environ.get("VIV_TEST_NET_POOL", default_pool)]
    # Egress here may intercept TLS with a CA the host added to its trust store; sandboxes get it.
    extra = Path("/usr/local/share/ca-certificates")
    pems = b"".join(p.read_bytes() for p in sorted(extra.glob("*.crt"))) if extra.is_dir() else b""
    if pems:
        (data / "guest-ca.pem").write_bytes(pems)
        args += ["--guest-ca-file", str(data / "guest-ca.pem")]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 600
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("viv serve did not start: " + (data / "serve.log").read_text())
            time.sleep(0.2)
    key = subprocess.run(
        [VIV, "keys", "create", "--data-dir", str(data), "--name", "sdk-suite"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()
    return Server(url=url, key=key, data=data, proc=proc)


@contextlib.contextmanager
def sandbox_of(sandbox_class, **opts):
    """A sandbox of an E2B SDK's `Sandbox` class with a generous lifetime for TCG, killed
    afterwards whatever happened."""
    sbx = sandbox_class.create(**{"timeout": 600, **opts})
    try:
        yield sbx
    finally:
        try:
            sbx.kill()
        except Exception:
            pass

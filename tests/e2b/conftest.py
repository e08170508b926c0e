"""E2B compatibility suite: the official `e2b` Python SDK, unchanged, against a Vivarium server.

The session starts its own `viv serve` on a scratch data directory (the image cache is shared),
creates an API key, and points the SDK at it with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY.
VIV_BIN names the binary (default: target/debug/viv of this checkout).
"""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VIV = os.environ.get("VIV_BIN", str(ROOT / "target" / "debug" / "viv"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def server():
    data = Path(tempfile.mkdtemp(prefix="viv-e2b-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VIV_LOG=os.environ.get("VIV_LOG", "warn"))
    log = open(data / "serve.log", "wb")
    args = [
        VIV, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
        "--accel", os.environ.get("VIV_ACCEL", "auto"), "--memory-mib", "512",
        # The suite's server takes its sandboxes along when it stops.
        "--on-shutdown", "kill",
    ]
    # Root gets the production network mode (a namespace per sandbox, egress rules).
    if os.geteuid() == 0:
        pool = os.environ.get("VIV_TEST_NET_POOL", "10.238.0.0/24")
        args += ["--network", "isolated", "--net-pool", pool]
    # Egress here may intercept TLS with a CA the host added to its trust store; sandboxes get it.
    extra = Path("/usr/local/share/ca-certificates")
    pems = b"".join(p.read_bytes() for p in sorted(extra.glob("*.crt"))) if extra.is_dir() else b""
    if pems:
        (data / "guest-ca.pem").write_bytes(pems)
        args += ["--guest-ca-file", str(data / "guest-ca.pem")]
    # HTTPS for sandbox host names (tests/e2b/test_files_tls.py), with Vivarium's own CA.
    tls_port = _free_port()
    args += ["--tls-listen", f"127.0.0.1:{tls_port}"]
    os.environ.update(VIV_TEST_TLS_PORT=str(tls_port), VIV_TEST_TLS_CA=str(data / "tls" / "ca.pem"))
    proc = subprocess.Popen(
        args,
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
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
        [VIV, "keys", "create", "--data-dir", str(data), "--name", "e2b-suite"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    shm = "/dev/shm/vivarium-" + hashlib.sha256(str(data).encode()).hexdigest()[:8]
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def sandbox():
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=600)
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass

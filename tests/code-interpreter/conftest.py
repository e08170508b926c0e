"""Code Interpreter suite: E2B's `e2b-code-interpreter` Python SDK, unchanged, against Vivarium.

The session starts its own `viv serve` (tests/e2b/vivserver.py) with a host layer cache in
$VIV_CACHE_DIR/layers (so the template's package layers are built once per host, not per run),
then asks for a sandbox of the built-in template `code-interpreter-v1` before it exists (which
starts its build) and follows the build through the CLI, as a user would (`viv template build
--builtin code-interpreter`); its output goes to build.log in the server's
data directory and, when the build fails, into the failure. `Sandbox.create()` of the SDK then
starts from that template's snapshot, warm kernels included.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2b"))
import vivserver  # noqa: E402

CACHE = Path(os.environ.get("VIV_CACHE_DIR", "/var/cache/vivarium"))
# A test's own time (its fixtures' set-up aside: the session's template build has its own limit).
TEST_TIMEOUT_S = 240
# The build of the template from an empty layer cache takes about 9 min here (TCG).
BUILD_TIMEOUT_S = 1500


def pytest_configure(config):
    # A time budget ending the run (scripts/test) stops it like ^C: fixtures are torn down, so the
    # server and its VMs go, and the summary line is still printed.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S, method="signal", func_only=True))


@pytest.fixture(scope="session", autouse=True)
def server():
    srv = vivserver.start(
        "viv-ci-", "10.237.0.0/24", ["--layer-cache-dir", str(CACHE / "layers")], memory_mib=1024,
    )
    try:
        started = time.monotonic()
        # First use, as a user meets it: a create naming the template starts its build and is
        # answered at once (test_first_use.py checks the answer); the CLI then follows that build.
        first = httpx.post(
            srv.url + "/sandboxes", headers={"X-API-Key": srv.key}, json={"templateID": "code-interpreter"}, timeout=60,
        )
        srv.first_use = (first.status_code, first.text, time.monotonic() - started)
        with open(srv.data / "build.log", "wb") as log:
            try:
                built = srv.cli(
                    "template", "build", "--builtin", "code-interpreter",
                    stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                built = None
        output = (srv.data / "build.log").read_text(errors="replace")
        if built is None:
            raise RuntimeError(f"the code interpreter template was not built within {BUILD_TIMEOUT_S} s:\n" + output[-6000:])
        if built.returncode != 0:
            raise RuntimeError("building the code interpreter template failed:\n" + output[-6000:])
        print(f"\ncode-interpreter template built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.key)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def sandbox():
    from e2b_code_interpreter import Sandbox

    with vivserver.sandbox_of(Sandbox) as sbx:
        yield sbx

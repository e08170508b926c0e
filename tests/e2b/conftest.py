"""E2B compatibility suite: the official `e2b` Python SDK, unchanged, against a Vivarium server.

The session starts its own `viv serve` on a scratch data directory (the image cache is shared),
creates an API key, and points the SDK at it with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY.
VIV_BIN names the binary (default: target/debug/viv of this checkout).
"""

import os

import pytest

import vivserver


@pytest.fixture(scope="session", autouse=True)
def server():
    # HTTPS for sandbox host names (tests/e2b/test_files_tls.py), with Vivarium's own CA.
    tls_port = vivserver.free_port()
    srv = vivserver.start("viv-e2b-", "10.238.0.0/24", ["--tls-listen", f"127.0.0.1:{tls_port}"])
    os.environ.update(VIV_TEST_TLS_PORT=str(tls_port), VIV_TEST_TLS_CA=str(srv.data / "tls" / "ca.pem"))
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.key)
    yield srv.url
    srv.stop()


@pytest.fixture
def sandbox():
    from e2b import Sandbox

    with vivserver.sandbox_of(Sandbox) as sbx:
        yield sbx

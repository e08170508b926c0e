"""E2B compatibility suite: the official `e2b` Python SDK, unchanged, against a Vivarium server.

The session starts its own `viv serve` on a scratch data directory (the image cache is shared),
creates an API key, and points the SDK at it with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY.
VIV_BIN names the binary (default: target/debug/viv of this checkout).

VIV_E2B_CLUSTER=1 runs the suite against a cluster instead: a scratch PostgreSQL, an API server
(`--role api`, which runs no VM) and a node (`--role node`) on it, the SDK pointed at the API
server, so every sandbox lives on the node and every SDK request (API, envd, host names, TLS) is
forwarded by the API server.
"""

import os

import pytest

import vivserver


@pytest.fixture(scope="session", autouse=True)
def server():
    # HTTPS for sandbox host names (tests/e2b/test_files_tls.py), with Vivarium's own CA.
    tls_port = vivserver.free_port()
    tls = ["--tls-listen", f"127.0.0.1:{tls_port}"]
    if os.environ.get("VIV_E2B_CLUSTER") == "1":
        postgres = vivserver.start_postgres()
        database = postgres.database("sdk")
        node = ["--node-down-after", "30s"]
        srv = vivserver.start("viv-e2b-api-", "10.238.0.0/25", [*tls, "--role", "api", "--node-name", "sdk-api", *node],
                              database=database)
        far = vivserver.start("viv-e2b-node-", "10.238.0.128/25", ["--role", "node", "--node-name", "sdk-node", *node],
                              database=database)
        stop = [srv, far, postgres]
        os.environ["VIV_TEST_SERVER_URLS"] = f"{srv.url},{far.url}"
    else:
        srv = vivserver.start("viv-e2b-", "10.238.0.0/24", tls)
        stop = [srv]
    os.environ.update(VIV_TEST_TLS_PORT=str(tls_port), VIV_TEST_TLS_CA=str(srv.data / "tls" / "ca.pem"))
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.key)
    yield srv.url
    for s in stop:
        s.stop()


@pytest.fixture
def sandbox():
    from e2b import Sandbox

    with vivserver.sandbox_of(Sandbox) as sbx:
        yield sbx

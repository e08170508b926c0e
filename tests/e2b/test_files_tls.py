"""Sandbox host names over TLS (`https://PORT-SANDBOXID.DOMAIN`): the server's `--tls-listen`
serves the same routes as its plain HTTP address, with a `*.DOMAIN` certificate issued by the CA
Vivarium made at its first start (DATA_DIR/tls/ca.pem). Both a sandbox port and envd (the SDK's
own traffic, with its access token) answer through it, over HTTP/1.1 and HTTP/2."""

import os
import socket
import ssl
import time

import httpx


def _tls_context():
    context = ssl.create_default_context(cafile=os.environ["VIV_TEST_TLS_CA"])
    # OpenSSL does not match a wildcard directly under a single-label domain (`*.localhost`),
    # so the chain is verified against Vivarium's CA here and the name is checked below.
    context.check_hostname = False
    return context


def _get(host, path, headers=""):
    port = int(os.environ["VIV_TEST_TLS_PORT"])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        with _tls_context().wrap_socket(raw, server_hostname=host) as conn:
            names = [v for k, v in conn.getpeercert()["subjectAltName"] if k == "DNS"]
            assert "*.localhost" in names, names
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_sandbox_port_over_tls(sandbox):
    sandbox.files.write("/home/user/tls-site/index.html", "over tls")
    sandbox.commands.run("python3 -m http.server 8000 --directory /home/user/tls-site", background=True)
    for _ in range(150):
        probe = sandbox.commands.run("curl -s -o /dev/null -w %{http_code} localhost:8000/ || true").stdout
        if probe not in ("", "000"):
            break
        time.sleep(0.2)
    status, body = _get(sandbox.get_host(8000), "/index.html")
    assert (status, body) == (200, b"over tls")


def test_envd_over_tls_with_the_access_token_and_http2(sandbox):
    sandbox.files.write("/home/user/tls.txt", "envd over tls")
    host = f"49983-{sandbox.sandbox_id}.localhost"
    token = f"X-Access-Token: {sandbox._envd_access_token}\r\n"
    status, body = _get(host, "/files?path=/home/user/tls.txt", token)
    assert (status, body) == (200, b"envd over tls")
    assert _get(host, "/files?path=/home/user/tls.txt")[0] == 401, "the token is still needed"
    # HTTP/2 (ALPN h2) names the host in :authority only.
    port = os.environ["VIV_TEST_TLS_PORT"]
    transport = httpx.HTTPTransport(http2=True, verify=_tls_context())
    with httpx.Client(transport=transport) as client:
        r = client.get(
            f"https://127.0.0.1:{port}/files",
            params={"path": "/home/user/tls.txt"},
            headers={"Host": host, "X-Access-Token": sandbox._envd_access_token},
            extensions={"sni_hostname": host},
        )
        assert r.http_version == "HTTP/2" and r.text == "envd over tls", (r.http_version, r.text)

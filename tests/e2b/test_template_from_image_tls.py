"""`Template().from_image(...)` from HTTPS registries: the server verifies a registry's certificate
against the host's CA store plus `viv serve --registry-ca` (here `VIV_REGISTRY_CA`, set before the
suite's server starts), and refuses, with a message that says why, a registry whose certificate it
does not trust. Everything stays on this machine: the test makes a CA and a certificate for
127.0.0.1 with openssl, runs Debian's `docker-registry` with TLS and pushes the image of
test_template_from_image.py with `skopeo`.
"""

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from e2b import Template
from e2b.exceptions import BuildException

from test_template_from_image import _free_port, _oci_layout

RUN = uuid.uuid4().hex[:6]

pytestmark = pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo") and shutil.which("openssl")),
    reason="needs Debian's docker-registry, skopeo and openssl (scripts/deps.sh)",
)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    """`{name}-ca.pem`/`.key` (a CA) and `{name}.pem`/`.key` (a server certificate it signs for
    127.0.0.1 and localhost)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem", "-days", "2",
        "-subj", f"/CN=vivarium test CA {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=localhost", cwd=directory)
    (directory / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem", "-CAkey", f"{name}-ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=directory,
    )


# The suite's server reads VIV_REGISTRY_CA when the session starts (after collection), so the CA
# is made here: `trusted` is handed to the server, `rogue` is not.
CERTS = Path(tempfile.mkdtemp(prefix="viv-registry-ca-"))
atexit.register(shutil.rmtree, CERTS, True)
if shutil.which("openssl"):
    _ca(CERTS, "trusted")
    _ca(CERTS, "rogue")
    os.environ["VIV_REGISTRY_CA"] = str(CERTS / "trusted-ca.pem")


def _tls_registry(root: Path, name: str, port: int) -> subprocess.Popen:
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / f"{name}-data")}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "tls": {"certificate": str(CERTS / f"{name}.pem"), "key": str(CERTS / f"{name}.key")},
        },
    }
    path = root / f"{name}.yml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(root / f"{name}.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(path)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not start: " + (root / f"{name}.log").read_text())
            time.sleep(0.1)


@pytest.fixture(scope="module")
def tls_registries(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-registries")
    layout = _oci_layout(root)
    ports = {"trusted": _free_port(), "rogue": _free_port()}
    procs = [_tls_registry(root, name, port) for name, port in ports.items()]
    try:
        # skopeo trusts the test CA for the push only (a cert dir holds CAs as *.crt).
        push_certs = root / "push-certs"
        push_certs.mkdir()
        shutil.copy(CERTS / "trusted-ca.pem", push_certs / "ca.crt")
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-cert-dir", str(push_certs), f"oci:{layout}:1",
             f"docker://127.0.0.1:{ports['trusted']}/vivtest/tls:1"],
            check=True,
        )
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def test_from_image_over_https_with_the_registry_ca(tls_registries):
    port = tls_registries["trusted"]
    # The step fails the build unless the pulled layers are the root file system it runs on.
    template = Template().from_image(f"127.0.0.1:{port}/vivtest/tls:1").run_cmd(
        "grep -q from-oci /etc/image-marker && test -e /etc/second && test ! -e /etc/removed"
    )
    logs = []
    Template.build(template, f"oci-tls-{RUN}", on_build_logs=logs.append)
    messages = [e.message for e in logs]
    assert any(f"from https://127.0.0.1:{port}" in m for m in messages), messages


def test_from_image_refuses_an_untrusted_certificate(tls_registries):
    port = tls_registries["rogue"]
    with pytest.raises(BuildException) as refused:
        Template.build(Template().from_image(f"127.0.0.1:{port}/vivtest/tls:1"), f"oci-rogue-{RUN}")
    message = str(refused.value)
    assert f"https://127.0.0.1:{port}" in message, message
    assert "does not trust" in message and "--registry-ca" in message, message

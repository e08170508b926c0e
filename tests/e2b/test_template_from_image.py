"""`Template().from_image(...)`: images pulled from a registry (anonymous and with credentials),
directly or through `viv serve --registry-mirror`, into a root file system that templates build
on. Everything stays on this machine: the test builds a small root file system (busybox), packs
it as a two-layer OCI image (the second layer adds a file and whites one out), and pushes it with
`skopeo` to two local `docker-registry` servers, one anonymous (also the mirror) and one that
wants a password.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

with warnings.catch_warnings():
    # The registry's htpasswd file wants bcrypt, which the C library's crypt(3) makes.
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The suite's server reads VIV_REGISTRY_MIRRORS when the session starts (after collection), so
# the mirror's address is chosen here; the mirror itself starts with this module's fixture.
MIRROR_PORT = int(os.environ.setdefault("VIV_TEST_MIRROR_PORT", str(_free_port())))
os.environ["VIV_REGISTRY_MIRRORS"] = f"http://127.0.0.1:{MIRROR_PORT}"

RUN = uuid.uuid4().hex[:6]
USER, PASSWORD = "puller", "s3cret-" + RUN

pytestmark = pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="needs Debian's docker-registry and skopeo (scripts/deps.sh)",
)


def _tar_layer(build) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return gzip.compress(buffer.getvalue(), mtime=0)


def _add(tar, name, data=None, mode=0o644, link=None, directory=False):
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))


def _oci_layout(root: Path) -> Path:
    """A two-layer OCI image layout, tag `1`."""
    busybox = Path("/bin/busybox").read_bytes()

    def base(tar):
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "run", "root", "srv"]:
            _add(tar, d, directory=True)
        _add(tar, "bin/busybox", busybox, mode=0o755)
        # The SDK runs commands with bash; busybox's sh stands in.
        _add(tar, "bin/bash", b'#!/bin/busybox sh\nexec /bin/busybox sh "$@"\n', mode=0o755)
        for applet in ["sh", "cat", "echo", "ls", "id", "pwd", "env", "test", "sleep", "mkdir", "true"]:
            _add(tar, f"bin/{applet}", link="busybox")
        _add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/group", b"root:x:0:\n")
        _add(tar, "etc/image-marker", b"from-oci\n")
        _add(tar, "etc/removed", b"whited out by the second layer\n")

    def second(tar):
        _add(tar, "etc", directory=True)
        _add(tar, "etc/second", b"2\n")
        _add(tar, "etc/.wh.removed", b"")

    layout = root / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layers = [_tar_layer(base), _tar_layer(second)]
    diff_ids = [f"sha256:{hashlib.sha256(gzip.decompress(l)).hexdigest()}" for l in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "IMAGE_VAR=from-config"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(config).encode())},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(l)} for l in layers],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **blob(json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return layout


def _registry(root: Path, name: str, port: int, htpasswd: Path = None) -> subprocess.Popen:
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / f"{name}-data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if htpasswd:
        config["auth"] = {"htpasswd": {"realm": "vivarium-test", "path": str(htpasswd)}}
    path = root / f"{name}.yml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    log = open(root / f"{name}.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(path)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 401 from the one with a password: it answers
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not start: " + (root / f"{name}.log").read_text())
            time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def registries(tmp_path_factory):
    root = tmp_path_factory.mktemp("registries")
    layout = _oci_layout(root)
    htpasswd = root / "htpasswd"
    htpasswd.write_text(f"{USER}:{crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    private_port = _free_port()
    procs = [
        _registry(root, "open", MIRROR_PORT),
        _registry(root, "private", private_port, htpasswd),
    ]
    try:
        push = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1"]
        subprocess.run(push + [f"docker://127.0.0.1:{MIRROR_PORT}/vivtest/app:1"], check=True)
        subprocess.run(push + [f"docker://127.0.0.1:{MIRROR_PORT}/library/mirrored-{RUN}:1"], check=True)
        subprocess.run(
            push + ["--dest-creds", f"{USER}:{PASSWORD}", f"docker://127.0.0.1:{private_port}/vivtest/app:1"],
            check=True,
        )
        yield {"open": MIRROR_PORT, "private": private_port}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def run(sbx, cmd, **kw):
    return sbx.commands.run(cmd, **kw).stdout.strip()


def test_from_image_pulls_layers_config_and_builds_on_them(registries):
    template = (
        Template()
        .from_image(f"127.0.0.1:{registries['open']}/vivtest/app:1")
        .run_cmd("cat /etc/image-marker > built && echo $IMAGE_VAR >> built")
    )
    logs = []
    Template.build(template, f"oci-open-{RUN}", on_build_logs=logs.append)
    assert any("pulled" in e.message for e in logs), [e.message for e in logs]
    sbx = Sandbox.create(f"oci-open-{RUN}", timeout=120)
    try:
        # The image's WorkingDir and Env; steps ran as the image's user (root).
        assert run(sbx, "pwd") == "/srv"
        assert run(sbx, "cat /srv/built") == "from-oci\nfrom-config"
        assert run(sbx, "echo $IMAGE_VAR") == "from-config"
        assert run(sbx, "id -u") == "0"
        # Layers applied in order: a file added, one whited out.
        assert run(sbx, "cat /etc/second") == "2"
        assert run(sbx, "test -e /etc/removed || echo gone") == "gone"
    finally:
        sbx.kill()


def test_from_image_with_credentials(registries):
    image = f"127.0.0.1:{registries['private']}/vivtest/app:1"
    with pytest.raises(BuildException) as refused:
        Template.build(Template().from_image(image, username=USER, password="wrong"), f"oci-wrong-{RUN}")
    assert "refused" in str(refused.value) or "401" in str(refused.value), str(refused.value)
    with pytest.raises(BuildException) as anonymous:
        Template.build(Template().from_image(image), f"oci-anon-{RUN}")
    assert "credentials" in str(anonymous.value), str(anonymous.value)

    template = Template().from_image(image, username=USER, password=PASSWORD).run_cmd("cat /etc/second > /srv/private")
    Template.build(template, f"oci-private-{RUN}")
    sbx = Sandbox.create(f"oci-private-{RUN}", timeout=120)
    try:
        assert run(sbx, "cat /srv/private") == "2"
    finally:
        sbx.kill()


def test_from_image_through_the_registry_mirror(registries):
    # A Docker Hub name: the server tries its mirror before registry-1.docker.io.
    template = Template().from_image(f"mirrored-{RUN}:1").run_cmd("echo mirrored > /srv/m")
    logs = []
    Template.build(template, f"oci-mirror-{RUN}", on_build_logs=logs.append)
    assert any(f"from http://127.0.0.1:{registries['open']}" in e.message for e in logs), [e.message for e in logs]
    sbx = Sandbox.create(f"oci-mirror-{RUN}", timeout=120)
    try:
        assert run(sbx, "cat /srv/m /etc/image-marker") == "mirrored\nfrom-oci"
    finally:
        sbx.kill()
    # A Docker Hub image the mirror lacks fails with what each source said.
    with pytest.raises(BuildException) as missing:
        Template.build(Template().from_image(f"absent-{RUN}:1"), f"oci-absent-{RUN}")
    assert f"127.0.0.1:{registries['open']}" in str(missing.value), str(missing.value)

"""E2B volumes through the SDK's own `Volume` class: the control plane (`/volumes`) and the
content API (`/volumecontent/...`, the volume's bearer token). No VM is involved.

The SDK sends content calls to `E2B_VOLUME_API_URL` (else `https://api.<domain>`), so the suite
points it at the server."""

import io
import os
import uuid

import httpx
import pytest

from e2b import Volume
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    VolumeException,
)


@pytest.fixture(autouse=True)
def volume_api_url(server, monkeypatch):
    monkeypatch.setenv("E2B_VOLUME_API_URL", server)


@pytest.fixture
def volume():
    vol = Volume.create(f"test-{uuid.uuid4()}")
    yield vol
    Volume.destroy(vol.volume_id)


def test_create_get_info_list_connect_destroy():
    name = f"lifecycle-{uuid.uuid4()}"
    vol = Volume.create(name)
    assert vol.name == name and vol.volume_id and vol.token

    info = Volume.get_info(vol.volume_id)
    assert (info.volume_id, info.name, info.token) == (vol.volume_id, name, vol.token)
    assert any(v.volume_id == vol.volume_id and v.name == name for v in Volume.list())

    # A name is taken once.
    with pytest.raises(VolumeException):
        Volume.create(name)

    vol.write_file("/kept.txt", "outlives the handle")
    again = Volume.connect(vol.volume_id)
    assert again.name == name
    assert again.read_file("/kept.txt") == "outlives the handle"

    assert Volume.destroy(vol.volume_id) is True
    assert all(v.volume_id != vol.volume_id for v in Volume.list())
    assert Volume.destroy(vol.volume_id) is False
    with pytest.raises(NotFoundException):
        Volume.get_info(vol.volume_id)
    # Its content went with it: a new volume of the same name starts empty.
    fresh = Volume.create(name)
    try:
        assert fresh.volume_id != vol.volume_id
        assert fresh.list("/") == []
    finally:
        Volume.destroy(fresh.volume_id)


@pytest.mark.parametrize("name", ["", "a/b", "..", "-dash", "x" * 200, "spa ce"])
def test_bad_names_are_refused(name):
    with pytest.raises(VolumeException) as err:
        Volume.create(name)
    assert "400" in str(err.value)


def test_unknown_ids_are_not_found():
    with pytest.raises(NotFoundException):
        Volume.get_info("no-such-volume")
    with pytest.raises(NotFoundException):
        Volume.connect("../../etc")
    assert Volume.destroy("no-such-volume") is False


def test_write_and_read_text_bytes_stream(volume):
    volume.write_file("/hello.txt", "Hello, volume!")
    assert volume.read_file("/hello.txt") == "Hello, volume!"
    data = bytes(range(256)) * 1000
    entry = volume.write_file("/bin/data.bin", data)
    assert (entry.type.value, entry.size, entry.path, entry.name) == ("file", len(data), "/bin/data.bin", "data.bin")
    assert volume.read_file("/bin/data.bin", format="bytes") == data
    assert b"".join(volume.read_file("/bin/data.bin", format="stream")) == data
    volume.write_file("/streamed.txt", io.BytesIO(b"from a file object"))
    assert volume.read_file("streamed.txt") == "from a file object"
    volume.write_file("/empty", b"")
    assert volume.read_file("/empty", format="bytes") == b""


def test_overwrite_needs_force(volume):
    volume.write_file("/f.txt", "first")
    with pytest.raises(VolumeException) as err:
        volume.write_file("/f.txt", "second")
    assert "409" in str(err.value)
    assert volume.read_file("/f.txt") == "first"
    volume.write_file("/f.txt", "second", force=True)
    assert volume.read_file("/f.txt") == "second"


def test_metadata_on_write_make_dir_and_update(volume):
    entry = volume.write_file("/owned.txt", "x", uid=1000, gid=1000, mode=0o640)
    assert (entry.uid, entry.gid, entry.mode) == (1000, 1000, 0o640)
    info = volume.get_info("/owned.txt")
    assert (info.type.value, info.uid, info.gid, info.mode, info.size) == ("file", 1000, 1000, 0o640, 1)
    assert info.mtime.tzinfo is not None

    made = volume.make_dir("/d", uid=1001, gid=1002, mode=0o750)
    assert (made.type.value, made.uid, made.gid, made.mode) == ("directory", 1001, 1002, 0o750)

    updated = volume.update_metadata("/owned.txt", uid=1001, gid=1001, mode=0o755)
    assert (updated.path, updated.uid, updated.gid, updated.mode) == ("/owned.txt", 1001, 1001, 0o755)
    with pytest.raises(NotFoundException):
        volume.update_metadata("/missing.txt", mode=0o644)


def test_make_dir_list_and_remove(volume):
    with pytest.raises(NotFoundException):
        volume.make_dir("/a/b/c")
    volume.make_dir("/a/b/c", force=True)
    with pytest.raises(VolumeException):
        volume.make_dir("/a/b/c")
    volume.make_dir("/a/b/c", force=True)
    volume.write_file("/a/b/c/file.txt", "deep")
    volume.write_file("/a/top.txt", "top")

    assert sorted(e.name for e in volume.list("/a")) == ["b", "top.txt"]
    deep = {e.path: e.type.value for e in volume.list("/a", depth=3)}
    assert deep == {
        "/a/b": "directory",
        "/a/top.txt": "file",
        "/a/b/c": "directory",
        "/a/b/c/file.txt": "file",
    }
    with pytest.raises(NotFoundException):
        volume.list("/nope")

    assert volume.exists("/a/b/c/file.txt")
    volume.remove("/a")
    assert not volume.exists("/a")
    assert not volume.exists("/a/b/c/file.txt")
    with pytest.raises(NotFoundException):
        volume.remove("/a")
    with pytest.raises(NotFoundException):
        volume.read_file("/a/top.txt")


def test_paths_stay_inside_the_volume(volume):
    for path in ["../escape.txt", "/../../etc/passwd", "/a/../../b"]:
        with pytest.raises(VolumeException) as err:
            volume.write_file(path, "x")
        assert "400" in str(err.value)
        with pytest.raises(VolumeException):
            volume.read_file(path)
    with pytest.raises(VolumeException):
        volume.remove("/")
    with pytest.raises(VolumeException):
        volume.read_file("/")


def test_content_needs_the_volume_token(volume, server):
    volume.write_file("/secret.txt", "s")
    # Another volume's token opens nothing here.
    other = Volume.create(f"other-{uuid.uuid4()}")
    try:
        with pytest.raises(AuthenticationException):
            Volume(volume.volume_id, volume.name, token=other.token).read_file("/secret.txt")
    finally:
        Volume.destroy(other.volume_id)
    url = f"{server}/volumecontent/{volume.volume_id}/file"
    assert httpx.get(url, params={"path": "/secret.txt"}).status_code == 401
    ok = httpx.get(url, params={"path": "/secret.txt"}, headers={"Authorization": f"Bearer {volume.token}"})
    assert (ok.status_code, ok.content) == (200, b"s")
    # The API key is not the volume's token, and the control routes need the API key.
    key = os.environ["E2B_API_KEY"]
    assert httpx.get(url, params={"path": "/secret.txt"}, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert httpx.get(f"{server}/volumes").status_code == 401

"""Volumes mounted into sandboxes at create (`volume_mounts`), through the E2B SDK against real
VMs: the guest sees the volume's content, writes from one sandbox reach the volume (and other
sandboxes mounting it at the same time) at once, and the data outlives the sandboxes."""

import uuid

import pytest

from e2b import Sandbox, Volume
from e2b.exceptions import SandboxException, VolumeException


@pytest.fixture(autouse=True)
def volume_api_url(server, monkeypatch):
    monkeypatch.setenv("E2B_VOLUME_API_URL", server)


@pytest.fixture
def volume():
    vol = Volume.create(f"mount-{uuid.uuid4()}")
    yield vol
    Volume.destroy(vol.volume_id)


def test_two_sandboxes_share_a_mounted_volume_and_data_outlives_them(volume):
    volume.write_file("/from-api.txt", "written through the content API")
    a = Sandbox.create(timeout=600, volume_mounts={"/mnt/data": volume})
    b = None
    try:
        assert a.files.read("/mnt/data/from-api.txt") == "written through the content API"
        b = Sandbox.create(timeout=600, volume_mounts={"/mnt/shared": volume.name})

        # A writes through envd's files API; B, running at the same time, sees it at once.
        a.files.write("/mnt/data/from-a.txt", "hello from A")
        assert b.files.read("/mnt/shared/from-a.txt") == "hello from A"

        # B writes with a shell command (as the default user); A and the content API see it.
        r = b.commands.run("mkdir -p /mnt/shared/dir && echo 'hello from B' > /mnt/shared/dir/b.txt && id -u")
        assert r.exit_code == 0
        assert a.commands.run("cat /mnt/data/dir/b.txt").stdout == "hello from B\n"
        assert volume.read_file("/dir/b.txt") == "hello from B\n"
        info = volume.get_info("/dir/b.txt")
        assert info.uid == int(r.stdout.strip())

        # Renames, appends and removals go through too.
        a.commands.run("echo more >> /mnt/data/dir/b.txt && mv /mnt/data/from-a.txt /mnt/data/renamed.txt")
        assert b.commands.run("cat /mnt/shared/dir/b.txt").stdout == "hello from B\nmore\n"
        assert not volume.exists("/from-a.txt")
        assert volume.read_file("/renamed.txt") == "hello from A"
        b.commands.run("rm -r /mnt/shared/dir")
        assert not volume.exists("/dir")
        names = sorted(e.name for e in a.files.list("/mnt/data"))
        assert names == ["from-api.txt", "renamed.txt"]

        # A volume in use is not destroyed.
        with pytest.raises(VolumeException) as err:
            Volume.destroy(volume.volume_id)
        assert "409" in str(err.value)
    finally:
        a.kill()
        if b is not None:
            b.kill()

    # The data outlives both sandboxes: a new one mounting the volume finds it.
    c = Sandbox.create(timeout=600, volume_mounts={"/data": volume})
    try:
        assert c.files.read("/data/renamed.txt") == "hello from A"
    finally:
        c.kill()


@pytest.mark.parametrize(
    "mounts",
    [
        {"/mnt/x": "no-such-volume"},
        {"relative/path": None},
        {"/": None},
        {"/mnt/../etc": None},
    ],
)
def test_bad_volume_mounts_are_refused(volume, mounts):
    mounts = {path: (name or volume) for path, name in mounts.items()}
    with pytest.raises(SandboxException) as err:
        Sandbox.create(timeout=60, volume_mounts=mounts)
    assert "400" in str(err.value)


def test_a_resumed_sandbox_mounts_its_volume_again(volume):
    sbx = Sandbox.create(timeout=600, volume_mounts={"/mnt/v": volume})
    try:
        sbx.files.write("/mnt/v/before.txt", "before the pause")
        sbx.pause()
        # Paused, it still holds the volume.
        with pytest.raises(VolumeException):
            Volume.destroy(volume.volume_id)
        volume.write_file("/while-paused.txt", "written while paused")
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=600)
        assert resumed.files.read("/mnt/v/while-paused.txt") == "written while paused"
        assert resumed.files.read("/mnt/v/before.txt") == "before the pause"
        resumed.files.write("/mnt/v/after.txt", "after the resume")
        assert volume.read_file("/after.txt") == "after the resume"
    finally:
        sbx.kill()

"""Filesystem-only pauses and snapshots (no memory): resuming, or starting from the snapshot,
boots the saved disk afresh: a new kernel, the files kept, the processes gone."""

import json
import os
import urllib.request

from e2b import Sandbox

from lifecycle_helpers import boot_id, raw_info, wait_for_state


def test_a_filesystem_only_pause_keeps_the_files_and_resuming_boots_them_afresh():
    sbx = Sandbox.create(timeout=600, envs={"GREETING": "hello"})
    try:
        sbx.files.write("/home/user/fs-only-marker.txt", "persisted")
        before = boot_id(sbx)
        sleeper = sbx.commands.run("sleep 100000", background=True)

        assert sbx.pause(mode="filesystem")
        assert not sbx.is_running()
        info = raw_info(sbx.sandbox_id)
        assert info["state"] == "paused"
        assert info["pauseMode"] == "filesystem"

        resumed = sbx.connect(timeout=600)
        assert resumed.is_running()
        assert resumed.sandbox_id == sbx.sandbox_id
        assert resumed.files.read("/home/user/fs-only-marker.txt") == "persisted"
        assert boot_id(resumed) != before, "the guest booted afresh"
        assert sleeper.pid not in [p.pid for p in resumed.commands.list()]
        # The sandbox's token and creation environment hold after the boot.
        assert resumed.commands.run("echo $GREETING").stdout == "hello\n"
        # It can pause and resume again, with its memory this time.
        resumed.files.write("/home/user/second.txt", "again")
        after = boot_id(resumed)
        resumed.pause()
        assert raw_info(sbx.sandbox_id)["pauseMode"] == "full"
        again = Sandbox.connect(sbx.sandbox_id, timeout=600)
        assert boot_id(again) == after
        assert again.files.read("/home/user/second.txt") == "again"
    finally:
        sbx.kill()


def test_connect_with_reboot_boots_the_disk_of_a_full_pause():
    sbx = Sandbox.create(timeout=600)
    try:
        sbx.files.write("/home/user/kept.txt", "kept")
        before = boot_id(sbx)
        sbx.pause()
        rebooted = Sandbox.connect(sbx.sandbox_id, timeout=600, on_resume="reboot")
        assert boot_id(rebooted) != before
        assert rebooted.files.read("/home/user/kept.txt") == "kept"
    finally:
        sbx.kill()


def test_a_filesystem_only_snapshot_leaves_its_sandbox_running_and_starts_sandboxes_afresh():
    sbx = Sandbox.create(timeout=600)
    started = None
    try:
        sbx.files.write("/home/user/snap.txt", "in the snapshot")
        before = boot_id(sbx)
        sleeper = sbx.commands.run("sleep 100000", background=True)
        snapshot = sbx.create_snapshot(mode="filesystem")
        # The source runs on, memory and all.
        assert boot_id(sbx) == before
        assert sleeper.pid in [p.pid for p in sbx.commands.list()]
        sbx.files.write("/home/user/later.txt", "after the snapshot")

        started = Sandbox.create(snapshot.snapshot_id, timeout=600)
        assert started.files.read("/home/user/snap.txt") == "in the snapshot"
        assert not started.files.exists("/home/user/later.txt")
        assert boot_id(started) != before
        assert "sleep 100000" not in [p.cmd + " " + " ".join(p.args) for p in started.commands.list()]
    finally:
        if started is not None:
            started.kill()
        sbx.kill()


def test_a_timeout_pause_in_filesystem_mode_is_not_resumed_by_traffic_but_by_connect():
    sbx = Sandbox.create(timeout=600, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        sbx.files.write("/home/user/kept.txt", "kept")
        before = boot_id(sbx)
        sbx.set_timeout(2)
        wait_for_state(sbx.sandbox_id, "paused")
        assert raw_info(sbx.sandbox_id)["pauseMode"] == "filesystem"
        assert not sbx.is_running()
        sbx.connect(timeout=600)
        assert boot_id(sbx) != before
        assert sbx.files.read("/home/user/kept.txt") == "kept"
    finally:
        sbx.kill()



def test_a_boot_of_a_saved_disk_starts_like_its_template_with_its_environment_and_start_command():
    spec = (
        "FROM base\n"
        "ENV SITE=/home/user/site\n"
        "RUN mkdir -p /home/user/site && echo from-the-template > /home/user/site/index.html\n"
        "CMD python3 -m http.server 8002 --directory /home/user/site\n"
        "HEALTHCHECK CMD curl -sf localhost:8002/index.html\n"
    )
    request = urllib.request.Request(
        f"{os.environ['E2B_API_URL']}/templates",
        data=json.dumps({"name": "lifecycle-web", "spec": spec}).encode(),
        headers={"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=1800) as response:
        events = [json.loads(line) for line in response.read().decode().splitlines()]
    assert events[-1]["type"] == "done", events[-1]

    sbx = Sandbox.create("lifecycle-web", timeout=600)
    started = None
    try:
        snapshot = sbx.create_snapshot(mode="filesystem")
        started = Sandbox.create(snapshot.snapshot_id, timeout=600)
        assert boot_id(started) != boot_id(sbx)
        assert started.commands.run("echo $SITE").stdout == "/home/user/site\n"
        page = urllib.request.Request(f"{os.environ['E2B_API_URL']}/index.html", headers={"Host": started.get_host(8002)})
        with urllib.request.urlopen(page, timeout=300) as response:
            assert response.read() == b"from-the-template\n"
    finally:
        if started is not None:
            started.kill()
        sbx.kill()

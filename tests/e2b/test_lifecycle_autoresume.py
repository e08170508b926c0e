"""E2B's lifecycle options: a sandbox that reaches its timeout pauses instead of dying, and with
auto-resume, traffic for it (an envd call, an HTTP request to one of its ports) resumes it
transparently: the request waits for the resume and then succeeds."""

import concurrent.futures
import os
import time
import urllib.error
import urllib.request

import pytest
from e2b import Sandbox
from e2b.exceptions import InvalidArgumentException

from lifecycle_helpers import metric, raw_info, wait_for_state

AUTO = {"on_timeout": "pause", "auto_resume": True}


def _get(sandbox, port, path):
    request = urllib.request.Request(f"{os.environ['E2B_API_URL']}{path}", headers={"Host": sandbox.get_host(port)})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, response.read()


def test_a_sandbox_pauses_at_its_timeout_and_an_envd_call_resumes_it_with_its_processes():
    sbx = Sandbox.create(timeout=600, lifecycle=AUTO)
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
        sbx.files.write("/home/user/kept.txt", "kept")
        sleeper = sbx.commands.run("sleep 100000", background=True)
        sbx.set_timeout(2)
        wait_for_state(sbx.sandbox_id, "paused")
        info = raw_info(sbx.sandbox_id)
        assert info["lifecycle"] == {"autoResume": True, "onTimeout": "pause"}
        assert info["pauseMode"] == "full"

        # The same handle, no connect: the call wakes the sandbox and then runs.
        assert sbx.commands.run("cat /home/user/kept.txt").stdout == "kept"
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
        assert "pauseMode" not in raw_info(sbx.sandbox_id)
        assert sleeper.pid in [p.pid for p in sbx.commands.list()], "its memory was restored"
        # It lives on with the lifetime it was created with.
        assert Sandbox.get_info(sbx.sandbox_id).end_at.timestamp() > time.time() + 300
    finally:
        sbx.kill()


def test_concurrent_traffic_to_a_paused_sandbox_resumes_it_once_and_every_request_succeeds():
    sbx = Sandbox.create(timeout=600, lifecycle=AUTO)
    try:
        sbx.files.write("/home/user/site/index.html", "served from the sandbox")
        sbx.commands.run("python3 -m http.server 8000 --directory /home/user/site", background=True)
        for _ in range(200):
            probe = sbx.commands.run("curl -s -o /dev/null -w %{http_code} localhost:8000/ || true").stdout
            if probe not in ("", "000"):
                break
            time.sleep(0.2)
        sbx.set_timeout(2)
        wait_for_state(sbx.sandbox_id, "paused")
        resumes = metric("vivarium_sandboxes_auto_resumed_total")

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            commands = [pool.submit(lambda i=i: sbx.commands.run(f"echo {i}").stdout) for i in range(4)]
            pages = [pool.submit(_get, sbx, 8000, "/index.html") for _ in range(2)]
            assert [c.result() for c in commands] == [f"{i}\n" for i in range(4)]
            assert [p.result() for p in pages] == [(200, b"served from the sandbox")] * 2
        assert metric("vivarium_sandboxes_auto_resumed_total") == resumes + 1
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
    finally:
        sbx.kill()


def test_a_request_to_a_port_alone_resumes_a_paused_sandbox():
    sbx = Sandbox.create(timeout=600, lifecycle=AUTO)
    try:
        sbx.files.write("/home/user/site/index.html", "woken by a page")
        sbx.commands.run("python3 -m http.server 8001 --directory /home/user/site", background=True)
        for _ in range(200):
            probe = sbx.commands.run("curl -s -o /dev/null -w %{http_code} localhost:8001/ || true").stdout
            if probe not in ("", "000"):
                break
            time.sleep(0.2)
        sbx.pause()
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        assert _get(sbx, 8001, "/index.html") == (200, b"woken by a page")
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
    finally:
        sbx.kill()


def test_without_auto_resume_a_paused_sandbox_stays_paused_until_connect():
    sbx = Sandbox.create(timeout=600, lifecycle={"on_timeout": "pause"})
    try:
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        sbx.set_timeout(2)
        wait_for_state(sbx.sandbox_id, "paused")
        assert not sbx.is_running()
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        sbx.connect()
        assert sbx.is_running()
    finally:
        sbx.kill()


def test_a_fork_keeps_the_lifecycle_of_its_source():
    sbx = Sandbox.create(timeout=600, lifecycle=AUTO)
    forks = []
    try:
        forks = sbx.fork(timeout=600)
        assert not isinstance(forks[0], Exception), forks[0]
        assert forks[0].get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    finally:
        for fork in forks:
            if not isinstance(fork, Exception):
                fork.kill()
        sbx.kill()


def test_a_sandbox_without_lifecycle_options_is_killed_at_its_timeout_and_says_so():
    sbx = Sandbox.create(timeout=600)
    assert sbx.get_info().lifecycle == {"on_timeout": "kill", "auto_resume": False}
    sbx.kill()


def test_auto_resume_without_a_pause_is_refused():
    with pytest.raises(InvalidArgumentException):
        Sandbox.create(lifecycle={"on_timeout": "kill", "auto_resume": True})
    # The SDK checks this too; the server refuses it from any client.
    request = urllib.request.Request(
        f"{os.environ['E2B_API_URL']}/sandboxes",
        data=b'{"autoPause": false, "autoResume": {"enabled": true}}',
        headers={"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 400
        assert b"autoPause" in err.read()

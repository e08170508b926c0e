"""Sandbox lifecycle through the SDK: create, list, get, kill, timeouts, pause and connect, auth."""

import time

import pytest
from e2b import Sandbox, SandboxQuery
from e2b.exceptions import AuthenticationException, NotFoundException


def test_create_with_metadata_and_envs_then_list_get_and_kill():
    sbx = Sandbox.create(metadata={"suite": "e2b", "case": "lifecycle"}, envs={"GREETING": "hi"}, timeout=600)
    try:
        assert sbx.is_running()
        assert sbx.commands.run("echo $GREETING").stdout == "hi\n"
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"suite": "e2b", "case": "lifecycle"}
        assert info.state.value == "running"
        listed = Sandbox.list(query=SandboxQuery(metadata={"case": "lifecycle"})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"case": "no-such"})).next_items() == []
    finally:
        sbx.kill()
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_list_pages_with_a_limit():
    sandboxes = [Sandbox.create(metadata={"case": "pages"}) for _ in range(3)]
    try:
        paginator = Sandbox.list(query=SandboxQuery(metadata={"case": "pages"}), limit=2)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next
        second = paginator.next_items()
        assert len(second) == 1 and not paginator.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in sandboxes}
    finally:
        for sbx in sandboxes:
            sbx.kill()


def test_a_sandbox_dies_at_its_timeout_and_set_timeout_extends_it():
    short = Sandbox.create(timeout=4)
    kept = Sandbox.create(timeout=4)
    try:
        kept.set_timeout(120)
        time.sleep(8)
        assert not short.is_running()
        with pytest.raises(NotFoundException):
            Sandbox.get_info(short.sandbox_id)
        assert kept.is_running()
        assert kept.commands.run("echo alive").stdout == "alive\n"
    finally:
        kept.kill()


def test_pause_and_connect_keep_files_and_a_running_process():
    sbx = Sandbox.create(timeout=600)
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        counter = sbx.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done", background=True
        )
        time.sleep(0.5)
        sbx.pause()
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=600)
        assert resumed.files.read("/home/user/kept.txt") == "still here"
        before = int(resumed.commands.run("cat /tmp/count").stdout)
        time.sleep(0.5)
        after = int(resumed.commands.run("cat /tmp/count").stdout)
        assert after > before, "the background loop runs again after the resume"
        assert counter.pid in [p.pid for p in resumed.commands.list()]
    finally:
        sbx.kill()


def test_a_wrong_api_key_is_refused():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_" + "1" * 40).next_items()


def test_a_wrong_access_token_is_refused(sandbox):
    other = Sandbox.connect(sandbox.sandbox_id)
    assert other.commands.run("true").exit_code == 0
    forged = Sandbox(
        sandbox_id=sandbox.sandbox_id,
        envd_version=sandbox._envd_version,
        envd_access_token="not-the-token",
        sandbox_domain=None,
        connection_config=type(sandbox.connection_config)(
            extra_sandbox_headers={
                "E2b-Sandbox-Id": sandbox.sandbox_id,
                "E2b-Sandbox-Port": "49983",
                "X-Access-Token": "not-the-token",
            }
        ),
    )
    with pytest.raises(Exception) as refused:
        forged.commands.run("true")
    assert "token" in str(refused.value).lower() or "401" in str(refused.value) or "unauth" in str(refused.value).lower()


def test_metrics_report_cpu_memory_and_disk(sandbox):
    sandbox.commands.run("head -c 20000000 /dev/urandom > /tmp/blob")
    samples = sandbox.get_metrics()
    assert len(samples) >= 1
    sample = samples[-1]
    assert sample.cpu_count >= 1
    assert 0 <= sample.cpu_used_pct <= 100
    assert 0 < sample.mem_used < sample.mem_total
    assert 20_000_000 < sample.disk_used < sample.disk_total


def _qemu_of(sandbox_id):
    """The pid of the QEMU running sandbox `sandbox_id` (its command line names its run directory)."""
    import os

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and f"/sandboxes/{sandbox_id}/".encode() in b" ".join(argv):
            return int(pid)
    raise AssertionError(f"no QEMU for sandbox {sandbox_id}")


def test_a_sandbox_whose_vm_died_is_gone_as_e2b_reports_it():
    import os
    import signal

    sbx = Sandbox.create(metadata={"case": "dies"}, timeout=600)
    try:
        assert sbx.is_running()
        os.kill(_qemu_of(sbx.sandbox_id), signal.SIGKILL)
        deadline = time.time() + 20
        while sbx.is_running() and time.time() < deadline:
            time.sleep(0.2)
        assert not sbx.is_running()
        # Gone, as E2B reports a sandbox that is no more: not a state the SDK cannot parse.
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sbx.sandbox_id)
        assert Sandbox.list(query=SandboxQuery(metadata={"case": "dies"})).next_items() == []
    finally:
        try:
            sbx.kill()
        except NotFoundException:
            pass

"""Timeouts as E2B has them: `connect` to a running sandbox may extend its lifetime but never
shortens it, and a command that outlives `commands.run(..., timeout=N)` ends with the SDK's
TimeoutException and is killed, as envd kills a process whose `Start` deadline
(`Connect-Timeout-Ms`) passed."""

import time

import pytest
from e2b import Sandbox, TimeoutException


def _remaining(sandbox_id):
    info = Sandbox.get_info(sandbox_id)
    return (info.end_at - info.started_at).total_seconds(), info.end_at


def test_connect_to_a_running_sandbox_extends_but_never_shortens_its_lifetime():
    sbx = Sandbox.create(timeout=600)
    try:
        _, end_before = _remaining(sbx.sandbox_id)
        Sandbox.connect(sbx.sandbox_id, timeout=30)
        _, end_after_short = _remaining(sbx.sandbox_id)
        assert end_after_short >= end_before, "a shorter connect timeout shortened the sandbox's life"
        Sandbox.connect(sbx.sandbox_id, timeout=1200)
        _, end_after_long = _remaining(sbx.sandbox_id)
        assert (end_after_long - end_before).total_seconds() > 300, "a longer connect timeout extends it"
        assert sbx.is_running()
    finally:
        sbx.kill()


def test_a_command_past_its_timeout_raises_timeout_exception_and_is_killed(sandbox):
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 301; echo done", timeout=2)
    elapsed = time.monotonic() - started
    assert elapsed < 25, f"the command was not cut at its deadline ({elapsed:.1f}s)"
    # As envd does, the agent kills a process whose Start deadline passed (its whole group).
    deadline = time.monotonic() + 20
    while True:
        left = sandbox.commands.run("ps -eo args").stdout
        if "sleep 301" not in left:
            break
        assert time.monotonic() < deadline, f"the timed-out command still runs:\n{left}"
        time.sleep(0.5)
    # A command that reconnects with a deadline only loses its stream: the process goes on.
    background = sandbox.commands.run("sleep 302", background=True)
    with pytest.raises(TimeoutException):
        sandbox.commands.connect(background.pid, timeout=2).wait()
    assert "sleep 302" in sandbox.commands.run("ps -eo args").stdout
    background.kill()

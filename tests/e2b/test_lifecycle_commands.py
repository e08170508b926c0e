"""Background commands across a pause: a command started in the background before a pause goes
on after the resume, and a handle reconnected by pid delivers its output and exit code."""

import pytest
from e2b import Sandbox
from e2b.sandbox.commands.command_handle import CommandExitException

from lifecycle_helpers import wait_for_state


def test_a_background_command_goes_on_after_a_resume_and_its_reconnected_handle_ends_it():
    sbx = Sandbox.create(timeout=600)
    try:
        # It prints, then waits for a file that appears only after the resume, prints again and
        # ends with its own exit code.
        handle = sbx.commands.run(
            "echo before; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo after $(cat /tmp/go); exit 7",
            background=True,
        )
        pid = handle.pid
        assert pid in [p.pid for p in sbx.commands.list()]
        sbx.pause()
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"

        resumed = Sandbox.connect(sbx.sandbox_id, timeout=600)
        assert pid in [p.pid for p in resumed.commands.list()], "the command runs on after the resume"
        reconnected = resumed.commands.connect(pid)
        resumed.files.write("/tmp/go", "resumed")
        with pytest.raises(CommandExitException) as ended:
            reconnected.wait()
        assert ended.value.exit_code == 7
        assert "after resumed" in ended.value.stdout
        assert pid not in [p.pid for p in resumed.commands.list()]
    finally:
        sbx.kill()


def test_a_background_command_outlives_a_pause_at_the_timeout_and_its_handle_reconnects_by_pid():
    # Auto-pause at the timeout and auto-resume: reconnecting the handle is itself the traffic
    # that wakes the sandbox.
    sbx = Sandbox.create(timeout=600, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        handle = sbx.commands.run(
            "echo started; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo finished $(cat /tmp/go); exit 3",
            background=True,
        )
        sbx.set_timeout(2)
        wait_for_state(sbx.sandbox_id, "paused")

        reconnected = sbx.commands.connect(handle.pid)
        sbx.files.write("/tmp/go", "after-auto-resume")
        with pytest.raises(CommandExitException) as ended:
            reconnected.wait()
        assert ended.value.exit_code == 3
        assert "finished after-auto-resume" in ended.value.stdout
    finally:
        sbx.kill()

"""Failures a user meets: an execution that outlives its timeout (the client gives up, the server
interrupts the kernel, which is usable again at once), a kernel process killed under the
server, a sandbox killed mid-execution, and long silent runs kept alive."""

import threading
import time

import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox


def test_timeout_interrupts_the_kernel_which_answers_again_at_once(sandbox):
    sandbox.run_code("state = 'kept'")
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\nwhile True:\n    time.sleep(0.1)", timeout=3)
    assert time.monotonic() - started < 30
    # The loop was interrupted when the client went away: the kernel answers, state intact.
    after = sandbox.run_code("state", timeout=30)
    assert after.text == "kept", after
    # The same for a busy loop in JavaScript.
    with pytest.raises(TimeoutException):
        sandbox.run_code("for (;;) {}", language="javascript", timeout=3)
    assert sandbox.run_code("1 + 1", language="javascript", timeout=30).text == "2"


def test_silent_long_runs_are_kept_alive(sandbox):
    # No output for longer than idle proxies allow: keepalive lines carry the stream.
    execution = sandbox.run_code("import time; time.sleep(12); 'done'", timeout=120)
    assert execution.text == "done"


def test_a_killed_kernel_is_restarted(sandbox):
    sandbox.run_code("lost = True")
    in_flight = {}

    def long_run():
        try:
            in_flight["execution"] = sandbox.run_code("import time; time.sleep(60)", timeout=120)
        except Exception as err:  # noqa: BLE001 (reported below)
            in_flight["error"] = err

    runner = threading.Thread(target=long_run)
    runner.start()
    time.sleep(3)
    killed = sandbox.commands.run("pkill -9 -f ipykernel_launcher", user="root")
    assert killed.exit_code == 0, killed
    runner.join(120)
    assert not runner.is_alive()
    execution = in_flight.get("execution")
    assert execution is not None and execution.error is not None, in_flight
    assert "restart" in (execution.error.value + execution.error.name).lower(), execution.error
    # A fresh kernel: works, state gone.
    assert sandbox.run_code("1 + 1").text == "2"
    gone = sandbox.run_code("lost")
    assert gone.error is not None and gone.error.name == "NameError"


def test_sandbox_killed_mid_execution_ends_the_call_with_a_clear_error():
    sbx = Sandbox.create(timeout=600)
    killer = threading.Timer(3, sbx.kill)
    killer.start()
    try:
        with pytest.raises(TimeoutException) as raised:
            sbx.run_code("import time; time.sleep(60)", timeout=120)
        assert "killed" in str(raised.value) or "not found" in str(raised.value), raised.value
    finally:
        killer.cancel()
        try:
            sbx.kill()
        except Exception:
            pass

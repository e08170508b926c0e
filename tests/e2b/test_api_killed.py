"""A sandbox killed while a command streams: the stream ends as envd's does when its VM goes
away, the sandbox's `/health` (through the proxy, as the SDK probes envd) answers 502, and the
SDK raises its "sandbox was killed or reached its end of life" error."""

import threading

import pytest
from e2b import Sandbox, SandboxException


def test_killing_a_sandbox_ends_a_streaming_command_with_end_of_life():
    sbx = Sandbox.create(timeout=600)
    try:
        cmd = sbx.commands.run("sleep 300", background=True)
        Sandbox.kill(sbx.sandbox_id)
        outcome = {}

        def wait():
            try:
                cmd.wait()
            except BaseException as err:  # noqa: BLE001 - recorded for the assertions
                outcome["error"] = err

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(120)
        assert not waiter.is_alive(), "the command stream did not end when its sandbox was killed"
        assert isinstance(outcome.get("error"), SandboxException), outcome
        assert "sandbox was killed or reached its end of life" in str(outcome["error"])
        assert not sbx.is_running()
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


def test_health_of_a_killed_sandbox_is_a_502():
    sbx = Sandbox.create(timeout=600)
    assert sbx.is_running()
    sbx.kill()
    response = sbx._envd_api.get("/health")
    assert response.status_code == 502

"""Python through `Sandbox.run_code`: results, state, streams with callbacks, errors with
tracebacks, execution counts, env vars (per run and the sandbox's), and the server's answers to
malformed requests (sent raw to port 49999 through the proxy, as the SDK sends its own)."""

import os
import time

import httpx
import pytest
from e2b_code_interpreter import Sandbox


def test_first_result_and_state_kept(sandbox):
    first = sandbox.run_code("x = 40\nx + 2")
    assert first.error is None, first.error
    assert [r.text for r in first.results] == ["42"]
    assert first.results[0].is_main_result
    assert first.text == "42"
    second = sandbox.run_code("x * 10")
    assert second.text == "400"
    # Warm kernel: the data stack is imported already, and the kernel is Python 3.
    stack = sandbox.run_code("import sys, pandas, numpy, matplotlib; sys.version_info[0], 'pandas' in sys.modules")
    assert stack.text == "(3, True)", stack


def test_streams_arrive_live_through_callbacks_in_order(sandbox):
    seen = []
    code = (
        "import sys, time\n"
        "print('one', flush=True)\n"
        "time.sleep(1.5)\n"
        "print('two', file=sys.stderr, flush=True)\n"
        "print('three', flush=True)\n"
    )
    started = time.time_ns()
    execution = sandbox.run_code(
        code,
        on_stdout=lambda m: seen.append(("out", m.line, m.timestamp, time.monotonic())),
        on_stderr=lambda m: seen.append(("err", m.line, m.timestamp, time.monotonic())),
    )
    finished = time.monotonic()
    assert [(kind, line) for kind, line, _, _ in seen] == [("out", "one\n"), ("err", "two\n"), ("out", "three\n")]
    assert execution.logs.stdout == ["one\n", "three\n"]
    assert execution.logs.stderr == ["two\n"]
    # Streamed, not batched at the end: the first line arrived well before the run ended.
    assert finished - seen[0][3] > 1.0, seen
    # Timestamps: nanoseconds since the epoch, in order, taken during the run.
    stamps = [stamp for _, _, stamp, _ in seen]
    assert stamps == sorted(stamps)
    assert started - 60e9 < stamps[0] < time.time_ns() + 60e9


def test_errors_carry_name_value_and_traceback(sandbox):
    errors = []
    execution = sandbox.run_code(
        "def inner():\n    return 1 / 0\nprint('before')\ninner()\nprint('after')",
        on_error=errors.append,
    )
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "inner" in execution.error.traceback and "ZeroDivisionError" in execution.error.traceback
    assert execution.logs.stdout == ["before\n"]
    assert errors and errors[0].name == "ZeroDivisionError"
    syntax = sandbox.run_code("def broken(:")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    # The kernel is fine afterwards.
    assert sandbox.run_code("'still alive'").text == "still alive"


def test_execution_counts_count_runs_not_helper_runs(sandbox):
    counts = [sandbox.run_code("1", envs={"A": "b"}).execution_count for _ in range(3)]
    assert counts[1] == counts[0] + 1 and counts[2] == counts[1] + 1, counts


def test_env_vars_per_run_and_from_the_sandbox():
    sbx = Sandbox.create(timeout=600, envs={"FROM_SANDBOX": "sandbox-value"})
    try:
        read = "import os; os.environ.get('FROM_SANDBOX'), os.environ.get('PER_RUN')"
        assert sbx.run_code(read).text == "('sandbox-value', None)"
        assert sbx.run_code(read, envs={"PER_RUN": "run-value"}).text == "('sandbox-value', 'run-value')"
        # Applied to that run only.
        assert sbx.run_code(read).text == "('sandbox-value', None)"
        # A per-run value shadows the sandbox's for that run, which is restored afterwards.
        assert sbx.run_code(read, envs={"FROM_SANDBOX": "shadow"}).text == "('shadow', None)"
        assert sbx.run_code(read).text == "('sandbox-value', None)"
        # Other languages' contexts see the sandbox's variables too.
        js = sbx.run_code("process.env.FROM_SANDBOX", language="javascript")
        assert js.text == "sandbox-value", js
    finally:
        sbx.kill()


def _raw(sandbox, method, path, headers=None, **kw):
    """A request to the sandbox's port 49999 through the proxy, as the SDK addresses it."""
    url = os.environ["E2B_SANDBOX_URL"] + path
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49999", **(headers or {})}
    return httpx.request(method, url, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize(
    "body, status",
    [
        ({"code": 5}, 422),
        ({"code": ["1"]}, 422),
        ({}, 422),
        ({"code": "1", "language": "python", "context_id": "whatever"}, 400),
        ({"code": "1", "language": "cobol"}, 400),
        ({"code": "1", "context_id": "no-such-context"}, 404),
    ],
)
def test_bad_execute_requests_are_refused_clearly(sandbox, body, status):
    response = _raw(sandbox, "POST", "/execute", json=body)
    assert response.status_code == status, response.text
    assert response.text.strip(), "an error says what is wrong"


def test_health_and_malformed_json(sandbox):
    assert _raw(sandbox, "GET", "/health").status_code == 200
    garbage = _raw(sandbox, "POST", "/execute", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400, garbage.text

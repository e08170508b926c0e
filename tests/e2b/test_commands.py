"""Commands through the SDK: foreground and background runs, streaming, exit codes, stdin,
kill, working directory, user and environment."""

import time

import pytest
from e2b import CommandExitException


def test_foreground_run_streams_output_and_reports_exit_codes(sandbox):
    out, err = [], []
    result = sandbox.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert result.exit_code == 0
    assert result.stdout == "out1\nout2\nout3\n"
    assert result.stderr == "err1\nerr2\nerr3\n"
    assert "".join(out) == result.stdout and "".join(err) == result.stderr
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "partial\n"


def test_background_commands_can_be_waited_for_listed_and_killed(sandbox):
    handle = sandbox.commands.run("sleep 0.5; echo done", background=True)
    assert handle.wait().stdout == "done\n"
    sleeper = sandbox.commands.run("sleep 300", background=True)
    assert sleeper.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(sleeper.pid)
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sleeper.pid not in [p.pid for p in sandbox.commands.list()]


def test_stdin_reaches_the_process(sandbox):
    handle = sandbox.commands.run("read line; echo got:$line", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello\n")
    assert handle.wait().stdout == "got:hello\n"


def test_cwd_user_and_envs(sandbox):
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("whoami").stdout == "user\n"
    assert sandbox.commands.run("whoami; echo $HOME", user="root").stdout == "root\n/root\n"
    assert sandbox.commands.run("echo $A-$B", envs={"A": "1", "B": "two"}).stdout == "1-two\n"


def test_a_command_timeout_stops_the_wait(sandbox):
    started = time.time()
    with pytest.raises(Exception):
        sandbox.commands.run("sleep 30", timeout=2)
    assert time.time() - started < 20


def test_stream_input_and_close_stdin(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["one ", b"two ", "three\n"])
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "one two three\n"

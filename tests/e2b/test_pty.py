"""Terminals through the SDK: a login shell on a PTY, input, resize and kill."""

import time

import pytest
from e2b import CommandExitException
from e2b.sandbox.commands.command_handle import PtySize


def test_pty_runs_a_shell_with_input_and_resize(sandbox):
    output = []
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; tty; echo marker-$((6*7))\n")
    time.sleep(1)
    sandbox.pty.resize(terminal.pid, PtySize(rows=40, cols=100))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; whoami; exit\n")
    result = terminal.wait(on_pty=output.append)
    text = b"".join(output).decode(errors="replace")
    assert result.exit_code == 0
    assert "24 80" in text and "40 100" in text
    assert "/dev/pts/" in text
    assert "marker-42" in text
    assert "\r\nuser\r\n" in text


def test_pty_can_be_killed(sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    assert sandbox.pty.kill(terminal.pid)
    with pytest.raises(CommandExitException):
        terminal.wait()

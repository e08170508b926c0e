"""Terminals as E2B's envd has them: a PTY reconnected by pid delivers what its shell prints
afterwards, however much, while clients that went away are dropped, and environment variables
given at creation are set in its shell."""

import threading
import time

from e2b.sandbox.commands.command_handle import PtySize


def _collect(handle, output):
    def wait():
        try:
            handle.wait(on_pty=output.append)
        except Exception as err:  # noqa: BLE001 - the output is checked instead
            output.append(repr(err).encode())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _wait_for(output, needle, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if needle in b"".join(output).decode(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def test_pty_envs_are_set_in_its_shell(sandbox):
    output = []
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), cwd="/", envs={"PTY_GREETING": "hello-from-envs"})
    sandbox.pty.send_stdin(terminal.pid, b"echo marker:$PTY_GREETING:$TERM:$PWD; exit\n")
    result = terminal.wait(on_pty=output.append)
    text = b"".join(output).decode(errors="replace")
    assert result.exit_code == 0
    assert "marker:hello-from-envs:xterm-256color:/" in text, text


def test_a_pty_reconnected_by_pid_delivers_all_its_output(sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    pid = terminal.pid
    terminal.disconnect()
    # Another client connects and goes away too, without reading.
    sandbox.pty.connect(pid).disconnect()
    again = sandbox.pty.connect(pid)
    assert again.pid == pid
    output = []
    waiter = _collect(again, output)
    # Much more output than any buffer holds: clients that left must not hold it up.
    sandbox.pty.send_stdin(pid, b"for i in $(seq 1 3000); do echo line-$i; done; echo reconnected-$((6*7))\n")
    assert _wait_for(output, "reconnected-42", 120), b"".join(output)[-400:]
    assert "line-2999" in b"".join(output).decode(errors="replace")
    sandbox.pty.send_stdin(pid, b"exit\n")
    waiter.join(60)
    assert not waiter.is_alive()

"""A Jupyter wrapper kernel that evaluates code in a long-lived child process (Node.js or a JVM).

Usage (from a kernel.json): ``python3 childkernel.py LANGUAGE -f {connection_file} -- CHILD_ARGV...``
where LANGUAGE is one of ``javascript``, ``typescript``, ``java``.

This module (standard library only) starts the child first, then imports wrapperkernel.py, whose
ipykernel ``Kernel`` subclass speaks the Jupyter protocol: importing ipykernel takes seconds under
emulation, and the child loads meanwhile.

The child protocol (shared by kernels/js/driver.js and kernels/java/VivJShell.java):
- requests, one line each on the child's stdin: ``OP BASE64(UTF-8 code)`` with OP ``execute`` or
  ``is_complete``; one request at a time, the next only after the previous answered ``done``;
- answers, JSON lines on the protocol pipe (its fd number is in the child's env var
  VIV_KERNEL_FD): ``{"type":"ready"}`` once at start, then per request any number of
  ``{"type":"result","data":{MIME: value}}`` / ``{"type":"error","ename","evalue","traceback"}``
  / ``{"type":"is_complete","status"}``, always ending with ``{"type":"done"}``;
- everything the child (or its own children) writes to fd 1 / fd 2 is the user's stdout / stderr.

Invariants:
- one reader thread owns the child's three pipes; before it handles a protocol line it drains fd 1
  and fd 2, so output written before a result or ``done`` is published before it;
- output is only queued while ``forwarding`` is set (a non-silent execution runs): output of
  silent runs and of idle times is dropped;
- the child runs in its own session and gets SIGKILL when this process dies (PR_SET_PDEATHSIG),
  so jupyter's SIGINT to the kernel's process group reaches only the kernel, which forwards it;
- the reader thread reports the child's exit as an ("exit", code) event after EOF on the protocol
  pipe (then kills what is left of the child's process group), so a waiting request never blocks
  forever on a dead child, even if the child's own children keep fd 1 / fd 2 open.
"""

import base64
import codecs
import ctypes
import json
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading

READ_CHUNK = 1 << 16
MAX_PROTOCOL_LINE = 64 << 20  # a longer protocol line means a broken child: it is restarted
LANGUAGES = ("javascript", "typescript", "java")


def _die_with_parent():
    """preexec_fn: SIGKILL the child when the kernel process dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ChildProcess:
    """One child process and the reader thread that turns its pipes into events on a queue.

    Events: ("stdout"|"stderr", text), ("msg", dict), ("exit", returncode).
    """

    def __init__(self, argv):
        self.argv = argv
        self.forwarding = False  # set by the kernel while a non-silent execution runs
        self.events = queue.Queue()
        proto_read, proto_write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(proto_write,), start_new_session=True, preexec_fn=_die_with_parent,
                env=dict(os.environ, VIV_KERNEL_FD=str(proto_write)))
        finally:
            os.close(proto_write)
        self.proto = os.fdopen(proto_read, "rb", buffering=0)
        self.thread = threading.Thread(target=self._read_loop, daemon=True)
        self.thread.start()

    def send(self, op, code):
        line = op + " " + base64.b64encode(code.encode("utf-8", "surrogatepass")).decode() + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def interrupt(self):
        try:
            self.proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _read_loop(self):
        pipes = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr",
                 self.proto.fileno(): "proto"}  # all three non-blocking, read only when ready
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace")
                    for name in ("stdout", "stderr")}
        sel = selectors.DefaultSelector()
        for fd, name in pipes.items():
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
        pending = b""
        while self.proto.fileno() in sel.get_map():
            names = {key.data for key, _ in sel.select()}
            # Output before protocol lines: what the child wrote before a result or "done" is
            # already in the output pipes when the protocol line arrives.
            for name in ("stdout", "stderr"):
                if name in names or "proto" in names:
                    self._read_output(sel, name, decoders[name])
            if "proto" in names:
                chunk = self._read(sel, "proto")
                pending += chunk or b""
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._protocol_line(line)
                if len(pending) > MAX_PROTOCOL_LINE:
                    self.kill()
        # The protocol pipe closed: the child is gone (or broke the protocol). Its own children
        # may still hold fd 1 / fd 2 open, so do not wait for those: take what they hold, make
        # sure the child and its process group are gone, and report the exit.
        for name in ("stdout", "stderr"):
            self._read_output(sel, name, decoders[name])
        sel.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        self.events.put(("exit", self.proc.returncode))

    def _read(self, sel, name):
        """One non-blocking read of the named pipe: bytes, b"" at EOF (unregistered), or None."""
        fd = next((key.fd for key in sel.get_map().values() if key.data == name), None)
        if fd is None:
            return None
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return None
        if not chunk:
            sel.unregister(fd)
        return chunk

    def _read_output(self, sel, name, decoder):
        """Reads everything the output pipe NAME holds right now."""
        while True:
            chunk = self._read(sel, name)
            if not chunk:
                return
            self._output(name, decoder.decode(chunk))

    def _output(self, name, text):
        if text and self.forwarding:
            self.events.put((name, text))

    def _protocol_line(self, line):
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if isinstance(msg, dict):
            self.events.put(("msg", msg))


def main(argv):
    """Entry point: ``childkernel.py LANGUAGE [ipykernel args...] -- CHILD_ARGV...``."""
    if len(argv) < 2 or argv[1] not in LANGUAGES or "--" not in argv:
        sys.exit("usage: childkernel.py {%s} -f CONNECTION_FILE -- CHILD_ARGV..." % ",".join(LANGUAGES))
    split = argv.index("--")
    kernel_args, child_argv = argv[2:split], argv[split + 1:]
    if not child_argv:
        sys.exit("childkernel.py: no child command after --")
    first_child = ChildProcess(child_argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import wrapperkernel  # noqa: E402 (slow: imports ipykernel while the child starts)
    wrapperkernel.launch(argv[1], kernel_args, first_child, lambda: ChildProcess(child_argv))


if __name__ == "__main__":
    main(sys.argv)

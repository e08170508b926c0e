"""A Jupyter wrapper kernel that evaluates code in a long-lived child process (Node.js or a JVM).

Usage (from a kernel.json): ``python3 childkernel.py LANGUAGE -f {connection_file} -- CHILD_ARGV...``
where LANGUAGE is one of ``javascript``, ``typescript``, ``java``.

ipykernel's ``Kernel`` base speaks the Jupyter protocol; this module only runs the child and
translates. The child protocol (shared by kernels/js/driver.js and kernels/java/VivJShell.java):

- requests, one line each on the child's stdin: ``OP BASE64(UTF-8 code)`` with OP ``execute`` or
  ``is_complete``; one request at a time, the next only after the previous answered ``done``;
- answers, JSON lines on the protocol pipe (fd number in the child's env var VIV_KERNEL_FD): ``{"type":"ready"}`` once at start, then per request
  any number of ``{"type":"result","data":{MIME: value}}`` / ``{"type":"error","ename","evalue",
  "traceback"}`` / ``{"type":"is_complete","status"}``, always ending with ``{"type":"done"}``;
- everything the child (or its own children) writes to fd 1 / fd 2 is the user's stdout / stderr.

Invariants:
- one reader thread owns the child's three pipes; before it handles a protocol line it drains fd 1
  and fd 2, so output written before a result or ``done`` is published before it;
- output is only forwarded while a non-silent execution runs (silent runs and idle-time output
  are dropped, so helper runs emit nothing; the base class does not count silent runs);
- the child runs in its own session and dies with this process (PR_SET_PDEATHSIG), so jupyter's
  SIGINT to our process group reaches only us: we forward it to the child while it executes; if
  the child does not finish within INTERRUPT_GRACE seconds it is killed and restarted (the
  execution reports the lost state); a child that exits is restarted for the next request;
- a request never blocks forever on a dead child: EOF on the protocol pipe ends the execution with an error.
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
import time

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

INTERRUPT_GRACE = 5.0  # seconds a child gets to stop after SIGINT before it is restarted
READ_CHUNK = 1 << 16
MAX_PROTOCOL_LINE = 64 << 20  # a longer protocol line means a broken child: it is restarted

LANGUAGES = {
    "javascript": {
        "display": "JavaScript (Node.js)",
        "info": {"name": "javascript", "mimetype": "application/javascript",
                 "file_extension": ".js", "codemirror_mode": "javascript"},
    },
    "typescript": {
        "display": "TypeScript (Node.js)",
        "info": {"name": "typescript", "mimetype": "text/typescript",
                 "file_extension": ".ts", "codemirror_mode": "typescript"},
    },
    "java": {
        "display": "Java (JShell)",
        "info": {"name": "java", "mimetype": "text/x-java", "file_extension": ".jshell",
                 "codemirror_mode": "text/x-java"},
    },
}


def _die_with_parent():
    """preexec_fn: SIGKILL the child when the kernel process dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ChildProcess:
    """One child process and the reader thread that turns its pipes into events on a queue.

    Events: ("stdout"|"stderr", text), ("msg", dict), ("exit", returncode).
    """

    def __init__(self, argv, forward_output):
        self.forward_output = forward_output  # callable () -> bool: keep stream output?
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

    def alive(self):
        return self.proc.poll() is None

    def _read_loop(self):
        sel = selectors.DefaultSelector()
        decoders = {}
        for name, f in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            sel.register(f, selectors.EVENT_READ, name)
            decoders[name] = codecs.getincrementaldecoder("utf-8")("replace")
        sel.register(self.proto, selectors.EVENT_READ, "proto")
        pending = b""
        open_count = 3
        while open_count:
            ready = sorted((key.data, key.fileobj) for key, _ in sel.select())
            # "proto" sorts after "stderr"/"stdout": output written first is published first.
            for name, f in ready:
                if name == "proto":
                    self._drain_output(sel, decoders)
                chunk = os.read(f.fileno(), READ_CHUNK)
                if not chunk:
                    sel.unregister(f)
                    open_count -= 1
                    continue
                if name != "proto":
                    self._output(name, decoders[name].decode(chunk))
                    continue
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._protocol_line(line)
                if len(pending) > MAX_PROTOCOL_LINE:
                    self.kill()
        self.proc.wait()
        self.events.put(("exit", self.proc.returncode))

    def _drain_output(self, sel, decoders):
        """Reads whatever fd 1 and fd 2 hold right now, without blocking."""
        for key in list(sel.get_map().values()):
            if key.data == "proto":
                continue
            while sel.get_map().get(key.fd) and _readable(key.fileobj):
                chunk = os.read(key.fd, READ_CHUNK)
                if not chunk:
                    break  # EOF: the main loop sees it again and unregisters
                self._output(key.data, decoders[key.data].decode(chunk))

    def _output(self, name, text):
        if text and self.forward_output():
            self.events.put((name, text))

    def _protocol_line(self, line):
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if isinstance(msg, dict):
            self.events.put(("msg", msg))


def _readable(f):
    sel = selectors.DefaultSelector()
    sel.register(f, selectors.EVENT_READ)
    try:
        return bool(sel.select(timeout=0))
    finally:
        sel.close()


class ChildKernel(Kernel):
    """The Jupyter side: one ChildProcess, restarted when it dies or ignores an interrupt."""

    implementation = "vivarium-childkernel"
    implementation_version = "1.0"
    language = ""
    child_argv = []  # set by main() before the kernel is instantiated

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        spec = LANGUAGES[self.language]
        self.language_info = dict(spec["info"])
        self.banner = spec["display"] + " kernel (Vivarium)"
        self._forwarding = False
        self._interrupted_at = None
        self.child = None
        self._start_child()

    # --- the child -------------------------------------------------------------------------
    def _start_child(self):
        self.child = ChildProcess(self.child_argv, lambda: self._forwarding)
        self._ready = False

    def _restart_child(self):
        self.child.kill()
        self._start_child()

    def _wait_ready(self):
        """Waits for the child's ready line; returns an error reply dict if it died first."""
        if self._ready:
            return None
        while True:
            kind, value = self.child.events.get()
            if kind == "msg" and value.get("type") == "ready":
                self._ready = True
                return None
            if kind == "exit":
                self._start_child()
                return self._error("KernelStartError", "the %s process exited with code %s "
                                   "before it was ready" % (self.language, value), [])

    # --- interrupts ----------------------------------------------------------------------
    def pre_handler_hook(self):
        self.saved_sigint_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self._interrupted_at is None:
            self._interrupted_at = time.monotonic()
        self.child.interrupt()

    # --- requests ------------------------------------------------------------------------
    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, **kwargs):
        self._interrupted_at = None
        error = self._wait_ready()
        if error is None and not code.strip():
            return self._ok()
        if error is None:
            self._drop_stale_events()
            self._forwarding = not silent
            try:
                self.child.send("execute", code)
                error = self._collect(silent)
            except (BrokenPipeError, OSError):
                error = self._child_exited(self._wait_exit())
            finally:
                self._forwarding = False
        if error is None:
            return self._ok()
        if not silent:
            self.send_response(self.iopub_socket, "error", error)
        return dict(error, status="error", execution_count=self.execution_count)

    def _collect(self, silent):
        """Publishes the child's events until ``done``; returns the first error or None."""
        error = None
        while True:
            try:
                kind, value = self.child.events.get(timeout=0.25)
            except queue.Empty:
                if self._interrupted_at and time.monotonic() - self._interrupted_at > INTERRUPT_GRACE:
                    self._restart_child()
                    return self._error("Interrupted", "the %s process did not stop when interrupted; "
                                       "it was restarted and its state is lost" % self.language, [])
                continue
            if kind in ("stdout", "stderr"):
                if not silent:
                    self.send_response(self.iopub_socket, "stream", {"name": kind, "text": value})
            elif kind == "exit":
                return self._child_exited(value)
            elif value.get("type") == "done":
                return error
            elif value.get("type") == "result" and not silent:
                data = value.get("data") or {}
                self.send_response(self.iopub_socket, "execute_result", {
                    "execution_count": self.execution_count, "data": data, "metadata": {}})
            elif value.get("type") == "display" and not silent:
                self.send_response(self.iopub_socket, "display_data", {
                    "data": value.get("data") or {}, "metadata": {}, "transient": {}})
            elif value.get("type") == "error" and error is None:
                error = self._error(str(value.get("ename", "Error")), str(value.get("evalue", "")),
                                    [str(line) for line in value.get("traceback") or []])

    def _wait_exit(self):
        while True:
            kind, value = self.child.events.get()
            if kind == "exit":
                return value

    def _child_exited(self, returncode):
        self._start_child()
        return self._error("ProcessExited", "the %s process exited (code %s); its state is lost "
                           "and a new one was started" % (self.language, returncode), [])

    def _drop_stale_events(self):
        while True:
            try:
                kind, value = self.child.events.get_nowait()
            except queue.Empty:
                return
            if kind == "exit":
                self._start_child()
                self._wait_ready()
                return

    async def do_is_complete(self, code):
        if self._wait_ready() is not None:
            return {"status": "unknown"}
        self._drop_stale_events()
        status = "unknown"
        try:
            self.child.send("is_complete", code)
        except OSError:
            return {"status": "unknown"}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                kind, value = self.child.events.get(timeout=0.25)
            except queue.Empty:
                continue
            if kind == "exit":
                self._start_child()
                break
            if kind == "msg" and value.get("type") == "is_complete":
                status = value.get("status", "unknown")
            if kind == "msg" and value.get("type") == "done":
                break
        return {"status": status, "indent": ""} if status == "incomplete" else {"status": status}

    async def do_shutdown(self, restart):
        self.child.kill()
        return {"status": "ok", "restart": restart}

    def _ok(self):
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}

    @staticmethod
    def _error(ename, evalue, traceback):
        return {"ename": ename, "evalue": evalue, "traceback": traceback or [f"{ename}: {evalue}"]}


def main(argv):
    """Entry point: ``childkernel.py LANGUAGE [ipykernel args...] -- CHILD_ARGV...``."""
    if len(argv) < 2 or argv[1] not in LANGUAGES or "--" not in argv:
        sys.exit("usage: childkernel.py {%s} -f CONNECTION_FILE -- CHILD_ARGV..."
                 % ",".join(LANGUAGES))
    split = argv.index("--")
    kernel_args, child_argv = argv[2:split], argv[split + 1:]
    if not child_argv:
        sys.exit("childkernel.py: no child command after --")
    kernel_class = type(argv[1].capitalize() + "Kernel", (ChildKernel,),
                        {"language": argv[1], "child_argv": child_argv})
    IPKernelApp.launch_instance(argv=kernel_args, kernel_class=kernel_class)


if __name__ == "__main__":
    main(sys.argv)

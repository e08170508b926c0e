"""The Jupyter side of the javascript, typescript and java kernels (see kernels/childkernel.py).

ChildKernel subclasses ipykernel's ``Kernel`` base (which speaks the Jupyter protocol) and turns
execute / is_complete / interrupt / shutdown requests into the child protocol described in
childkernel.py, publishing the child's streams, results and errors on iopub.

Invariants:
- silent executions publish nothing and are not counted (the base class counts non-silent ones);
- SIGINT (jupyter's interrupt) is forwarded to the child only while a request runs; a child that
  has not answered ``done`` INTERRUPT_GRACE seconds later is killed and replaced;
- a child that exits during a request ends it with a ProcessExited error; one that exited while
  idle is replaced before the next request runs, and the next non-silent execution is told on
  stderr that the earlier state is lost; every request gets exactly one reply.
"""

import queue
import signal
import time

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

INTERRUPT_GRACE = 5.0  # seconds a child gets to stop after SIGINT before it is restarted
START_TIMEOUT = 300  # seconds a child may take to answer "ready" (a JVM under emulation: ~10)

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


class ChildKernel(Kernel):
    """The Jupyter side: one ChildProcess, restarted when it dies or ignores an interrupt."""

    implementation = "vivarium-childkernel"
    implementation_version = "1.0"
    language = ""
    first_child = None  # set by launch(): the ChildProcess started before ipykernel was imported
    new_child = None  # set by launch(): () -> a new ChildProcess

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        spec = LANGUAGES[self.language]
        self.language_info = dict(spec["info"])
        self.banner = spec["display"] + " kernel (Vivarium)"
        self._interrupted_at = None
        self.child = self.first_child
        self._ready = False
        self._lost_state_note = ""  # told to the next non-silent execution after an idle exit

    # --- the child -------------------------------------------------------------------------
    def _start_child(self):
        self.child = self.new_child()
        self._ready = False

    def _restart_child(self):
        self.child.kill()
        self._start_child()

    def _wait_ready(self):
        """Waits for the child's ready line; returns an error reply dict if it died first."""
        if self._ready:
            return None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                kind, value = self.child.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self._restart_child()
                return self._error("KernelStartError", "the %s process did not start within %d s; "
                                   "a new one was started" % (self.language, START_TIMEOUT), [])
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
            error = self._drop_stale_events()
        if error is None and not silent and self._lost_state_note:
            self.send_response(self.iopub_socket, "stream", {"name": "stderr", "text": self._lost_state_note})
            self._lost_state_note = ""
        if error is None:
            self.child.forwarding = not silent
            try:
                self.child.send("execute", code)
                error = self._collect(silent)
            except (BrokenPipeError, OSError):
                error = self._child_exited(self._wait_exit())
            finally:
                self.child.forwarding = False
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
            elif value.get("type") == "error" and error is None:
                error = self._error(str(value.get("ename", "Error")), str(value.get("evalue", "")),
                                    [str(line) for line in value.get("traceback") or []])

    def _wait_exit(self):
        """The exit code of a child that stopped reading requests (killed after 5 s if alive)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                kind, value = self.child.events.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.child.kill()
                continue
            if kind == "exit":
                return value

    def _child_exited(self, returncode):
        self._start_child()
        return self._error("ProcessExited", "the %s process exited (code %s); its state is lost "
                           "and a new one was started" % (self.language, returncode), [])

    def _drop_stale_events(self):
        """Drops idle-time events; replaces a child that exited while idle (noting the lost state).

        Returns an error dict if the replacement did not start, else None.
        """
        while True:
            try:
                kind, value = self.child.events.get_nowait()
            except queue.Empty:
                if self.child.proc.poll() is None:
                    return None
                kind, value = "exit", self._wait_exit()  # exiting now: its event is on the way
            if kind == "exit":
                self._lost_state_note = ("[the %s process had exited (code %s): a new one was started "
                                         "and earlier state is lost]\n" % (self.language, value))
                self._start_child()
                return self._wait_ready()

    async def do_is_complete(self, code):
        if self._wait_ready() is not None:
            return {"status": "unknown"}
        if self._drop_stale_events() is not None:
            return {"status": "unknown"}
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


def launch(language, kernel_args, first_child, new_child):
    """Runs the kernel for LANGUAGE until shutdown (ipykernel's application does the sockets)."""
    kernel_class = type(language.capitalize() + "Kernel", (ChildKernel,), {
        "language": language, "first_child": first_child, "new_child": staticmethod(new_child)})
    IPKernelApp.launch_instance(argv=kernel_args, kernel_class=kernel_class)

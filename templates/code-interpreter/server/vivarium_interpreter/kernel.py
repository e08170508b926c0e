"""One Jupyter kernel process and the client connected to it.

Invariants: at most one `execute` runs at a time on a `Kernel` (the owning context serializes
them); `execute` yields only the IOPub messages answering its own request and returns once the
kernel reported idle for it, or raises `KernelDied` as soon as the process is gone. An abort
request interrupts the kernel (SIGINT) and keeps draining; a kernel that stays busy
`ABORT_GRACE` seconds after the interrupt is restarted, so an aborted run always ends.
Kernel process ids are recorded in `PID_DIR` so that a restarted server can end the kernels a
crashed one left behind.
"""

import asyncio
import logging
import os
import queue
import signal
import time
from typing import AsyncIterator, Optional

from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import NoSuchKernel

POLL = 0.5
START_TIMEOUT = 600.0
ABORT_GRACE = 10.0
REPLY_TIMEOUT = 5.0
PID_DIR = os.environ.get("VIVARIUM_KERNEL_PID_DIR", "/tmp/vivarium-interpreter/kernels")
log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """The kernel could not be started (spec absent, crashed at start, never became ready);
    `missing` tells the first case, which retrying cannot fix."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class KernelDied(RuntimeError):
    """The kernel process exited while it was running code."""


class KernelStuck(RuntimeError):
    """The kernel stayed busy after an interrupt."""


def end_orphans() -> None:
    """End the kernels (and their process groups) a previous server instance left running."""
    try:
        names = os.listdir(PID_DIR)
    except FileNotFoundError:
        return
    for name in names:
        try:
            pid = int(name)
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
                log.info("ended orphan kernel %d", pid)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        try:
            os.unlink(os.path.join(PID_DIR, name))
        except OSError:
            pass


class Kernel:
    """A kernel of spec `spec_name` started in `cwd` with environment `env`."""

    def __init__(self, spec_name: str, cwd: str, env: dict, extra_arguments: list):
        self.spec_name = spec_name
        self.manager = AsyncKernelManager(kernel_name=spec_name)
        self.client = None
        self._launch = dict(cwd=cwd, env=env, extra_arguments=extra_arguments)
        self._pid: Optional[int] = None

    async def start(self) -> None:
        """Start the process and wait until it answers; raises KernelUnavailable."""
        try:
            await self.manager.start_kernel(**self._launch)
        except NoSuchKernel:
            raise KernelUnavailable(
                f"the {self.spec_name!r} Jupyter kernel is not installed in this sandbox"
                " (no kernel spec of that name)",
                missing=True,
            ) from None
        except Exception as e:
            raise KernelUnavailable(f"the {self.spec_name!r} kernel failed to start: {e}") from e
        self._record_pid()
        await self._connect()

    async def restart(self) -> None:
        """Replace the process by a fresh one (state lost); raises KernelUnavailable."""
        self._close_client()
        self._forget_pid()
        try:
            if self.manager.has_kernel:
                await self.manager.shutdown_kernel(now=True)
            # A manager is single-use: shutting down terminates its ZeroMQ context.
            self.manager = AsyncKernelManager(kernel_name=self.spec_name)
            await self.manager.start_kernel(**self._launch)
        except Exception as e:
            raise KernelUnavailable(f"the {self.spec_name!r} kernel failed to restart: {e}") from e
        self._record_pid()
        await self._connect()

    def update_env(self, env: dict) -> None:
        """Environment entries for the next (re)start."""
        self._launch["env"] = {**self._launch["env"], **env}

    async def shutdown(self) -> None:
        self._close_client()
        self._forget_pid()
        try:
            await self.manager.shutdown_kernel(now=True)
        except Exception as e:
            log.warning("shutting down the %s kernel: %s", self.spec_name, e)

    async def is_alive(self) -> bool:
        """Whether the process runs and is connected (False after a failed restart)."""
        return self.client is not None and await self.manager.is_alive()

    async def interrupt(self) -> None:
        try:
            await self.manager.interrupt_kernel()
        except Exception as e:
            log.warning("interrupting the %s kernel: %s", self.spec_name, e)

    async def execute(
        self, code: str, *, silent: bool, abort: Optional[asyncio.Event] = None
    ) -> AsyncIterator[dict]:
        """Run `code`; yield its IOPub messages, then its execute_reply (or None if the kernel
        sent none in time). Raises KernelDied, or KernelStuck after an abort that did not take."""
        msg_id = self.client.execute(
            code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False
        )
        interrupted_at = None
        while True:
            if abort is not None and abort.is_set() and interrupted_at is None:
                interrupted_at = time.monotonic()
                await self.interrupt()
            if interrupted_at is not None and time.monotonic() - interrupted_at > ABORT_GRACE:
                raise KernelStuck(f"the {self.spec_name!r} kernel ignored an interrupt")
            try:
                msg = await self.client.get_iopub_msg(timeout=POLL)
            except queue.Empty:
                if not await self.is_alive():
                    raise KernelDied(self._death_note()) from None
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                break
            yield msg
        yield await self._reply(msg_id)

    async def _reply(self, msg_id: str) -> Optional[dict]:
        deadline = time.monotonic() + REPLY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await self.client.get_shell_msg(timeout=left)
            except queue.Empty:
                break
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return msg
        log.warning("no execute_reply from the %s kernel", self.spec_name)
        return None

    async def _connect(self) -> None:
        self.client = self.manager.client()
        self.client.start_channels(hb=False)
        try:
            await self.client.wait_for_ready(timeout=START_TIMEOUT)
        except Exception as e:
            raise KernelUnavailable(f"the {self.spec_name!r} kernel did not become ready: {e}") from e

    def _close_client(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None

    def _death_note(self) -> str:
        process = getattr(self.manager.provisioner, "process", None)
        code = getattr(process, "returncode", None) if process is not None else None
        if code is not None and code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}" if code is not None else "exited"

    def _record_pid(self) -> None:
        process = getattr(self.manager.provisioner, "process", None)
        self._pid = getattr(process, "pid", None)
        if self._pid is not None:
            os.makedirs(PID_DIR, exist_ok=True)
            open(os.path.join(PID_DIR, str(self._pid)), "w").close()

    def _forget_pid(self) -> None:
        if self._pid is not None:
            try:
                os.unlink(os.path.join(PID_DIR, str(self._pid)))
            except OSError:
                pass
            self._pid = None

"""Contexts: one kernel each, with a language, a working directory and serialized executions.

Invariants:
- Executions in one context run one at a time, in arrival order (an asyncio.Lock, FIFO); helper
  runs (cwd, env vars) happen under the same lock and are silent, so they are never counted.
- An `Execution` runs as its own task, independent of the HTTP request: its event queue always
  ends with `END`, whatever happens (kernel death, abort, internal error). Aborting it (client
  gone) interrupts the kernel; the lock is released only once the kernel is idle again (or was
  restarted), so the next execution always finds a usable kernel.
- Per-run env vars are set before the run and restored after it; the sandbox's env vars
  (`sandbox_env`) are re-read before every run and the differences applied, so a kernel always sees
  the current sandbox env plus nothing left over from earlier runs.
- A kernel found dead is restarted (fresh state, cwd and env re-applied); the run that saw it die
  ends with an error saying so.
- `Registry.contexts` keeps creation order; each language has at most one default context, started
  once even under concurrent first uses.
"""

import asyncio
import logging
import os
import uuid
from typing import Optional

from . import sandbox_env
from .kernel import Kernel, KernelDied, KernelStuck, KernelUnavailable
from .languages import JAVASCRIPT, PYTHON, Language
from .results import Translator, error_event

END = object()
STARTUP_ATTEMPTS = 3
STARTUP_RETRY_DELAY = 5.0
DEFAULT_CWD = "/home/user"
IPYTHON_EXT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ipython")
log = logging.getLogger(__name__)


class HelperFailed(RuntimeError):
    """A silent helper run (cd, env vars) failed in the kernel."""


def base_env() -> dict:
    """The environment every kernel starts from: the server's, minus shell bookkeeping."""
    env = dict(os.environ)
    for name in ("PWD", "OLDPWD", "SHLVL", "_"):
        env.pop(name, None)
    return env


class Context:
    """A kernel of `language` whose code runs in `cwd`."""

    def __init__(self, language: Language, cwd: str):
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.lock = asyncio.Lock()
        self.closed = False
        self.base = base_env()
        self.applied_sandbox: dict = {}
        self.kernel: Optional[Kernel] = None
        self.running: Optional["Execution"] = None

    def to_json(self) -> dict:
        return {"id": self.id, "language": self.language.name, "cwd": self.cwd}

    async def start(self) -> None:
        """Start the kernel in cwd with the sandbox env; raises KernelUnavailable."""
        self.applied_sandbox = sandbox_env.read()
        env = {**self.base, **self.applied_sandbox}
        extra = []
        if self.language is PYTHON:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (IPYTHON_EXT_DIR, env.get("PYTHONPATH")) if p)
            extra = ["--ext=vivarium_kernel_ext"]
        self.kernel = Kernel(self.language.kernel_spec, self.cwd, env, extra)
        await self.kernel.start()
        await self._settle()

    async def restart(self) -> None:
        """Fresh kernel state, same id (the running execution is stopped first)."""
        if self.running is not None:
            self.running.stop("the context was restarted while this code was running")
        async with self.lock:
            await self._restart_kernel()

    async def close(self) -> None:
        """Shut the kernel down; the running execution is stopped, queued ones end with an error."""
        self.closed = True
        if self.running is not None:
            self.running.stop("the context was removed while this code was running")
        async with self.lock:
            if self.kernel is not None:
                await self.kernel.shutdown()

    async def _restart_kernel(self) -> None:
        self.applied_sandbox = sandbox_env.read()
        self.kernel.update_env(self.applied_sandbox)
        await self.kernel.restart()
        await self._settle()

    async def _settle(self) -> None:
        """After a (re)start: cd into cwd (the process cwd already is, but kernels may chdir)."""
        if self.language.takes_helpers:
            await self._helper(self.language.chdir(self.cwd))

    async def _helper(self, code: str) -> None:
        if not code:
            return
        reply = None
        async for msg in self.kernel.execute(code, silent=True):
            if msg is not None and msg.get("msg_type") == "execute_reply":
                reply = msg
        if reply is not None and reply["content"].get("status") == "error":
            c = reply["content"]
            raise HelperFailed(f"{c.get('ename', 'Error')}: {c.get('evalue', '')}")

    async def _sync_sandbox_env(self) -> None:
        current = sandbox_env.read()
        assign = {k: v for k, v in current.items() if self.applied_sandbox.get(k) != v}
        remove = [k for k in self.applied_sandbox if k not in current]
        restore = {k: self.base[k] for k in remove if k in self.base}
        remove = [k for k in remove if k not in self.base]
        if (assign or restore or remove) and self.language.takes_helpers:
            await self._helper(self.language.env_code({**assign, **restore}, remove))
        self.applied_sandbox = current

    def _restore_code(self, names) -> str:
        """Helper code giving `names` back the values they had before a run's env vars."""
        assign, remove = {}, []
        for name in names:
            if name in self.applied_sandbox:
                assign[name] = self.applied_sandbox[name]
            elif name in self.base:
                assign[name] = self.base[name]
            else:
                remove.append(name)
        return self.language.env_code(assign, remove)

    def submit(self, code: str, env_vars: dict) -> "Execution":
        execution = Execution(self, code, env_vars)
        execution.task = asyncio.create_task(execution.run())
        return execution


class Execution:
    """One /execute run: `events` receives the SDK events, then END."""

    def __init__(self, context: Context, code: str, env_vars: dict):
        self.context = context
        self.code = code
        self.env_vars = env_vars
        self.events: asyncio.Queue = asyncio.Queue()
        self.abort = asyncio.Event()
        self.task: Optional[asyncio.Task] = None

    async def run(self) -> None:
        ctx = self.context
        try:
            async with ctx.lock:
                if self.abort.is_set():
                    return
                if ctx.closed:
                    self._emit(error_event("ContextNotFound", "the context was removed", ""))
                    return
                ctx.running = self
                try:
                    await self._run_locked()
                finally:
                    ctx.running = None
        except KernelUnavailable as e:
            self._emit(error_event("KernelUnavailable", str(e), ""))
        except Exception as e:
            log.exception("execution in context %s failed", ctx.id)
            self._emit(error_event("InternalError", f"the code interpreter failed: {e}", ""))
        finally:
            self.events.put_nowait(END)

    async def _run_locked(self) -> None:
        ctx = self.context
        if not await ctx.kernel.is_alive():
            log.warning("the %s kernel of context %s had died; restarting it", ctx.language.name, ctx.id)
            await ctx._restart_kernel()
        per_run = self.env_vars if ctx.language.takes_helpers else {}
        try:
            await ctx._sync_sandbox_env()
            if per_run:
                await ctx._helper(ctx.language.env_code(per_run, []))
        except HelperFailed as e:
            self._emit(error_event("EnvironmentError", f"could not set the environment variables: {e}", ""))
            return
        except KernelDied:
            await self._recover("died while its environment was being set up")
            return
        translator = Translator(values_are_displays=ctx.language.values_are_displays)
        try:
            async for msg in ctx.kernel.execute(self.code, silent=False, abort=self.abort):
                if msg is None or msg["msg_type"] == "execute_reply":
                    for event in translator.finish(completed=True) + translator.reply(msg):
                        self._emit(event)
                else:
                    for event in translator.message(msg):
                        self._emit(event)
        except KernelDied as e:
            for event in translator.finish(completed=False):
                self._emit(event)
            await self._recover(f"died while running this code ({e})", translator)
            return
        except KernelStuck:
            for event in translator.finish(completed=False):
                self._emit(event)
            await self._recover("did not stop when interrupted", translator)
            return
        if per_run and not ctx.closed:
            try:
                await ctx._helper(ctx._restore_code(per_run))
            except (HelperFailed, KernelDied) as e:
                log.warning("restoring env vars in context %s: %s; restarting its kernel", ctx.id, e)
                await ctx._restart_kernel()

    async def _recover(self, what: str, translator: Optional[Translator] = None) -> None:
        ctx = self.context
        if ctx.closed:
            return
        log.warning("the %s kernel of context %s %s; restarting it", ctx.language.name, ctx.id, what)
        try:
            await ctx._restart_kernel()
            outcome = "it was restarted: its state (variables, imports) is lost"
        except KernelUnavailable as e:
            outcome = f"restarting it failed: {e}"
        event = error_event("KernelDiedError", f"The {ctx.language.name} kernel {what}; {outcome}.", "")
        if translator is None or not translator.error_sent:
            self._emit(event)

    def stop(self, reason: Optional[str]) -> None:
        """Interrupt the run; `reason` (if any) is reported to the client as its error."""
        if reason is not None and not self.abort.is_set():
            self._emit(error_event("ExecutionStopped", reason, ""))
        self.abort.set()

    def _emit(self, event: dict) -> None:
        if not self.abort.is_set():
            self.events.put_nowait(event)


class ContextNotFound(KeyError):
    pass


class Registry:
    """Every context, in creation order, and the default context of each language."""

    def __init__(self):
        self.contexts: dict = {}
        self.defaults: dict = {}
        self._default_locks: dict = {}
        self.startup_errors: dict = {}

    async def create(self, language: Language, cwd: str) -> Context:
        """A new started context; raises KernelUnavailable (nothing registered then)."""
        os.makedirs(cwd, exist_ok=True)
        ctx = Context(language, cwd)
        try:
            await ctx.start()
        except BaseException:
            if ctx.kernel is not None:
                await ctx.kernel.shutdown()
            raise
        self.contexts[ctx.id] = ctx
        return ctx

    async def default_for(self, language: Language) -> Context:
        """The language's default context, started on first use."""
        lock = self._default_locks.setdefault(language.name, asyncio.Lock())
        async with lock:
            ctx_id = self.defaults.get(language.name)
            if ctx_id in self.contexts:
                return self.contexts[ctx_id]
            ctx = await self.create(language, DEFAULT_CWD)
            self.defaults[language.name] = ctx.id
            self.startup_errors.pop(language.name, None)
            return ctx

    async def start_defaults(self, languages) -> None:
        """Start the default contexts (at server start: they are warm in the template snapshot).
        A kernel that fails to start is tried again (STARTUP_ATTEMPTS in all) unless its spec is
        missing; the last error is kept for /health."""
        async def one(language):
            for attempt in range(1, STARTUP_ATTEMPTS + 1):
                try:
                    await self.default_for(language)
                    log.info("default %s context ready", language.name)
                    return
                except Exception as e:
                    log.error("default %s context (attempt %d): %s", language.name, attempt, e)
                    self.startup_errors[language.name] = str(e)
                    if isinstance(e, KernelUnavailable) and e.missing:
                        return
                    await asyncio.sleep(STARTUP_RETRY_DELAY)
        await asyncio.gather(*(one(lang) for lang in languages))

    def ready(self, languages) -> bool:
        return all(self.defaults.get(lang.name) in self.contexts for lang in languages)

    def listed(self) -> list:
        """Every context: the default ones first (Python, then JavaScript, whichever kernel
        started first), then the others in the order they were created."""
        order = [self.defaults.get(lang.name) for lang in DEFAULT_LANGUAGES]
        first = [self.contexts[i] for i in order if i in self.contexts]
        return first + [c for i, c in self.contexts.items() if i not in order]

    def get(self, ctx_id: str) -> Context:
        try:
            return self.contexts[ctx_id]
        except KeyError:
            raise ContextNotFound(ctx_id) from None

    async def remove(self, ctx_id: str) -> None:
        ctx = self.contexts.pop(ctx_id, None)
        if ctx is None:
            raise ContextNotFound(ctx_id)
        await ctx.close()

    async def close_all(self) -> None:
        for ctx_id in list(self.contexts):
            await self.remove(ctx_id)


DEFAULT_LANGUAGES = (PYTHON, JAVASCRIPT)

"""The HTTP routes on port 49999, as E2B's Code Interpreter SDKs call them.

Routes: GET /health, POST /execute (chunked NDJSON), GET/POST /contexts, DELETE /contexts/{id},
POST /contexts/{id}/restart. No route requires a token (the SDK sends X-Access-Token on /execute
only; it is ignored).

Invariants: every request is validated before any work starts, and bad input gets a plain-text
message with 400 (malformed request), 404 (unknown context) or 422 (well-formed JSON with a wrong
field); a language whose kernel is missing gets 503 (or, when its first kernel takes longer than
HEADERS_WITHIN to start, an `error` line in a stream already started, so that no client times out
waiting for headers). Once an /execute stream has started it always
ends with an `end_of_execution` line, and a `keepalive` line is sent after every 5 s of silence; a
client that goes away aborts its execution (the kernel is interrupted).
"""

import asyncio
import json
import logging
import os

from aiohttp import web

from .contexts import DEFAULT_CWD, END, ContextNotFound, HelperFailed, Registry
from .kernel import KernelUnavailable
from .languages import ENV_NAME, UnknownLanguage, normalize

KEEPALIVE = 5.0
# How long /execute waits for a language's first kernel before it starts the stream anyway.
HEADERS_WITHIN = 10.0
MAX_BODY = 64 * 1024 * 1024
REGISTRY = web.AppKey("registry", Registry)
DEFAULTS = web.AppKey("default_languages", tuple)
log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request error: `status` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _json_object(request: web.Request, required: bool) -> dict:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise BadRequest(400, "the request body must be a JSON object")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    return body


def _optional_string(body: dict, field: str):
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(422, f"{field!r} must be a string")
    return value


def _language(given):
    try:
        return normalize(given)
    except UnknownLanguage as e:
        raise BadRequest(400, str(e)) from None


def _env_vars(body: dict) -> dict:
    env = body.get("env_vars")
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise BadRequest(422, "'env_vars' must be an object of string values")
    for name, value in env.items():
        if not ENV_NAME.match(name):
            raise BadRequest(400, f"invalid environment variable name {name!r}")
        if not isinstance(value, str):
            raise BadRequest(422, f"environment variable {name!r} must have a string value")
        if "\0" in value:
            raise BadRequest(400, f"environment variable {name!r} contains a NUL byte")
    return env


@web.middleware
async def errors(request: web.Request, handler):
    """Map request errors to plain-text responses; never let an exception become a hang."""
    try:
        return await handler(request)
    except BadRequest as e:
        return web.Response(status=e.status, text=str(e) + "\n")
    except ContextNotFound as e:
        return web.Response(status=404, text=f"context {e.args[0]!r} not found\n")
    except KernelUnavailable as e:
        return web.Response(status=503, text=str(e) + "\n")
    except HelperFailed as e:
        return web.Response(status=500, text=f"could not prepare the context: {e}\n")
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return web.Response(status=500, text=f"internal error: {e}\n")


async def health(request: web.Request) -> web.Response:
    registry, defaults = request.app[REGISTRY], request.app[DEFAULTS]
    if registry.ready(defaults):
        return web.Response(text="ok\n")
    failed = "; ".join(f"{lang}: {err}" for lang, err in registry.startup_errors.items())
    return web.Response(status=503, text=f"starting kernels{' (' + failed + ')' if failed else ''}\n")


async def execute(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    body = await _json_object(request, required=True)
    code = body.get("code")
    if not isinstance(code, str):
        raise BadRequest(422, "'code' must be a string")
    context_id = _optional_string(body, "context_id")
    language = _optional_string(body, "language")
    if context_id is not None and language is not None:
        raise BadRequest(400, "give either 'context_id' or 'language', not both")
    env_vars = _env_vars(body)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    if context_id is not None:
        ctx = registry.get(context_id)
    else:
        starting = asyncio.ensure_future(registry.default_for(_language(language)))
        done, _ = await asyncio.wait({starting}, timeout=HEADERS_WITHIN)
        if done:
            ctx = starting.result()
        else:
            ctx = await _started_while_streaming(request, response, starting)
            if ctx is None:
                return response
    if not response.prepared:
        await response.prepare(request)
    execution = ctx.submit(code, env_vars)
    try:
        while True:
            try:
                event = await asyncio.wait_for(execution.events.get(), KEEPALIVE)
            except asyncio.TimeoutError:
                event = {"type": "keepalive"}
            if event is END:
                break
            await response.write(_line(event))
        await response.write(_line({"type": "end_of_execution"}))
        await response.write_eof()
    except (asyncio.CancelledError, ConnectionError) as e:
        log.info("client left during an execution in context %s: interrupting it", ctx.id)
        execution.stop(None)
        if isinstance(e, asyncio.CancelledError):
            raise
    return response


async def _started_while_streaming(request, response, starting):
    """A language's first kernel is still starting after HEADERS_WITHIN: start the stream (so a
    client's timeout for the response headers does not end the call) and send keepalives until it
    is up. A kernel that then fails to start ends the stream with an `error` event naming it, and
    None is returned."""
    await response.prepare(request)
    try:
        while True:
            done, _ = await asyncio.wait({starting}, timeout=KEEPALIVE)
            if done:
                break
            await response.write(_line({"type": "keepalive"}))
        return starting.result()
    except (asyncio.CancelledError, ConnectionError):
        # The kernel keeps starting: it becomes the language's default context for the next call.
        raise
    except Exception as e:
        log.error("the kernel for this execution did not start: %s", e)
        await response.write(_line({
            "type": "error",
            "name": type(e).__name__,
            "value": f"the kernel did not start: {e}",
            "traceback": "",
        }))
        await response.write(_line({"type": "end_of_execution"}))
        await response.write_eof()
        return None


def _line(event: dict) -> bytes:
    return (json.dumps(event, ensure_ascii=False, allow_nan=False, default=str) + "\n").encode()


async def list_contexts(request: web.Request) -> web.Response:
    return web.json_response([c.to_json() for c in request.app[REGISTRY].listed()])


async def create_context(request: web.Request) -> web.Response:
    body = await _json_object(request, required=False)
    language = _language(_optional_string(body, "language"))
    cwd = _optional_string(body, "cwd") or DEFAULT_CWD
    if not os.path.isabs(cwd) or "\0" in cwd:
        raise BadRequest(400, f"'cwd' must be an absolute path, not {cwd!r}")
    try:
        ctx = await request.app[REGISTRY].create(language, os.path.normpath(cwd))
    except OSError as e:
        raise BadRequest(400, f"cannot use {cwd!r} as the working directory: {e.strerror}") from None
    return web.json_response(ctx.to_json())


async def remove_context(request: web.Request) -> web.Response:
    await request.app[REGISTRY].remove(request.match_info["id"])
    return web.Response(status=204)


async def restart_context(request: web.Request) -> web.Response:
    await request.app[REGISTRY].get(request.match_info["id"]).restart()
    return web.Response(status=204)


def make_app(default_languages: tuple) -> web.Application:
    """The application; its default contexts start in the background when it starts."""
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[REGISTRY] = Registry()
    app[DEFAULTS] = default_languages

    async def lifecycle(app: web.Application):
        task = asyncio.create_task(app[REGISTRY].start_defaults(default_languages))
        yield
        task.cancel()
        await app[REGISTRY].close_all()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/health", health)
    app.router.add_post("/execute", execute)
    app.router.add_get("/contexts", list_contexts)
    app.router.add_post("/contexts", create_context)
    app.router.add_delete("/contexts/{id}", remove_context)
    app.router.add_post("/contexts/{id}/restart", restart_context)
    return app

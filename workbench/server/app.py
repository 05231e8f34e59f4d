"""The HTTP API of `workbench serve`: FastAPI routes under /v1 over one `Workbench`.

Every route but /healthz needs an API key (`Authorization: Bearer wbk_...`); a session belongs to the key that
created it, and any other key gets 404 for it. The blocking Workbench calls run in a thread pool of the app's
own (sized for many concurrent executions: anyio's default of 40 threads is not); an execution holds a thread
for as long as its cell runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

import pydantic
import pydantic_core
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..agent import Format
from ..client import Workbench
from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    RequestTooLargeError,
    SessionNotFoundError,
    TooManyExecutionsError,
    WorkbenchError,
)
from ..files import CHUNK, FileInfo
from ..results import CommandResult, ExecutionError, ExecutionResult, Output, ToolResult
from ..session import Session
from ..store import ApiKeyRecord, LogEntry, PausedState, SessionRecord
from .auth import authenticate, bearer
from .cluster import ClusterRouter, ClusterSettings, Membership, cluster_token_secret
from .errors import INTERNAL, clean_text, error_body, status_and_code
from .models import (
    CreateSession,
    ErrorBody,
    Execute,
    ExecuteTool,
    ExecuteTools,
    FilesCapacity,
    FilesUsage,
    HandleToolCall,
    HandleToolCalls,
    McpConfig,
    RenameFile,
    RunCommand,
    SearchTools,
    SessionInfo,
    ToolAnswer,
    ToolInfo,
    Updated,
    UpdateSession,
)
from .tokens import load_secret, session_token

log = logging.getLogger(__name__)
T = TypeVar("T")
_PUBLIC = {"/healthz"}
_SCHEME = "apiKey"  # the OpenAPI name of the bearer scheme
_UPLOAD_SUFFIX = "/files/content"
_STREAM_BACKLOG = 8 << 20  # characters of streamed output waiting for a slow client before more is dropped
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (401, "no API key, or an unknown or revoked one"), (404, "no such session (or another key's)"),
        (422, "the request does not fit the API"))}


class ServerSettings(BaseModel):
    """Limits of one server."""

    max_body: int = Field(default=4 << 20, ge=1024, description="bytes of a request body (JSON)")
    max_upload: int = Field(default=4 << 30, ge=1024, description="bytes of one file upload; the session's "
                            "workspace cap applies as well")
    max_executions_per_key: int = Field(default=128, ge=1, description="executions, commands and tool calls one "
                                        "API key may have running at once; past it: 429 too_many_executions")
    max_starting: int = Field(default=4, ge=1, description="sessions created at once (each starts a kernel); more "
                              "wait their turn rather than all starving the CPU past the kernels' start timeout")
    threads: int = Field(default=256, ge=8, description="threads running the Workbench's blocking calls")
    public_url: str | None = Field(default=None, description="the base URL clients reach this server by (for "
                                   "the MCP URLs of sessions); by default the one each request came to")


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _dump(value: Any) -> bytes:
    """JSON of a result, fast; text from a sandbox that is not valid Unicode (lone surrogates) is escaped."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError:
        return json.dumps(pydantic_core.to_jsonable_python(value)).encode()  # ASCII escapes keep every character


def _json(value: Any, status: int = 200) -> Response:
    return Response(_dump(value), status_code=status, media_type="application/json")


def _error_response(exc: BaseException) -> Response:
    status, code = status_and_code(exc)
    if code == INTERNAL:
        log.error("request failed", exc_info=exc)
        message = "the server failed to handle this request; it was logged there"
    else:
        message = str(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(_dump(error_body(code, message)), status_code=status, media_type="application/json",
                    headers=headers)


class _Guard:
    """Pure ASGI middleware (cheap per request): authenticates every request but /healthz and the MCP endpoints
    (which check their session tokens themselves), and caps the bytes of a request body."""

    def __init__(self, app: ASGIApp, workbench: Workbench, settings: ServerSettings) -> None:
        self.app, self.workbench, self.settings = app, workbench, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        upload = scope["method"] == "PUT" and path.endswith(_UPLOAD_SUFFIX)
        limit = self.settings.max_upload if upload else self.settings.max_body
        headers = dict(scope["headers"])
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if path not in _PUBLIC and not (path == "/mcp" or path.startswith("/mcp/")):
            token = bearer(headers.get(b"authorization", b"").decode("latin-1"))
            key = authenticate(self.workbench.store, token) if token else None
            if key is None:
                shown = "no API key given" if token is None else "unknown or revoked API key"
                await _error_response(AuthenticationError(
                    f"{shown}: send Authorization: Bearer <key> (workbench keys create NAME)"))(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = key
        if length > limit:
            await _error_response(RequestTooLargeError(
                f"the request body has {length:,} bytes; this server takes at most {limit:,}"))(scope, receive, send)
            return
        received = 0
        too_large: RequestTooLargeError | None = None
        replaced = False

        async def bounded() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = RequestTooLargeError(f"the request body has more than {limit:,} bytes; this "
                                                     f"server takes at most {limit:,}")
                    raise too_large
            return message

        async def answer(message: Message) -> None:
            # whatever the app made of a body cut short (a parse error, a half-written upload): the caller is told 413
            nonlocal replaced
            if too_large is None:
                await send(message)
            elif not replaced and message["type"] == "http.response.start":
                replaced = True
                await _error_response(too_large)(scope, receive, send)

        await self.app(scope, bounded, answer)


_EXECUTE_PATH = re.compile(r"/v1/sessions/([^/]+)/execute")  # as the route below matches it


class _LeanExecute:
    """Serves `POST /v1/sessions/{id}/execute`, the call every agent step makes, without FastAPI's per-request
    machinery (routing, dependency solving, exception middlewares): about 0.6 ms less per call on this project's
    2-core machines (benchmarks/server.py). It sits inside the key check, the body cap and the cluster's router;
    its body is validated by the same model and its errors go through the same mapping as every route's. The
    FastAPI route of the same path is its OpenAPI declaration and runs the same `handle`."""

    def __init__(self, app: ASGIApp, handle: Callable[[ApiKeyRecord, str, Execute], Awaitable[bytes]]) -> None:
        self.app, self.handle = app, handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _EXECUTE_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        key = scope.get("state", {}).get("api_key")
        if found is None or scope["method"] != "POST" or not isinstance(key, ApiKeyRecord):
            await self.app(scope, receive, send)
            return
        try:
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = _execute_body(dict(scope["headers"]).get(b"content-type"), b"".join(chunks))
            response = Response(await self.handle(key, found.group(1), body), media_type="application/json")
        except RequestValidationError as exc:
            response = _error_response(InvalidRequestError(_validation_text(exc)))
        except Exception as exc:
            response = _error_response(exc)
        await response(scope, receive, send)


def _execute_body(content_type: bytes | None, raw: bytes) -> Execute:
    """The body of an execute request, read as FastAPI reads a route's JSON body: parsed as JSON when there is no
    Content-Type or a JSON one, with `json.loads` (which takes what every JSON encoder writes, lone surrogates
    escaped too), then validated; RequestValidationError (located at `body`) when it does not fit."""
    mime = (content_type or b"application/json").decode("latin-1").split(";", 1)[0].strip().lower()
    if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
        raise RequestValidationError([{"loc": ("body",), "msg": "the body must be JSON (Content-Type: "
                                       "application/json)", "type": "model_attributes_type"}])
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RequestValidationError([{"loc": ("body", getattr(exc, "pos", 0)), "msg": "JSON decode error",
                                       "type": "json_invalid"}]) from None
    try:
        return Execute.model_validate(data)
    except pydantic.ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


class _FileStream(StreamingResponse):
    """A file's bytes, read in the thread pool; the file is closed when the response ends, however it ends (a
    client gone before the first chunk too), not whenever the garbage collector gets to it."""

    def __init__(self, handle: BinaryIO, close: Callable[[], None]) -> None:
        super().__init__(iter(functools.partial(handle.read, CHUNK), b""), media_type="application/octet-stream")
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)  # returns once no read is under way, even if cancelled
        finally:
            self._close()


def _validation_text(exc: RequestValidationError) -> str:
    """What a request that does not fit the API is told: where and why, never the input itself."""
    text = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))[:100]}: {str(e.get('msg', ''))[:200]}"
                     for e in exc.errors()[:5])
    return text or "invalid request"


class _Slots:
    """Executions running per API key, capped (thread-safe: released from worker threads)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}

    def take(self, key_id: str) -> None:
        with self._lock:
            used = self._used.get(key_id, 0)
            if used >= self.cap:
                raise TooManyExecutionsError(f"this API key has {used} executions running, the most this server "
                                             "allows at once; retry when one has ended")
            self._used[key_id] = used + 1

    def give(self, key_id: str) -> None:
        with self._lock:
            left = self._used.get(key_id, 1) - 1
            if left > 0:
                self._used[key_id] = left
            else:
                self._used.pop(key_id, None)


_LINE_BREAKS = (("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"), ("\x85".encode(), b"\\u0085"))


def _declare_bearer(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (an OpenAPI document of this app) with the API key declared as an HTTP bearer scheme, required by
    every operation but the public ones (the guard does the checking; this only tells clients and the docs page)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[_SCHEME] = {
        "type": "http", "scheme": "bearer", "bearerFormat": "wbk_...",
        "description": "an API key of this server (`workbench keys create NAME`)"}
    schema["security"] = [{_SCHEME: []}]
    for path in _PUBLIC:
        for operation in schema.get("paths", {}).get(path, {}).values():
            operation["security"] = []
    return schema


def _event(name: str, data: Any) -> bytes:
    """One server-sent event. The JSON keeps to one line for every reader: the line breaks outside ASCII that
    some split lines on (U+2028, U+2029, U+0085) are escaped as well (JSON escapes those below U+0020)."""
    payload = _dump(data)
    for raw, escaped in _LINE_BREAKS:
        payload = payload.replace(raw, escaped)
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def create_app(
    workbench: Workbench,
    *,
    settings: ServerSettings | None = None,
    secret: bytes | None = None,
    mounts: dict[str, ASGIApp] | None = None,
    lifespans: list[Callable[[], contextlib.AbstractAsyncContextManager[Any]]] | None = None,
    cluster: ClusterSettings | None = None,
) -> FastAPI:
    """The ASGI app serving `workbench`. `mounts` are more ASGI apps by path prefix (the MCP endpoint at "/mcp"),
    `lifespans` async context managers entered while the app runs (the MCP endpoint's `lifespan`); `cluster`
    makes it one replica of a cluster (see `cluster.py`). Stopping the app closes nothing of the sessions: their
    kernels and the store outlive it."""
    settings = settings or ServerSettings()
    secret = secret if secret is not None else load_secret(workbench.home)
    threads = ThreadPoolExecutor(settings.threads, thread_name_prefix="workbench-serve")
    slots = _Slots(settings.max_executions_per_key)
    starting = threading.Semaphore(settings.max_starting)
    membership = Membership(workbench, cluster) if cluster is not None else None
    lifespans = [*(lifespans or []), *([membership.running] if membership is not None else [])]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for each in lifespans:
                await stack.enter_async_context(each())
            yield
        threads.shutdown(wait=False)

    app = FastAPI(title="workbench", version="1", lifespan=lifespan, responses=_ERRORS,
                  description="Sandboxed Jupyter kernels for AI agents: sessions, executions, files, tools.")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _declare_bearer(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    for prefix, mounted in (mounts or {}).items():
        app.mount(prefix, mounted)

    async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(threads, functools.partial(fn, *args, **kwargs))

    async def running(key: ApiKeyRecord, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an execution (a cell, a command, tool calls) counted against the key's cap."""
        slots.take(key.key_id)
        try:
            return await run(fn, *args, **kwargs)
        finally:
            slots.give(key.key_id)

    def key_of(request: Request) -> ApiKeyRecord:
        key = request.scope.get("state", {}).get("api_key")
        if not isinstance(key, ApiKeyRecord):  # the guard let it through without one: never for /v1
            raise AuthenticationError("no API key given")
        return key

    owners: dict[str, str] = {}  # session id -> its key's id: set once, never changed, so kept once read

    def owned(key: ApiKeyRecord, session_id: str) -> None:
        owner = owners.get(session_id)
        if owner is None:
            owner = workbench.store.owner(session_id)
            if owner is not None and len(owners) < 1_000_000:
                owners[session_id] = owner
        if owner != key.key_id:  # another key's session is not there at all
            raise SessionNotFoundError(f"no session {session_id!r}")

    def session_of(key: ApiKeyRecord, session_id: str) -> Session:
        owned(key, session_id)
        return workbench.use(session_id)

    def info(record: SessionRecord, base: str) -> SessionInfo:
        return SessionInfo(
            **record.model_dump(exclude={"kernel"}),  # never its kernel's connection keys
            mcp=McpConfig(url=f"{base}/mcp/{record.session_id}",
                          headers={"Authorization": f"Bearer {session_token(secret, record.session_id)}"}))

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    @app.exception_handler(WorkbenchError)
    async def workbench_error(_: Request, exc: WorkbenchError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        return _error_response(InvalidRequestError(_validation_text(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return Response(_dump(error_body(code, str(exc.detail))), status_code=exc.status_code,
                        media_type="application/json")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:
        return _error_response(exc)

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, str]:
        """Whether the server is up (the one route that needs no key)."""
        return {"status": "ok"}

    @app.get("/v1/tools", response_model=list[ToolInfo], tags=["tools"])
    async def registered_tools() -> Response:
        """Every tool the served Workbench registered (a session may call those of its toolkits and tools)."""
        return _json([ToolInfo(**tool.describe()) for tool in workbench.tools.registered()])

    # sessions -------------------------------------------------------------------------------------------------

    @app.post("/v1/sessions", response_model=SessionInfo, status_code=201, tags=["sessions"])
    async def create_session(body: CreateSession, request: Request) -> Response:
        """Open a session (a kernel and a workspace) for one user; it belongs to the key that created it."""
        key, base = key_of(request), base_url(request)

        def create() -> SessionInfo:
            with starting:
                session = workbench.create(
                    body.user_id, toolkits=body.toolkits, tools=body.tools, limits=body.limits,
                    offload_threshold=body.offload_threshold, metadata=body.metadata,
                    allow_default_user=body.allow_default_user)
            try:
                workbench.store.set_owner(session.session_id, key.key_id)
            except BaseException:
                session.close(delete_workspace=True)
                raise
            return info(workbench.store.get(session.session_id), base)

        return _json(await run(create), 201)

    @app.get("/v1/sessions", response_model=list[SessionInfo], tags=["sessions"])
    async def list_sessions(request: Request, user_id: str | None = None,
                            metadata: list[str] = Query(default=[], description="KEY=VALUE, repeatable")) -> Response:
        """The key's open sessions, of one user, and with every `metadata` key at the value given."""
        key, base = key_of(request), base_url(request)
        wanted: dict[str, str] = {}
        for pair in metadata:
            name, sep, value = pair.partition("=")
            if not sep:
                raise InvalidRequestError(f"metadata filters are KEY=VALUE, not {clean_text(pair, 100)!r}")
            wanted[name] = value

        def listed() -> list[SessionInfo]:
            return [info(r, base) for r in workbench.store.list(user_id=user_id, metadata=wanted, owner=key.key_id)]

        return _json(await run(listed))

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    async def get_session(session_id: str, request: Request) -> Response:
        """A session's record (open or closed) and its MCP endpoint."""
        key, base = key_of(request), base_url(request)

        def get() -> SessionInfo:
            owned(key, session_id)
            return info(workbench.store.get(session_id), base)

        return _json(await run(get))

    @app.patch("/v1/sessions/{session_id}", response_model=Updated, tags=["sessions"])
    async def update_session(session_id: str, body: UpdateSession, request: Request) -> Response:
        """Change a session's config; 409 `conflict` when `config_version` is not the stored one."""
        key = key_of(request)

        def update() -> Updated:
            version = session_of(key, session_id).update(
                toolkits=body.toolkits, tools=body.tools, limits=body.limits,
                offload_threshold=body.offload_threshold, metadata=body.metadata,
                restart_if_needed=body.restart_if_needed, config_version=body.config_version)
            return Updated(config_version=version)

        return _json(await run(update))

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
    async def close_session(session_id: str, request: Request, delete_workspace: bool = False) -> Response:
        """Close a session: its kernel stops; its workspace is kept unless `delete_workspace`."""
        key = key_of(request)

        def close() -> None:
            owned(key, session_id)
            if workbench.store.get(session_id).status == "open":
                workbench.use(session_id).close(delete_workspace=delete_workspace)

        await run(close)
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/restart", status_code=204, tags=["sessions"])
    async def restart_session(session_id: str, request: Request) -> Response:
        """Restart the kernel: variables are lost, the workspace is kept."""
        key = key_of(request)
        await run(lambda: session_of(key, session_id).restart())
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/pause", response_model=PausedState, tags=["sessions"])
    async def pause_session(session_id: str, request: Request) -> Response:
        """Save the kernel's variables into the workspace and stop the kernel (see `Session.pause`)."""
        key = key_of(request)
        return _json(await run(lambda: session_of(key, session_id).pause()))

    @app.post("/v1/sessions/{session_id}/resume", status_code=204, tags=["sessions"])
    async def resume_session(session_id: str, request: Request) -> Response:
        """Start a paused session's kernel and restore its variables now."""
        key = key_of(request)
        await run(lambda: session_of(key, session_id).resume())
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/fork", response_model=SessionInfo, status_code=201, tags=["sessions"])
    async def fork_session(session_id: str, request: Request) -> Response:
        """A new session with a copy of this one's config, workspace and variables; it belongs to the same key."""
        key, base = key_of(request), base_url(request)

        def fork() -> SessionInfo:
            with starting:
                forked = session_of(key, session_id).fork()
            try:
                workbench.store.set_owner(forked.session_id, key.key_id)
            except BaseException:
                forked.close(delete_workspace=True)
                raise
            return info(workbench.store.get(forked.session_id), base)

        return _json(await run(fork), 201)

    @app.get("/v1/sessions/{session_id}/notebook", tags=["sessions"],
             responses={200: {"content": {"application/x-ipynb+json": {}}}})
    async def session_notebook(session_id: str, request: Request) -> Response:
        """Every execution of the session with its outputs, as a Jupyter notebook (nbformat v4)."""
        key = key_of(request)
        text = await run(lambda: session_of(key, session_id).notebook())
        return Response(text, media_type="application/x-ipynb+json")

    @app.get("/v1/sessions/{session_id}/logs", response_model=list[LogEntry], tags=["sessions"])
    async def session_logs(session_id: str, request: Request, limit: int = Query(1000, ge=1, le=100_000)
                           ) -> Response:
        """The session's executions, commands and tool calls, oldest first."""
        key = key_of(request)
        return _json(await run(lambda: session_of(key, session_id).logs(limit)))

    # executions and commands ----------------------------------------------------------------------------------

    def streamed(key: ApiKeyRecord, work: Callable[[Callable[[str, Any], None]], BaseModel]) -> StreamingResponse:
        """Server-sent events of one execution: `stdout`, `stderr`, `result`, `error` as they come, then `done`
        (the whole result) or `failure` (an error body). The work runs on whatever becomes of the client: a client
        that goes away leaves the cell to finish (its timeout bounds it), and the session usable."""
        slots.take(key.key_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        backlog = [0, False]  # characters queued and not sent; whether some were dropped

        def emit(name: str, data: Any) -> None:
            size = len(data.get("text", "")) if isinstance(data, dict) else 0
            if name in ("stdout", "stderr"):
                if backlog[0] + size > _STREAM_BACKLOG:
                    if not backlog[1]:
                        backlog[1] = True
                        loop.call_soon_threadsafe(queue.put_nowait, ("notice", {
                            "text": "the client reads more slowly than the cell writes: streamed output was dropped "
                                    "(the final result holds it, bounded as always)"}))
                    return
                backlog[0] += size
            loop.call_soon_threadsafe(queue.put_nowait, (name, data))

        def job() -> None:
            try:
                result = work(emit)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except BaseException as exc:
                status, code = status_and_code(exc)
                if code == INTERNAL:
                    log.error("streamed execution failed", exc_info=exc)
                message = str(exc) if code != INTERNAL else "the server failed; it was logged there"
                loop.call_soon_threadsafe(queue.put_nowait, ("failure", {**error_body(code, message),
                                                                         "status": status}))
            finally:
                slots.give(key.key_id)

        threads.submit(job)

        async def events() -> AsyncIterator[bytes]:
            while True:
                name, data = await queue.get()
                if name in ("stdout", "stderr"):
                    backlog[0] -= len(data["text"])
                yield _event(name, data)
                if name in ("done", "failure"):
                    return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def execute_json(key: ApiKeyRecord, session_id: str, body: Execute) -> bytes:
        return _dump(await running(key, lambda: session_of(key, session_id).execute(body.code, timeout=body.timeout)))

    @app.post("/v1/sessions/{session_id}/execute", response_model=ExecutionResult, tags=["executions"])
    async def execute(session_id: str, body: Execute, request: Request) -> Response:
        """Run code in the session's kernel; the whole result when the cell has ended."""
        return Response(await execute_json(key_of(request), session_id, body), media_type="application/json")

    @app.post("/v1/sessions/{session_id}/execute/stream", tags=["executions"],
              responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}})
    async def execute_stream(session_id: str, body: Execute, request: Request) -> Response:
        """Run code; its output as server-sent events while it runs (`stdout`, `stderr`, `result`, `error`), then
        `done` with the whole `ExecutionResult` (or `failure` with an error body)."""
        key = key_of(request)
        session = await run(session_of, key, session_id)  # a bad session is a plain error, not a stream

        def work(emit: Callable[[str, Any], None]) -> BaseModel:
            def on_result(output: Output) -> None:
                emit("result", output)

            def on_error(error: ExecutionError) -> None:
                emit("error", error)

            return session.execute(body.code, timeout=body.timeout,
                                   on_stdout=lambda text: emit("stdout", {"text": text}),
                                   on_stderr=lambda text: emit("stderr", {"text": text}),
                                   on_result=on_result, on_error=on_error)

        return streamed(key, work)

    @app.post("/v1/sessions/{session_id}/commands", response_model=CommandResult, tags=["executions"])
    async def run_command(session_id: str, body: RunCommand, request: Request) -> Response:
        """Run a shell command in the session's sandbox, beside the kernel."""
        key = key_of(request)
        return _json(await running(key, lambda: session_of(key, session_id).commands.run(
            body.cmd, timeout=body.timeout, cwd=body.cwd, env=body.env)))

    @app.post("/v1/sessions/{session_id}/commands/stream", tags=["executions"],
              responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}})
    async def run_command_stream(session_id: str, body: RunCommand, request: Request) -> Response:
        """Run a shell command; `stdout` and `stderr` events as it writes, then `done` with the `CommandResult`."""
        key = key_of(request)
        session = await run(session_of, key, session_id)
        return streamed(key, lambda emit: session.commands.run(
            body.cmd, timeout=body.timeout, cwd=body.cwd, env=body.env,
            on_stdout=lambda text: emit("stdout", {"text": text}),
            on_stderr=lambda text: emit("stderr", {"text": text})))

    # files ----------------------------------------------------------------------------------------------------

    @app.get("/v1/sessions/{session_id}/files", response_model=list[FileInfo], tags=["files"])
    async def list_files(session_id: str, request: Request, path: str = ".", recursive: bool = False) -> Response:
        """The entries of a workspace folder (all the way down with `recursive`); a file lists itself."""
        key = key_of(request)
        return _json(await run(lambda: session_of(key, session_id).files.list(path, recursive)))

    @app.get("/v1/sessions/{session_id}/files/exists", tags=["files"])
    async def file_exists(session_id: str, request: Request, path: str) -> dict[str, bool]:
        """Whether a file, folder or symlink is at `path`."""
        key = key_of(request)
        return {"exists": await run(lambda: session_of(key, session_id).files.exists(path))}

    @app.get("/v1/sessions/{session_id}/files/content", tags=["files"],
             responses={200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}})
    async def download(session_id: str, request: Request, path: str) -> Response:
        """A workspace file's bytes, streamed."""
        key = key_of(request)
        stack = contextlib.ExitStack()

        def open_file() -> Any:
            return stack.enter_context(session_of(key, session_id).files.open(path))

        return _FileStream(await run(open_file), stack.close)

    @app.put("/v1/sessions/{session_id}/files/content", response_model=FileInfo, tags=["files"],
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}})
    async def upload(session_id: str, request: Request, path: str) -> Response:
        """Write a workspace file from the request body, streamed; replaced atomically, within the workspace's
        size cap (507 `workspace_full` past it)."""
        key = key_of(request)
        writer = await run(lambda: session_of(key, session_id).files.writer(path))
        try:
            pending: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                pending.append(chunk)
                size += len(chunk)
                if size >= CHUNK:
                    await run(writer.write, b"".join(pending))
                    pending, size = [], 0
            if pending:
                await run(writer.write, b"".join(pending))
            await run(writer.close)
        except BaseException:
            await run(writer.abort)
            raise
        return _json(writer.info)

    @app.delete("/v1/sessions/{session_id}/files", status_code=204, tags=["files"])
    async def remove_file(session_id: str, request: Request, path: str) -> Response:
        """Remove a file, a symlink or a folder with everything in it."""
        key = key_of(request)
        await run(lambda: session_of(key, session_id).files.remove(path))
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/files/rename", response_model=FileInfo, tags=["files"])
    async def rename_file(session_id: str, body: RenameFile, request: Request) -> Response:
        """Give an entry another name in its folder (a link is renamed itself); an entry of that name is
        replaced."""
        key = key_of(request)
        return _json(await run(lambda: session_of(key, session_id).files.rename(body.path, body.new_name)))

    @app.get("/v1/sessions/{session_id}/files/usage", response_model=FilesUsage, tags=["files"])
    async def files_usage(session_id: str, request: Request) -> Response:
        """Bytes held by the workspace's files."""
        key = key_of(request)
        return _json(FilesUsage(used=await run(lambda: session_of(key, session_id).files.usage())))

    @app.get("/v1/sessions/{session_id}/files/capacity", response_model=FilesCapacity, tags=["files"])
    async def files_capacity(session_id: str, request: Request) -> Response:
        """The workspace's size cap in bytes."""
        key = key_of(request)
        return _json(FilesCapacity(capacity=await run(lambda: session_of(key, session_id).files.capacity())))

    # tools ----------------------------------------------------------------------------------------------------

    @app.get("/v1/sessions/{session_id}/tools", response_model=list[ToolInfo], tags=["tools"])
    async def available_tools(session_id: str, request: Request) -> Response:
        """The tools the session may call, with their argument schemas."""
        key = key_of(request)
        return _json(await run(lambda: [ToolInfo(**tool.describe())
                                        for tool in session_of(key, session_id).available_tools()]))

    @app.get("/v1/sessions/{session_id}/tools/definitions", tags=["tools"])
    async def tool_definitions(session_id: str, request: Request, format: Format = "openai",
                               include_tools: bool = False) -> Response:
        """The meta tools (and with `include_tools` the session's tools) as tool definitions for a model:
        `format` openai, openai_responses, anthropic or mcp (langchain tools are built by the client)."""
        key = key_of(request)
        if format == "langchain":
            raise InvalidRequestError("format must be one of openai, openai_responses, anthropic, mcp "
                                      "(LangChain tools are made by the client, over handle_tool_call)")
        return _json(await run(lambda: session_of(key, session_id).tools(format, include_tools=include_tools)))

    @app.post("/v1/sessions/{session_id}/tools/search", response_model=ToolAnswer, tags=["tools"])
    async def search_tools(session_id: str, body: SearchTools, request: Request) -> Response:
        """The session's tools that fit each use case best (the WORKBENCH_SEARCH_TOOLS meta tool's answer)."""
        key = key_of(request)
        answer = await run(lambda: session_of(key, session_id).answer_tool_call(
            "WORKBENCH_SEARCH_TOOLS", {"queries": body.queries}))
        return _json(ToolAnswer(text=answer.text, is_error=answer.is_error))

    @app.post("/v1/sessions/{session_id}/tools/execute", response_model=ToolResult, tags=["tools"])
    async def execute_tool(session_id: str, body: ExecuteTool, request: Request) -> Response:
        """Run one of the host's tools for the session; a large response goes to the workspace."""
        key = key_of(request)
        return _json(await running(key, lambda: session_of(key, session_id).execute_tool(
            body.slug, body.arguments, sync_to_workbench=body.sync_to_workbench, timeout=body.timeout,
            inline_limit=body.inline_limit)))

    @app.post("/v1/sessions/{session_id}/tools/execute_many", response_model=list[ToolResult], tags=["tools"])
    async def execute_tools(session_id: str, body: ExecuteTools, request: Request) -> Response:
        """Run several tool calls concurrently; results in the calls' order."""
        key = key_of(request)
        return _json(await running(key, lambda: session_of(key, session_id).execute_tools(
            [(call.slug, call.arguments) for call in body.calls], sync_to_workbench=body.sync_to_workbench,
            max_workers=body.max_workers, timeout=body.timeout, inline_limit=body.inline_limit)))

    @app.post("/v1/sessions/{session_id}/tool_calls", response_model=ToolAnswer, tags=["tools"])
    async def handle_tool_call(session_id: str, body: HandleToolCall, request: Request) -> Response:
        """Answer one tool call a model made, with the text the model reads (errors are answers, never raised)."""
        key = key_of(request)
        answer = await running(key, lambda: session_of(key, session_id).answer_tool_call(body.name, body.arguments))
        return _json(ToolAnswer(text=answer.text, is_error=answer.is_error))

    @app.post("/v1/sessions/{session_id}/tool_calls/response", tags=["tools"])
    async def handle_tool_calls(session_id: str, body: HandleToolCalls, request: Request) -> Response:
        """Run every call in a model's response that names one of the session's tools; the result messages in
        that provider's shape."""
        key = key_of(request)
        return _json(await running(key, lambda: session_of(key, session_id).handle_tool_calls(
            body.response, include_tools=body.include_tools)))

    # the first added runs innermost: the key check, then the cluster's router, then the lean execute route
    app.add_middleware(_LeanExecute, handle=execute_json)
    if membership is not None:
        app.add_middleware(ClusterRouter, membership=membership, per_key=settings.max_executions_per_key)
    app.add_middleware(_Guard, workbench=workbench, settings=settings)
    return app


def build_app(workbench: Workbench, settings: ServerSettings | None = None,
              cluster: ClusterSettings | None = None) -> FastAPI:
    """The app `workbench serve` runs: the HTTP API, and the per-session MCP endpoints at /mcp; with `cluster`,
    as one replica of a cluster (its MCP tokens are then made with a key every replica derives alike)."""
    from .mcp import McpEndpoint

    secret = load_secret(workbench.home) if cluster is None else cluster_token_secret(cluster)
    endpoint = McpEndpoint(workbench, secret)
    mounts: dict[str, ASGIApp] = {"/mcp": endpoint}
    lifespans: list[Callable[[], contextlib.AbstractAsyncContextManager[Any]]] = [endpoint.lifespan]
    return create_app(workbench, settings=settings, secret=secret, mounts=mounts, lifespans=lifespans,
                      cluster=cluster)


"""Clients of `workbench serve` with the API of `Workbench` and `Session`: `RemoteWorkbench` (sync) and
`AsyncRemoteWorkbench` (asyncio), on httpx.

    wb = RemoteWorkbench("http://127.0.0.1:8642", api_key="wbk_...")   # or WORKBENCH_URL and WORKBENCH_API_KEY
    with wb.create(user_id="user_123") as s:
        print(s.execute("1 + 1").text)

Results are the library's own models (`ExecutionResult`, `ToolResult`, ...), and errors the same exception classes
(`SessionNotFoundError`, `ConflictError`, ...), turned back from the server's stable error codes. Tools run where
the server runs: they are registered in the app it serves (`workbench serve --app module:wb`), not by the client.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path, PurePath
from typing import Any, BinaryIO, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from .agent import Answer, Definition, Format, render
from .config import Limits
from .errors import ServerError, SessionError, SessionNotFoundError, WorkbenchError
from .files import FileInfo
from .results import CommandResult, ExecutionError, ExecutionResult, Output, ToolResult
from .server.errors import exception_for
from .server.models import McpConfig, SessionInfo, ToolInfo
from .store import LogEntry, PausedState, SessionConfig, SessionRecord

DEFAULT_URL = "http://127.0.0.1:8642"
CHUNK = 1 << 20
M = TypeVar("M")
F = TypeVar("F", bound=Callable[..., Any])
_SESSIONS = TypeAdapter(list[SessionInfo])
_FILES = TypeAdapter(list[FileInfo])
_TOOL_RESULTS = TypeAdapter(list[ToolResult])
_TOOLS = TypeAdapter(list[ToolInfo])
_LOGS = TypeAdapter(list[LogEntry])
_STREAMED = {"stdout", "stderr", "result", "error", "notice"}


def _settings(url: str | None, api_key: str | None) -> tuple[str, str]:
    url = url or os.environ.get("WORKBENCH_URL") or DEFAULT_URL
    api_key = api_key or os.environ.get("WORKBENCH_API_KEY")
    if not api_key:
        raise WorkbenchError("no API key: pass api_key= or set WORKBENCH_API_KEY (made by `workbench keys create`)")
    return url.rstrip("/"), api_key


def _check(response: httpx.Response) -> httpx.Response:
    """The response, or the exception of its error code."""
    if response.status_code < 400:
        return response
    try:
        body = response.json()
    except ValueError:
        body = response.text[:500]
    raise exception_for(response.status_code, body)


def _timeout(seconds: float | None) -> httpx.Timeout:
    """For a call that waits on a cell or a command: no read timeout unless the caller set one (plus a margin)."""
    return httpx.Timeout(30.0, read=None if seconds is None else seconds + 60.0)


def _no_tool(slug: str | None) -> WorkbenchError:
    return WorkbenchError(
        f"the server has no tool {slug!r} in this toolkit: tools run where the server runs, so register it in the "
        "module `workbench serve --app` loads (a remote client cannot send a Python function to the server)")


def _plain_response(response: Any) -> dict[str, Any]:
    """A model's response (an SDK object or a dict) as JSON for the server."""
    dump = getattr(response, "model_dump", None)
    data = dump(mode="json") if callable(dump) else response
    if not isinstance(data, dict):
        raise WorkbenchError(f"not a model response: {type(response).__name__}")
    return data


def _update_body(toolkits: list[str] | None, tools: list[str] | None, limits: Limits | dict[str, Any] | None,
                 offload_threshold: int | None, metadata: dict[str, str] | None, restart_if_needed: bool,
                 config_version: int | None) -> dict[str, Any]:
    if isinstance(limits, Limits):
        limits = limits.model_dump(exclude_unset=True)
    return {"toolkits": toolkits, "tools": tools, "limits": limits, "offload_threshold": offload_threshold,
            "metadata": metadata, "restart_if_needed": restart_if_needed, "config_version": config_version}


def _create_body(user_id: str, toolkits: list[str] | None, tools: list[str] | None,
                 limits: Limits | dict[str, Any] | None, offload_threshold: int | None, metadata: dict[str, str] | None,
                 allow_default_user: bool) -> dict[str, Any]:
    if isinstance(limits, Limits):
        limits = limits.model_dump(exclude_unset=True)
    return {"user_id": user_id, "toolkits": toolkits, "tools": tools, "limits": limits,
            "offload_threshold": offload_threshold, "metadata": metadata, "allow_default_user": allow_default_user}


def _list_params(user_id: str | None, metadata: dict[str, str] | None) -> list[tuple[str, str]]:
    params = [("user_id", user_id)] if user_id is not None else []
    return params + [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]


def _sse_lines(lines: Iterable[str], dispatch: Callable[[str, Any], Any]) -> Any:
    """Read server-sent events; `dispatch(name, data)` returns a final value for `done`."""
    name, data = "message", []
    for line in lines:
        if line:
            field, _, value = line.partition(":")
            if field == "event":
                name = value.strip()
            elif field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            continue
        if data:
            found = dispatch(name, json.loads("\n".join(data)))
            if found is not None:
                return found
        name, data = "message", []
    raise ServerError("the server closed the stream before the result")


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of an event stream, split at LF only (text's other line breaks are data)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.decode()


async def _alines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.decode()


def _final(name: str, data: Any, model: type[BaseModel]) -> BaseModel | None:
    if name == "done":
        return model.model_validate(data)
    if name == "failure":
        raise exception_for(int(data.get("status", 500)), data)
    return None


def _streamed_callback(callbacks: dict[str, Callable[[Any], Any] | None], name: str, data: Any) -> Any:
    """The callback of a streamed event, with its argument (None when nobody listens)."""
    callback = callbacks.get(name)
    if callback is None:
        return None, None
    if name in ("stdout", "stderr"):
        return callback, data["text"]
    if name == "result":
        return callback, Output.model_validate(data)
    if name == "error":
        return callback, ExecutionError.model_validate(data)
    return None, None


def _chunks(data: bytes | str | BinaryIO | Iterable[bytes]) -> bytes | Iterator[bytes]:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    read = getattr(data, "read", None)
    if callable(read):
        return _read_chunks(read)
    return (chunk.encode() if isinstance(chunk, str) else bytes(chunk) for chunk in data)


def _read_chunks(read: Callable[[int], bytes | str]) -> Iterator[bytes]:
    """A file object's content in chunks (a text file's as UTF-8)."""
    while chunk := read(CHUNK):
        yield chunk.encode() if isinstance(chunk, str) else chunk


# the HTTP side ------------------------------------------------------------------------------------------------


class _Channel:
    """Requests to one server with one key; failures turned into workbench's exceptions."""

    def __init__(self, http: httpx.Client, url: str) -> None:
        self.http, self.url = http, url

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return _check(self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach the workbench server at {self.url}: {exc}") from exc

    def session(self, session_id: str) -> _SessionChannel:
        return _SessionChannel(self, session_id)


class _SessionChannel:
    """Requests about one session (paths below /v1/sessions/{id})."""

    def __init__(self, channel: _Channel, session_id: str) -> None:
        self.channel, self.path = channel, f"/v1/sessions/{_id(session_id)}"

    def request(self, method: str, path: str = "", **kwargs: Any) -> httpx.Response:
        return self.channel.request(method, self.path + path, **kwargs)

    def info(self) -> SessionInfo:
        return SessionInfo.model_validate_json(self.request("GET").content)

    def events(self, path: str, body: dict[str, Any], model: type[M], callbacks: dict[str, Any],
               timeout: float | None) -> M:
        """POST and follow the server-sent events to the final result, calling back for each output."""
        def dispatch(name: str, data: Any) -> Any:
            callback, value = _streamed_callback(callbacks, name, data)
            if callback is not None:
                callback(value)
            return _final(name, data, model)  # type: ignore[arg-type]

        try:
            with self.channel.http.stream("POST", self.path + path, json=body,
                                          timeout=_timeout(timeout)) as response:
                if response.status_code >= 400:
                    response.read()
                    _check(response)
                return _sse_lines(_lines(response.iter_bytes()), dispatch)  # type: ignore[no-any-return]
        except httpx.TransportError as exc:
            raise ServerError(f"lost the workbench server at {self.channel.url}: {exc}") from exc

    @contextlib.contextmanager
    def download(self, path: str, params: dict[str, Any]) -> Iterator[httpx.Response]:
        """A GET whose body is streamed (checked for an error first)."""
        with self.channel.http.stream("GET", self.path + path, params=params, timeout=_timeout(None)) as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            yield response


class _AsyncChannel:
    """`_Channel` on an async httpx client."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http, self.url = http, url

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return _check(await self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach the workbench server at {self.url}: {exc}") from exc

    def session(self, session_id: str) -> _AsyncSessionChannel:
        return _AsyncSessionChannel(self, session_id)


class _AsyncSessionChannel:
    """`_SessionChannel` on an async httpx client; callbacks may be coroutines."""

    def __init__(self, channel: _AsyncChannel, session_id: str) -> None:
        self.channel, self.path = channel, f"/v1/sessions/{_id(session_id)}"

    async def request(self, method: str, path: str = "", **kwargs: Any) -> httpx.Response:
        return await self.channel.request(method, self.path + path, **kwargs)

    async def info(self) -> SessionInfo:
        return SessionInfo.model_validate_json((await self.request("GET")).content)

    async def events(self, path: str, body: dict[str, Any], model: type[M], callbacks: dict[str, Any],
                     timeout: float | None) -> M:
        try:
            async with self.channel.http.stream("POST", self.path + path, json=body,
                                                timeout=_timeout(timeout)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _check(response)
                name, data = "message", []
                async for line in _alines(response.aiter_bytes()):
                    if line:
                        field, _, value = line.partition(":")
                        if field == "event":
                            name = value.strip()
                        elif field == "data":
                            data.append(value[1:] if value.startswith(" ") else value)
                        continue
                    if data:
                        parsed = json.loads("\n".join(data))
                        callback, argument = _streamed_callback(callbacks, name, parsed)
                        if callback is not None:
                            given = callback(argument)
                            if inspect.isawaitable(given):
                                await given
                        found = _final(name, parsed, model)  # type: ignore[arg-type]
                        if found is not None:
                            return found  # type: ignore[return-value]
                    name, data = "message", []
        except httpx.TransportError as exc:
            raise ServerError(f"lost the workbench server at {self.channel.url}: {exc}") from exc
        raise ServerError("the server closed the stream before the result")


# sync ---------------------------------------------------------------------------------------------------------


class RemoteWorkbench:
    """`Workbench` over HTTP: the sessions of a `workbench serve` server, as the API key given may see them.

    `url` and `api_key` default to WORKBENCH_URL (else http://127.0.0.1:8642) and WORKBENCH_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 http: httpx.Client | None = None) -> None:
        self.url, api_key = _settings(url, api_key)
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64))
        self.http.headers["Authorization"] = f"Bearer {api_key}"
        self._channel = _Channel(self.http, self.url)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._channel.request(method, path, **kwargs)

    def create(self, user_id: str, *, toolkits: list[str] | None = None, tools: list[str] | None = None,
               limits: Limits | dict[str, Any] | None = None, offload_threshold: int | None = None,
               metadata: dict[str, str] | None = None, allow_default_user: bool = False,
               from_session: str | None = None) -> RemoteSession:
        """Open a new session on the server, or fork one (see `Workbench.create`)."""
        if from_session is not None:
            _check_fork(toolkits, tools, limits, offload_threshold, metadata)
            source = self.use(from_session)
            if source.user_id != user_id:
                raise SessionNotFoundError(f"no session {from_session!r} of user {user_id!r}")
            return source.fork()
        body = _create_body(user_id, toolkits, tools, limits, offload_threshold, metadata, allow_default_user)
        response = self._request("POST", "/v1/sessions", json=body, timeout=_timeout(None))  # a kernel starts
        info = SessionInfo.model_validate_json(response.content)
        return RemoteSession(self._channel.session(info.session_id), info)

    def use(self, session_id: str) -> RemoteSession:
        """The session with this id (of this API key); SessionClosedError when it is closed."""
        channel = self._channel.session(session_id)
        session = RemoteSession(channel, channel.info())
        if session.status != "open":
            from .errors import SessionClosedError

            raise SessionClosedError(f"session {session_id} is closed")
        return session

    def list(self, user_id: str | None = None, metadata: dict[str, str] | None = None) -> list[SessionRecord]:
        """The key's open sessions, of one user, and with every `metadata` key at the value given."""
        found = _SESSIONS.validate_json(self._request("GET", "/v1/sessions",
                                                      params=_list_params(user_id, metadata)).content)
        return list(found)

    def tool(self, slug: str | None = None, *, toolkit: str = "default",
             description: str | None = None) -> Callable[[F], F]:
        """Tools run on the server, registered by the app it serves (`workbench serve --app module:wb`): a client
        cannot send one. This checks that the server has a tool of this slug in this toolkit and returns the
        function unchanged (the server's tool is what runs, never this function); WorkbenchError otherwise."""
        def check(fn: F) -> F:
            name = slug or fn.__name__
            served = {(t.slug, t.toolkit) for t in _TOOLS.validate_json(self._request("GET", "/v1/tools").content)}
            if (name, toolkit) not in served:
                raise _no_tool(name)
            return fn

        return check

    def close(self) -> None:
        """Close the HTTP connections (the sessions live on, on the server)."""
        self.http.close()

    def __enter__(self) -> RemoteWorkbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_fork(*settings: object) -> None:
    if any(value is not None for value in settings):
        raise SessionError("a fork copies its source's config and metadata: leave the other settings out and change "
                           "them with update() afterwards")


def _id(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id or "/" in session_id or session_id in (".", ".."):
        from .errors import SessionNotFoundError

        raise SessionNotFoundError(f"no session {session_id!r}")
    return session_id


class _SessionState:
    """What a remote session knows of itself, shared by the sync and async twins."""

    def __init__(self, info: SessionInfo) -> None:
        self._set(info)
        self.closed = False

    def _set(self, info: SessionInfo) -> None:
        self.session_id = info.session_id
        self.user_id = info.user_id
        self.status = info.status
        self.config: SessionConfig = info.config
        self.config_version = info.config_version
        self.mcp: McpConfig | None = info.mcp
        """The session's MCP endpoint: `mcp.url` and the `mcp.headers` to send (its bearer token)."""
        self.replica: str | None = info.replica
        """In a cluster, the replica whose host runs the session (None on a lone server)."""
        self._paused = info.paused is not None

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(session_id={self.session_id!r}, user_id={self.user_id!r})"


class RemoteSession(_SessionState):
    """`Session` over HTTP. Executions on one session run one at a time, in order, on the server."""

    def __init__(self, channel: _SessionChannel, info: SessionInfo) -> None:
        super().__init__(info)
        self._channel = channel
        self.files = RemoteFiles(channel)
        self.commands = RemoteCommands(channel)

    @property
    def metadata(self) -> dict[str, str]:
        """The session's metadata, as stored now."""
        self._set(self._channel.info())
        return self.config.metadata

    def execute(self, code: str, *, timeout: float | None = None, on_stdout: Callable[[str], Any] | None = None,
                on_stderr: Callable[[str], Any] | None = None, on_result: Callable[[Output], Any] | None = None,
                on_error: Callable[[ExecutionError], Any] | None = None) -> ExecutionResult:
        """Run code in the session's kernel (see `Session.execute`); with callbacks, output streams as it comes."""
        body = {"code": code, "timeout": timeout}
        callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}
        if any(callbacks.values()):
            return self._channel.events("/execute/stream", body, ExecutionResult, callbacks, timeout)
        return ExecutionResult.model_validate_json(
            self._channel.request("POST", "/execute", json=body, timeout=_timeout(timeout)).content)

    def update(self, *, toolkits: list[str] | None = None, tools: list[str] | None = None,
               limits: Limits | dict[str, Any] | None = None, offload_threshold: int | None = None,
               metadata: dict[str, str] | None = None, restart_if_needed: bool = False,
               config_version: int | None = None) -> int:
        """Change the session's config (see `Session.update`): ConflictError when it changed since this object
        read it (or since `config_version`)."""
        expected = self.config_version if config_version is None else config_version
        body = _update_body(toolkits, tools, limits, offload_threshold, metadata, restart_if_needed, expected)
        self._channel.request("PATCH", json=body, timeout=_timeout(None))
        self._set(self._channel.info())
        return self.config_version

    def execute_tool(self, slug: str, arguments: dict[str, Any] | None = None, *, sync_to_workbench: bool = False,
                     timeout: float | None = None, inline_limit: int | None = None) -> ToolResult:
        """Run one of the server's tools for this session (see `Session.execute_tool`)."""
        body = {"slug": slug, "arguments": arguments, "sync_to_workbench": sync_to_workbench, "timeout": timeout,
                "inline_limit": inline_limit}
        return ToolResult.model_validate_json(
            self._channel.request("POST", "/tools/execute", json=body, timeout=_timeout(timeout)).content)

    def execute_tools(self, calls: list[tuple[str, dict[str, Any]]], *, sync_to_workbench: bool = False,
                      max_workers: int = 8, timeout: float | None = None,
                      inline_limit: int | None = None) -> list[ToolResult]:
        """Run several tool calls concurrently on the server; results in the calls' order."""
        body = {"calls": [{"slug": slug, "arguments": arguments} for slug, arguments in calls],
                "sync_to_workbench": sync_to_workbench, "max_workers": max_workers, "timeout": timeout,
                "inline_limit": inline_limit}
        return _TOOL_RESULTS.validate_json(
            self._channel.request("POST", "/tools/execute_many", json=body, timeout=_timeout(timeout)).content)

    def available_tools(self) -> list[ToolInfo]:
        """The tools this session may call (slug, toolkit, description, argument schema)."""
        return _TOOLS.validate_json(self._channel.request("GET", "/tools").content)

    def tools(self, format: Format = "openai", *, include_tools: bool = False) -> list[Any]:
        """The meta tools as tool definitions for a model (see `Session.tools`); "langchain" tools answer through
        the server."""
        if format == "langchain":
            found = self._channel.request("GET", "/tools/definitions", params={"format": "mcp",
                                                                        "include_tools": include_tools}).json()
            return render([Definition(d["name"], d["description"], d["inputSchema"]) for d in found], format,
                          self.answer_tool_call)
        return self._channel.request("GET", "/tools/definitions", params={"format": format,  # type: ignore[no-any-return]
                                                                   "include_tools": include_tools}).json()

    def answer_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> Answer:
        """`handle_tool_call`, with whether the answer reports an error."""
        found = self._channel.request("POST", "/tool_calls", json={"name": name, "arguments": arguments},
                              timeout=_timeout(None)).json()
        return Answer(found["text"], bool(found["is_error"]))

    def handle_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> str:
        """Answer one tool call a model made: the text the model reads (see `Session.handle_tool_call`)."""
        return self.answer_tool_call(name, arguments).text

    def handle_tool_calls(self, response: Any, *, include_tools: bool = False) -> list[dict[str, Any]]:
        """Run the calls in a model's response on the server; the result messages (see
        `Session.handle_tool_calls`)."""
        body = {"response": _plain_response(response), "include_tools": include_tools}
        return self._channel.request("POST", "/tool_calls/response", json=body,  # type: ignore[no-any-return]
                             timeout=_timeout(None)).json()

    def logs(self, limit: int = 1000) -> list[LogEntry]:
        """The session's executions and tool calls, oldest first."""
        return _LOGS.validate_json(self._channel.request("GET", "/logs", params={"limit": limit}).content)

    def restart(self) -> None:
        """Restart the kernel: variables are lost, the workspace is kept."""
        self._channel.request("POST", "/restart", timeout=_timeout(None))

    @property
    def paused(self) -> bool:
        """True while the session sleeps (see `Session.paused`)."""
        self._set(self._channel.info())
        return self.status == "open" and self._paused

    def pause(self) -> PausedState:
        """Save the variables and stop the kernel (see `Session.pause`)."""
        return PausedState.model_validate_json(self._channel.request("POST", "/pause", timeout=_timeout(None)).content)

    def resume(self) -> None:
        """Start the kernel and restore the variables now (see `Session.resume`)."""
        self._channel.request("POST", "/resume", timeout=_timeout(None))

    def fork(self) -> RemoteSession:
        """A copy of this session, variables included (see `Session.fork`); it belongs to the same key."""
        info = SessionInfo.model_validate_json(self._channel.request("POST", "/fork", timeout=_timeout(None)).content)
        return RemoteSession(self._channel.channel.session(info.session_id), info)

    def notebook(self) -> str:
        """The session's executions and outputs as a Jupyter notebook (see `Session.notebook`)."""
        return self._channel.request("GET", "/notebook", timeout=_timeout(None)).text

    def export_notebook(self, path: str | Path) -> Path:
        """Write the session's notebook at `path` on this machine; returns the path."""
        target = Path(path)
        target.write_text(self.notebook(), encoding="utf-8")
        return target

    def close(self, delete_workspace: bool = False) -> None:
        """Close the session on the server (see `Session.close`)."""
        if not self.closed:
            self._channel.request("DELETE", params={"delete_workspace": delete_workspace}, timeout=_timeout(None))
            self.closed = True

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteFiles:
    """`Files` over HTTP: uploads and downloads are streamed."""

    def __init__(self, channel: _SessionChannel) -> None:
        self._channel = channel

    def write(self, path: str | PurePath, data: bytes | str | BinaryIO | Iterable[bytes]) -> FileInfo:
        """Write a file (bytes, str, a binary file object or an iterable of byte chunks), streamed."""
        return FileInfo.model_validate_json(self._channel.request(
            "PUT", "/files/content", params={"path": os.fspath(path)}, content=_chunks(data),
            headers={"Content-Type": "application/octet-stream"}, timeout=_timeout(None)).content)

    def read(self, path: str | PurePath) -> bytes:
        """The whole file as bytes (use `open` to stream a large one)."""
        with self.open(path) as handle:
            return handle.read()

    def read_text(self, path: str | PurePath, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    @contextlib.contextmanager
    def open(self, path: str | PurePath) -> Iterator[BinaryIO]:
        """The file, streamed from the server, as a binary file to read: `with s.files.open(p) as f: ...`."""
        with self._channel.download("/files/content", {"path": os.fspath(path)}) as response:
            yield _Reader(response.iter_bytes())  # type: ignore[misc]

    def list(self, path: str | PurePath = ".", recursive: bool = False) -> list[FileInfo]:
        return _FILES.validate_json(self._channel.request(
            "GET", "/files", params={"path": os.fspath(path), "recursive": recursive}).content)

    def exists(self, path: str | PurePath) -> bool:
        return bool(self._channel.request("GET", "/files/exists", params={"path": os.fspath(path)}).json()["exists"])

    def remove(self, path: str | PurePath) -> None:
        self._channel.request("DELETE", "/files", params={"path": os.fspath(path)})

    def rename(self, path: str | PurePath, new_name: str) -> FileInfo:
        """Give an entry another name in its folder (see `Files.rename`); its new info."""
        return FileInfo.model_validate_json(self._channel.request(
            "POST", "/files/rename", json={"path": os.fspath(path), "new_name": new_name}).content)

    def usage(self) -> int:
        """Bytes held by the workspace's files."""
        return int(self._channel.request("GET", "/files/usage", timeout=_timeout(None)).json()["used"])

    def capacity(self) -> int:
        """The workspace's size cap in bytes."""
        return int(self._channel.request("GET", "/files/capacity").json()["capacity"])


class _Reader:
    """A read-only binary file over an iterator of chunks; reading is linear in the bytes read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()  # deleting its head is cheap: CPython moves its start

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            data = b"".join([bytes(self._buffer), *self._chunks])
            self._buffer.clear()
            return data
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readable(self) -> bool:
        return True


class RemoteCommands:
    """`Commands` over HTTP."""

    def __init__(self, channel: _SessionChannel) -> None:
        self._channel = channel

    def run(self, cmd: str, *, timeout: float = 60, cwd: str | None = None, env: dict[str, str] | None = None,
            on_stdout: Callable[[str], Any] | None = None,
            on_stderr: Callable[[str], Any] | None = None) -> CommandResult:
        """Run a shell command in the session's sandbox (see `Commands.run`); with callbacks, output streams."""
        body = {"cmd": cmd, "timeout": timeout, "cwd": cwd, "env": env}
        if on_stdout or on_stderr:
            return self._channel.events("/commands/stream", body, CommandResult,
                                         {"stdout": on_stdout, "stderr": on_stderr}, timeout)
        return CommandResult.model_validate_json(
            self._channel.request("POST", "/commands", json=body, timeout=_timeout(timeout)).content)


# async --------------------------------------------------------------------------------------------------------


class AsyncRemoteWorkbench:
    """`AsyncWorkbench` over HTTP (see `RemoteWorkbench`)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 http: httpx.AsyncClient | None = None) -> None:
        self.url, self._key = _settings(url, api_key)
        self.http = http or httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64))
        self.http.headers["Authorization"] = f"Bearer {self._key}"
        self._channel = _AsyncChannel(self.http, self.url)
        self._sync: RemoteWorkbench | None = None

    @property
    def sync(self) -> RemoteWorkbench:
        """A sync client of the same server and key (for `AsyncRemoteSession.tools`, which is not awaited)."""
        if self._sync is None:
            self._sync = RemoteWorkbench(self.url, self._key)
        return self._sync

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._channel.request(method, path, **kwargs)

    async def create(self, user_id: str, *, toolkits: list[str] | None = None, tools: list[str] | None = None,
                     limits: Limits | dict[str, Any] | None = None, offload_threshold: int | None = None,
                     metadata: dict[str, str] | None = None, allow_default_user: bool = False,
                     from_session: str | None = None) -> AsyncRemoteSession:
        """Open a new session on the server, or fork one (see `Workbench.create`)."""
        if from_session is not None:
            _check_fork(toolkits, tools, limits, offload_threshold, metadata)
            source = await self.use(from_session)
            if source.user_id != user_id:
                raise SessionNotFoundError(f"no session {from_session!r} of user {user_id!r}")
            return await source.fork()
        body = _create_body(user_id, toolkits, tools, limits, offload_threshold, metadata, allow_default_user)
        response = await self._request("POST", "/v1/sessions", json=body, timeout=_timeout(None))
        info = SessionInfo.model_validate_json(response.content)
        return AsyncRemoteSession(self._channel.session(info.session_id), info, self.sync.use)

    async def use(self, session_id: str) -> AsyncRemoteSession:
        """The session with this id (of this API key); SessionClosedError when it is closed."""
        channel = self._channel.session(session_id)
        session = AsyncRemoteSession(channel, await channel.info(), self.sync.use)
        if session.status != "open":
            from .errors import SessionClosedError

            raise SessionClosedError(f"session {session_id} is closed")
        return session

    async def list(self, user_id: str | None = None, metadata: dict[str, str] | None = None) -> list[SessionRecord]:
        response = await self._request("GET", "/v1/sessions", params=_list_params(user_id, metadata))
        return list(_SESSIONS.validate_json(response.content))

    def tool(self, slug: str | None = None, *, toolkit: str = "default",
             description: str | None = None) -> Callable[[F], F]:
        """See `RemoteWorkbench.tool`: checks that the server has this tool; it runs there."""
        return self.sync.tool(slug, toolkit=toolkit, description=description)

    async def close(self) -> None:
        await self.http.aclose()
        if self._sync is not None:
            self._sync.close()

    async def __aenter__(self) -> AsyncRemoteWorkbench:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncRemoteSession(_SessionState):
    """`AsyncSession` over HTTP; streaming callbacks may be plain functions or coroutines."""

    def __init__(self, channel: _AsyncSessionChannel, info: SessionInfo,
                 sync: Callable[[str], RemoteSession]) -> None:
        super().__init__(info)
        self._channel, self._sync = channel, sync  # `sync(id)`: the same session on a sync client (for tools())
        self.files = AsyncRemoteFiles(channel)
        self.commands = AsyncRemoteCommands(channel)

    @property
    def metadata(self) -> dict[str, str]:
        """The session's metadata as this object last read it (`await wb.use(id)` reads it again)."""
        return self.config.metadata

    async def execute(self, code: str, *, timeout: float | None = None,
                      on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
                      on_result: Callable[[Output], Any] | None = None,
                      on_error: Callable[[ExecutionError], Any] | None = None) -> ExecutionResult:
        """Run code (see `Session.execute`); with callbacks, output streams as it comes."""
        body = {"code": code, "timeout": timeout}
        callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}
        if any(callbacks.values()):
            return await self._channel.events("/execute/stream", body, ExecutionResult, callbacks, timeout)
        response = await self._channel.request("POST", "/execute", json=body, timeout=_timeout(timeout))
        return ExecutionResult.model_validate_json(response.content)

    async def update(self, *, toolkits: list[str] | None = None, tools: list[str] | None = None,
                     limits: Limits | dict[str, Any] | None = None, offload_threshold: int | None = None,
                     metadata: dict[str, str] | None = None, restart_if_needed: bool = False,
                     config_version: int | None = None) -> int:
        """Change the session's config (see `RemoteSession.update`)."""
        expected = self.config_version if config_version is None else config_version
        body = _update_body(toolkits, tools, limits, offload_threshold, metadata, restart_if_needed, expected)
        await self._channel.request("PATCH", json=body, timeout=_timeout(None))
        self._set(await self._channel.info())
        return self.config_version

    async def execute_tool(self, slug: str, arguments: dict[str, Any] | None = None, *,
                           sync_to_workbench: bool = False, timeout: float | None = None,
                           inline_limit: int | None = None) -> ToolResult:
        body = {"slug": slug, "arguments": arguments, "sync_to_workbench": sync_to_workbench, "timeout": timeout,
                "inline_limit": inline_limit}
        response = await self._channel.request("POST", "/tools/execute", json=body, timeout=_timeout(timeout))
        return ToolResult.model_validate_json(response.content)

    async def execute_tools(self, calls: list[tuple[str, dict[str, Any]]], *, sync_to_workbench: bool = False,
                            max_workers: int = 8, timeout: float | None = None,
                            inline_limit: int | None = None) -> list[ToolResult]:
        body = {"calls": [{"slug": slug, "arguments": arguments} for slug, arguments in calls],
                "sync_to_workbench": sync_to_workbench, "max_workers": max_workers, "timeout": timeout,
                "inline_limit": inline_limit}
        response = await self._channel.request("POST", "/tools/execute_many", json=body, timeout=_timeout(timeout))
        return _TOOL_RESULTS.validate_json(response.content)

    async def available_tools(self) -> list[ToolInfo]:
        return _TOOLS.validate_json((await self._channel.request("GET", "/tools")).content)

    def tools(self, format: Format = "openai", *, include_tools: bool = False) -> list[Any]:
        """The meta tools as tool definitions for a model (not awaited, as `AsyncSession.tools`)."""
        return self._sync(self.session_id).tools(format, include_tools=include_tools)

    async def answer_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> Answer:
        found = (await self._channel.request("POST", "/tool_calls", json={"name": name, "arguments": arguments},
                                     timeout=_timeout(None))).json()
        return Answer(found["text"], bool(found["is_error"]))

    async def handle_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> str:
        return (await self.answer_tool_call(name, arguments)).text

    async def handle_tool_calls(self, response: Any, *, include_tools: bool = False) -> list[dict[str, Any]]:
        body = {"response": _plain_response(response), "include_tools": include_tools}
        return (await self._channel.request("POST", "/tool_calls/response", json=body,  # type: ignore[no-any-return]
                                    timeout=_timeout(None))).json()

    async def logs(self, limit: int = 1000) -> list[LogEntry]:
        return _LOGS.validate_json((await self._channel.request("GET", "/logs", params={"limit": limit})).content)

    async def restart(self) -> None:
        await self._channel.request("POST", "/restart", timeout=_timeout(None))

    @property
    def paused(self) -> bool:
        """Whether the session was paused when this object last read it (`await wb.use(id)` reads it again)."""
        return self.status == "open" and self._paused

    async def pause(self) -> PausedState:
        response = await self._channel.request("POST", "/pause", timeout=_timeout(None))
        return PausedState.model_validate_json(response.content)

    async def resume(self) -> None:
        await self._channel.request("POST", "/resume", timeout=_timeout(None))

    async def fork(self) -> AsyncRemoteSession:
        response = await self._channel.request("POST", "/fork", timeout=_timeout(None))
        info = SessionInfo.model_validate_json(response.content)
        return AsyncRemoteSession(self._channel.channel.session(info.session_id), info, self._sync)

    async def notebook(self) -> str:
        return (await self._channel.request("GET", "/notebook", timeout=_timeout(None))).text

    async def export_notebook(self, path: str | Path) -> Path:
        target = Path(path)
        target.write_text(await self.notebook(), encoding="utf-8")
        return target

    async def close(self, delete_workspace: bool = False) -> None:
        if not self.closed:
            await self._channel.request("DELETE", params={"delete_workspace": delete_workspace}, timeout=_timeout(None))
            self.closed = True

    async def __aenter__(self) -> AsyncRemoteSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncRemoteFiles:
    """`AsyncFiles` over HTTP."""

    def __init__(self, channel: _AsyncSessionChannel) -> None:
        self._channel = channel

    async def write(self, path: str | PurePath, data: bytes | str | BinaryIO | Iterable[bytes]) -> FileInfo:
        chunks = _chunks(data)
        content: bytes | AsyncIterator[bytes] = chunks if isinstance(chunks, bytes) else _aiter(chunks)
        response = await self._channel.request("PUT", "/files/content", params={"path": os.fspath(path)},
                                                content=content, timeout=_timeout(None),
                                                headers={"Content-Type": "application/octet-stream"})
        return FileInfo.model_validate_json(response.content)

    async def read(self, path: str | PurePath) -> bytes:
        response = await self._channel.request("GET", "/files/content", params={"path": os.fspath(path)},
                                                timeout=_timeout(None))
        return response.content

    async def read_text(self, path: str | PurePath, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def list(self, path: str | PurePath = ".", recursive: bool = False) -> list[FileInfo]:
        response = await self._channel.request("GET", "/files",
                                                params={"path": os.fspath(path), "recursive": recursive})
        return _FILES.validate_json(response.content)

    async def exists(self, path: str | PurePath) -> bool:
        response = await self._channel.request("GET", "/files/exists", params={"path": os.fspath(path)})
        return bool(response.json()["exists"])

    async def remove(self, path: str | PurePath) -> None:
        await self._channel.request("DELETE", "/files", params={"path": os.fspath(path)})

    async def rename(self, path: str | PurePath, new_name: str) -> FileInfo:
        response = await self._channel.request("POST", "/files/rename",
                                                json={"path": os.fspath(path), "new_name": new_name})
        return FileInfo.model_validate_json(response.content)

    async def usage(self) -> int:
        response = await self._channel.request("GET", "/files/usage", timeout=_timeout(None))
        return int(response.json()["used"])

    async def capacity(self) -> int:
        return int((await self._channel.request("GET", "/files/capacity")).json()["capacity"])


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class AsyncRemoteCommands:
    """`AsyncCommands` over HTTP."""

    def __init__(self, channel: _AsyncSessionChannel) -> None:
        self._channel = channel

    async def run(self, cmd: str, *, timeout: float = 60, cwd: str | None = None, env: dict[str, str] | None = None,
                  on_stdout: Callable[[str], Any] | None = None,
                  on_stderr: Callable[[str], Any] | None = None) -> CommandResult:
        body = {"cmd": cmd, "timeout": timeout, "cwd": cwd, "env": env}
        if on_stdout or on_stderr:
            return await self._channel.events("/commands/stream", body, CommandResult,
                                               {"stdout": on_stdout, "stderr": on_stderr}, timeout)
        response = await self._channel.request("POST", "/commands", json=body, timeout=_timeout(timeout))
        return CommandResult.model_validate_json(response.content)

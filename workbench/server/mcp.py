"""MCP for one session: its meta tools as MCP tools, and the workspace files its answers refer to as resources.

Served two ways with the official `mcp` SDK's low-level `Server`:

- `McpEndpoint`: an ASGI app of Streamable HTTP endpoints, one per session at `/{session_id}` under wherever it is
  mounted (`workbench serve` mounts it at `/mcp`). Every HTTP request carries `Authorization: Bearer <token>`, the
  session's own token (`tokens.session_token`): it opens that session only, and only while the session is open.
  The transport is stateless (no `Mcp-Session-Id`, JSON responses): each request is authenticated and served on
  its own, so nothing is kept between requests, several server processes can share the work, and a token dies
  with its session on the next request. Both protocol eras the SDK speaks are served (the initialize handshake and
  the per-request envelope of 2026-07-28).
- `serve_stdio(session)`: the same tools and resources over stdio, for desktop MCP clients
  (`workbench mcp --session ID`). Whoever can start that process already holds the workbench's home, so no token.

A tool's answer is the text a model reads (bounded like every meta-tool answer); when it refers to workspace files
(offloaded tool responses in `.responses/`, spilled outputs and whole answers in `.outputs/`), the result also
carries a resource link to each: `workbench://files/<path, percent-encoded>`. `resources/read` reads such a URI
through the session's files API (no path out of the workspace, no symlink followed out of it), at most
`READ_LIMIT` bytes at a time: `?offset=N&length=M` reads a slice of a larger file (template `SLICE_TEMPLATE`).
"""
from __future__ import annotations

import base64
import logging
import mimetypes
import posixpath
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import anyio
import mcp_types as types
from anyio.lowlevel import RunVar
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..agent.meta import meta_input_schema
from ..client import Workbench
from ..errors import (
    ReplicaUnavailableError,
    SessionClosedError,
    SessionNotFoundError,
    WorkbenchError,
    WorkspaceFileNotFoundError,
)
from ..files import OUTPUTS, FileInfo
from ..session import Session
from ..tools.offload import RESPONSES
from .tokens import check_session_token

log = logging.getLogger(__name__)

SCHEME = "workbench"
FILES_PREFIX = f"{SCHEME}://files/"
SLICE_TEMPLATE = FILES_PREFIX + "{+path}{?offset,length}"
READ_LIMIT = 1 << 20  # bytes of a file one resources/read returns; a larger file is read in slices
LISTED = 500  # files of .responses/ and .outputs/ that resources/list names
MAX_BODY = 16 << 20  # bytes of one HTTP request (a meta tool's arguments may be 8 M characters)
RESOURCE_NOT_FOUND = -32002  # as the MCP spec has it for resources/read
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SCOPE_KEY = "workbench.session"  # where the endpoint leaves the authenticated Session in the ASGI scope
_T = TypeVar("_T")
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-ndjson")


def file_uri(path: str) -> str:
    """The resource URI of a workspace file (`path` relative to the workspace): every character that is not
    unreserved is percent-encoded, `/` between folders kept (a name that is not UTF-8 keeps its bytes)."""
    return FILES_PREFIX + "/".join(quote(part, safe="", errors="surrogateescape") for part in path.split("/"))


def shown(text: str) -> str:
    """Text as it can go on the wire (JSON in UTF-8): a name that is not UTF-8 (a sandbox can make one) with its
    bytes escaped, any other lone surrogate (a kernel can print one) escaped too."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_uri(uri: str) -> tuple[str, int, int | None]:
    """The workspace path, offset and length (None: to the end) a resource URI names. Raises MCPError
    (invalid params) for anything else; whether the path stays in the workspace is the files API's to say."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise MCPError(types.INVALID_PARAMS, "not a valid URI") from None
    if parts.scheme != SCHEME or parts.netloc != "files" or not parts.path.startswith("/") or parts.fragment:
        raise MCPError(types.INVALID_PARAMS, f"not a workspace file: resource URIs look like {FILES_PREFIX}<path>")
    path = unquote(parts.path[1:], errors="surrogateescape")  # the bytes of a name that is not UTF-8, as file_uri
    if not path or "\0" in path:
        raise MCPError(types.INVALID_PARAMS, "the URI names no file of the workspace")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query), max_num_fields=4)
    except ValueError:
        raise MCPError(types.INVALID_PARAMS, "the URI's query is not offset=N&length=M") from None
    if set(query) - {"offset", "length"} or any(len(values) != 1 for values in query.values()):
        raise MCPError(types.INVALID_PARAMS, "the URI's query takes offset and length, once each")
    numbers: dict[str, int] = {}
    for key, (value,) in query.items():
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise MCPError(types.INVALID_PARAMS, f"{key} must be a whole number of bytes")
        numbers[key] = int(value)
    return path, numbers.get("offset", 0), numbers.get("length")


def read_resource(session: Session, uri: str) -> types.ReadResourceResult:
    """Read a workspace file (or a slice of it) named by a resource URI, at most `READ_LIMIT` bytes: text when the
    file's type is text (or unknown) and the bytes are UTF-8, else base64. Synchronous: call it from a thread."""
    path, offset, length = parse_uri(uri)
    if length is not None and length > READ_LIMIT:
        raise MCPError(types.INVALID_PARAMS, f"length {length:,} is over the {READ_LIMIT:,} bytes one read returns")
    try:
        with session.files.open(path) as handle:
            size = handle.seek(0, 2)
            if length is None and offset == 0 and size > READ_LIMIT:
                raise MCPError(types.INVALID_PARAMS, (
                    f"{shown(path)} holds {size:,} bytes, over the {READ_LIMIT:,} one read returns: read it in slices, "
                    f"{file_uri(path)}?offset=0&length={READ_LIMIT}"))
            handle.seek(min(offset, size))
            data = handle.read(READ_LIMIT if length is None else length)
    except WorkspaceFileNotFoundError:
        raise MCPError(RESOURCE_NOT_FOUND, f"no file {shown(path[:300])} in the workspace",
                       {"uri": uri[:1000]}) from None
    except (WorkbenchError, OSError) as exc:  # out of the workspace, a symlink out, a folder, a closed session
        raise MCPError(types.INVALID_PARAMS, shown(str(exc)[:500])) from None
    mime = _mime_type(path)
    meta = {"size": size, "offset": min(offset, size), "length": len(data)}
    textual = _is_text(mime) or mime == "application/octet-stream"  # (an image or an Arrow file is bytes)
    text = _utf8(data, whole=offset == 0 and offset + len(data) == size) if textual else None
    if text is not None:
        meta["length"] = text[1]
        return types.ReadResourceResult(contents=[types.TextResourceContents(
            uri=uri, mime_type=mime if _is_text(mime) else "text/plain", text=text[0], _meta=meta)])
    return types.ReadResourceResult(contents=[types.BlobResourceContents(
        uri=uri, mime_type=mime, blob=base64.b64encode(data).decode(), _meta=meta)])


def _utf8(data: bytes, whole: bool) -> tuple[str, int] | None:
    """The bytes as text, and how many bytes that text is: a slice may end inside a character, whose first bytes
    are then left for the next slice. None when they are not UTF-8."""
    try:
        return data.decode("utf-8"), len(data)
    except UnicodeDecodeError as exc:
        if whole or exc.end != len(data) or len(data) - exc.start > 3 or exc.start == 0:
            return None
        try:
            return data[:exc.start].decode("utf-8"), exc.start
        except UnicodeDecodeError:
            return None


def _mime_type(path: str) -> str:
    if path.endswith(".arrow"):
        return "application/vnd.apache.arrow.file"
    return mimetypes.guess_type(posixpath.basename(path))[0] or "application/octet-stream"


def _is_text(mime: str) -> bool:
    return mime.startswith("text/") or mime in _TEXT_TYPES


def _describe(path: str) -> str:
    if path.startswith(RESPONSES + "/"):
        return "a tool response written to the workbench (offloaded: too large for the answer)"
    if path.startswith(f"{OUTPUTS}/answers/"):
        return "the whole of an answer that was cut to fit"
    return "output written to the workbench (past the output limit)"


def _link(session: Session, path: str) -> types.ResourceLink:
    size: int | None = None
    try:
        found = session.files.list(path)
        size = found[0].size if len(found) == 1 and found[0].type == "file" else None
    except (WorkbenchError, OSError):
        pass
    return types.ResourceLink(name=shown(posixpath.basename(path) or path), title=shown(path), uri=file_uri(path),
                              description=_describe(path), mime_type=_mime_type(path), size=size)


def call_tool(session: Session, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
    """Answer one tools/call: the answer's text, and a resource link to each workspace file it refers to. Never
    raises for what the client sent; a failure is a result with `isError`. Synchronous: call it from a thread."""
    answer = session.answer_tool_call(name, arguments or {})
    content: list[types.ContentBlock] = [types.TextContent(type="text", text=shown(answer.text))]
    content += [_link(session, path) for path in answer.files]
    return types.CallToolResult(content=content, is_error=answer.is_error)


def list_tools(session: Session) -> types.ListToolsResult:
    """The session's meta tools as MCP tools."""
    return types.ListToolsResult(tools=[types.Tool.model_validate(tool) for tool in session.tools(format="mcp")])


def list_resources(session: Session) -> types.ListResourcesResult:
    """The files in the workspace's `.responses/` and `.outputs/` (newest first, at most `LISTED`)."""
    found: list[FileInfo] = []
    for folder in (RESPONSES, OUTPUTS):
        try:
            found += [info for info in session.files.list(folder, recursive=True) if info.type == "file"]
        except (WorkbenchError, OSError):
            continue  # not there yet, or not a folder
    found.sort(key=lambda info: info.modified, reverse=True)
    return types.ListResourcesResult(resources=[types.Resource(
        name=shown(posixpath.basename(info.path)), title=shown(info.path), uri=file_uri(info.path),
        description=_describe(info.path),
        mime_type=_mime_type(info.path), size=info.size) for info in found[:LISTED]])


def _templates() -> types.ListResourceTemplatesResult:
    return types.ListResourceTemplatesResult(resource_templates=[types.ResourceTemplate(
        name="workspace-file", title="A file of the session's workspace, or a slice of it", uri_template=SLICE_TEMPLATE,
        description=(f"Any file of the workspace by its path relative to /workspace; offset and length (bytes) read "
                     f"a slice; one read returns at most {READ_LIMIT:,} bytes."))])


def build_server(session_of: Callable[[ServerRequestContext[Any, Any]], Session]) -> Server[Any]:
    """The MCP server of the meta tools and workspace files; `session_of(ctx)` is the session a request is for.
    The session's (synchronous) calls run in worker threads, never on the event loop."""
    async def run(function: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(function, *args, limiter=_limiter())

    async def on_list_tools(ctx: ServerRequestContext[Any, Any],
                            params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return await run(_guarded(list_tools), session_of(ctx))

    async def on_call_tool(ctx: ServerRequestContext[Any, Any],
                           params: types.CallToolRequestParams) -> types.CallToolResult:
        return await run(call_tool, session_of(ctx), params.name, params.arguments)

    async def on_list_resources(ctx: ServerRequestContext[Any, Any],
                                params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        return await run(_guarded(list_resources), session_of(ctx))

    async def on_list_resource_templates(ctx: ServerRequestContext[Any, Any],
                                         params: types.PaginatedRequestParams | None
                                         ) -> types.ListResourceTemplatesResult:
        session_of(ctx)
        return _templates()

    async def on_read_resource(ctx: ServerRequestContext[Any, Any],
                               params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        return await run(read_resource, session_of(ctx), str(params.uri))

    return Server("workbench", version=_version(), instructions=(
        "A sandboxed Python workbench (a Jupyter kernel with the session's files in /workspace). Large tool "
        "responses and outputs are written there; results link them as workbench://files/ resources."),
        get_tool_input_schema=meta_input_schema,  # (else the SDK lists the tools to check a call's Mcp-Param headers)
        on_list_tools=on_list_tools, on_call_tool=on_call_tool, on_list_resources=on_list_resources,
        on_list_resource_templates=on_list_resource_templates, on_read_resource=on_read_resource)


_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("workbench_mcp_threads")
THREADS = 256  # session calls at once per event loop (cells may run for minutes: not the default pool of 40)


def _limiter() -> anyio.CapacityLimiter:
    """The worker-thread limiter of the running event loop (an app may be served by several loops in turn)."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(THREADS)
        _LIMITER.set(limiter)
        return limiter


def _guarded(function: Callable[[Session], Any]) -> Callable[[Session], Any]:
    """A listing whose session failed (closed meanwhile, Docker gone) as a protocol error, not a crash."""
    def guarded(session: Session) -> Any:
        try:
            return function(session)
        except WorkbenchError as exc:
            raise MCPError(types.INTERNAL_ERROR, shown(str(exc)[:500])) from None
    return guarded


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("workbench")
    except Exception:
        return ""


class McpEndpoint:
    """The Streamable HTTP MCP endpoints of a workbench's sessions: an ASGI app serving `/{session_id}` below where
    it is mounted. Enter `lifespan()` for as long as it serves (the app's lifespan)."""

    def __init__(self, workbench: Workbench, secret: bytes) -> None:
        self.workbench = workbench
        self._secret = secret
        self.server = build_server(_session_in_scope)
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the SDK's Streamable HTTP session manager (stateless, JSON responses) while serving."""
        manager = StreamableHTTPSessionManager(self.server, json_response=True, stateless=True,
                                               max_request_body_size=MAX_BODY)
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # mounted on its own: run the manager for the server's lifetime
            await self._lifespan_protocol(receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        session_id = path.strip("/")
        if not _SESSION_ID.fullmatch(session_id):
            await _error(send, 404, "not_found", "no MCP endpoint here: the URL is /mcp/<session id>")
            return
        request = Request(scope)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await _error(send, 401, "unauthorized", "this endpoint needs the header Authorization: Bearer "
                         "<the session's MCP token>")
            return
        if not check_session_token(self._secret, session_id, token.strip()):
            await _error(send, 401, "unauthorized", "the token does not open this session's MCP endpoint")
            return
        try:
            session = await anyio.to_thread.run_sync(self._open_session, session_id)
        except SessionNotFoundError:
            await _error(send, 404, "session_not_found", f"no session {session_id}")
            return
        except SessionClosedError:
            await _error(send, 404, "session_closed", f"session {session_id} is closed: its token is void")
            return
        except ReplicaUnavailableError as exc:  # a cluster's session that this replica does not run
            await _error(send, 503, "replica_unavailable", str(exc))
            return
        if self._manager is None:
            await _error(send, 503, "unavailable", "the MCP endpoint is not running (its lifespan was not entered)")
            return
        await self._manager.handle_request({**scope, _SCOPE_KEY: session}, receive, send)

    def _open_session(self, session_id: str) -> Session:
        record = self.workbench.store.get(session_id)  # read fresh: another process may have closed it
        if record.status != "open":
            raise SessionClosedError(f"session {session_id} is closed")
        return self.workbench.use(session_id)

    async def _lifespan_protocol(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        async with self.lifespan():
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


def _session_in_scope(ctx: ServerRequestContext[Any, Any]) -> Session:
    request = ctx.request
    session = request.scope.get(_SCOPE_KEY) if isinstance(request, Request) else None
    if not isinstance(session, Session):  # only reached through McpEndpoint, which always sets it
        raise MCPError(types.INTERNAL_ERROR, "no session for this request")
    return session


async def _error(send: Send, status: int, code: str, message: str) -> None:
    import json

    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="workbench-mcp"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_stdio_async(session: Session) -> None:
    """Serve `session`'s tools and files over this process's stdin and stdout until the client goes."""
    server = build_server(lambda ctx: session)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_stdio(session: Session) -> None:
    """Serve `session` over stdio (what `workbench mcp --session ID` runs), blocking until the client goes."""
    anyio.run(serve_stdio_async, session)

"""A real HTTP server for MCP tests and benchmarks: a Starlette app mounting `McpEndpoint` at /mcp, run by uvicorn in
a thread on a free port of 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from workbench import Workbench
from workbench.server.mcp import McpEndpoint
from workbench.server.tokens import load_secret


def mcp_app(wb: Workbench) -> tuple[Starlette, McpEndpoint]:
    """An app serving the MCP endpoints of `wb`'s sessions at /mcp/<session id>, as `workbench serve` mounts it."""
    endpoint = McpEndpoint(wb, load_secret(wb.home))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with endpoint.lifespan():
            yield

    return Starlette(routes=[Mount("/mcp", app=endpoint)], lifespan=lifespan), endpoint


@contextmanager
def serving(wb: Workbench, app: Starlette | None = None) -> Iterator[str]:
    """The base URL (http://127.0.0.1:PORT) of a uvicorn server of `app` (default: `mcp_app(wb)`), for as long as the
    block runs."""
    app = app if app is not None else mcp_app(wb)[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the MCP test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

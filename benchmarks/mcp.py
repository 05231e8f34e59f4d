"""What MCP over Streamable HTTP adds to a trivial execute, in the same run.

    python -m benchmarks.mcp [--calls 300] [--json]

A uvicorn server (in a thread of this process) mounts the MCP endpoint at /mcp; the official `mcp` client, one
client session reused, calls `WORKBENCH_REMOTE_WORKBENCH` with the cell `1 + 1`, interleaved with a bare in-process
`session.execute` of the same cell (each pair in alternating order, so drift of this shared machine hits both
alike). Reported: both p50s, their ratio, and the median of the paired differences (the HTTP request, the SDK's
JSON-RPC handling on both sides, the worker thread, the meta tool's answer).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.routing import Mount

from benchmarks.paired import added
from workbench import Session, Workbench
from workbench.server.mcp import McpEndpoint
from workbench.server.tokens import load_secret, session_token

CELL = "1 + 1"


@contextmanager
def serving(wb: Workbench) -> Iterator[str]:
    """The base URL of a uvicorn server (a thread of this process) with `wb`'s MCP endpoints at /mcp."""
    endpoint = McpEndpoint(wb, load_secret(wb.home))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with endpoint.lifespan():
            yield

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Mount("/mcp", app=endpoint)], lifespan=lifespan),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the MCP server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def paired(url: str, headers: dict[str, str], session: Session, n: int, cell: str,
           expected: str) -> tuple[list[float], list[float]]:
    """Seconds of `n` interleaved pairs (each in alternating order, after 20 of each to warm up): `cell` through
    `session.execute` in this process, and through `WORKBENCH_REMOTE_WORKBENCH` on the MCP endpoint at `url` (the
    official client over Streamable HTTP, one client session, `headers` sent); both must answer `expected`."""
    arguments = {"code_to_execute": cell}
    bare: list[float] = []
    over_mcp: list[float] = []

    async def run() -> None:
        async with (httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120)) as http,
                    Client(streamable_http_client(url, http_client=http), cache=None) as client):

            async def call() -> None:
                result = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH", arguments)
                block = result.content[0]
                assert isinstance(block, types.TextContent) and block.text == f"result:\n{expected}", result

            for _ in range(20):
                session.execute(cell)
                await call()
            for i in range(n):
                pair: dict[str, float] = {}
                for which in (("bare", "mcp") if i % 2 == 0 else ("mcp", "bare")):
                    started = time.perf_counter()
                    if which == "bare":
                        assert session.execute(cell).text == expected
                    else:
                        await call()
                    pair[which] = time.perf_counter() - started
                bare.append(pair["bare"])
                over_mcp.append(pair["mcp"])

    anyio.run(run)
    return bare, over_mcp


def measure(wb: Workbench, n: int = 300) -> dict[str, Any]:
    """Milliseconds: bare execute and the same cell through MCP (p50s, ratio, paired overhead)."""
    with wb.create(user_id="bench-mcp") as session, serving(wb) as base:
        token = session_token(load_secret(wb.home), session.session_id)
        bare, over_mcp = paired(f"{base}/mcp/{session.session_id}", {"Authorization": f"Bearer {token}"}, session,
                                n, CELL, "2")
    ms = lambda values: statistics.median(values) * 1000
    return {"bare_p50_ms": ms(bare), "mcp_p50_ms": ms(over_mcp), "ratio": statistics.median(over_mcp) /
            statistics.median(bare), "overhead_ms": added(bare, over_mcp) * 1000,
            "pairs": n, "baseline": "session.execute of the same cell in-process, interleaved pairs, same run",
            "transport": "Streamable HTTP (stateless, JSON responses), one client session, server in-process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, Workbench(home=home, pool_size=0) as wb:
        wb.build_image()
        figures = measure(wb, args.calls)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"MCP over Streamable HTTP ({args.calls} interleaved pairs of the cell {CELL!r})")
    print(f"  session.execute in-process                    p50 {figures['bare_p50_ms']:6.2f} ms")
    print(f"  tools/call WORKBENCH_REMOTE_WORKBENCH over MCP p50 {figures['mcp_p50_ms']:6.2f} ms")
    print(f"  ratio {figures['ratio']:.2f}; added (median of paired differences) {figures['overhead_ms']:.2f} ms")


if __name__ == "__main__":
    main()

"""MCP with the official `mcp` client: over Streamable HTTP against a real uvicorn server (and once through a real
`workbench serve`), and over stdio against `python -m workbench mcp --session ID` as a subprocess. Lists and calls
the meta tools, follows the resource links of offloaded responses and spilled outputs, reads slices; every way in
without the session's token fails."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_app import ROWS, register
from mcp_server import mcp_app, serving
from served import Server

from workbench import RemoteWorkbench, Session, Workbench
from workbench.agent import NAMES
from workbench.server.mcp import READ_LIMIT, file_uri, parse_uri
from workbench.server.tokens import load_secret, session_token

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def mcp_wb(wb: Workbench) -> Workbench:
    if "MCP_LIST_ORDERS" not in wb.tools:
        register(wb)
    return wb


@pytest.fixture(scope="module")
def shop(mcp_wb: Workbench) -> Iterator[Session]:
    s = mcp_wb.create("mcp-user", toolkits=["mcp_shop"])
    yield s
    s.close(delete_workspace=True)


@pytest.fixture(scope="module")
def base_url(mcp_wb: Workbench) -> Iterator[str]:
    with serving(mcp_wb) as url:
        yield url


def token_of(wb: Workbench, session_id: str) -> str:
    return session_token(load_secret(wb.home), session_id)


@asynccontextmanager
async def http_client(url: str, token: str | None, mode: str = "auto") -> AsyncIterator[Client]:
    """The official client over Streamable HTTP, with the bearer token in every request."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120)) as http,
                Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client):
        yield client


def text_of(result: types.CallToolResult) -> str:
    texts = [block.text for block in result.content if isinstance(block, types.TextContent)]
    assert len(texts) == 1
    return texts[0]


def links_of(result: types.CallToolResult) -> list[types.ResourceLink]:
    return [block for block in result.content if isinstance(block, types.ResourceLink)]


def content_of(read: types.ReadResourceResult) -> types.TextResourceContents | types.BlobResourceContents:
    assert len(read.contents) == 1
    return read.contents[0]


# --- Streamable HTTP -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_http_lists_and_calls_tools(mcp_wb: Workbench, shop: Session, base_url: str, mode: str) -> None:
    """Both protocol eras: the 2026-07-28 per-request envelope ("auto" discovers it) and the initialize handshake."""
    url = f"{base_url}/mcp/{shop.session_id}"

    async def main() -> None:
        async with http_client(url, token_of(mcp_wb, shop.session_id), mode) as client:
            listed = await client.list_tools()
            assert [tool.name for tool in listed.tools] == list(NAMES)
            schema = next(t for t in listed.tools if t.name == "WORKBENCH_REMOTE_WORKBENCH").input_schema
            assert "code_to_execute" in schema["properties"]
            result = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH",
                                            {"code_to_execute": f"mcp_{mode} = 41\nprint('hi')\nmcp_{mode} + 1"})
            assert not result.is_error
            assert "hi" in text_of(result) and "42" in text_of(result)
            assert links_of(result) == []
            failed = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "1 / 0"})
            assert failed.is_error and "ZeroDivisionError" in text_of(failed)
            bash = await client.call_tool("WORKBENCH_REMOTE_BASH_TOOL", {"command": "echo from-bash; exit 3"})
            assert bash.is_error and "exit code: 3" in text_of(bash) and "from-bash" in text_of(bash)
            found = await client.call_tool("WORKBENCH_SEARCH_TOOLS", {"queries": [{"use_case": "list shop orders"}]})
            assert "MCP_LIST_ORDERS" in text_of(found)
            templates = await client.list_resource_templates()
            assert templates.resource_templates[0].uri_template.startswith("workbench://files/")

    anyio.run(main)
    assert shop.execute(f"mcp_{mode}").text == "41"  # the same kernel as the in-process session


def test_http_tool_errors_are_results(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    """Unknown tools and bad arguments come back as isError results, never as protocol failures."""
    url = f"{base_url}/mcp/{shop.session_id}"

    async def main() -> None:
        async with http_client(url, token_of(mcp_wb, shop.session_id)) as client:
            unknown = await client.call_tool("NO_SUCH_TOOL", {})
            assert unknown.is_error and "[error: not_found]" in text_of(unknown)
            bad = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH", {"code": "1"})
            assert bad.is_error and "[error: invalid_arguments]" in text_of(bad)
            direct = await client.call_tool("MCP_LIST_ORDERS", {})  # as handle_tool_call: the session's own tool
            assert not direct.is_error and next(link.title for link in links_of(direct)).startswith(".responses/")

    anyio.run(main)


def test_http_offloaded_response_is_a_resource_link(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    url = f"{base_url}/mcp/{shop.session_id}"

    async def main() -> None:
        async with http_client(url, token_of(mcp_wb, shop.session_id)) as client:
            result = await client.call_tool("WORKBENCH_MULTI_EXECUTE_TOOL",
                                            {"tools": [{"tool_slug": "MCP_LIST_ORDERS", "arguments": {}}]})
            assert not result.is_error
            answer = json.loads(text_of(result))
            offload = answer["results"][0]["offload"]
            assert offload["records"] == ROWS
            links = {link.title: link for link in links_of(result)}
            assert set(links) == {offload["path"], offload["table_path"]}
            link = links[offload["path"]]
            assert link.uri == file_uri(offload["path"]) and link.mime_type == "application/json"
            assert link.size == shop.files.list(offload["path"])[0].size > READ_LIMIT // 8
            read = content_of(await client.read_resource(link.uri))
            assert isinstance(read, types.TextResourceContents)
            assert read.text.encode() == shop.files.read(offload["path"])
            assert len(json.loads(read.text)) == ROWS
            table = content_of(await client.read_resource(links[offload["table_path"]].uri))
            assert isinstance(table, types.BlobResourceContents)  # Arrow: bytes, base64 on the wire
            assert base64.b64decode(table.blob) == shop.files.read(offload["table_path"])
            listed = await client.list_resources()
            assert {offload["path"], offload["table_path"]} <= {r.title for r in listed.resources}

    anyio.run(main)


def test_http_reads_slices_of_a_large_file(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    """A file past the read limit is refused whole with the slice URI to use; slices read all of it, and a slice
    that ends inside a UTF-8 character leaves that character to the next one."""
    whole = ("é" * 100 + "\n").encode() * (READ_LIMIT // 150)  # over 1.3 read limits of two-byte characters
    shop.files.write("big/notes é.txt", whole)
    uri = file_uri("big/notes é.txt")
    assert uri == "workbench://files/big/notes%20%C3%A9.txt"

    async def main() -> None:
        async with http_client(f"{base_url}/mcp/{shop.session_id}", token_of(mcp_wb, shop.session_id)) as client:
            with pytest.raises(MCPError, match=r"read it in slices.*offset=0&length="):
                await client.read_resource(uri)
            got, offset = b"", 0
            while offset < len(whole):
                part = content_of(await client.read_resource(f"{uri}?offset={offset}&length=99999"))
                assert isinstance(part, types.TextResourceContents)
                meta = part.meta or {}
                assert meta["offset"] == offset and meta["size"] == len(whole) and meta["length"] <= 99999
                got += part.text.encode()
                offset += meta["length"]
            assert got == whole
            with pytest.raises(MCPError, match="over the"):
                await client.read_resource(f"{uri}?offset=0&length={READ_LIMIT + 1}")
            past = content_of(await client.read_resource(f"{uri}?offset={len(whole) + 10}&length=10"))
            assert isinstance(past, types.TextResourceContents) and past.text == ""

    anyio.run(main)


def test_http_spilled_output_is_a_resource_link(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    """A cell whose stdout goes past the output limit, and an answer past the answer limit: both files are linked."""
    async def main() -> None:
        async with http_client(f"{base_url}/mcp/{shop.session_id}", token_of(mcp_wb, shop.session_id)) as client:
            result = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH",
                                            {"code_to_execute": "print('x' * 1_100_000)"})
            links = links_of(result)
            paths = [link.title or "" for link in links]
            assert any(p.startswith(".outputs/answers/") for p in paths)  # the whole answer, cut to fit
            assert any(p.startswith(".outputs/") and not p.startswith(".outputs/answers/") for p in paths)  # stdout
            answers = next(p for p in paths if p.startswith(".outputs/answers/"))
            assert answers in text_of(result)  # (the stdout file's path is in the part of the answer that was cut)
            for link in links:
                part = content_of(await client.read_resource(f"{link.uri}?offset=0&length=1000"))
                assert isinstance(part, types.TextResourceContents) and len(part.text) <= 1000

    anyio.run(main)


def test_http_missing_resources(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    async def main() -> None:
        async with http_client(f"{base_url}/mcp/{shop.session_id}", token_of(mcp_wb, shop.session_id)) as client:
            with pytest.raises(MCPError, match="no file"):
                await client.read_resource(file_uri("nope.txt"))
            for bad in ("file:///etc/passwd", "workbench://other/x", "workbench://files/a?offset=-1",
                        "workbench://files/a?colour=red", "workbench://files/"):
                with pytest.raises(MCPError):
                    await client.read_resource(bad)

    anyio.run(main)


def test_http_a_long_cell_blocks_no_other_session(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    """Session calls run in worker threads: while one session's cell sleeps, another's requests are answered."""
    other = mcp_wb.create("mcp-busy")
    try:
        async def main() -> None:
            async with (http_client(f"{base_url}/mcp/{other.session_id}", token_of(mcp_wb, other.session_id)) as busy,
                        http_client(f"{base_url}/mcp/{shop.session_id}", token_of(mcp_wb, shop.session_id)) as free):
                answered: list[float] = []

                async def quick_calls() -> None:
                    await anyio.sleep(0.5)
                    for _ in range(3):
                        started = anyio.current_time()
                        result = await free.call_tool("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "2 + 2"})
                        assert "4" in text_of(result)
                        answered.append(anyio.current_time() - started)

                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(quick_calls)
                    slow = await busy.call_tool("WORKBENCH_REMOTE_WORKBENCH",
                                                {"code_to_execute": "import time; time.sleep(4); 'slept'"})
                    assert "slept" in text_of(slow)
                    assert len(answered) == 3 and max(answered) < 2  # all answered while the cell slept

        anyio.run(main)
    finally:
        other.close(delete_workspace=True)


# --- through workbench serve ---------------------------------------------------------------------------------------


def test_http_through_workbench_serve(served: Server, api_key: str) -> None:
    """A session made through a real `workbench serve`, reached with exactly the `mcp.url` and `mcp.headers` it
    was given: tools listed and called, a spilled output's resource link read, the same kernel as over REST."""
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="mcp-served", limits={"memory": "256m"}) as s:
        assert s.mcp is not None and s.mcp.url == f"{served.url}/mcp/{s.session_id}"
        url, headers = s.mcp.url, s.mcp.headers

        async def main() -> None:
            async with (httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120)) as http,
                        Client(streamable_http_client(url, http_client=http), cache=None) as client):
                assert [tool.name for tool in (await client.list_tools()).tools] == list(NAMES)
                result = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH",
                                                {"code_to_execute": "over_mcp = 41\nover_mcp + 1"})
                assert not result.is_error and "42" in text_of(result)
                spilled = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH",
                                                 {"code_to_execute": "print('x' * 1_100_000)"})
                stdout = next(link for link in links_of(spilled)
                              if (link.title or "").startswith(".outputs/") and "/answers/" not in link.uri)
                part = content_of(await client.read_resource(f"{stdout.uri}?offset=0&length=1000"))
                assert isinstance(part, types.TextResourceContents) and part.text == "x" * 1000
                assert s.files.read(stdout.title or "")[:1000] == b"x" * 1000

        anyio.run(main)
        assert s.execute("over_mcp").text == "41"  # the kernel REST drives
        s.close(delete_workspace=True)


# --- auth ----------------------------------------------------------------------------------------------------------

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _post(url: str, token: str | None, body: dict[str, Any] = INITIALIZE) -> httpx.Response:
    headers = {**ACCEPT, **({"Authorization": f"Bearer {token}"} if token is not None else {})}
    return httpx.post(url, headers=headers, json=body, timeout=30)


def test_auth_failures(mcp_wb: Workbench, shop: Session, base_url: str) -> None:
    other = mcp_wb.create("mcp-other")
    try:
        url = f"{base_url}/mcp/{shop.session_id}"
        good = token_of(mcp_wb, shop.session_id)
        assert _post(url, good).status_code == 200
        cases = {
            "no token": (None, 401),
            "not bearer": ("", 401),
            "wrong token": (good[:-2] + "xx", 401),
            "another session's token": (token_of(mcp_wb, other.session_id), 401),
        }
        for what, (token, status) in cases.items():
            response = _post(url, token) if token != "" else httpx.post(
                url, headers={**ACCEPT, "Authorization": f"Basic {good}"}, json=INITIALIZE)
            assert response.status_code == status, what
            error = response.json()["error"]
            assert error["code"] == "unauthorized" and error["message"], what
        # an API key-like secret, the server secret itself: not a session token
        assert _post(url, base64.urlsafe_b64encode(load_secret(mcp_wb.home)).decode()).status_code == 401
        unknown = _post(f"{base_url}/mcp/000000000000", token_of(mcp_wb, "000000000000"))
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "session_not_found"
        assert _post(f"{base_url}/mcp/a%2Fb", good).status_code == 404
        assert _post(f"{base_url}/mcp/", good).status_code == 404
        # the other session's own token opens the other session, and that one only
        assert _post(f"{base_url}/mcp/{other.session_id}", token_of(mcp_wb, other.session_id)).status_code == 200

        async def refused() -> None:
            with pytest.raises(Exception):  # noqa: B017 (the client reports the 401 its own way)
                async with http_client(url, token_of(mcp_wb, other.session_id)) as client:
                    await client.list_tools()

        anyio.run(refused)
    finally:
        other.close(delete_workspace=True)
    # a closed session's token is dead
    closed = _post(f"{base_url}/mcp/{other.session_id}", token_of(mcp_wb, other.session_id))
    assert closed.status_code == 404 and closed.json()["error"]["code"] == "session_closed"


def test_endpoint_serves_again_after_its_lifespan(mcp_wb: Workbench, shop: Session) -> None:
    """One app served twice in turn (each server run is a new event loop and a new SDK session manager)."""
    app, _ = mcp_app(mcp_wb)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "WORKBENCH_REMOTE_WORKBENCH", "arguments": {"code_to_execute": "6 * 7"}}}
    for _ in range(2):
        with serving(mcp_wb, app) as url:
            response = httpx.post(f"{url}/mcp/{shop.session_id}", json=body, timeout=60, headers={
                **ACCEPT, "Authorization": f"Bearer {token_of(mcp_wb, shop.session_id)}",
                "MCP-Protocol-Version": "2025-06-18"})
            assert response.status_code == 200 and "42" in response.json()["result"]["content"][0]["text"]


def test_token_dies_with_its_session_mid_connection(mcp_wb: Workbench, base_url: str) -> None:
    s = mcp_wb.create("mcp-closing")
    url = f"{base_url}/mcp/{s.session_id}"

    async def main() -> None:
        async with http_client(url, token_of(mcp_wb, s.session_id), "legacy") as client:
            assert not (await client.call_tool("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "1"})).is_error
            await anyio.to_thread.run_sync(s.close)
            with pytest.raises(Exception):  # noqa: B017 (404 from the endpoint, however the client words it)
                await client.call_tool("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "1"})

    anyio.run(main)


# --- stdio ---------------------------------------------------------------------------------------------------------


def test_stdio_lists_calls_and_reads(mcp_wb: Workbench, shop: Session) -> None:
    """`python -m workbench mcp --session ID --app mcp_app:wb` through the SDK's stdio client."""
    env = {"WORKBENCH_HOME": str(mcp_wb.home), "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
           **{k: v for k, v in os.environ.items() if k.startswith("WORKBENCH_") and k != "WORKBENCH_HOME"}}
    params = StdioServerParameters(command=sys.executable, cwd=str(TESTS), env=env,
                                   args=["-m", "workbench", "mcp", "--session", shop.session_id,
                                         "--app", "mcp_app:wb"])

    async def main() -> None:
        async with Client(params, cache=None) as client:
            listed = await client.list_tools()
            assert [tool.name for tool in listed.tools] == list(NAMES)
            ran = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "print('over stdio')"})
            assert "over stdio" in text_of(ran)
            result = await client.call_tool("WORKBENCH_MULTI_EXECUTE_TOOL",
                                            {"tools": [{"tool_slug": "MCP_LIST_ORDERS", "arguments": {}}]})
            offload = json.loads(text_of(result))["results"][0]["offload"]
            link = next(link for link in links_of(result) if link.title == offload["path"])
            part = content_of(await client.read_resource(f"{link.uri}?offset=0&length=64"))
            assert isinstance(part, types.TextResourceContents)
            assert part.text.encode() == shop.files.read(offload["path"])[:64]

    anyio.run(main)


def test_stdio_refuses_a_closed_session_and_a_bad_app(mcp_wb: Workbench) -> None:
    closed = mcp_wb.create("mcp-stdio-closed")
    closed.close()
    env = {**os.environ, "WORKBENCH_HOME": str(mcp_wb.home),
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    for args, message in [(["--session", closed.session_id], "is closed"),
                          (["--session", "000000000000"], "000000000000"),
                          (["--session", closed.session_id, "--app", "mcp_app:nothing"], "could not load"),
                          (["--session", closed.session_id, "--app", "mcp_app:ROWS"], "not a Workbench")]:
        proc = subprocess.run([sys.executable, "-m", "workbench", "mcp", *args], cwd=TESTS, env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert proc.stdout == ""  # nothing but MCP messages would ever go to stdout


def test_uri_round_trip() -> None:
    for path in ("a.txt", ".responses/x.json", "dir/with space/ü?#%.txt", "a/../b"):
        assert parse_uri(file_uri(path)) == (path, 0, None)
    assert parse_uri("workbench://files/a%2Fb?offset=3&length=4") == ("a/b", 3, 4)

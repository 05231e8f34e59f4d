"""The MCP endpoint against a hostile sandbox and hostile clients: resource URIs and planted links never read a host
file, odd names neither break a URI nor the protocol, a huge file is never read whole, and nothing but the session's
own token opens its endpoint."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_server import serving

from workbench import Session, Workbench
from workbench.server.mcp import MAX_BODY, READ_LIMIT, file_uri
from workbench.server.tokens import load_secret, session_token

SECRET_TEXT = "host-secret-8c1f"


@pytest.fixture(scope="module")
def base_url(wb: Workbench) -> Iterator[str]:
    with serving(wb) as url:
        yield url


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    path = tmp_path / "host.txt"
    path.write_text(SECRET_TEXT)
    return path


@asynccontextmanager
async def _client(wb: Workbench, base_url: str, session: Session) -> AsyncIterator[Client]:
    """The official client over Streamable HTTP with the session's own token."""
    token = session_token(load_secret(wb.home), session.session_id)
    url = f"{base_url}/mcp/{session.session_id}"
    async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
                Client(streamable_http_client(url, http_client=http), cache=None) as client):
        yield client


def test_resource_uris_never_leave_the_workspace(wb: Workbench, fresh: Session, base_url: str,
                                                 host_file: Path) -> None:
    fresh.execute(f"import os\nos.makedirs('.responses', exist_ok=True)\n"
                  f"os.symlink({str(host_file)!r}, '.responses/evil.json')\n"
                  f"os.symlink('/etc', 'etc')\nos.symlink('../../../../../..', 'up')\n"
                  f"os.symlink('/workspace/inside.txt', 'ok-link')\nopen('inside.txt', 'w').write('inside')")
    attempts = [
        ".responses/evil.json", "etc/passwd", "up" + str(host_file), str(host_file), "/etc/passwd",
        "../" * 6 + str(host_file).lstrip("/"),
    ]
    uris = [file_uri(path) for path in attempts] + [
        "workbench://files/../../../../etc/passwd",
        "workbench://files/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "workbench://files/a/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "workbench://files//etc/passwd", "workbench://files/%2Fetc%2Fpasswd",
        "workbench://files/inside.txt%00.json", "workbench://files/%252e%252e/etc/passwd",
        "workbench://files/%C0%AE%C0%AE/%C0%AE%C0%AE/etc/passwd",  # overlong UTF-8 dots
        f"workbench://files{host_file}", f"workbench://files/{'up' * 1}{host_file}?offset=0&length=10",
    ]

    async def main() -> None:
        async with _client(wb, base_url, fresh) as client:
            for uri in uris:
                with pytest.raises(MCPError) as caught:
                    await client.read_resource(uri)
                assert SECRET_TEXT not in str(caught.value) and "root:" not in str(caught.value), uri
            inside = await client.read_resource(file_uri("ok-link"))  # a link that stays inside is followed
            assert isinstance(inside.contents[0], types.TextResourceContents)
            assert inside.contents[0].text == "inside"
            listed = await client.list_resources()  # a symlink is not a file: not listed
            assert ".responses/evil.json" not in {r.title for r in listed.resources}

    anyio.run(main)
    assert host_file.read_text() == SECRET_TEXT


def test_odd_names_and_text_from_the_sandbox(wb: Workbench, fresh: Session, base_url: str) -> None:
    """Names with every kind of character, a name that is not UTF-8, and output with lone surrogates: listed, linked
    and read without breaking a URI or the protocol."""
    fresh.execute("import os\nos.makedirs('.outputs', exist_ok=True)\n"
                  "for name in ['a b?c#d%e&f=g.txt', 'new\\nline.txt', 'é 中文.txt', '..%2F..%2Fx.txt', '%00.txt']:\n"
                  "    open('.outputs/' + name, 'w').write(name)\n"
                  "fd = os.open(b'.outputs/bad\\xff\\xfe.txt', os.O_CREAT | os.O_WRONLY); os.write(fd, b'raw'); "
                  "os.close(fd)\nos.mkfifo('.outputs/fifo.txt')")

    async def main() -> None:
        async with _client(wb, base_url, fresh) as client:
            listed = await client.list_resources()
            by_title = {r.title: r for r in listed.resources}
            assert "fifo.txt" not in {r.name for r in listed.resources}
            for name in ["a b?c#d%e&f=g.txt", "new\nline.txt", "é 中文.txt", "..%2F..%2Fx.txt", "%00.txt"]:
                resource = by_title[f".outputs/{name}"]
                assert resource.uri.isascii() and "\n" not in resource.uri and " " not in resource.uri
                read = await client.read_resource(resource.uri)
                assert isinstance(read.contents[0], types.TextResourceContents)
                assert read.contents[0].text == name
            raw = by_title[".outputs/bad\\xff\\xfe.txt"]
            assert raw.uri == "workbench://files/.outputs/bad%FF%FE.txt"
            read = await client.read_resource(raw.uri)
            assert isinstance(read.contents[0], types.TextResourceContents) and read.contents[0].text == "raw"
            with pytest.raises(MCPError, match="not a regular file"):
                await client.read_resource(file_uri(".outputs/fifo.txt"))  # never blocks on a FIFO
            printed = await client.call_tool("WORKBENCH_REMOTE_WORKBENCH",
                                             {"code_to_execute": "print('lone \\udcff \\ud800 end')"})
            text = printed.content[0]
            assert isinstance(text, types.TextContent) and "end" in text.text

    anyio.run(main)


def test_a_huge_file_is_never_read_whole(wb: Workbench, fresh: Session, base_url: str) -> None:
    """A sparse 8 GiB file the sandbox made: refused whole, read in a slice at its end, numbers bounded."""
    fresh.execute("with open('huge.bin', 'wb') as f:\n    f.truncate(8 << 30)\n    f.seek((8 << 30) - 4)\n"
                  "    f.write(b'tail')")
    uri = file_uri("huge.bin")

    async def main() -> None:
        async with _client(wb, base_url, fresh) as client:
            with pytest.raises(MCPError, match="read it in slices"):
                await client.read_resource(uri)
            end = await client.read_resource(f"{uri}?offset={(8 << 30) - 4}&length=100")
            assert end.contents[0].meta == {"size": 8 << 30, "offset": (8 << 30) - 4, "length": 4}
            for query in [f"length={READ_LIMIT + 1}", "length=" + "9" * 40, "offset=-1", "offset=1e3",
                          "offset=1&offset=2", "length=%EF%BC%91"]:  # (a full-width digit)
                with pytest.raises(MCPError):
                    await client.read_resource(f"{uri}?{query}")

    anyio.run(main)


def test_tokens_reach_one_open_session_only(wb: Workbench, base_url: str) -> None:
    a, b = wb.create("mcp-attacker"), wb.create("mcp-victim")
    secret = load_secret(wb.home)
    token_a = session_token(secret, a.session_id)
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-06-18"}
    try:
        b.execute("victim = 'secret-of-b'")
        for url in [f"{base_url}/mcp/{b.session_id}", f"{base_url}/mcp/{b.session_id}/",
                    f"{base_url}/mcp/{a.session_id}/../{b.session_id}", f"{base_url}/mcp/{b.session_id}?s={a.session_id}",
                    f"{base_url}/mcp/{b.session_id.upper()}"]:
            response = httpx.post(url, headers={**headers, "Authorization": f"Bearer {token_a}"}, json=initialize)
            assert response.status_code in (401, 404), url
            assert set(response.json()) == {"error"} and "secret-of-b" not in response.text
        for token in [token_a.upper(), token_a + "x", token_a[:-1], "Bearer", token_a.replace("_", "/"),
                      session_token(b"x" * 32, b.session_id), "wbs_" + "A" * 43]:
            response = httpx.post(f"{base_url}/mcp/{b.session_id}",
                                  headers={**headers, "Authorization": f"Bearer {token}"}, json=initialize)
            assert response.status_code == 401, token
        # a header with two tokens, and a token given elsewhere than the Authorization header
        both = httpx.post(f"{base_url}/mcp/{b.session_id}", json=initialize, headers={
            **headers, "Authorization": f"Bearer {token_a} {session_token(secret, b.session_id)}"})
        assert both.status_code == 401
        query = httpx.post(f"{base_url}/mcp/{b.session_id}?token={session_token(secret, b.session_id)}",
                           headers=headers, json=initialize)
        assert query.status_code == 401
        # the own session works, also for a request the SDK's modern path serves
        ok = httpx.post(f"{base_url}/mcp/{a.session_id}", headers={**headers, "Authorization": f"Bearer {token_a}"},
                        json=initialize)
        assert ok.status_code == 200 and "WORKBENCH_REMOTE_WORKBENCH" in ok.text
        # a body past the cap is refused before it is parsed
        big = httpx.post(f"{base_url}/mcp/{a.session_id}", headers={**headers, "Authorization": f"Bearer {token_a}"},
                         content=b"[" + b" " * (MAX_BODY + 10) + b"]")
        assert big.status_code == 413
    finally:
        a.close(delete_workspace=True)
        b.close(delete_workspace=True)
    dead = httpx.post(f"{base_url}/mcp/{a.session_id}", headers={**headers, "Authorization": f"Bearer {token_a}"},
                      json=initialize)
    assert dead.status_code == 404 and json.loads(dead.text)["error"]["code"] == "session_closed"

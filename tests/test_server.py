"""`workbench serve` as clients see it: a real server in a subprocess, httpx and RemoteWorkbench against it."""
from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from served import Server

from workbench import (
    AsyncRemoteWorkbench,
    ConflictError,
    FileError,
    PathOutsideWorkspaceError,
    RemoteWorkbench,
    SessionClosedError,
    SessionNotFoundError,
    TooManyExecutionsError,
    Workbench,
    WorkbenchError,
    WorkspaceFileNotFoundError,
    WorkspaceFullError,
)
from workbench.server.tokens import load_secret, session_token


def events(response: httpx.Response) -> list[tuple[str, object]]:
    found, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            found.append((name, json.loads(line[5:])))
    return found


def test_openapi_is_valid_and_docs_are_served(served: Server, api_key: str) -> None:
    from openapi_spec_validator import validate

    with served.client(api_key) as http:
        spec = http.get("/openapi.json").json()
        validate(spec)
        assert "/v1/sessions/{session_id}/execute/stream" in spec["paths"]
        assert http.get("/docs").status_code == 200
    # the API key is declared as a bearer scheme (the docs page can authorise) and applied to all but /healthz
    schemes = spec["components"]["securitySchemes"]
    (name,) = [n for n, scheme in schemes.items() if scheme["type"] == "http" and scheme["scheme"] == "bearer"]
    assert spec["security"] == [{name: []}]
    operations = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
    assert operations[("/healthz", "get")]["security"] == []
    assert all("security" not in op for (path, _), op in operations.items() if path != "/healthz")
    assert len([path for path, _ in operations if path.startswith("/v1/")]) > 20
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
    for private in ("/openapi.json", "/docs", "/v1/sessions"):  # the scheme is what the server does
        assert httpx.get(f"{served.url}{private}").status_code == 401
    with served.client(api_key) as http:
        assert http.get("/v1/sessions").status_code == 200


def test_rest_api_end_to_end(served: Server, api_key: str, home: Path) -> None:
    with served.client(api_key) as http:
        created = http.post("/v1/sessions", json={"user_id": "rest-user", "toolkits": ["test"],
                                                  "limits": {"memory": "256m"}, "metadata": {"team": "a"}})
        assert created.status_code == 201, created.text
        session = created.json()
        sid = session["session_id"]
        assert "kernel" not in session or session["kernel"] is None  # never its connection keys
        assert session["mcp"]["url"] == f"{served.url}/mcp/{sid}"
        assert session["mcp"]["headers"] == {"Authorization": f"Bearer {session_token(load_secret(home), sid)}"}
        assert session["config"]["limits"]["memory"] == 256 * 1024**2
        try:
            assert http.get(f"/v1/sessions/{sid}").json()["config_version"] == 1
            listed = http.get("/v1/sessions", params=[("metadata", "team=a"), ("user_id", "rest-user")]).json()
            assert [s["session_id"] for s in listed] == [sid]
            assert http.get("/v1/sessions", params={"metadata": "team=b"}).json() == []

            result = http.post(f"/v1/sessions/{sid}/execute", json={"code": "x = 41\nprint('out')\nx + 1"}).json()
            assert result["text"] == "42" and result["stdout"] == "out\n"

            code = "import sys, time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.2)\n" \
                   "print('err', file=sys.stderr, flush=True)\ndisplay('shown')\n1 / 0"
            with http.stream("POST", f"/v1/sessions/{sid}/execute/stream", json={"code": code}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                got = events(response)
            names = [name for name, _ in got]
            assert names[-1] == "done" and names.index("stderr") > names.index("stdout")
            assert "".join(d["text"] for n, d in got if n == "stdout") == "0\n1\n2\n"  # in order
            assert names.index("result") < names.index("error") < names.index("done")
            assert got[-1][1]["error"]["ename"] == "ZeroDivisionError"

            updated = http.patch(f"/v1/sessions/{sid}", json={"metadata": {"team": "b"}, "config_version": 1})
            assert updated.json() == {"config_version": 2}
            stale = http.patch(f"/v1/sessions/{sid}", json={"toolkits": [], "config_version": 1})
            assert stale.status_code == 409 and stale.json()["error"]["code"] == "conflict"

            put = http.put(f"/v1/sessions/{sid}/files/content", params={"path": "in/data.csv"},
                           content=iter([b"a,b\n", b"1,2\n"]))
            assert put.status_code == 200 and put.json()["size"] == 8
            assert http.get(f"/v1/sessions/{sid}/files/content", params={"path": "in/data.csv"}).content == b"a,b\n1,2\n"
            paths = [f["path"] for f in http.get(f"/v1/sessions/{sid}/files", params={"recursive": True}).json()]
            assert "in/data.csv" in paths
            out = http.get(f"/v1/sessions/{sid}/files/content", params={"path": "../../etc/passwd"})
            assert out.status_code == 400 and out.json()["error"]["code"] == "path_outside_workspace"
            missing = http.get(f"/v1/sessions/{sid}/files/content", params={"path": "nope.txt"})
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
            assert http.delete(f"/v1/sessions/{sid}/files", params={"path": "in"}).status_code == 204
            assert http.get(f"/v1/sessions/{sid}/files/exists", params={"path": "in"}).json() == {"exists": False}

            command = http.post(f"/v1/sessions/{sid}/commands", json={"cmd": "echo hi; exit 3"}).json()
            assert command["exit_code"] == 3 and command["stdout"] == "hi\n"

            assert [t["slug"] for t in http.get(f"/v1/sessions/{sid}/tools").json()] == ["TEST_ECHO"]
            tool = http.post(f"/v1/sessions/{sid}/tools/execute", json={"slug": "TEST_ECHO",
                                                                         "arguments": {"text": "ab", "times": 2}})
            assert tool.json()["data"] == {"echo": "abab"}
            many = http.post(f"/v1/sessions/{sid}/tools/execute_many", json={"calls": [
                {"slug": "TEST_ECHO", "arguments": {"text": "x"}}, {"slug": "CRM_GET_CONTACT", "arguments": {}}]})
            assert [r["error_kind"] for r in many.json()] == [None, "not_allowed"]
            definitions = http.get(f"/v1/sessions/{sid}/tools/definitions", params={"format": "anthropic"}).json()
            assert "WORKBENCH_REMOTE_WORKBENCH" in {d["name"] for d in definitions}
            search = http.post(f"/v1/sessions/{sid}/tools/search", json={"queries": [{"use_case": "echo text"}]})
            assert "TEST_ECHO" in search.json()["text"]
            answer = http.post(f"/v1/sessions/{sid}/tool_calls", json={
                "name": "WORKBENCH_REMOTE_WORKBENCH", "arguments": '{"code_to_execute": "x"}'}).json()
            assert answer == {"text": "result:\n41", "is_error": False}
            bad = http.post(f"/v1/sessions/{sid}/tool_calls", json={"name": "NOPE", "arguments": {}}).json()
            assert bad["is_error"] and bad["text"].startswith("[error: not_found]")
            logs = http.get(f"/v1/sessions/{sid}/logs").json()
            assert [e["kind"] for e in logs][:2] == ["execution", "execution"]
            assert logs[0]["detail"]["metadata"] == {"team": "a"}

            invalid = http.post(f"/v1/sessions/{sid}/execute", json={"code": 1, "nope": True})
            assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_request"
            assert "body.code" in invalid.json()["error"]["message"]  # where, as every route says it
            for broken in (b'{"code": ', b"", b"[]", '{"code": "\u00e9"'.encode("latin-1")):
                answer = http.post(f"/v1/sessions/{sid}/execute", content=broken,
                                   headers={"Content-Type": "application/json"})
                assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", answer.text
            plain = http.post(f"/v1/sessions/{sid}/execute", content=b'{"code": "1"}',
                              headers={"Content-Type": "text/plain"})
            assert plain.status_code == 422 and "Content-Type" in plain.json()["error"]["message"]
            assert http.post(f"/v1/sessions/{sid}/execute", content=b'{"code": "41 + 1"}',
                             headers={"Content-Type": "application/vnd.api+json"}).json()["text"] == "42"
        finally:
            assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        gone = http.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "session_closed"
        assert http.get(f"/v1/sessions/{sid}").json()["status"] == "closed"
        assert http.get("/v1/sessions/nosuchsession").json()["error"]["code"] == "session_not_found"


def test_remote_workbench_has_the_same_api(served: Server, api_key: str) -> None:
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="remote-user", toolkits=["test"],
                                                              metadata={"run": "1"}) as s:
        assert s.mcp is not None and s.mcp.url.endswith(f"/mcp/{s.session_id}")
        assert s.execute("x = 20").ok and s.execute("x * 2 + 2").text == "42"
        chunks: list[str] = []
        errors: list[str] = []
        r = s.execute("print('a', flush=True); import time; time.sleep(0.1); print('b'); 1/0",
                      on_stdout=chunks.append, on_error=lambda e: errors.append(e.ename))
        assert "".join(chunks) == "a\nb\n" and errors == ["ZeroDivisionError"] and r.error is not None
        streamed: list[str] = []
        c = s.commands.run("echo one; echo two >&2; exit 4", on_stdout=streamed.append, on_stderr=streamed.append)
        assert c.exit_code == 4 and sorted(streamed) == ["one\n", "two\n"]
        info = s.files.write("big.bin", iter([b"x" * 3_000_000, b"y"]))
        assert info.size == 3_000_001 and s.files.read("big.bin")[-2:] == b"xy"
        with s.files.open("big.bin") as handle:
            assert handle.read(5) == b"xxxxx"
        assert [f.path for f in s.files.list()] == ["big.bin"] and s.files.exists("big.bin")
        with pytest.raises(PathOutsideWorkspaceError):
            s.files.read("/etc/passwd")
        with pytest.raises(WorkspaceFileNotFoundError):
            s.files.remove("nothing-here")
        s.files.write("old.txt", b"kept")
        assert s.files.rename("old.txt", "big.bin").path == "big.bin" and s.files.read("big.bin") == b"kept"
        assert not s.files.exists("old.txt")  # an entry of the new name is replaced, as by os.rename
        with pytest.raises(WorkspaceFileNotFoundError):
            s.files.rename("nothing-here", "x")
        for path, new_name in (("big.bin", "../escaped"), ("big.bin", "a/b"), ("../../etc/passwd", "x")):
            with pytest.raises(FileError):  # PathOutsideWorkspaceError is a FileError too
                s.files.rename(path, new_name)
        with served.client(api_key) as http:  # JSON can carry a lone surrogate, which no file name can hold
            for body in ({"path": "big.bin", "new_name": "\ud800"}, {"path": "\ud800", "new_name": "x"}):
                answer = http.post(f"/v1/sessions/{s.session_id}/files/rename", content=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
                assert answer.status_code == 400 and answer.json()["error"]["code"] == "file_error", answer.text
        assert s.files.read("big.bin") == b"kept"
        assert 0 < s.files.usage() < s.files.capacity() == s.limits.workspace_size
        assert s.execute_tool("TEST_ECHO", {"text": "hi"}).data == {"echo": "hi"}
        assert [r.data for r in s.execute_tools([("TEST_ECHO", {"text": "a"}), ("TEST_ECHO", {"text": "b"})])] == [
            {"echo": "a"}, {"echo": "b"}]
        assert s.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "x"}) == "result:\n20"
        response = {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "WORKBENCH_REMOTE_BASH_TOOL", "input": {"command": "echo ok"}},
            {"type": "tool_use", "id": "t2", "name": "OTHER", "input": {}}]}
        (message,) = s.handle_tool_calls(response)
        assert [b["tool_use_id"] for b in message["content"]] == ["t1"] and "ok" in message["content"][0]["content"]
        langchain = {t.name: t for t in s.tools("langchain")}
        assert langchain["WORKBENCH_REMOTE_WORKBENCH"].invoke({"code_to_execute": "x + 1"}) == "result:\n21"
        assert {t["name"] for t in s.tools("mcp", include_tools=True)} >= {"TEST_ECHO", "WORKBENCH_SEARCH_TOOLS"}
        assert [t.slug for t in s.available_tools()] == ["TEST_ECHO"]
        assert s.metadata == {"run": "1"}
        other = wb.use(s.session_id)
        assert other.update(metadata={"run": "2"}) == 2
        with pytest.raises(ConflictError):
            s.update(toolkits=[])  # s read version 1
        assert s.update(toolkits=[], config_version=2) == 3
        assert s.session_id in [r.session_id for r in wb.list(metadata={"run": "2"})]
        assert any(e.kind == "execution" and e.status == "error" for e in s.logs())
        with pytest.raises(WorkbenchError, match="has no tool 'NOT_THERE'"):
            wb.tool(slug="NOT_THERE")(lambda: None)
    with pytest.raises(SessionClosedError):
        RemoteWorkbench(served.url, api_key).use(s.session_id)
    with pytest.raises(SessionNotFoundError):
        RemoteWorkbench(served.url, api_key).use("0123456789ab")


def test_a_large_remote_read_is_exact(served: Server, api_key: str) -> None:
    """Tens of MB read back whole and piecewise (the reader once grew its buffer quadratically: 8.6 s for 32 MB)."""
    data = os.urandom(40 << 20)

    def digest(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="reader", limits={"memory": "256m"}) as s:
        s.files.write("large.bin", data)
        assert digest(s.files.read("large.bin")) == digest(data)
        with s.files.open("large.bin") as handle:
            pieces = [handle.read(100_001), handle.read(5 << 20), handle.read(1), handle.read()]
            assert handle.read() == b"" and handle.read(7) == b""
        assert [len(p) for p in pieces[:3]] == [100_001, 5 << 20, 1] and digest(b"".join(pieces)) == digest(data)
        s.close(delete_workspace=True)


def test_pause_resume_fork_and_notebook_through_the_server(served: Server, api_key: str, tmp_path: Path) -> None:
    import nbformat

    with RemoteWorkbench(served.url, api_key) as wb:
        s = wb.create(user_id="remote-user", limits={"memory": "256m"})
        try:
            s.execute("import pandas as pd\nframe = pd.DataFrame({'a': [1, 2]})\ngen = (i for i in range(2))")
            state = s.pause()
            assert "frame" in state.names and "gen" in state.skipped and s.paused
            fork = wb.create(user_id="remote-user", from_session=s.session_id)  # forking a paused session
            with pytest.raises(SessionNotFoundError):
                wb.create(user_id="someone-else", from_session=s.session_id)
            r = s.execute("int(frame.a.sum())")
            assert r.text == "3" and r.state_restored and not s.paused
            assert fork.execute("frame['b'] = 1\nlist(frame.columns)").text == "['a', 'b']"
            assert s.execute("list(frame.columns)").text == "['a']"
            s.pause()
            s.resume()
            assert not s.paused and s.execute("frame.shape").text == "(2, 1)"
            nb = nbformat.read(s.export_notebook(tmp_path / "remote.ipynb"), as_version=4)
            nbformat.validate(nb)
            assert nb.cells[-1].source == "frame.shape" and nb.cells[-1].outputs[0]["data"]["text/plain"] == "(2, 1)"
            fork.close(delete_workspace=True)
        finally:
            s.close(delete_workspace=True)
    # a fork belongs to the key that asked for it: another key does not see it
    with httpx.Client(base_url=served.url, headers={"Authorization": "Bearer wbk_not-a-key"}) as other:
        assert other.post(f"/v1/sessions/{fork.session_id}/fork").status_code == 401


def test_async_remote_workbench(served: Server, api_key: str) -> None:
    async def main() -> list[str | None]:
        async with AsyncRemoteWorkbench(served.url, api_key) as wb:
            sessions = await asyncio.gather(*(wb.create(user_id=f"async-{i}", limits={"memory": "256m"})
                                              for i in range(2)))
            seen: list[str] = []

            async def on_stdout(text: str) -> None:
                seen.append(text)

            results = await asyncio.gather(*(s.execute(f"print({i}); {i} ** 2", on_stdout=on_stdout)
                                             for i, s in enumerate(sessions)))
            await sessions[0].files.write("a.txt", b"async")
            assert await sessions[0].files.read("a.txt") == b"async"
            assert (await sessions[0].files.rename("a.txt", "b.txt")).size == 5
            assert await sessions[0].files.read("b.txt") == b"async"
            assert sorted(seen) == ["0\n", "1\n"]
            await asyncio.gather(*(s.close(delete_workspace=True) for s in sessions))
            return [r.text for r in results]

    assert asyncio.run(main()) == ["0", "1"]


def test_a_client_that_disconnects_mid_execution_leaves_the_session_usable(served: Server, api_key: str) -> None:
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="leaver", limits={"memory": "256m"}) as s:
        with served.client(api_key) as http, http.stream(
                "POST", f"/v1/sessions/{s.session_id}/execute/stream",
                json={"code": "import time\nprint('started', flush=True)\ntime.sleep(2)\nfinished = True"}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # the first event: the cell runs; the client goes away
        assert s.execute("finished").text == "True"  # queued behind the cell, which ran to its end
        assert s.execute("1 + 1").text == "2"


def test_aborted_downloads_leave_no_file_open(served: Server, api_key: str) -> None:
    """Clients that go away before or during a download: the server closes the file at once, not at some GC."""
    assert served.proc is not None
    fds = Path(f"/proc/{served.proc.pid}/fd")

    def held() -> int:
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd).endswith("/aborted.bin"))

    def abort(sid: str, read_first: bool) -> None:
        with socket.create_connection(("127.0.0.1", served.port)) as raw:
            raw.sendall(f"GET /v1/sessions/{sid}/files/content?path=aborted.bin HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {api_key}\r\n\r\n".encode())
            if read_first:
                assert raw.recv(12) == b"HTTP/1.1 200"  # the file is open and streaming
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") * 2)  # close: RST

    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="aborter", limits={"memory": "256m"}) as s:
        s.files.write("aborted.bin", iter([b"z" * (1 << 20)] * 64))  # more than the sockets' buffers hold
        for i in range(40):
            abort(s.session_id, read_first=i % 2 == 0)
        assert len(s.files.read("aborted.bin")) == 64 << 20  # the server still serves it
        deadline = time.monotonic() + 10
        while held() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held() == 0
        s.close(delete_workspace=True)


def test_a_client_that_disconnects_from_a_plain_execute_leaves_the_session_usable(served: Server,
                                                                                 api_key: str) -> None:
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="leaver", limits={"memory": "256m"}) as s:
        with served.client(api_key) as http, pytest.raises(httpx.ReadTimeout):
            http.post(f"/v1/sessions/{s.session_id}/execute", timeout=httpx.Timeout(30, read=0.5),
                      json={"code": "import time\ntime.sleep(3)\nplain_finished = True"})
        assert s.execute("plain_finished").text == "True"  # the cell ran to its end; this one waited for it
        assert s.execute("2 + 2").text == "4"
        assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok"}
        s.close(delete_workspace=True)


def test_executions_on_one_session_from_many_clients_stay_in_order(served: Server, api_key: str) -> None:
    """8 clients on the same session, each sending its 10 executions in order: each one's land in order, all 80.
    Then executions queued by 6 clients while the session is busy, 250 ms apart: they run in the order sent (the
    server hands none of them to the kernel ahead of one that came before it)."""
    threads, steps = 8, 10
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="shared", limits={"memory": "256m"}) as s:
        s.execute("seq = []")

        def client(t: int) -> None:
            with RemoteWorkbench(served.url, api_key) as own:
                mine = own.use(s.session_id)
                for i in range(steps):
                    assert mine.execute(f"seq.append(({t}, {i}))").ok

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(client, range(threads)))
        seq = ast.literal_eval(s.execute("seq").text or "None")
        assert sorted(seq) == [(t, i) for t in range(threads) for i in range(steps)]  # all 80, once each
        for t in range(threads):
            assert [i for u, i in seq if u == t] == list(range(steps))

        s.execute("order = []")
        queued = [RemoteWorkbench(served.url, api_key) for _ in range(6)]
        try:
            sessions = [each.use(s.session_id) for each in queued]  # each on a connection of its own
            with ThreadPoolExecutor(7) as pool:
                blocker = pool.submit(s.execute, "import pathlib, time\npathlib.Path('busy').touch()\ntime.sleep(3)")
                deadline = time.monotonic() + 60
                while not s.files.exists("busy") and time.monotonic() < deadline:
                    time.sleep(0.05)
                sent = []
                for i, each in enumerate(sessions):
                    sent.append(pool.submit(each.execute, f"order.append({i})"))
                    time.sleep(0.25)
                assert not blocker.done(), "the cell ended before every execution was queued behind it"
                assert blocker.result().ok and all(f.result().ok for f in sent)
        finally:
            for each in queued:
                each.close()
        assert s.execute("order").text == str(list(range(6)))
        s.close(delete_workspace=True)


def test_request_size_and_workspace_caps(served: Server, api_key: str) -> None:
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(
            user_id="capped", limits={"memory": "256m", "workspace_size": "2m"}) as s:
        with served.client(api_key) as http:
            big = http.post(f"/v1/sessions/{s.session_id}/execute", json={"code": "#" * (5 << 20)})
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
            chunked = http.post(f"/v1/sessions/{s.session_id}/execute", content=iter([b"x" * (1 << 20)] * 5),
                                headers={"Content-Type": "application/json"})  # no Content-Length: counted
            assert chunked.status_code == 413, chunked.text
        with pytest.raises(WorkspaceFullError):
            s.files.write("fill.bin", iter([b"z" * (1 << 20)] * 3))
        assert not s.files.exists("fill.bin") and s.execute("1").text == "1"


def test_per_key_cap_on_concurrent_executions(wb: Workbench, home: Path) -> None:
    server = Server(home, "--max-executions-per-key", "1").start()
    try:
        key = server.key("capped")
        with RemoteWorkbench(server.url, key) as remote, remote.create(user_id="cap", limits={"memory": "256m"}) as s:
            runner = threading.Thread(target=s.execute, args=("import time; time.sleep(1.5)",))
            runner.start()
            time.sleep(0.5)
            with pytest.raises(TooManyExecutionsError):
                s.execute("1")
            with server.client(key) as http:
                refused = http.post(f"/v1/sessions/{s.session_id}/execute", json={"code": "1"})
                assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_executions"
            runner.join()
            assert s.execute("2").text == "2"  # the slot is back
    finally:
        server.stop()


def test_a_restarted_server_serves_its_sessions_again(wb: Workbench, home: Path) -> None:
    server = Server(home).start()
    key = server.key("restart")
    try:
        remote = RemoteWorkbench(server.url, key)
        s = remote.create(user_id="restart", limits={"memory": "256m"})
        s.execute("kept = 'across restarts'")
        s.files.write("note.txt", b"still here")
        server.stop()
        server.start()
        again = RemoteWorkbench(server.url, key).use(s.session_id)
        assert again.execute("kept").text == "'across restarts'"  # the same kernel, variables intact
        assert again.files.read("note.txt") == b"still here"
        assert [e.status for e in again.logs() if e.kind == "execution"] == ["ok", "ok"]
        again.close(delete_workspace=True)
    finally:
        server.stop()


def test_many_agents_at_once(served: Server, api_key: str) -> None:
    """100 clients, each driving a session of its own, all at once; each session's executions stay in order."""
    clients = 100

    def agent(i: int) -> list[int]:
        with RemoteWorkbench(served.url, api_key) as wb, wb.create(
                user_id=f"agent-{i}", limits={"memory": "128m", "cpus": 0.2}) as s:
            s.execute("seen = []")
            for step in range(5):
                s.execute(f"seen.append({step})")
            order = s.execute("seen").text
            s.close(delete_workspace=True)
            return json.loads(order or "null")

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        orders = list(pool.map(agent, range(clients)))
    assert orders == [[0, 1, 2, 3, 4]] * clients
    print(f"{clients} agents in {time.monotonic() - started:.1f}s")


def test_serve_warns_off_loopback_without_tls_and_refuses_a_bad_app(wb: Workbench, home: Path) -> None:
    import os
    import subprocess
    import sys

    server = Server(home, "--host", "0.0.0.0").start()
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        server.stop()
    assert "without TLS" in server.log.read_text()
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    for app, said in (("no_such_module:wb", "no_such_module"), ("readme_app:README", "not a Workbench")):
        proc = subprocess.run([sys.executable, "-m", "workbench", "serve", "--app", app, "--port", "1"],
                              capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=60)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr

"""Every way a request to `workbench serve` can lack the right to what it asks, against a real server: no key, a
wrong or malformed key, a revoked key, another key's session, a session's MCP token used elsewhere; and what a
sandbox puts in a file name or an output reaching the HTTP client intact and harmless."""
from __future__ import annotations

import re

import httpx
import pytest
from served import Server, cli

from workbench import RemoteWorkbench, SessionNotFoundError
from workbench.errors import AuthenticationError

ROUTES = [("GET", "/v1/sessions"), ("POST", "/v1/sessions"), ("GET", "/openapi.json"), ("GET", "/docs"),
          ("GET", "/v1/tools"), ("GET", "/v1/sessions/{sid}"), ("POST", "/v1/sessions/{sid}/execute"),
          ("GET", "/v1/sessions/{sid}/files/content?path=a.txt"), ("DELETE", "/v1/sessions/{sid}"),
          ("GET", "/nowhere")]


@pytest.fixture(scope="module")
def victim(served: Server, api_key: str) -> str:
    with RemoteWorkbench(served.url, api_key) as wb:
        s = wb.create(user_id="victim", limits={"memory": "256m"})
        s.files.write("a.txt", b"secret")
        return s.session_id


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wbk_" + "A" * 43}, {"Authorization": "Bearer wbk_short"}, {"Authorization": "Basic eDp5"},
    {"Authorization": "wbk_" + "A" * 43}, {"Authorization": "Bearer " + "x" * 10_000}],
    ids=["none", "unknown", "malformed", "basic", "no-scheme", "huge"])
def test_no_route_but_healthz_answers_without_a_valid_key(served: Server, victim: str, headers: dict) -> None:
    for method, route in ROUTES:
        response = httpx.request(method, served.url + route.format(sid=victim), headers=headers, json={})
        assert response.status_code == 401, (method, route, response.text)
        assert response.json()["error"]["code"] == "unauthorized" and response.headers["www-authenticate"] == "Bearer"
        assert "secret" not in response.text
    assert httpx.get(f"{served.url}/healthz").status_code == 200


def test_a_revoked_key_is_refused_from_the_next_request(served: Server) -> None:
    key = served.key("short-lived")
    with served.client(key) as http:
        assert http.get("/v1/sessions").status_code == 200
        key_id = re.search(r"([0-9a-f]{12})\W+short-lived\W", cli(served.home, "keys", "list")).group(1)
        cli(served.home, "keys", "revoke", key_id)
        assert http.get("/v1/sessions").status_code == 401
    assert "revoked" in cli(served.home, "keys", "list")
    with pytest.raises(AuthenticationError):
        RemoteWorkbench(served.url, key).list()


def test_keys_are_stored_hashed(served: Server) -> None:
    key = served.key("hashed")
    assert key.startswith("wbk_") and key not in (served.home / "workbench.db").read_bytes().decode("latin-1")


def test_another_keys_session_is_not_there(served: Server, victim: str) -> None:
    """404, as for a session that does not exist: ids do not leak, nothing of it is reached or changed."""
    with served.client(served.key("intruder")) as http:
        attempts = [
            http.get(f"/v1/sessions/{victim}"),
            http.post(f"/v1/sessions/{victim}/execute", json={"code": "open('a.txt').read()"}),
            http.post(f"/v1/sessions/{victim}/execute/stream", json={"code": "1"}),
            http.post(f"/v1/sessions/{victim}/commands", json={"cmd": "cat a.txt"}),
            http.get(f"/v1/sessions/{victim}/files/content", params={"path": "a.txt"}),
            http.put(f"/v1/sessions/{victim}/files/content", params={"path": "a.txt"}, content=b"overwritten"),
            http.delete(f"/v1/sessions/{victim}/files", params={"path": "a.txt"}),
            http.get(f"/v1/sessions/{victim}/files"),
            http.post(f"/v1/sessions/{victim}/files/rename", json={"path": "a.txt", "new_name": "b.txt"}),
            http.get(f"/v1/sessions/{victim}/files/usage"),
            http.patch(f"/v1/sessions/{victim}", json={"toolkits": ["github"]}),
            http.post(f"/v1/sessions/{victim}/tools/execute", json={"slug": "TEST_ECHO", "arguments": {"text": "x"}}),
            http.post(f"/v1/sessions/{victim}/tool_calls", json={"name": "WORKBENCH_REMOTE_BASH_TOOL",
                                                                 "arguments": {"command": "cat a.txt"}}),
            http.get(f"/v1/sessions/{victim}/logs"),
            http.post(f"/v1/sessions/{victim}/restart"),
            http.delete(f"/v1/sessions/{victim}"),
        ]
        nowhere = http.get("/v1/sessions/000000000000")
        for response in attempts:
            assert response.status_code == 404, response.request.url
            assert response.json() == {"error": {"code": "session_not_found", "message": f"no session '{victim}'"}}
        assert nowhere.status_code == 404
        assert victim not in http.get("/v1/sessions").text
    with pytest.raises(SessionNotFoundError):
        RemoteWorkbench(served.url, served.key("intruder2")).use(victim)


def test_the_owner_still_has_it_all(served: Server, api_key: str, victim: str) -> None:
    with RemoteWorkbench(served.url, api_key) as wb:
        s = wb.use(victim)
        assert s.files.read("a.txt") == b"secret" and s.execute("1").text == "1"  # the intruder changed nothing


def test_a_session_token_is_no_api_key_and_reaches_only_its_session(served: Server, api_key: str,
                                                                    victim: str) -> None:
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="other", limits={"memory": "256m"}) as other:
        assert other.mcp is not None
        token = other.mcp.headers["Authorization"]
        assert httpx.get(f"{served.url}/v1/sessions/{other.session_id}",
                         headers={"Authorization": token}).status_code == 401
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        headers = {"Authorization": token, "Accept": "application/json, text/event-stream"}
        elsewhere = httpx.post(f"{served.url}/mcp/{victim}", json=initialize, headers=headers)
        assert elsewhere.status_code == 401, elsewhere.text  # another session's token opens nothing
        mine = httpx.post(f"{served.url}/mcp/{other.session_id}", json=initialize, headers=headers)
        assert mine.status_code == 200, mine.text  # while its own session's endpoint answers it


def test_what_a_sandbox_names_reaches_the_client_intact(served: Server, api_key: str) -> None:
    """File names that are not UTF-8 (the JSON shows their bytes escaped) and outputs with control characters
    reach the client as data, never as a server error, never as a header."""
    with RemoteWorkbench(served.url, api_key) as wb, wb.create(user_id="names", limits={"memory": "256m"}) as s:
        r = s.execute("import os\nopen(os.fsencode('bad\\udcff\\r\\nX-Evil: 1.txt'), 'w').write('x')\n"
                      "print('\\x1b[2J\\x00\\r\\nend')")
        assert r.ok and r.stdout.endswith("end\n")
        names = [f.path for f in s.files.list()]
        assert any(name.startswith("bad") and "X-Evil" in name for name in names)
        streamed: list[str] = []
        assert s.execute("print('\\x00\\u2028')", on_stdout=streamed.append).ok and streamed == ["\x00\u2028\n"]
        listed = s.commands.run("ls").stdout
        assert "X-Evil" in listed

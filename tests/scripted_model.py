"""A scripted model behind the real OpenAI and Anthropic HTTP APIs, on 127.0.0.1: the official SDKs (pointed at it
by OPENAI_BASE_URL / ANTHROPIC_BASE_URL) talk to it exactly as to the provider, with no network and no model.

Its script is an agent's first steps in a workbench: it runs a tool through WORKBENCH_MULTI_EXECUTE_TOOL, reads
the offload envelope it gets back, queries `tables[id]` with WORKBENCH_REMOTE_WORKBENCH, checks the workspace
with WORKBENCH_REMOTE_BASH_TOOL, then answers with the cell's result. Each step is decided from the tool results
in the conversation it is sent, so a wrong answer from the workbench shows in the final text.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CELL = "tables[{rid!r}].groupby('city').revenue.sum().idxmax()"


def _next_step(results: list[str], tool_names: list[str]) -> tuple[str, dict[str, Any]] | str:
    """The next tool call (name, arguments) given the tool results so far, or the final answer."""
    assert "WORKBENCH_MULTI_EXECUTE_TOOL" in tool_names, tool_names
    if not results:
        return "WORKBENCH_MULTI_EXECUTE_TOOL", {"tools": [
            {"tool_slug": "CRM_LIST_CONTACTS", "arguments": {"country": "FR"}}]}
    if len(results) == 1:
        rid = json.loads(results[0])["results"][0]["offload"]["id"]
        return "WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": CELL.format(rid=rid)}
    if len(results) == 2:
        return "WORKBENCH_REMOTE_BASH_TOOL", {"command": "ls .responses | wc -l"}
    answer = re.search(r"result:\n'?([^'\n]+)", results[1])
    files = re.search(r"stdout:\n(\d+)", results[2])
    return (f"{answer.group(1) if answer else 'unknown'} brings the most revenue "
            f"({files.group(1) if files else '?'} files in .responses)")


def _openai(body: dict[str, Any]) -> dict[str, Any]:
    results = [m["content"] for m in body["messages"] if m.get("role") == "tool"]
    step = _next_step(results, [t["function"]["name"] for t in body.get("tools", [])])
    if isinstance(step, str):
        message: dict[str, Any] = {"role": "assistant", "content": step}
        finish = "stop"
    else:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{len(results)}", "type": "function",
             "function": {"name": step[0], "arguments": json.dumps(step[1])}}]}
        finish = "tool_calls"
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1_700_000_000,
            "model": body["model"], "choices": [{"index": 0, "finish_reason": finish, "message": message}]}


def _anthropic(body: dict[str, Any]) -> dict[str, Any]:
    results = [block["content"] for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for block in m["content"] if block.get("type") == "tool_result"]
    step = _next_step(results, [t["name"] for t in body.get("tools", [])])
    if isinstance(step, str):
        content: list[dict[str, Any]] = [{"type": "text", "text": step}]
        stop = "end_turn"
    else:
        content = [{"type": "tool_use", "id": f"toolu_{len(results)}", "name": step[0], "input": step[1]}]
        stop = "tool_use"
    return {"id": "msg_scripted", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1}}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/chat/completions"):
            reply = _openai(body)
        elif self.path.endswith("/messages"):
            reply = _anthropic(body)
        else:
            self.send_error(404)
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def scripted_model() -> Iterator[dict[str, str]]:
    """Serve the script; yields the environment that points both SDKs at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {"OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": "scripted", "ANTHROPIC_BASE_URL": url,
               "ANTHROPIC_API_KEY": "scripted"}
    finally:
        server.shutdown()
        server.server_close()

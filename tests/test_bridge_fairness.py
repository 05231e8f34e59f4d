"""The bridge's scheduling, on real Unix sockets and a real asyncio loop, with sessions that answer from a plain
function: threads go to sessions in turn, and a session's counts survive its socket being bound again."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workbench.tools.bridge import CONCURRENCY, BridgeServer
from workbench.tools.protocol import Request


class Endpoint:
    """A session as the bridge sees it; its calls sleep as long as they ask."""

    def __init__(self, session_id: str, runtime_dir: Path) -> None:
        self.session_id, self._runtime_dir = session_id, runtime_dir
        self.running = self.most = 0
        self.lock = threading.Lock()

    @property
    def runtime_dir(self) -> Path:
        return self._runtime_dir

    def handle_bridge_request(self, request: Request, abandoned: threading.Event) -> dict[str, Any]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(request.arguments.get("seconds", 0))
        finally:
            with self.lock:
                self.running -= 1
        return {"id": request.id, "ok": True, "data": request.arguments.get("n")}


def connect(endpoint: Endpoint) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(endpoint.runtime_dir / "bridge"))
    sock.settimeout(30)
    return sock


def send(sock: socket.socket, **fields: Any) -> None:
    body = json.dumps({"v": 2, "op": "call", "slug": "SLEEP", **fields}).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def read(sock: socket.socket) -> dict[str, Any]:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the bridge closed the connection"
            data += chunk
        return data
    return json.loads(exactly(struct.unpack(">I", exactly(4))[0]))


@pytest.fixture
def bridge() -> Iterator[BridgeServer]:
    server = BridgeServer(lambda: 30.0, threads=4)
    yield server
    server.close()


def endpoint(tmp_path: Path, name: str) -> Endpoint:
    folder = tmp_path / name
    folder.mkdir()
    return Endpoint(name, folder)


def test_threads_go_to_sessions_in_turn(bridge: BridgeServer, tmp_path: Path) -> None:
    flooder, other = endpoint(tmp_path, "flooder"), endpoint(tmp_path, "other")
    bridge.ensure(flooder)
    bridge.ensure(other)
    flood = connect(flooder)
    for i in range(400):  # 400 calls of 50 ms on 4 threads: 5 s of work queued ahead of the other session
        send(flood, id=i, arguments={"seconds": 0.05, "n": i})
    time.sleep(0.3)
    waits = []
    sock = connect(other)
    for i in range(3):
        started = time.monotonic()
        send(sock, id=i, arguments={"n": i})
        assert read(sock)["data"] == i
        waits.append(time.monotonic() - started)
    assert max(waits) < 0.5, f"the other session waited {max(waits):.2f}s behind the flood"
    assert sum(read(flood)["ok"] for _ in range(400)) == 400  # and the flood is served in full


def test_binding_again_gives_a_session_no_new_room(tmp_path: Path) -> None:
    bridge = BridgeServer(lambda: 30.0, threads=4 * CONCURRENCY)  # threads enough for three sessions' worth
    sandbox = endpoint(tmp_path, "sandbox")
    bridge.ensure(sandbox)
    held = []
    for _ in range(3):  # each round: calls that hang, then the socket removed so that the host binds again
        sock = connect(sandbox)
        for i in range(CONCURRENCY):
            send(sock, id=i, arguments={"seconds": 1.5}, timeout=0.1)
        held.append(sock)
        time.sleep(0.2)
        (sandbox.runtime_dir / "bridge").unlink()
        bridge.ensure(sandbox)
    time.sleep(0.2)
    try:
        assert sandbox.most <= CONCURRENCY, f"{sandbox.most} calls of one session held threads at once"
        assert bridge.stats("sandbox")["holding_threads"] <= CONCURRENCY
    finally:
        bridge.close()

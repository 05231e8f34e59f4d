"""The tool bridge: code in a sandbox calls the host's tools through a ZMQ socket in its session's runtime dir.

The container has no network; the socket (`/run/workbench/bridge` inside, a ROUTER bound by the host) is in
the one folder mounted from the session's runtime dir, so each session reaches only its own bridge. The
host side serves that session alone: every call goes through the session's tool call (as `Session.execute_tool`), which enforces the
allowlist, runs the tool with the session's user context, routes large responses into the workspace and
logs the call. Requests are JSON `{"id", "op": "call" | "list" | "schema", ...}`; every reply carries the
request's id and either a result or an error, so a bad frame gets an error and the bridge keeps serving.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson
import zmq

from .container import SANDBOX_UID
from .errors import SessionClosedError
from .kernel import zmq_context

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

MAX_REQUEST = 8 << 20  # bytes of one request; larger ones get an error reply
MAX_FRAME = 64 << 20  # ZMQ drops a peer sending more than this in one message, before it is in memory
MAX_PENDING = 4096  # calls one session may have waiting; more are refused at once
CONCURRENCY = 32  # tool calls one session runs at the same time
REPLY_QUEUE = 100_000  # replies queued for a sandbox not reading them yet (ZMQ drops beyond it: keep it large)
SOCKET = "bridge"


class BridgeServer:
    """Serves the bridges of one Workbench's sessions from one thread polling their sockets; tools run on the
    workbench's tool pool and their replies come back to that thread over an inproc socket."""

    def __init__(self, pool: ThreadPoolExecutor, tool_timeout: Callable[[], float]) -> None:
        self._pool = pool
        self._tool_timeout = tool_timeout
        self._context = zmq_context()
        self._inbox = f"inproc://workbench-bridge-{secrets.token_hex(8)}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._orders: deque[tuple[str, Any, threading.Event]] = deque()
        self._bound: dict[str, os.stat_result] = {}  # session id -> its socket file, as bound
        self._finished: dict[int, _Call] = {}  # call key -> call done on the pool, for the bridge thread to answer

    # called from any thread ---------------------------------------------------------------------------------------

    def ensure(self, session: Session) -> None:
        """Serve this session's bridge from this process, (re)binding when its socket is gone or not ours (a
        kernel restart recreates the runtime dir; another process may have bound it since)."""
        path = session._kernel.runtime_dir / SOCKET
        bound = self._bound.get(session.session_id)
        try:
            current = path.stat()
            if bound is not None and (current.st_ino, current.st_dev) == (bound.st_ino, bound.st_dev):
                return
        except FileNotFoundError:
            pass
        self._order("bind", session)

    def stop(self, session_id: str) -> None:
        """Stop serving a session (closed, or handed to another process)."""
        if self._thread is not None:
            self._order("unbind", session_id)

    def close(self) -> None:
        if self._thread is not None:
            self._order("close", None)
            self._thread.join(timeout=5)
            self._thread = None

    def _order(self, what: str, subject: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._started = threading.Event()
                self._thread = threading.Thread(target=self._run, name="workbench-bridge", daemon=True)
                self._thread.start()
                self._started.wait()
            done = threading.Event()
            self._orders.append((what, subject, done))
        self._send([b"order"])
        if not done.wait(10):
            raise RuntimeError(f"the tool bridge did not {what} in time")

    def _send(self, frames: list[bytes]) -> None:
        """To the bridge thread, from any thread (a PUSH socket per thread: ZMQ sockets are not thread-safe)."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._inbox)
        sock.send_multipart(frames)

    # the bridge thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        inbox = self._context.socket(zmq.PULL)
        inbox.bind(self._inbox)
        self._started.set()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        served: dict[str, _Served] = {}
        by_socket: dict[zmq.Socket, _Served] = {}
        deadlines: list[tuple[float, int, _Call]] = []
        counter = itertools.count()
        try:
            while True:
                wait = max(0.0, deadlines[0][0] - time.monotonic()) * 1000 if deadlines else None
                for sock, _ in poller.poll(wait):
                    if sock is inbox:
                        frames = inbox.recv_multipart()
                        if frames[0] == b"order":
                            if not self._obey(served, by_socket, poller):
                                return
                        else:  # [b"reply", key]: a call finished on the pool
                            call = self._finished.pop(int(frames[1]), None)
                            if call is not None and call.served.calls.pop(call.key, None) is not None:
                                call.served.reply(call.identity, call.reply)
                                self._next(call.served, deadlines, counter)
                    else:
                        entry = by_socket[sock]
                        while True:
                            try:
                                frames = sock.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self._receive(entry, frames, deadlines, counter)
                now = time.monotonic()
                while deadlines and deadlines[0][0] <= now:
                    _, _, call = heapq.heappop(deadlines)
                    if call.served.calls.pop(call.key, None) is not None:
                        call.abandoned.set()
                        call.served.reply(call.identity, {
                            "id": call.request.get("id"), "ok": False, "kind": "timeout",
                            "error": f"{call.request['slug']} did not answer within {call.limit:g}s"})
                        self._next(call.served, deadlines, counter)
        finally:
            for entry in served.values():
                entry.socket.close(linger=0)
            inbox.close(linger=0)

    def _obey(self, served: dict[str, _Served], by_socket: dict[zmq.Socket, _Served], poller: zmq.Poller) -> bool:
        while self._orders:
            what, subject, done = self._orders.popleft()
            try:
                if what == "close":
                    done.set()
                    return False
                session_id = subject if what == "unbind" else subject.session_id
                old = served.pop(session_id, None)
                self._bound.pop(session_id, None)
                if old is not None:
                    poller.unregister(old.socket)
                    by_socket.pop(old.socket, None)
                    old.socket.close(linger=0)
                if what == "bind":
                    entry = _Served(subject, self._context.socket(zmq.ROUTER))
                    path = subject._kernel.runtime_dir / SOCKET
                    entry.socket.setsockopt(zmq.LINGER, 0)
                    entry.socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
                    entry.socket.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
                    entry.socket.bind(f"ipc://{path}")
                    if os.getuid() == 0:
                        os.chown(path, SANDBOX_UID, SANDBOX_UID)
                    self._bound[session_id] = path.stat()
                    served[session_id] = entry
                    by_socket[entry.socket] = entry
                    poller.register(entry.socket, zmq.POLLIN)
            except Exception:
                log.exception("tool bridge: could not %s", what)
            finally:
                done.set()
        return True

    def _receive(self, entry: _Served, frames: list[bytes], deadlines: list, counter: Iterator[int]) -> None:
        if len(frames) != 2:
            if len(frames) > 1:
                entry.reply(frames[0], {"id": None, "ok": False, "kind": "bad_request",
                                        "error": "send one frame per request"})
            return
        identity, payload = frames
        try:
            request = _parse(payload)
        except _BadRequest as exc:
            entry.reply(identity, {"id": exc.request_id, "ok": False, "kind": "bad_request", "error": str(exc)})
            return
        if request["op"] != "call":
            entry.reply(identity, _describe(entry.session, request))
            return
        if len(entry.calls) + len(entry.backlog) >= MAX_PENDING:
            entry.reply(identity, {"id": request.get("id"), "ok": False, "kind": "busy",
                                   "error": f"more than {MAX_PENDING} calls are waiting on this session; "
                                            "send fewer at once"})
            return
        entry.backlog.append(_Call(entry, identity, request, request.get("timeout") or self._tool_timeout()))
        self._next(entry, deadlines, counter)

    def _next(self, entry: _Served, deadlines: list, counter: Iterator[int]) -> None:
        """Start waiting calls while the session runs fewer than CONCURRENCY."""
        while entry.backlog and len(entry.calls) < CONCURRENCY:
            call = entry.backlog.popleft()
            entry.calls[call.key] = call
            heapq.heappush(deadlines, (time.monotonic() + call.limit, next(counter), call))
            self._pool.submit(self._work, call)

    def _work(self, call: _Call) -> None:
        """On the tool pool: run the call, hand the reply to the bridge thread."""
        request = call.request
        try:
            result = call.served.session._tool_call(request["slug"], request.get("arguments") or {},
                                                    bool(request.get("sync")), None, call.abandoned)
            reply: dict[str, Any] = {"id": request.get("id"), "ok": result.ok, "duration": result.duration}
            if result.ok:
                reply["data"] = result.data
                reply["offload"] = result.offload.model_dump() if result.offload else None
            else:
                reply.update(kind=result.error_kind, error=result.error, retry_after=result.retry_after)
        except Exception as exc:  # a bug here must still answer the sandbox
            log.exception("tool bridge: call failed")
            reply = {"id": request.get("id"), "ok": False, "kind": "error", "error": f"{type(exc).__name__}: {exc}"}
        call.reply = reply
        self._finished[call.key] = call
        self._send([b"reply", str(call.key).encode()])


class _Served:
    """One session's bridge socket and its calls."""

    def __init__(self, session: Session, socket: zmq.Socket) -> None:
        self.session, self.socket = session, socket
        self.calls: dict[int, _Call] = {}  # running, by key
        self.backlog: deque[_Call] = deque()

    def reply(self, identity: bytes, reply: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([identity, orjson.dumps(reply, default=str)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone or not reading: nothing to answer to
            log.debug("tool bridge: reply dropped: %s", exc)


class _Call:
    _keys = itertools.count()

    def __init__(self, served: _Served, identity: bytes, request: dict[str, Any], limit: float) -> None:
        self.served, self.identity, self.request, self.limit = served, identity, request, limit
        self.key = next(self._keys)
        self.abandoned = threading.Event()
        self.reply: dict[str, Any] = {}

    def __lt__(self, other: _Call) -> bool:
        return self.key < other.key


class _BadRequest(Exception):
    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _parse(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_REQUEST:
        raise _BadRequest(f"request of {len(payload):,} bytes is over the bridge's limit of {MAX_REQUEST:,}")
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _BadRequest("request must be a JSON object")
    rid = request.get("id")
    if request.get("op") not in ("call", "list", "schema"):
        raise _BadRequest(f"unknown op {request.get('op')!r}: use call, list or schema", rid)
    if request["op"] in ("call", "schema") and not isinstance(request.get("slug"), str):
        raise _BadRequest("a call needs a tool slug (text)", rid)
    if request["op"] == "call" and not isinstance(request.get("arguments") or {}, dict):
        raise _BadRequest("arguments must be a JSON object", rid)
    timeout = request.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise _BadRequest("timeout must be a positive number of seconds", rid)
    return request


def _describe(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    try:
        config = session._current_config()
    except SessionClosedError as exc:
        return {"id": request.get("id"), "ok": False, "kind": "session_closed", "error": str(exc)}
    allowed = session._workbench.tools.allowed(config.toolkits, config.tools)
    if request["op"] == "list":
        return {"id": request.get("id"), "ok": True,
                "data": [{"slug": t.slug, "toolkit": t.toolkit, "description": t.description} for t in allowed]}
    for tool in allowed:
        if tool.slug == request["slug"]:
            return {"id": request.get("id"), "ok": True, "data": tool.describe()}
    return {"id": request.get("id"), "ok": False, "kind": "not_found",
            "error": f"no tool {request['slug']!r} is available to this session"}

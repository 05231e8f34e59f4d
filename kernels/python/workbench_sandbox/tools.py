"""run_tool, run_tools, list_tools, tool_schema: call the host's tools from the sandbox, through the bridge.

The sandbox has no network: requests go over a Unix socket in /run/workbench to the host, which checks the
session's allowlist, runs the tool with the user's credentials (never seen here) and answers. The wire
format is in `protocol`.
"""
from __future__ import annotations

import heapq
import itertools
import json
import random
import select
import socket
import threading
import time
from collections import deque
from typing import Any

from .protocol import HEADER, MAX_REQUEST, SANDBOX_PATH, VERSION
from .responses import responses, tables

ANSWER_GRACE = 30.0  # beyond a call's timeout, how long to wait for the host before giving up on an answer
DEFAULT_TIMEOUT = 60.0

_local = threading.local()
_ids = itertools.count(1)


class ToolError(Exception):
    """Why a tool call failed. `kind`: not_found, not_allowed, invalid_arguments, tool_error, rate_limited,
    timeout, not_serialisable, workspace_full, workspace_error, session_closed, busy, bad_request, internal or
    no_answer. Returned, not raised: `raise error` if you want it raised."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after

    def __repr__(self) -> str:
        return f"ToolError({self.kind!r}, {self.message!r})"


class Offloaded:
    """A tool response too large to send back: it stays in the workspace. `.value()` loads it (responses[id]),
    `.table()` gives its records as a DataFrame (tables[id]); `.envelope` describes it."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        self.envelope = envelope
        self.id: str = envelope["id"]
        self.path: str = envelope["path"]

    def value(self) -> Any:
        return responses[self.id]

    def table(self) -> Any:
        return tables[self.id]

    def __repr__(self) -> str:
        records = self.envelope.get("records")
        what = f"{records:,} records" if records is not None else f"{self.envelope['bytes']:,} bytes"
        return f"<offloaded response {self.id}: {what} in /workspace/{self.path}>"


class _Connection:
    """A connection to the bridge, non-blocking: replies are read while requests are sent, so neither side
    waits on the other."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(SANDBOX_PATH)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        self.out = bytearray()
        self.sent = 0
        self.inbox = bytearray()
        self.closed = False

    def queue(self, request: dict[str, Any]) -> None:
        self.out += _encode(request)

    def pump(self, timeout: float) -> list[dict[str, Any]]:
        """Send what is queued and read what arrived, waiting at most `timeout` seconds for either."""
        want = select.POLLIN | (select.POLLOUT if self.sent < len(self.out) else 0)
        self.poller.modify(self.sock, want)
        events = self.poller.poll(min(max(0.0, timeout), 3600.0) * 1000)  # poll takes at most 2^31 ms
        replies: list[dict[str, Any]] = []
        for _, event in events:
            if event & select.POLLOUT:
                try:
                    self.sent += self.sock.send(memoryview(self.out)[self.sent:self.sent + (1 << 20)])
                except BlockingIOError:
                    pass
                if self.sent == len(self.out) or self.sent > (8 << 20):
                    del self.out[:self.sent]
                    self.sent = 0
            if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    data = self.sock.recv(1 << 20)
                except BlockingIOError:
                    data = None
                if data == b"":
                    self.close()
                    raise ConnectionError("the bridge closed the connection")
                if data:
                    self.inbox += data
                    replies += self._frames()
        return replies

    def _frames(self) -> list[dict[str, Any]]:
        frames, start = [], 0
        while len(self.inbox) - start >= HEADER:
            size = int.from_bytes(self.inbox[start:start + HEADER], "big")
            if len(self.inbox) - start - HEADER < size:
                break
            frames.append(json.loads(self.inbox[start + HEADER:start + HEADER + size]))
            start += HEADER + size
        del self.inbox[:start]
        return frames

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            if getattr(_local, "connection", None) is self:
                _local.connection = None


def _connection() -> _Connection:
    """This thread's connection to the bridge."""
    connection = getattr(_local, "connection", None)
    if connection is None or connection.closed:
        connection = _local.connection = _Connection()
    return connection


def _send_now(payload: bytes) -> _Connection:
    """Send a request on this thread's connection, opening it again when the host closed it since the last
    call (a kernel restart, a host process that took the session over): nothing was delivered then."""
    for attempt in (0, 1):
        connection = _connection()
        try:
            sent = connection.sock.send(payload) if not connection.out else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            refusal = _refusal(connection)
            connection.close()
            if refusal is not None:
                raise _Refused(refusal) from None
            if attempt:
                raise
            continue
        connection.out += payload[sent:]
        return connection
    raise AssertionError("unreachable")


class _Refused(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("error"))
        self.reply = reply


def _refusal(connection: _Connection) -> dict[str, Any] | None:
    """The error the host sent before closing a connection it would not serve (too many open), if any."""
    try:
        for reply in connection.pump(0):
            if reply.get("id") is None and not reply.get("ok"):
                return reply
    except OSError:
        pass
    for reply in connection._frames():
        if reply.get("id") is None and not reply.get("ok"):
            return reply
    return None


def _encode(request: dict[str, Any]) -> bytes:
    request["v"] = VERSION
    payload = json.dumps(request, default=str).encode()
    if len(payload) > MAX_REQUEST:
        raise ToolError("bad_request", f"the request is {len(payload):,} bytes; the bridge takes at most "
                                       f"{MAX_REQUEST:,}: write large inputs to a file and pass its path")
    return len(payload).to_bytes(HEADER, "big") + payload


def _outcome(reply: dict[str, Any]) -> tuple[Any, ToolError | None]:
    if reply.get("ok"):
        if reply.get("offload") is not None and reply.get("data") is None:
            return Offloaded(reply["offload"]), None
        return reply.get("data"), None
    return None, ToolError(reply.get("kind") or "error", reply.get("error") or "failed", reply.get("retry_after"))


def _no_answer(why: str) -> dict[str, Any]:
    return {"ok": False, "kind": "no_answer", "error": why}


def _ask(request: dict[str, Any], wait: float) -> dict[str, Any]:
    """Send one request and wait for its answer (other answers on this connection are stale: dropped)."""
    request["id"] = next(_ids)
    payload = _encode(request)
    try:
        connection = _send_now(payload)
    except _Refused as refused:
        return refused.reply
    except OSError as exc:
        return _no_answer(f"cannot reach the tool bridge: {exc}")
    deadline = time.monotonic() + wait
    try:
        while (left := deadline - time.monotonic()) > 0:
            for reply in connection.pump(left):
                # an answer to a frame the host could not read, or a refused connection, has no id
                if reply.get("id") == request["id"] or (reply.get("id") is None and not reply.get("ok")):
                    return reply
    except OSError as exc:
        connection.close()
        return _no_answer(f"the tool bridge closed the connection ({exc}); the host may be restarting")
    connection.close()  # a half-sent request or a late answer must not confuse the next call
    return _no_answer(f"the host did not answer within {wait:.0f}s")


def run_tool(slug: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None,
             sync_to_workbench: bool = False) -> tuple[Any, ToolError | None]:
    """Call one of the host's tools: returns (result, error), exactly one of them None.

    A large result stays in the workspace and comes back as an `Offloaded` handle (`.value()`, `.table()`).
    `timeout` (seconds) bounds the call on the host (default: the host's tool timeout).
    """
    try:
        request = {"op": "call", "slug": slug, "arguments": arguments or {}, "timeout": timeout,
                   "sync_to_workbench": sync_to_workbench}
        return _outcome(_ask(request, (timeout or DEFAULT_TIMEOUT) + ANSWER_GRACE))
    except ToolError as error:
        return None, error


def list_tools() -> list[dict[str, Any]]:
    """The tools this session may call: slug, toolkit, description."""
    data, error = _outcome(_ask({"op": "list"}, ANSWER_GRACE))
    if error:
        raise error
    return data


def tool_schema(slug: str) -> dict[str, Any]:
    """One tool's description and the JSON Schema of its arguments."""
    data, error = _outcome(_ask({"op": "schema", "slug": slug}, ANSWER_GRACE))
    if error:
        raise error
    return data


def run_tools(calls: list[Any], *, max_workers: int = 16, retries: int = 3, timeout: float | None = None,
              as_table: bool = False, progress: bool = True, sync_to_workbench: bool = False) -> Any:
    """Call tools in bulk: `calls` is a list of (slug, arguments) pairs (or {"slug": ..., "arguments": ...}).

    Returns a list of (result, error) pairs in the order of `calls`. At most `max_workers` calls run at once
    on the host. A call the tool answers with a rate limit is retried up to `retries` times, after an
    exponential backoff with jitter (or the wait the tool asked for); no other error is retried. Progress is
    shown in the cell's output while it runs. `as_table=True` returns the successful results as one pandas
    DataFrame instead (a dict result is a row, a list of dicts several; `_call` is the call's index).
    """
    normalised = [_normalise(call) for call in calls]
    total = len(normalised)
    results: list[tuple[Any, ToolError | None] | None] = [None] * total
    attempts = [0] * total
    ready: deque[int] = deque(range(total))
    waiting: list[tuple[float, int]] = []  # (due, index) of rate-limited calls
    inflight: dict[int, tuple[int, float]] = {}  # request id -> (index, deadline)
    wait = (timeout or DEFAULT_TIMEOUT) + ANSWER_GRACE
    connection: _Connection | None = None
    shown = _Progress(total) if progress and total else None
    done = errors = retried = 0
    while done < total:
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            ready.append(heapq.heappop(waiting)[1])
        if ready and (connection is None or connection.closed):
            try:
                connection = _connection()
            except OSError as exc:  # the bridge cannot be reached: every call still to make fails alike
                for index in ready:
                    results[index] = (None, ToolError("no_answer", f"cannot reach the tool bridge: {exc}"))
                done, errors = done + len(ready), errors + len(ready)
                ready.clear()
                continue
        while ready and len(inflight) < max(1, max_workers):
            index = ready.popleft()
            slug, arguments = normalised[index]
            if isinstance(slug, ToolError):
                results[index], done, errors = (None, slug), done + 1, errors + 1
                continue
            rid = next(_ids)
            try:
                assert connection is not None
                connection.queue({"id": rid, "op": "call", "slug": slug, "arguments": arguments,
                                  "timeout": timeout, "sync_to_workbench": sync_to_workbench})
            except ToolError as error:
                results[index], done, errors = (None, error), done + 1, errors + 1
                continue
            inflight[rid] = (index, now + wait)
        next_due = min([d for d, _ in waiting[:1]] + [deadline for _, deadline in inflight.values()] + [now + 0.25])
        if inflight and connection is not None:
            try:
                replies = connection.pump(next_due - time.monotonic())
            except OSError as exc:  # calls already sent may have run: they are not sent again
                refusal = _refusal(connection)
                error = (ToolError(refusal.get("kind") or "busy", refusal.get("error") or "refused") if refusal
                         else ToolError("no_answer", f"the tool bridge closed the connection ({exc})"))
                connection.close()
                for index, _ in inflight.values():
                    results[index] = (None, error)
                done, errors = done + len(inflight), errors + len(inflight)
                inflight.clear()
                replies = []
            for reply in replies:
                entry = inflight.pop(reply.get("id"), None)
                if entry is None:
                    continue  # an answer to a call given up on
                index = entry[0]
                result, error = _outcome(reply)
                if error is not None and error.kind == "rate_limited" and attempts[index] < retries:
                    backoff = min(30.0, 0.1 * 2 ** attempts[index]) * random.uniform(0.5, 1.5)
                    attempts[index] += 1
                    retried += 1
                    heapq.heappush(waiting, (time.monotonic() + max(backoff, error.retry_after or 0.0), index))
                    continue
                results[index] = (result, error)
                done += 1
                errors += error is not None
        elif not inflight and waiting:
            time.sleep(max(0.0, min(0.25, waiting[0][0] - time.monotonic())))
        now = time.monotonic()
        for rid, (index, deadline) in list(inflight.items()):
            if deadline <= now:
                del inflight[rid]
                results[index] = (None, ToolError("no_answer", f"the host did not answer within {wait:.0f}s"))
                done, errors = done + 1, errors + 1
        if shown:
            shown.update(done, errors, retried)
    if shown:
        shown.finish(done, errors, retried)
    pairs = [pair for pair in results if pair is not None]
    return _table(pairs) if as_table else pairs


def _normalise(call: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(call, dict) and "slug" in call:
        return call["slug"], call.get("arguments") or {}
    if isinstance(call, (tuple, list)) and len(call) == 2 and isinstance(call[0], str):
        return call[0], call[1] or {}
    return ToolError("bad_request", f"a call must be (slug, arguments) or {{'slug': ..., 'arguments': ...}}, "
                                    f"not {call!r:.80}"), {}


def _table(pairs: list[tuple[Any, ToolError | None]]) -> Any:
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for index, (result, error) in enumerate(pairs):
        if error is not None:
            continue
        if isinstance(result, Offloaded):
            result = result.value()
        for item in result if isinstance(result, list) else [result]:
            rows.append({"_call": index, **(item if isinstance(item, dict) else {"value": item})})
    return pd.DataFrame(rows)


class _Progress:
    """A line in the cell's output, updated in place while run_tools works."""

    def __init__(self, total: int) -> None:
        from IPython.display import display

        self.total, self.started, self.last = total, time.monotonic(), 0.0
        self.handle = display(self._text(0, 0, 0), display_id=True)

    def _text(self, done: int, errors: int, retried: int, final: bool = False) -> Any:
        from IPython.display import Pretty

        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        state = "done" if final else "running"
        return Pretty(f"run_tools {state}: {done:,}/{self.total:,} calls, {errors:,} errors, {retried:,} retries, "
                      f"{elapsed:.1f}s ({rate:,.0f} calls/s)")

    def update(self, done: int, errors: int, retried: int) -> None:
        now = time.monotonic()
        if now - self.last >= 0.25 and self.handle is not None:
            self.last = now
            self.handle.update(self._text(done, errors, retried))

    def finish(self, done: int, errors: int, retried: int) -> None:
        if self.handle is not None:
            self.handle.update(self._text(done, errors, retried, final=True))

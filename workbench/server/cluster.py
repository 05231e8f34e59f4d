"""`workbench serve` as one replica of a cluster: one replica per Docker host, all on one shared store.

Each replica runs the kernels of the sessions placed on it, on its own host, exactly as a lone server does. It
beats into the store every few seconds; a new session goes to the live replica with the most memory not yet
promised to its sessions' limits; and any replica takes any request and forwards it to the replica that runs the
session, over HTTP signed with the cluster's secret. A replica not seen for `ttl` seconds is down: its sessions
answer 503 `replica_unavailable` until it is back, and then serve again with their workspaces. A session never
moves.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import httpx
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..client import Workbench
from ..errors import ReplicaUnavailableError, SessionNotFoundError, WorkbenchError
from ..store import ReplicaRecord
from .auth import bearer
from .errors import error_body
from .tokens import check_session_token

log = logging.getLogger(__name__)

FORWARDED = "x-workbench-forwarded"  # replica;timestamp;signature of a request one replica sent another
_SKEW = 30.0  # seconds a forwarded request's timestamp may differ from this replica's clock
_FORWARDS = 512  # requests one replica forwards at once (its connections to the others); past it: 503 at once
_BODY_IDLE = 60.0  # seconds a forwarded request's body may go without a byte before the forward is dropped
_LIVE_CACHE = 0.5  # seconds the live replicas, as read from the store, are reused
_HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
        b"proxy-authorization", b"proxy-connection", FORWARDED.encode()}
_CACHE = 100_000  # sessions whose replica is remembered (a session never moves)


class ClusterSettings(BaseModel):
    """How this replica takes part in its cluster."""

    model_config = ConfigDict(frozen=True)

    replica: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$", description="this replica's name (WORKBENCH_REPLICA)")
    url: str = Field(description="where the other replicas reach this one (WORKBENCH_REPLICA_URL)")
    secret: bytes = Field(min_length=32, description="shared by every replica: signs what they forward")
    heartbeat: float = Field(default=2.0, gt=0, description="seconds between two heartbeats")
    ttl: float = Field(default=10.0, gt=0, description="seconds without a heartbeat after which a replica is down")

    @classmethod
    def from_env(cls, port: int) -> ClusterSettings | None:
        """From WORKBENCH_REPLICA (none: not a cluster), WORKBENCH_CLUSTER_SECRET or WORKBENCH_CLUSTER_SECRET_FILE
        (e.g. a Swarm secret), WORKBENCH_REPLICA_URL (default: http://<this host's address>:<port>), and
        WORKBENCH_CLUSTER_HEARTBEAT and WORKBENCH_CLUSTER_TTL (seconds)."""
        replica = os.environ.get("WORKBENCH_REPLICA")
        if not replica:
            return None
        secret = os.environ.get("WORKBENCH_CLUSTER_SECRET", "").encode()
        if not secret and os.environ.get("WORKBENCH_CLUSTER_SECRET_FILE"):
            secret = Path(os.environ["WORKBENCH_CLUSTER_SECRET_FILE"]).read_bytes().strip()
        if len(secret) < 32:
            raise WorkbenchError("a cluster replica needs WORKBENCH_CLUSTER_SECRET (or WORKBENCH_CLUSTER_SECRET_FILE):"
                                 " at least 32 bytes, the same on every replica")
        url = os.environ.get("WORKBENCH_REPLICA_URL") or f"http://{socket.gethostbyname(socket.gethostname())}:{port}"
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.path not in ("", "/"):
            raise WorkbenchError(f"WORKBENCH_REPLICA_URL must be http(s)://host:port, not {url!r}")
        timing = {name: float(os.environ[f"WORKBENCH_CLUSTER_{name.upper()}"]) for name in ("heartbeat", "ttl")
                  if os.environ.get(f"WORKBENCH_CLUSTER_{name.upper()}")}
        return cls(replica=replica, url=url.rstrip("/"), secret=secret, **timing)


def cluster_token_secret(settings: ClusterSettings) -> bytes:
    """The key of the sessions' MCP tokens on every replica: a token made by one is good on all."""
    return hmac.new(settings.secret, b"workbench mcp session tokens", hashlib.sha256).digest()


def signature(secret: bytes, replica: str, stamp: str, method: str, target: str, to: str) -> str:
    """The HMAC of a forward: from `replica`, at `stamp`, of `method` `target`, to the replica `to`."""
    message = "\n".join((replica, stamp, method, target, to)).encode()
    return base64.urlsafe_b64encode(hmac.new(secret, message, hashlib.sha256).digest()).rstrip(b"=").decode()


class Membership:
    """This replica's heartbeat into the store, the cluster's replicas as the store has them, and the HTTP client
    that forwards to them (while `running`)."""

    def __init__(self, workbench: Workbench, settings: ClusterSettings) -> None:
        if workbench.replica != settings.replica:
            raise WorkbenchError(f"the served Workbench is replica {workbench.replica!r}, the cluster settings say "
                                 f"{settings.replica!r}: make it with replica= (or WORKBENCH_REPLICA) the same")
        self.workbench, self.settings = workbench, settings
        self.started_at = time.time()
        self.client: httpx.AsyncClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: tuple[float, dict[str, ReplicaRecord]] = (0.0, {})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Beat (first before anything is served), and keep a client for forwarding, until the app stops. Refuses
        to start while another live replica has this one's name at another address."""
        await anyio.to_thread.run_sync(self._check_name)
        await anyio.to_thread.run_sync(self.beat)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="workbench-heartbeat", daemon=True)
        self._thread.start()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0, pool=5.0), follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=_FORWARDS, max_keepalive_connections=64))
        try:
            yield
        finally:
            self._stop.set()
            await self.client.aclose()
            self.client = None
            await anyio.to_thread.run_sync(functools.partial(self._thread.join, timeout=10))

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat):
            try:
                self.beat()
            except Exception as exc:  # the store may be away for a while: the next beat tries again
                log.warning("heartbeat failed: %s", exc)

    def beat(self) -> None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.workbench.store.heartbeat(ReplicaRecord(replica_id=self.settings.replica, url=self.settings.url,
                                                     memory=memory, started_at=self.started_at, seen_at=time.time()))

    def _check_name(self) -> None:
        for other in self.workbench.store.replicas():
            if (other.replica_id == self.settings.replica and other.url != self.settings.url
                    and time.time() - other.seen_at <= self.settings.ttl):
                raise WorkbenchError(f"another live replica is named {other.replica_id!r} (at {other.url}): each "
                                     "replica needs a name of its own (WORKBENCH_REPLICA)")

    def live(self) -> dict[str, ReplicaRecord]:
        """The replicas seen within `ttl` (re-read from the store at most every half second)."""
        read_at, live = self._live
        now = time.monotonic()
        if now - read_at > _LIVE_CACHE:
            wall = time.time()
            live = {r.replica_id: r for r in self.workbench.store.replicas() if wall - r.seen_at <= self.settings.ttl}
            self._live = (now, live)
        return live

    def place(self) -> ReplicaRecord:
        """The live replica a new session goes to: the one with the most memory not promised to its open sessions'
        limits, then the one with the fewest sessions (from the store as it is now, not as of the last beats)."""
        live = self.live()
        if not live:
            raise ReplicaUnavailableError("no replica of the cluster is live (none beat into the store lately)")
        promised = {name: 0 for name in live}
        sessions = dict(promised)
        for record in self.workbench.store.list():
            if record.replica in promised:
                promised[record.replica] += record.config.limits.memory
                sessions[record.replica] += 1
        return max(live.values(), key=lambda r: (r.memory - promised[r.replica_id], -sessions[r.replica_id],
                                                 r.replica_id == self.settings.replica))


class ClusterRouter:
    """ASGI middleware: a request for a session runs here when the session is this replica's, and is forwarded to
    its replica otherwise; a new session is created on the replica `Membership.place` picks. It sits behind the
    API-key check (an MCP request's session token is checked here too); a forwarded request carries the client's
    credentials, which its replica checks again. An API key (or a session's MCP token) has at most `per_key`
    forwards at once."""

    def __init__(self, app: ASGIApp, membership: Membership, per_key: int) -> None:
        self.app, self.membership, self.per_key = app, membership, per_key
        self.settings = membership.settings
        self.store = membership.workbench.store
        self._replicas: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()  # session -> replica, key
        self._forwarding: dict[str, int] = {}  # forwards running per API key (or MCP session), on the event loop
        self._tokens = cluster_token_secret(membership.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        mark = headers.get(FORWARDED.encode())
        if mark is not None:
            if not self._check(mark.decode("latin-1"), scope):
                await _error(send, 401, "unauthorized", "a forwarded request with a bad or stale signature")
                return
            await self.app(scope, receive, send)  # sent here by a replica: it runs here
            return
        parts = [part for part in scope["path"].split("/") if part]  # as the routes read it: empty parts dropped
        if parts[:1] == ["mcp"] and len(parts) >= 2:
            # not through the API-key check: its token is checked before anything (even where it runs) is told
            token = bearer(headers.get(b"authorization", b"").decode("latin-1"))
            if token is None or not check_session_token(self._tokens, parts[1], token):
                await _error(send, 401, "unauthorized", "no valid session token for this session's MCP endpoint")
                return
            caller = f"mcp:{parts[1]}"
        else:
            key = scope.get("state", {}).get("api_key")
            caller = key.key_id if key is not None else ""
        try:
            owner = await self._owner(parts, scope["method"], caller)
        except ReplicaUnavailableError as exc:
            await _error(send, 503, "replica_unavailable", str(exc))
            return
        if owner is None or owner.replica_id == self.settings.replica:
            await self.app(scope, receive, send)
            return
        if self._forwarding.get(caller, 0) >= self.per_key:
            await _error(send, 429, "too_many_executions", f"this API key has {self.per_key} requests forwarded to "
                         "other replicas at once, the most this replica allows; retry when one has ended")
            return
        self._forwarding[caller] = self._forwarding.get(caller, 0) + 1
        try:
            await self._forward(owner, scope, receive, send)
        finally:
            left = self._forwarding.pop(caller) - 1
            if left:
                self._forwarding[caller] = left

    async def _owner(self, parts: list[str], method: str, caller: str) -> ReplicaRecord | None:
        """The replica a request goes to (None: this one, or one the app answers anyway, e.g. with a 404: another
        API key's session is not even said to be down)."""
        if parts == ["v1", "sessions"] and method == "POST":
            return await anyio.to_thread.run_sync(self.membership.place)
        if parts[:2] == ["v1", "sessions"] and len(parts) >= 3:
            session_id = parts[2]
        elif parts[:1] == ["mcp"] and len(parts) >= 2:
            session_id = parts[1]
        else:
            return None
        replica, key_id = await self._replica_of(session_id)
        if replica is None or replica == self.settings.replica:
            return None
        if not caller.startswith("mcp:") and key_id != caller:
            return None  # the app answers as for any session of another key
        live = await anyio.to_thread.run_sync(self.membership.live)
        if replica not in live:
            seen = {r.replica_id: r.seen_at for r in await anyio.to_thread.run_sync(self.store.replicas)}
            when = f"last seen {time.time() - seen[replica]:.0f}s ago" if replica in seen else "never seen"
            raise ReplicaUnavailableError(f"this session ({session_id}) runs on replica {replica}, which is down "
                                          f"({when}); it serves again when that replica is back")
        return live[replica]

    async def _replica_of(self, session_id: str) -> tuple[str | None, str | None]:
        """The replica that runs a session and the API key that owns it (neither ever changes)."""
        if session_id in self._replicas:
            self._replicas.move_to_end(session_id)
            return self._replicas[session_id]
        try:
            record = await anyio.to_thread.run_sync(self.store.get, session_id)
        except SessionNotFoundError:
            return None, None  # the app answers 404 (not remembered: it may be created meanwhile elsewhere)
        key_id = await anyio.to_thread.run_sync(self.store.owner, session_id)
        if key_id is None:
            return record.replica, None  # its owner is being recorded (a create in flight): not remembered yet
        self._replicas[session_id] = (record.replica, key_id)
        if len(self._replicas) > _CACHE:
            self._replicas.popitem(last=False)
        return record.replica, key_id

    def _check(self, mark: str, scope: Scope) -> bool:
        try:
            replica, stamp, given = mark.split(";")
            fresh = abs(time.time() - float(stamp)) <= _SKEW
        except ValueError:
            return False
        expected = signature(self.settings.secret, replica, stamp, scope["method"], _target(scope),
                             self.settings.replica)
        return fresh and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))

    async def _forward(self, owner: ReplicaRecord, scope: Scope, receive: Receive, send: Send) -> None:
        """Relay the request to `owner` and its answer back, both streamed. While it runs, the owner's heartbeat is
        watched: a replica that dies mid-request (its host gone, its connections silent) ends the relay with 503
        rather than leaving it waiting."""
        client = self.membership.client
        if client is None:
            await _error(send, 503, "replica_unavailable", "this replica is stopping: it forwards nothing more")
            return
        stamp = f"{time.time():.3f}"
        target = _target(scope)
        raw = dict(scope["headers"])
        has_body = raw.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in raw
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP or k.lower() == b"host"]
        if not has_body:
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((FORWARDED.encode(), ";".join((self.settings.replica, stamp, signature(
            self.settings.secret, self.settings.replica, stamp, scope["method"], target, owner.replica_id))).encode()))

        async def body() -> AsyncIterator[bytes]:
            while True:
                with anyio.fail_after(_BODY_IDLE):  # a body trickled byte by byte holds no forward for long
                    message: Message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return

        request = client.build_request(scope["method"], owner.url + target, headers=headers,
                                       content=body() if has_body else None)
        if request.url.raw_path.decode("latin-1") != target:  # httpx would send another path than the one signed
            await _error(send, 400, "invalid_request", "a request path that cannot be forwarded as it is (dot "
                         "segments, or characters a URL must escape): send it in its plain form")
            return
        answered = gone = False

        async def relay() -> None:
            nonlocal answered
            try:
                response = await client.send(request, stream=True)
            except Exception as exc:  # the replica, or the client's body (cut off, too large, too slow)
                if not answered:
                    if isinstance(exc, TimeoutError):
                        await _error(send, 400, "invalid_request", f"the request's body stalled for {_BODY_IDLE:.0f}s")
                    else:
                        await _error(send, 503, "replica_unavailable", _unreachable(owner.replica_id, exc))
                    answered = True
                return
            try:
                answered = True
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception as exc:  # either side went away mid-answer: the client sees it cut
                log.warning("forwarding to replica %s broke off: %s", owner.replica_id, exc)
            finally:
                await response.aclose()

        async with anyio.create_task_group() as group:
            async def watch() -> None:
                nonlocal gone
                while True:
                    await anyio.sleep(self.settings.ttl / 2)
                    if owner.replica_id not in await anyio.to_thread.run_sync(self.membership.live):
                        gone = True
                        group.cancel_scope.cancel()
                        return

            async def relay_then_stop() -> None:
                await relay()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            group.start_soon(relay_then_stop)
        if gone and not answered:
            await _error(send, 503, "replica_unavailable", _unreachable(owner.replica_id, "it stopped beating"))


def _unreachable(replica: str, why: object) -> str:
    reason = f"{type(why).__name__}: {why}".rstrip(": ") if isinstance(why, BaseException) else str(why)
    return (f"this session runs on replica {replica}, which cannot be reached ({reason}); it serves again when that "
            "replica is back")


def _target(scope: Scope) -> str:
    query: str = scope.get("query_string", b"").decode("latin-1")
    path: str = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    return path + (f"?{query}" if query else "")


async def _error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

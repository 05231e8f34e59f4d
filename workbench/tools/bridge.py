"""The tool bridge: code in a sandbox calls the host's tools through a Unix socket in its session's runtime dir.

The container has no network; the socket (`/run/workbench/bridge` inside) is in the one folder mounted from
the session's runtime dir, so each session reaches only its own bridge. The wire format is in
`protocol`. Every session's bridge is served by one asyncio loop on a thread of its own; calls run on a
thread pool, handed out round-robin between sessions, and each call goes through the session's tool pipeline
(allowlist, arguments, timeout, offload, log).

The sandbox is hostile, so everything it can do to the bridge is bounded per session: connections, bytes
buffered (requests over 256 KiB need one of two permits, and are parsed on a call's thread, not the
loop's), calls waiting and calls holding a thread (a call past its timeout is answered at once but counts
until its thread really returns), and unread replies. A session over a bound is slowed (its sockets are
not read) or its connection is closed; others are not affected. The socket is bound in a host-only
folder, then renamed into the runtime dir, so no symlink the sandbox plants is ever followed.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import resource
import secrets
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from ..sandbox import SANDBOX_UID
from . import protocol as wire

log = logging.getLogger(__name__)

CONCURRENCY = 32  # calls of one session holding a thread at once (abandoned ones too)
THREADS = 512  # calls of all sessions holding a thread at once (threads are made as needed)
MAX_CONNECTIONS = 64  # open connections per session; more are closed at once
MAX_WAITING = 1024  # calls of one session waiting for a thread; past it, its sockets are not read
WAITING_BYTES = 16 << 20  # bytes of waiting small requests of one session; past it, likewise
RUNNING_BYTES = 2 << 20  # bytes of small requests of one session parsed and running at once (parsed JSON can
# take thirty times its size): past it, the next waits for one to end
BIG = 256 << 10  # a request larger than this needs one of BIG_PERMITS, held until its call ends
BIG_PERMITS = 2
FAIR_CONNECTIONS = 4  # connections a session may open even when all sessions together hold the most
WRITE_HIGH = 8 << 20  # unread reply bytes past which a connection is no longer read
WRITE_ABORT = 64 << 20  # unread reply bytes of one session past which its connection is closed
_BIND_TIMEOUT = 10.0


class Endpoint(Protocol):
    """What the bridge needs of a session."""

    session_id: str

    @property
    def runtime_dir(self) -> Path: ...

    def handle_bridge_request(self, request: wire.Request, abandoned: threading.Event) -> dict[str, Any]:
        """Run one request in the calling thread and return its reply; `abandoned` is set when the bridge gave
        up waiting (timeout), so the pipeline knows its answer will not be read."""
        ...


class BridgeServer:
    """Serves the bridges of one Workbench's sessions (see the module's docstring)."""

    def __init__(self, tool_timeout: Callable[[], float], *, threads: int = THREADS) -> None:
        """`tool_timeout` gives the host's time limit of a call; `threads`, how many calls of all sessions may
        hold a thread at once (handed out in turn between sessions)."""
        self._tool_timeout = tool_timeout
        self._threads = threads
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="workbench-bridge-call")
        self._bound: dict[str, tuple[int, int]] = {}  # session id -> (st_dev, st_ino) of its socket as bound
        self._state: _LoopState | None = None

    # called from any thread ---------------------------------------------------------------------------------------

    def ensure(self, session: Endpoint) -> None:
        """Serve this session's bridge from this process, (re)binding when its socket is gone or not ours (a
        kernel restart recreates the runtime dir; another process may have bound it since; the loop may have
        been restarted)."""
        loop, state = self._running_loop()
        bound = self._bound.get(session.session_id)
        if bound is not None:
            try:
                current = os.lstat(session.runtime_dir / wire.SOCKET)
                if (current.st_dev, current.st_ino) == bound and stat.S_ISSOCK(current.st_mode):
                    return
            except OSError:
                pass
        future = asyncio.run_coroutine_threadsafe(state.bind(session), loop)
        try:
            self._bound[session.session_id] = future.result(_BIND_TIMEOUT)
        except Exception as exc:  # what the sandbox did to its runtime dir must not fail the execution
            log.warning("tool bridge: cannot serve session %s (%s: %s); its tool calls will fail until this "
                        "is fixed", session.session_id, type(exc).__name__, exc)

    def stop(self, session_id: str) -> None:
        """Stop serving a session (closed, or handed to another process)."""
        self._bound.pop(session_id, None)
        with self._lock:
            loop, state = self._loop, self._state
        if loop is not None and state is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(state.unbind(session_id), loop).result(_BIND_TIMEOUT)

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = self._state = None
        self._bound.clear()
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)  # the loop's thread closes its sockets as it ends
        if thread is not None:
            thread.join(timeout=5)
        self._pool.shutdown(wait=False)

    def stats(self, session_id: str) -> dict[str, int]:
        """What the bridge holds for a session now: connections, calls waiting and holding threads, bytes."""
        loop, state = self._loop, self._state
        if loop is None or state is None:
            return {}
        return asyncio.run_coroutine_threadsafe(state.stats(session_id), loop).result(_BIND_TIMEOUT)

    def _running_loop(self) -> tuple[asyncio.AbstractEventLoop, _LoopState]:
        """The bridge's loop, started on first use and again if its thread ever died (then every session is
        bound anew on its next use)."""
        with self._lock:
            if self._loop is not None and self._state is not None and self._thread is not None \
                    and self._thread.is_alive():
                return self._loop, self._state
            if self._thread is not None:
                log.error("tool bridge: its loop had stopped; starting it again")
            self._bound.clear()
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_log_loop_error)
            state = _LoopState(loop, self._pool, self._tool_timeout, self._threads)
            started = threading.Event()
            self._thread = threading.Thread(target=_serve, args=(loop, state, started), name="workbench-bridge",
                                            daemon=True)
            self._thread.start()
            started.wait()
            self._loop, self._state = loop, state
            return loop, state


def _serve(loop: asyncio.AbstractEventLoop, state: _LoopState, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    try:
        loop.run_forever()
    except BaseException:  # the loop must not die quietly: the next ensure() starts another
        log.exception("tool bridge: the loop stopped")
    finally:
        try:  # close every socket it served, so that sandboxes reconnect to the next loop's
            loop.run_until_complete(state.close())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
        except BaseException:
            log.exception("tool bridge: could not close the loop's sockets")


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    if isinstance(exc, OSError) and "accept" in context.get("message", ""):
        log.warning("tool bridge: %s (%s); accepting again in a second", context["message"], exc)
        return
    log.error("tool bridge: %s", context.get("message"), exc_info=exc)


def bind_socket(runtime_dir: Path) -> socket.socket:
    """A listening Unix socket at `runtime_dir/bridge`, made without following anything the sandbox planted:
    bound in a folder only this user can write (opened by descriptor, reached through /proc/self/fd, so the
    path cannot be swapped), given to the sandbox's uid there, then renamed into place."""
    runtime = os.open(runtime_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    private = f".host-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.mkdir(private, 0o700, dir_fd=runtime)
        folder = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=runtime)
        try:
            info = os.fstat(folder)
            if info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise OSError(f"the host-only folder in {runtime_dir} is not private")
            sock.bind(f"/proc/self/fd/{folder}/{wire.SOCKET}")
            os.chown(wire.SOCKET, SANDBOX_UID, SANDBOX_UID, dir_fd=folder, follow_symlinks=False)
            os.chmod(wire.SOCKET, 0o600, dir_fd=folder)  # nobody but this user can add a link here
            try:
                os.rename(wire.SOCKET, wire.SOCKET, src_dir_fd=folder, dst_dir_fd=runtime)
            except (IsADirectoryError, OSError) as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # the sandbox made a folder there: moved aside (in its own runtime dir), not entered
                os.rename(wire.SOCKET, f".displaced-{secrets.token_hex(8)}", src_dir_fd=runtime, dst_dir_fd=runtime)
                os.rename(wire.SOCKET, wire.SOCKET, src_dir_fd=folder, dst_dir_fd=runtime)
        finally:
            os.close(folder)
            try:
                os.rmdir(private, dir_fd=runtime)
            except OSError:  # the sandbox moved it: it is empty and only this user can write into it
                pass
        sock.listen(128)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(runtime)


class _LoopState:
    """Everything the loop thread owns; touched only from that thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor,
                 tool_timeout: Callable[[], float], threads: int) -> None:
        self.loop, self.pool, self.tool_timeout, self.threads = loop, pool, tool_timeout, threads
        self.endpoints: dict[str, _Served] = {}
        self.ready: deque[_Served] = deque()  # sessions with calls waiting and a thread they may use
        self.running = 0  # calls holding a pool thread, all sessions
        self.connections = 0  # open connections, all sessions
        # a quarter of the process's descriptors at most, whatever the sandboxes do: the rest stay for kernel
        # clients and files
        self.max_connections = max(256, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)

    async def bind(self, session: Endpoint) -> tuple[int, int]:
        """Serve a session on a new socket. Its counts (calls holding threads, permits) are kept from any
        earlier socket of the session: binding again gives a sandbox no new room."""
        served = self.endpoints.get(session.session_id)
        if served is None:
            served = self.endpoints[session.session_id] = _Served(self, session)
        served.shut()
        served.session, served.closed = session, False
        sock = bind_socket(session.runtime_dir)
        try:
            served.server = await self.loop.create_unix_server(lambda: _Connection(served), sock=sock)
        except BaseException:
            sock.close()
            served.closed = True
            raise
        info = os.lstat(session.runtime_dir / wire.SOCKET)
        return info.st_dev, info.st_ino

    async def unbind(self, session_id: str) -> None:
        served = self.endpoints.get(session_id)
        if served is not None:
            served.shut()
            self.forget_if_idle(served)

    def forget_if_idle(self, served: _Served) -> None:
        """A session no longer served is forgotten once none of its calls holds a thread."""
        if served.closed and served.holding == 0 and self.endpoints.get(served.session.session_id) is served:
            del self.endpoints[served.session.session_id]

    async def close(self) -> None:
        for session_id in list(self.endpoints):
            await self.unbind(session_id)

    async def stats(self, session_id: str) -> dict[str, int]:
        served = self.endpoints.get(session_id)
        if served is None:
            return {}
        return {"connections": len(served.connections), "waiting": len(served.waiting),
                "holding_threads": served.holding, "waiting_bytes": served.waiting_bytes,
                "big_in_use": BIG_PERMITS - served.big_free,
                "buffered": sum(len(c.buffer) for c in served.connections)}

    def schedule(self, served: _Served) -> None:
        if not served.queued and served.waiting and served.holding < CONCURRENCY:
            served.queued = True
            self.ready.append(served)
        self.pump()

    def pump(self) -> None:
        """Give free threads to waiting calls, one session at a time in turn."""
        while self.ready and self.running < self.threads:
            served = self.ready.popleft()
            served.queued = False
            if served.closed or not served.waiting or served.holding >= CONCURRENCY:
                continue
            call = served.next_live_call()
            served.resume_if_room()
            if call is None:
                continue
            if not call.big and served.running_bytes and served.running_bytes + call.small_bytes > RUNNING_BYTES:
                served.waiting.appendleft(call)  # its turn comes again when a running call ends
                served.waiting_bytes += call.small_bytes
                continue
            if call.big:  # parsed on its thread, where a slow parse holds up nobody else
                call.limit = self.tool_timeout()
            else:
                try:
                    call.parse(self.tool_timeout())
                except wire.BadRequest as exc:
                    call.connection.send(wire.error_reply(exc.request_id, "bad_request", str(exc)))
                    if served.waiting and not served.queued:
                        served.queued = True
                        self.ready.append(served)
                    continue
            served.holding += 1
            served.running_bytes += call.small_bytes
            self.running += 1
            call.started = self.loop.time()
            call.timer = self.loop.call_later(call.limit, self.expire, call)
            self.pool.submit(self.work, call)
            if served.waiting and served.holding < CONCURRENCY:
                served.queued = True
                self.ready.append(served)

    def work(self, call: _Call) -> None:
        """On a pool thread: run the request through the session's pipeline."""
        try:
            if call.request is None:
                call.parse(self.tool_timeout())
                if call.limit < self.tool_timeout():
                    self.loop.call_soon_threadsafe(self.shorten, call)
            assert call.request is not None
            reply = call.served.session.handle_bridge_request(call.request, call.abandoned)
        except wire.BadRequest as exc:
            reply = wire.error_reply(exc.request_id, "bad_request", str(exc))
        except Exception:  # a bug in the pipeline must still answer and free the slot
            log.exception("tool bridge: a request failed on the host")
            reply = wire.error_reply(call.id, "internal", "the host failed to handle this call; it was "
                                     "logged there")
        try:
            self.loop.call_soon_threadsafe(self.finish, call, reply)
        except RuntimeError:  # the loop is closed: nobody is left to answer
            pass

    def finish(self, call: _Call, reply: dict[str, Any]) -> None:
        """On the loop: the call's thread returned."""
        served = call.served
        served.holding -= 1
        served.running_bytes -= call.small_bytes
        self.running -= 1
        if call.timer is not None:
            call.timer.cancel()
        if not call.answered:
            call.answered = True
            call.connection.send(reply)
        call.request = None  # its body is not kept once answered
        if call.big:
            served.release_big()
        self.schedule(served)
        self.forget_if_idle(served)

    def shorten(self, call: _Call) -> None:
        """On the loop: a request parsed on its thread asked for less time than the host's limit."""
        if call.timer is not None and not call.answered:
            call.timer.cancel()
            call.timer = self.loop.call_later(max(0.0, call.started + call.limit - self.loop.time()),
                                              self.expire, call)

    def expire(self, call: _Call) -> None:
        """On the loop: the call's time is up. It is answered now; it keeps its thread (and its session's
        count) until that thread returns."""
        if call.answered:
            return
        call.answered = True
        call.abandoned.set()
        what = (call.request.slug or call.request.op) if call.request is not None else "the call"
        call.connection.send(wire.error_reply(call.id, "timeout", f"{what} did not answer within {call.limit:g}s"))


class _Served:
    """One session's listening socket, its connections and its calls."""

    def __init__(self, state: _LoopState, session: Endpoint) -> None:
        self.state, self.session = state, session
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[_Connection] = set()
        self.waiting: deque[_Call] = deque()
        self.waiting_bytes = 0
        self.holding = 0  # calls holding a thread, answered or not
        self.running_bytes = 0  # bytes of the small requests among them
        self.queued = False  # in the state's ready queue
        self.closed = False
        self.big_free = BIG_PERMITS
        self.big_waiting: deque[_Connection] = deque()
        self.full: list[_Connection] = []  # connections not read because too much is waiting

    def accepts(self) -> bool:
        if self.closed or len(self.connections) >= MAX_CONNECTIONS:
            return False
        return len(self.connections) < FAIR_CONNECTIONS or self.state.connections < self.state.max_connections

    def unread(self) -> int:
        """Reply bytes written to this session's connections that its sandbox has not read yet."""
        return sum(c.transport.get_write_buffer_size() for c in self.connections if c.transport is not None)

    def submit(self, connection: _Connection, payload: bytes, big: bool) -> None:
        call = _Call(self, connection, payload, big)
        self.waiting.append(call)
        self.waiting_bytes += call.small_bytes
        self.state.schedule(self)

    def next_live_call(self) -> _Call | None:
        """The next waiting call whose connection is still open (nobody would read the others' answers: they
        are dropped unrun)."""
        while self.waiting:
            call = self.waiting.popleft()
            self.waiting_bytes -= call.small_bytes
            if not call.connection.gone:
                return call
            if call.big:
                self.release_big()
        return None

    def has_room(self, size: int = 0) -> bool:
        """Whether a request of `size` bytes may wait (one always may when none is waiting)."""
        if not self.waiting:
            return True
        return len(self.waiting) < MAX_WAITING and self.waiting_bytes + size <= WAITING_BYTES

    def resume_if_room(self) -> None:
        if self.full and self.has_room():
            full, self.full = self.full, []
            for connection in full:
                connection.unpause("full")

    def take_big(self, connection: _Connection) -> bool:
        if self.big_free > 0:
            self.big_free -= 1
            return True
        self.big_waiting.append(connection)
        return False

    def release_big(self) -> None:
        self.big_free += 1
        while self.big_waiting and self.big_free > 0:
            connection = self.big_waiting.popleft()
            if not connection.gone:
                connection.unpause("big")  # it takes the permit when it reads the frame's header again

    def shut(self) -> None:
        """Stop serving: the socket and connections are closed and waiting calls dropped; calls holding threads
        keep counting until they return."""
        self.closed = True
        if self.server is not None:
            self.server.close()
            self.server = None
        for connection in list(self.connections):
            connection.abort()
        self.big_free += sum(call.big for call in self.waiting)
        self.waiting.clear()
        self.waiting_bytes = 0
        self.full.clear()
        self.big_waiting.clear()


class _Call:
    """A request, kept as the bytes it came in until it is about to run (parsed objects can be tens of times
    larger than their JSON: what waits is counted exactly)."""

    def __init__(self, served: _Served, connection: _Connection, payload: bytes, big: bool) -> None:
        self.served, self.connection, self.payload, self.big = served, connection, payload, big
        self.small_bytes = 0 if big else len(payload)
        self.request: wire.Request | None = None
        self.limit = self.started = 0.0
        self.abandoned = threading.Event()
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None

    def parse(self, tool_timeout: float) -> None:
        """Parse the payload (raises BadRequest); the bytes are dropped."""
        payload, self.payload = self.payload, b""
        self.request = wire.parse_request(payload)
        self.limit = wire.bounded_timeout(self.request.timeout, tool_timeout)

    @property
    def id(self) -> int | str | None:
        return self.request.id if self.request is not None else None


_ids = itertools.count()


class _Connection(asyncio.Protocol):
    """One connection from the sandbox: frames in, replies out."""

    def __init__(self, served: _Served) -> None:
        self.served = served
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.offset = 0  # where the next frame starts in the buffer
        self.holding_big = False  # this connection holds a permit for the big frame it is reading
        self.paused: set[str] = set()
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.served.accepts():  # too many: told so, and closed before anything is read
            self.gone = True
            transport.write(wire.encode(wire.error_reply(None, "busy", f"this sandbox has {MAX_CONNECTIONS} "
                                                                       "connections to its bridge open already")))
            transport.close()
            return
        self.served.connections.add(self)
        self.served.state.connections += 1
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self in self.served.connections:
            self.served.connections.discard(self)
            self.served.state.connections -= 1
        if self.holding_big:
            self.holding_big = False
            self.served.release_big()
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.frames()

    def frames(self) -> None:
        """Take every complete frame from the buffer, unless paused."""
        buffer, served = self.buffer, self.served
        while not self.paused and not self.gone:
            if len(buffer) - self.offset < wire.HEADER:
                break
            size = int.from_bytes(buffer[self.offset:self.offset + wire.HEADER], "big")
            if size > wire.MAX_REQUEST:
                self.send(wire.error_reply(None, "bad_request", f"a frame of {size:,} bytes is over the bridge's "
                                           f"limit of {wire.MAX_REQUEST:,}; the connection is closed"))
                self.close()
                return
            big = size > BIG
            if big and not self.holding_big:
                if not served.take_big(self):
                    self.pause("big")
                    break
                self.holding_big = True
            end = self.offset + wire.HEADER + size
            if len(buffer) < end:
                break
            if not big and not served.has_room(size):  # it stays in the buffer until there is room
                served.full.append(self)
                self.pause("full")
                break
            with memoryview(buffer) as view:
                payload = bytes(view[self.offset + wire.HEADER:end])
            self.offset = end
            self.holding_big = False  # the permit goes with the call
            served.submit(self, payload, big)
        if self.offset:  # a new buffer, so that one large frame's memory is not kept for the connection's life
            self.buffer = buffer[self.offset:]
            self.offset = 0

    def send(self, reply: dict[str, Any]) -> None:
        if self.gone or self.transport is None:
            return
        try:
            frame = wire.encode(reply)
        except TypeError:
            frame = wire.encode(wire.error_reply(reply.get("id"), "internal", "the reply could not be encoded"))
        self.transport.write(frame)
        if self.transport.get_write_buffer_size() > WRITE_HIGH and self.served.unread() > WRITE_ABORT:
            log.warning("tool bridge: session %s does not read its replies; closing its connection",
                        self.served.session.session_id)
            self.abort()

    def pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(reason)

    def unpause(self, reason: str) -> None:
        self.paused.discard(reason)
        if not self.paused and not self.gone and self.transport is not None:
            self.transport.resume_reading()
            # later, not now: the caller may be handing out threads, and these frames would start calls
            self.served.state.loop.call_soon(self.frames)

    def pause_writing(self) -> None:  # the sandbox is not reading its replies: read no more requests for now
        self.pause("writing")

    def resume_writing(self) -> None:
        self.unpause("writing")

    def close(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.abort()

"""A relay between this process's kernel clients and a kernel's sockets that bounds every message the kernel sends.

libzmq's MAXMSGSIZE limits each frame of a message, not the message: a kernel sending one message of many frames,
each under the limit, makes libzmq hold all of them in this process before the first is handed out (ZMQ delivers a
multipart message whole). The relay reads the kernel's side of each ZMTP 3 connection (RFC 23 and 37) as it
passes, counts what each message costs, and cuts the connection before a message passes its channel's limit: what
was forwarded of that message is dropped by libzmq, which connects again (through the relay, to the kernel) ten
milliseconds later. Only the frame headers are read; the bytes pass as they come, at most one chunk held per
direction, so a kernel that floods waits on the host's receive queue as it would without the relay. The same
reading bounds what libzmq keeps besides messages (protocol commands, the receive buffers small frames pin) and
what one kernel can cost the relay's thread, which all kernels share (frames, commands, writes of a few bytes).

The host's sockets reach the relay at an abstract unix address in this process's network namespace, which no
sandbox shares; a connection from another process is refused (its peer credentials are checked).
"""
from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import queue
import secrets
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHUNK = 1 << 16
FRAME_COST = 256  # what one frame costs this process beyond its bytes (libzmq's msg_t, pyzmq's Frame)
PINNED = 8192 + 8 + 249 * 40  # libzmq's receive buffer: a frame of 34 to 8191 bytes points into it (zero-copy) and
# keeps all of it, so a kernel writing one such frame at a time pins a buffer per frame
MAX_FRAMES = 1024  # in one message (a Jupyter message has six, plus its buffers)
MAX_COMMAND = 1024  # bytes in one command (libzmq's READY is 30 to 300, its ERROR at most 260, a PING under 30)
COMMANDS_IN_A_ROW = 32  # without a message ending between them (libzmq drops commands: nothing pushes back)
SMALL_READ = 4096  # bytes: a kernel that dribbles a message in reads under this size...
DRIBBLE = 64  # ...more than this many times is read once a millisecond until the message ends: libzmq takes an
# unfinished message's bytes as they come, so nothing else would stop it keeping the relay's thread busy
_DRIBBLE_PAUSE = 0.001
_GREETING = 64  # signature (10), version (2), mechanism (20), as-server (1), filler (31)
_NULL = b"NULL".ljust(20, b"\0")  # the only mechanism jupyter's kernels speak; under CURVE the flags are encrypted
_MORE, _LONG, _COMMAND = 1, 2, 4
_WARN_EVERY = 10.0  # seconds between two warnings of one route
_RECENT = 10.0  # seconds in which three cuts of one route make it refuse connections for a while
_MAX_HOLD = 1.0  # seconds at most
_RETRY_ACCEPT = 0.5  # seconds before a listener is watched again when this process is out of descriptors
RETRY_CONNECT = 0.01  # seconds between two tries to reach a kernel that does not listen (libzmq's own interval here)
_RETRY_SLOWER = (2.0, 0.1)  # ...and after this many seconds, every this many (a kernel that stopped, not starting)


def frame_cost(size: int) -> int:
    """What a frame of `size` bytes can cost this process once libzmq holds it."""
    return FRAME_COST + (PINNED if 33 < size < 8192 else size)


class Inbound:
    """The kernel's side of one ZMTP 3 connection, read as it passes (the frame headers only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._greeting = bytearray()
        self._header = bytearray()  # a frame header split between two chunks
        self._body = 0  # bytes of the current frame's body still to pass
        self._more = False  # the last data frame said that more frames of its message follow
        self._cost = 0  # what the frames of the unfinished message cost so far
        self._frames = 0  # and how many there are
        self._commands = 0  # commands since the last message ended
        self.small_reads = 0  # reads of under SMALL_READ bytes since the last message ended

    def feed(self, data: bytes) -> tuple[int, str | None]:
        """How many bytes of `data` may pass, and why the connection must then be cut (None: all may pass, go on).
        What may pass before a cut is the messages that ended before the offending one began."""
        at, end = 0, len(data)
        start = 0  # where the unfinished message began in `data` (0 when in an earlier chunk)
        while at < end:
            if len(self._greeting) < _GREETING:
                take = min(_GREETING - len(self._greeting), end - at)
                self._greeting += data[at:at + take]
                at += take
                if reason := self._check_greeting():
                    return 0, reason
            elif self._body:
                take = min(self._body, end - at)
                self._body -= take
                at += take
            else:
                begin = at
                if self._header or end - at < 9:  # (a header in pieces: byte by byte)
                    self._header.append(data[at])
                    at += 1
                    flags = self._header[0]
                    need = 9 if flags & _LONG else 2
                    if len(self._header) < need:
                        continue
                    size = int.from_bytes(self._header[1:need], "big")
                    self._header.clear()
                    begin = max(0, at - need)
                else:
                    flags = data[at]
                    need = 9 if flags & _LONG else 2
                    size = int.from_bytes(data[at + 1:at + need], "big")
                    at += need
                if not self._more:
                    start = begin  # a new message (or a command between two) begins here
                if reason := self._check_frame(flags, size):
                    return start, reason
                self._body = size
        return end, None

    def _check_greeting(self) -> str | None:
        got = self._greeting
        if got[0] != 0xFF or (len(got) > 9 and not got[9] & 1) or (len(got) > 10 and got[10] < 3):
            return "the kernel does not speak ZMTP 3"
        if len(got) >= 32 and bytes(got[12:32]) != _NULL:
            return f"the kernel asks for the security mechanism {bytes(got[12:32]).rstrip(bytes(1))!r}, not NULL"
        return None

    def _check_frame(self, flags: int, size: int) -> str | None:
        if flags & ~(_MORE | _LONG | _COMMAND):
            return f"a frame with unknown flags {flags:#04x}"
        cost = self._cost + frame_cost(size)
        if flags & _COMMAND:
            if flags & _MORE:  # libzmq would queue a SUBSCRIBE so marked as a part of an endless message
                return "a command marked as a part of a message"
            if size > MAX_COMMAND:
                return f"a command of {size:,} bytes (at most {MAX_COMMAND:,})"
            self._commands += 1
            if self._commands > COMMANDS_IN_A_ROW:
                return f"more than {COMMANDS_IN_A_ROW} commands without a message ending"
            if self._more:  # (inside a message: counted with it)
                self._cost = cost
            return None
        self._frames += 1
        if self._frames > MAX_FRAMES:
            return f"a message of more than {MAX_FRAMES:,} frames"
        if cost > self.limit:
            return (f"a message over its channel's limit of {self.limit:,} bytes (each frame costs "
                    f"{FRAME_COST} bytes more, and one of 34 to 8191 bytes the {PINNED:,}-byte buffer it pins)")
        self._more = bool(flags & _MORE)
        if self._more:
            self._cost = cost
        else:  # the message ends with this frame
            self._cost = self._frames = self._commands = self.small_reads = 0
        return None

    @property
    def in_message(self) -> bool:
        """Whether a message has begun and not ended."""
        return self._more or self._body > 0 or bool(self._header)


class Route:
    """Where this process's socket connects instead of the kernel's `upstream` address; close() when done."""

    def __init__(self, relay: Relay, listener: socket.socket, upstream: tuple[int, object], limit: int,
                 name: str) -> None:
        self.url = f"ipc://@{name}"
        self.limit = limit
        self.listener = listener
        self.upstream = upstream  # (address family, address)
        self.pairs: set[_Pair] = set()
        self.cuts = 0
        self.closed = False
        self.held_until = 0.0  # connections are refused until then, after cuts in a row
        self._relay = relay
        self._warned = 0.0
        self._recent: list[float] = []  # when the last cuts were

    def close(self) -> None:
        """Stop listening and drop this route's connections (from any thread)."""
        self._relay.call(lambda: self._relay.drop_route(self))

    def cut(self, reason: str) -> None:
        """Count a cut, warn now and then, and refuse connections for a while when cuts come in a row (a kernel
        that provokes them would otherwise keep the relay busy: a cut message is not pushed back on)."""
        self.cuts += 1
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning("kernel connection cut (%d so far on this channel): %s", self.cuts, reason)
        self._recent = [t for t in self._recent if now - t < _RECENT] + [now]
        if len(self._recent) >= 3:
            self.held_until = now + min(_MAX_HOLD, 0.05 * 2 ** (len(self._recent) - 3))


class _Pair:
    """One connection passing through: the host's libzmq socket (`down`) and the kernel's (`up`)."""

    def __init__(self, route: Route, down: socket.socket) -> None:
        self.route = route
        self.down = down
        self.up: socket.socket | None = None  # until the kernel's side is connected (see Relay._connect)
        self.connecting = True  # until the connection to the kernel is made
        self.pending: dict[socket.socket, bytes] = {down: b""}  # bytes waiting to be written to each socket
        self.inbound = Inbound(route.limit)
        self.closed = False
        self.paused = False  # the kernel's side is not read for a moment (it dribbles, see DRIBBLE)
        self.since = time.monotonic()

    def connected_to(self, up: socket.socket, connecting: bool) -> None:
        self.up, self.connecting = up, connecting
        self.pending[up] = b""

    def sockets(self) -> list[socket.socket]:
        return [self.down] if self.up is None else [self.down, self.up]

    def other(self, sock: socket.socket) -> socket.socket:
        assert self.up is not None  # (only connected pairs pass bytes)
        return self.up if sock is self.down else self.down


class Relay:
    """One thread relaying every route of this process (see the module's docstring)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._calls: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._later: list[tuple[float, int, Callable[[], None]]] = []  # a heap: when, a tie-breaker, what to do
        self._order = itertools.count()
        self.pid = os.getpid()  # the process whose thread this is
        self._thread = threading.Thread(target=self._run, name="workbench-relay", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def route(self, upstream: str, limit: int) -> Route:
        """A route to the ZMQ address `upstream` (`ipc://PATH` or `tcp://HOST:PORT`) whose messages from the
        kernel each stay within `limit` bytes."""
        address = _address(upstream)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"workbench-relay-{secrets.token_hex(12)}"
        listener.bind(f"\0{name}")
        listener.listen(16)
        listener.setblocking(False)
        route = Route(self, listener, address, limit, name)
        self.call(lambda: self._selector.register(listener, selectors.EVENT_READ, route))
        return route

    def call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the relay's thread, soon."""
        self._calls.put(fn)
        try:
            self._wake_write.send(b"\0")
        except BlockingIOError:
            pass  # already woken

    def drop_route(self, route: Route) -> None:
        if not route.closed:
            route.closed = True
            if route.listener in self._selector.get_map():  # (not while set aside for later, see _accept)
                self._selector.unregister(route.listener)
            route.listener.close()
        for pair in list(route.pairs):
            self._drop(pair)

    # the relay's thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = max(0.0, self._later[0][0] - time.monotonic()) if self._later else None
            for key, events in self._selector.select(timeout):
                try:
                    self._handle(key, events)
                except Exception:  # one connection's surprise must not stop every kernel's messages
                    log.exception("the kernel relay failed on a connection; it is dropped")
                    if isinstance(key.data, _Pair):
                        self._drop(key.data)
            now = time.monotonic()
            while self._later and self._later[0][0] <= now:
                then = heapq.heappop(self._later)[2]
                try:
                    then()
                except Exception:  # (as for events: one connection's surprise must not stop the relay)
                    log.exception("the kernel relay failed on a timed step; it goes on")

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data is None:
            while True:
                try:
                    self._wake_read.recv(4096)
                except BlockingIOError:
                    break
            while True:
                try:
                    call = self._calls.get_nowait()
                except queue.Empty:
                    break
                try:
                    call()
                except Exception:
                    log.exception("the kernel relay failed to open or close a route")
        elif isinstance(key.data, Route):
            if not key.data.closed:  # (a route closed while an earlier event of this round was handled)
                self._accept(key.data)
        elif not key.data.closed:  # (a pair dropped while an earlier event of this round was handled)
            pair: _Pair = key.data
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if events & selectors.EVENT_WRITE and not self._write(pair, sock):
                return
            if events & selectors.EVENT_READ:
                self._read(pair, sock)

    def _accept(self, route: Route) -> None:
        try:
            down, _ = route.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._set_aside(route, exc)
            return
        if time.monotonic() < route.held_until:
            down.close()  # libzmq tries again ten milliseconds later
            return
        pid = struct.unpack("3i", down.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if pid != self.pid:
            log.warning("refused a connection to a kernel relay from process %d (only this process may use it)", pid)
            down.close()
            return
        down.setblocking(False)
        pair = _Pair(route, down)
        route.pairs.add(pair)
        self._connect(pair)

    def _connect(self, pair: _Pair) -> None:
        """Connect a pair to the kernel. While the kernel does not listen (it is starting, or restarting), try
        again every RETRY_CONNECT seconds (less often after a while), the host's side held open and unread
        meanwhile: what libzmq sent there waits and reaches the kernel once it listens. Refusing the host instead
        made a cold start 0.3 s slower (measured: 0.85 s against 0.55 s)."""
        if pair.closed:
            return
        hung_up = select.poll()
        hung_up.register(pair.down, select.POLLRDHUP)
        if hung_up.poll(0):  # the host's side gave up (libzmq's handshake timeout, a closed socket)
            self._drop(pair)
            return
        family, address = pair.route.upstream
        try:
            up = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._drop(pair)
            self._set_aside(pair.route, exc)
            return
        up.setblocking(False)
        code = up.connect_ex(address)  # type: ignore[arg-type]
        if code not in (0, errno.EINPROGRESS):
            up.close()
            self._retry(pair)
            return
        if family != socket.AF_UNIX:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.connected_to(up, connecting=code != 0)
        self._update(pair)

    def _after(self, when: float, then: Callable[[], None]) -> None:
        heapq.heappush(self._later, (when, next(self._order), then))

    def _retry(self, pair: _Pair) -> None:
        after, every = _RETRY_SLOWER
        delay = RETRY_CONNECT if time.monotonic() - pair.since < after else every
        self._after(time.monotonic() + delay, lambda: self._connect(pair))

    def _set_aside(self, route: Route, exc: OSError) -> None:
        """Out of descriptors: watch this listener again a little later, not in a busy loop (libzmq, refused or
        not answered, tries again)."""
        if route.listener not in self._selector.get_map():
            return  # (already set aside)
        log.warning("the kernel relay cannot take a connection: %s; trying again in %s s", exc, _RETRY_ACCEPT)
        self._selector.unregister(route.listener)

        def again() -> None:
            if not route.closed:  # (a closed route's listener is closed)
                self._selector.register(route.listener, selectors.EVENT_READ, route)

        self._after(time.monotonic() + _RETRY_ACCEPT, again)

    def _read(self, pair: _Pair, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(pair)
            return
        if sock is pair.up:
            passing, reason = pair.inbound.feed(data)
            if reason is not None:
                pair.route.cut(reason)
                if passing and not pair.pending[pair.down]:  # the messages that ended before, if they go now
                    try:
                        pair.down.send(data[:passing], socket.MSG_NOSIGNAL)
                    except OSError:
                        pass
                self._drop(pair)
                return
            if len(data) < SMALL_READ and pair.inbound.in_message:
                pair.inbound.small_reads += 1
                if pair.inbound.small_reads > DRIBBLE:
                    pair.paused = True
                    self._after(time.monotonic() + _DRIBBLE_PAUSE, lambda: self._resume(pair))
        target = pair.other(sock)
        pair.pending[target] = data
        if self._write(pair, target):
            self._update(pair)

    def _resume(self, pair: _Pair) -> None:
        pair.paused = False
        if not pair.closed:
            self._update(pair)

    def _write(self, pair: _Pair, sock: socket.socket) -> bool:
        """Send what waits for `sock`; False when the pair was dropped or is not connected any more."""
        if sock is pair.up and pair.connecting:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):  # (refused: try again, as in _connect)
                self._selector.unregister(sock)
                sock.close()
                del pair.pending[sock]
                pair.up = None
                self._retry(pair)
                return False
            pair.connecting = False
        data = pair.pending[sock]
        if data:
            try:
                sent = sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(pair)
                return False
            pair.pending[sock] = data[sent:]
        self._update(pair)
        return True

    def _update(self, pair: _Pair) -> None:
        """Watch each socket for what it can do now: read while the other side has nothing waiting, write while
        it has something waiting (or its connection is being made)."""
        for sock in pair.sockets():
            events = 0
            if not pair.connecting and not pair.pending[pair.other(sock)] and not (sock is pair.up and pair.paused):
                events |= selectors.EVENT_READ
            if pair.pending[sock] or (sock is pair.up and pair.connecting):
                events |= selectors.EVENT_WRITE
            key = self._selector.get_map().get(sock)
            if key is not None and key.events == events:
                continue
            if key is None:
                if events:
                    self._selector.register(sock, events, pair)
            elif events:
                self._selector.modify(sock, events, pair)
            else:
                self._selector.unregister(sock)

    def _drop(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in pair.sockets():
            if sock in self._selector.get_map():
                self._selector.unregister(sock)
            sock.close()
        pair.route.pairs.discard(pair)


def _address(url: str) -> tuple[int, object]:
    scheme, _, rest = url.partition("://")
    if scheme == "ipc":
        return socket.AF_UNIX, rest
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        # IPv4, as libzmq's sockets (ZMQ_IPV6 is off)
        family, _, _, _, address = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0]
        return family, address
    raise ValueError(f"a kernel's address is ipc:// or tcp://, not {url!r}")


_relay: Relay | None = None
_relay_lock = threading.Lock()


def relay() -> Relay:
    """This process's relay, started on first use (and again in a forked child)."""
    global _relay
    with _relay_lock:
        if _relay is None or _relay.pid != os.getpid() or not _relay.alive:
            _relay = Relay()
        return _relay

"""A relay between this process's kernel clients and a kernel's sockets that bounds every message the kernel sends.

libzmq's MAXMSGSIZE limits each frame of a message, not the message: a kernel sending one message of many frames,
each under the limit, makes libzmq hold all of them in this process before the first is handed out (ZMQ delivers a
multipart message whole). The relay reads the kernel's side of each ZMTP 3 connection (RFC 23 and 37) as it
passes, counts what each message costs, and cuts the connection before a message passes its channel's limit: what
was forwarded of that message is dropped by libzmq, which connects again (through the relay, to the kernel) ten
milliseconds later. Only the frame headers are read; the bytes pass as they come, at most one chunk held per
direction, so a kernel that floods waits on the host's receive queue as it would without the relay.

The host's sockets reach the relay at an abstract unix address in this process's network namespace, which no
sandbox shares; a connection from another process is refused (its peer credentials are checked).
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHUNK = 1 << 16
FRAME_COST = 256  # what one frame costs this process beyond its bytes (libzmq's msg_t, pyzmq's Frame): a message
# of millions of empty frames is bounded too
_GREETING = 64  # signature (10), version (2), mechanism (20), as-server (1), filler (31)
_NULL = b"NULL".ljust(20, b"\0")  # the only mechanism jupyter's kernels speak; under CURVE the flags are encrypted
_MORE, _LONG, _COMMAND = 1, 2, 4
_WARN_EVERY = 10.0  # seconds between two warnings of one route


class Inbound:
    """The kernel's side of one ZMTP 3 connection, read as it passes: `feed` tells why a chunk must not pass."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._greeting = bytearray()
        self._header = bytearray()
        self._body = 0  # bytes of the current frame's body still to pass
        self._more = False  # the last data frame said that more frames of its message follow
        self._cost = 0  # what the frames of the current message cost so far

    def feed(self, data: bytes) -> str | None:
        """None when `data` may pass, else why the connection must be cut (then nothing of `data` may pass)."""
        at, end = 0, len(data)
        while at < end:
            if len(self._greeting) < _GREETING:
                take = min(_GREETING - len(self._greeting), end - at)
                self._greeting += data[at:at + take]
                at += take
                if reason := self._check_greeting():
                    return reason
            elif self._body:
                take = min(self._body, end - at)
                self._body -= take
                at += take
            else:
                self._header.append(data[at])
                at += 1
                if reason := self._check_header():
                    return reason
        return None

    def _check_greeting(self) -> str | None:
        got = self._greeting
        if got[0] != 0xFF or (len(got) > 9 and not got[9] & 1) or (len(got) > 10 and got[10] < 3):
            return "the kernel does not speak ZMTP 3"
        if len(got) >= 32 and bytes(got[12:32]) != _NULL:
            return f"the kernel asks for the security mechanism {bytes(got[12:32]).rstrip(bytes(1))!r}, not NULL"
        return None

    def _check_header(self) -> str | None:
        flags = self._header[0]
        if flags & ~(_MORE | _LONG | _COMMAND):
            return f"a frame with unknown flags {flags:#04x}"
        if len(self._header) < (9 if flags & _LONG else 2):
            return None
        size = struct.unpack(">Q", self._header[1:9])[0] if flags & _LONG else self._header[1]
        self._header.clear()
        cost = self._cost + size + FRAME_COST
        if cost > self.limit:
            return (f"a message over its channel's limit of {self.limit:,} bytes (frames cost their size and "
                    f"{FRAME_COST} bytes each)")
        if not flags & _COMMAND:
            self._more = bool(flags & _MORE)
        self._cost = cost if self._more else 0  # a command between two messages is counted alone
        self._body = size
        return None


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
        self._relay = relay
        self._warned = 0.0

    def close(self) -> None:
        """Stop listening and drop this route's connections (from any thread)."""
        self._relay.call(lambda: self._relay.drop_route(self))

    def warn(self, reason: str) -> None:
        self.cuts += 1
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning("kernel connection cut (%d so far on this channel): %s", self.cuts, reason)


class _Pair:
    """One connection passing through: the host's libzmq socket (`down`) and the kernel's (`up`)."""

    def __init__(self, route: Route, down: socket.socket, up: socket.socket, connecting: bool) -> None:
        self.route = route
        self.down, self.up = down, up
        self.connecting = connecting
        self.pending: dict[socket.socket, bytes] = {down: b"", up: b""}  # bytes waiting to be written to each
        self.inbound = Inbound(route.limit)
        self.closed = False

    def other(self, sock: socket.socket) -> socket.socket:
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
        self.pid = os.getpid()  # the process whose thread this is
        self._thread = threading.Thread(target=self._run, name="workbench-relay", daemon=True)
        self._thread.start()

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
            self._selector.unregister(route.listener)
            route.listener.close()
        for pair in list(route.pairs):
            self._drop(pair)

    # the relay's thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            for key, events in self._selector.select():
                try:
                    self._handle(key, events)
                except Exception:  # one connection's surprise must not stop every kernel's messages
                    log.exception("the kernel relay failed on a connection; it is dropped")
                    if isinstance(key.data, _Pair):
                        self._drop(key.data)

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data is None:
            while True:
                try:
                    self._wake_read.recv(4096)
                except BlockingIOError:
                    break
            while True:
                try:
                    self._calls.get_nowait()()
                except queue.Empty:
                    break
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
        pid = struct.unpack("3i", down.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if pid != self.pid:
            log.warning("refused a connection to a kernel relay from process %d (only this process may use it)", pid)
            down.close()
            return
        down.setblocking(False)
        family, address = route.upstream
        up = socket.socket(family, socket.SOCK_STREAM)
        up.setblocking(False)
        code = up.connect_ex(address)  # type: ignore[arg-type]
        if code not in (0, errno.EINPROGRESS):
            down.close()  # the kernel is not listening (yet, or any more): libzmq tries again
            up.close()
            return
        if family != socket.AF_UNIX:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(route, down, up, connecting=code != 0)
        route.pairs.add(pair)
        self._update(pair)

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
        if sock is pair.up and (reason := pair.inbound.feed(data)):
            pair.route.warn(reason)
            self._drop(pair)
            return
        target = pair.other(sock)
        pair.pending[target] = data
        if self._write(pair, target):
            self._update(pair)

    def _write(self, pair: _Pair, sock: socket.socket) -> bool:
        """Send what waits for `sock`; False when the pair was dropped."""
        if sock is pair.up and pair.connecting:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._drop(pair)
                return False
            pair.connecting = False
        data = pair.pending[sock]
        if data:
            try:
                sent = sock.send(data)
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
        for sock in (pair.down, pair.up):
            other = pair.other(sock)
            events = 0
            if not pair.connecting and not pair.pending[other]:
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
        for sock in (pair.down, pair.up):
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
        family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
        return family, address
    raise ValueError(f"a kernel's address is ipc:// or tcp://, not {url!r}")


_relay: Relay | None = None
_relay_lock = threading.Lock()


def relay() -> Relay:
    """This process's relay, started on first use (and again in a forked child)."""
    global _relay
    with _relay_lock:
        if _relay is None or _relay.pid != os.getpid():
            _relay = Relay()
        return _relay

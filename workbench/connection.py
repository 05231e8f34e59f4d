"""The jupyter-client side of one kernel, apart from where the kernel runs: channels made from connection info
(transport `ipc` or `tcp`), the ready check, and one cell followed to its end. A kernel reached over TCP on
another host needs nothing new here; the Kernel class (kernel.py) adds the sandbox and its IPC socket folder.
"""
from __future__ import annotations

import json
import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import channel_socket_types

from .execution import DROPPED, Callbacks, Outcome, Spill, receive, run_cell
from .relay import Route, relay

log = logging.getLogger(__name__)

# What the kernel can make this process hold: a message (all its frames) larger than its channel's limit is cut by
# the relay (relay.py: libzmq connects again, the message is lost) and at most RECEIVE_QUEUE messages wait per
# socket, so a flood waits in the kernel's own memory. iopub carries the outputs: a print or an image of up to
# 32 MiB is one message and passes (larger outputs belong in files). shell carries only replies, which are small: a
# forged huge execute_reply is dropped. Per session, at worst: iopub (RECEIVE_QUEUE queued + 1 being received) x
# 32 MiB = 160 MiB, shell and control 2 x 5 x 1 MiB = 10 MiB, plus the one message being decoded (its Python str;
# the part is parsed by the standard library's parser past _SMALL_PART). stdin and heartbeat are not connected.
MAX_IOPUB_MESSAGE = 32 * 1024**2
MAX_SHELL_MESSAGE = 1024**2  # shell and control
RECEIVE_QUEUE = 4
_SMALL_PART = 1 << 20
MAX_CONTAINERS = 100_000  # lists and objects in one large message part (an output of JSON data)
_context: zmq.Context[zmq.Socket[bytes]] | None = None
_context_lock = threading.Lock()


def zmq_context() -> zmq.Context[zmq.Socket[bytes]]:
    """The process's one ZMQ context, for kernel clients and tool bridges: reconnecting fast (sockets appear while
    a kernel starts) and never terminated, so a socket left open in some thread cannot hang the exit."""
    global _context
    with _context_lock:
        if _context is None:
            _context = zmq.Context()
            _context.set(zmq.MAX_SOCKETS, 65536)  # three per kernel client, one per bridge: hundreds of sessions
            _raise_open_files_limit()
            _context.setsockopt(zmq.RECONNECT_IVL, 10)
            _context.setsockopt(zmq.LINGER, 0)
        return _context


def _raise_open_files_limit() -> None:
    """Let this process hold the sockets of hundreds of sessions: the soft limit on open files up to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _Client(BlockingKernelClient):
    """A kernel client whose sockets bound what the kernel can queue in this process: each reaches the kernel
    through a route of the relay, which bounds whole messages, and bounds its queue (set before connecting)."""

    routes: list[Route]

    def _create_connected_socket(self, channel: str, identity: bytes | None = None) -> zmq.Socket[bytes]:
        limit = MAX_IOPUB_MESSAGE if channel == "iopub" else MAX_SHELL_MESSAGE
        route = relay().route(self._make_url(channel), limit)
        self.routes.append(route)
        sock: zmq.Socket[bytes] = self.context.socket(channel_socket_types[channel])
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, limit)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        if identity:
            sock.identity = identity
        sock.connect(route.url)
        return sock


class KernelConnection:
    """Channels to one kernel (shell and iopub; stdin and heartbeat are not connected), from its connection info.

    `info` is the kernel's connection info with transport `ipc` or `tcp`; for `ipc`, `ipc_path` is where this
    process reaches the sockets (the kernel's own path inside its sandbox means nothing here).
    """

    def __init__(self, info: dict[str, Any], *, ipc_path: str | None = None) -> None:
        transport = info.get("transport")
        if transport == "ipc":
            if ipc_path is None:
                raise ValueError("an ipc connection needs the path of the kernel's sockets on this host")
            info = {**info, "ip": ipc_path}
        elif transport != "tcp":
            raise ValueError(f"a kernel's transport is ipc or tcp, not {transport!r}")
        client = _Client(context=zmq_context())
        self._routes: list[Route] = []
        client.routes = self._routes
        client.load_connection_info(info)  # type: ignore[arg-type]  # (a TypedDict of the same keys)
        client.session.unpack = _unpack
        try:
            client.start_channels(hb=False, stdin=False)
        except BaseException:
            for route in self._routes:
                route.close()
            raise
        self.client: BlockingKernelClient = client

    def wait_ready(self, timeout: float, between: Callable[[], None] | None = None) -> bool:
        """Whether the kernel answers within `timeout` seconds: a kernel_info reply on shell, and a status message
        of the same request on iopub (which proves iopub is subscribed). `between` runs while nothing comes (e.g. a
        check that raises once the kernel's sandbox stopped)."""
        deadline = time.monotonic() + timeout
        shell, iopub = self.client.shell_channel, self.client.iopub_channel
        while time.monotonic() < deadline:
            msg_id = self.client.kernel_info()
            if _answered(shell, msg_id, 0.5, between) and _answered(iopub, msg_id, 0.3):
                return True
        return False

    def run(self, code: str, *, timeout: float | None, output_limit: int, interrupt: Callable[[], None],
            exit_reason: Callable[[], str | None], callbacks: Callbacks, spill: Spill | None = None,
            silent: bool = False) -> Outcome:
        """One cell followed to its end, a timeout or the kernel's death (see execution.run_cell)."""
        return run_cell(self.client, code, timeout=timeout, output_limit=output_limit, interrupt=interrupt,
                        exit_reason=exit_reason, callbacks=callbacks, spill=spill, silent=silent)

    def close(self) -> None:
        """Close the channels; the kernel keeps running."""
        try:  # (the channels started; jupyter-client's stop_channels would make the others first, to stop them)
            for channel in (self.client.shell_channel, self.client.iopub_channel, self.client.control_channel):
                if channel.is_alive():
                    channel.stop()
        finally:
            for route in self._routes:
                route.close()


def _unpack(data: bytes) -> Any:
    """A message part's JSON: orjson for the usual small parts, the standard library's parser for large ones
    (orjson peaks at 12 times their size: 165 MB of host memory for a 10 MB image)."""
    if len(data) < _SMALL_PART:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # e.g. a lone surrogate, which the standard library's parser reads
    elif data.count(b"[") + data.count(b"{") > MAX_CONTAINERS:  # millions of them hold the GIL for seconds
        raise ValueError(f"a message part with more than {MAX_CONTAINERS:,} lists and objects")
    return json.loads(data)


def _answered(channel: Any, msg_id: str, seconds: float, between: Callable[[], None] | None = None) -> bool:
    """Whether a message answering `msg_id` arrives on `channel` within `seconds` (others are dropped); `between`
    runs whenever a poll finds nothing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if channel.socket.poll(50):
            if _parent_id(channel) == msg_id:
                return True
        elif between is not None:
            between()
    return False


def _parent_id(channel: Any) -> Any:
    """The parent msg_id of a channel's next message; None when there is none, or it was malformed (dropped)."""
    msg = receive(channel, lambda reason: log.warning("dropped a malformed kernel message: %s", reason))
    return None if msg is None or msg is DROPPED else msg["parent_header"].get("msg_id")

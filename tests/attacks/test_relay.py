"""The relay between the host's kernel clients and a kernel's sockets (workbench/relay.py), against a hostile kernel
played by real ZMQ sockets and by raw bytes: a message is bounded by the sum of its frames, not by each frame; what
is not ZMTP 3 under the NULL mechanism does not pass; only this process may use a route; and after a cut libzmq
connects again, so the next message arrives."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from workbench.connection import zmq_context
from workbench.relay import (
    COMMANDS_IN_A_ROW,
    DRIBBLE,
    FRAME_COST,
    MAX_COMMAND,
    MAX_FRAMES,
    SMALL_READ,
    Route,
    frame_cost,
    relay,
)

LIMIT = 1 << 20


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """The kernel's side: a PUB socket bound at an ipc path, as ipykernel's iopub."""
    pub = zmq_context().socket(zmq.PUB)
    url = f"ipc://{tmp_path}/k-1"
    pub.bind(url)
    try:
        yield pub, url
    finally:
        pub.close(linger=0)


@pytest.fixture
def host(kernel: tuple[zmq.Socket[bytes], str]) -> Iterator[tuple[zmq.Socket[bytes], Route]]:
    """The host's side: a SUB socket reaching the kernel through a route of the relay."""
    route = relay().route(kernel[1], LIMIT)
    sub = zmq_context().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(route.url)
    try:
        yield sub, route
    finally:
        sub.close(linger=0)
        route.close()


def subscribed(pub: zmq.Socket[bytes], sub: zmq.Socket[bytes]) -> None:
    """Wait until the kernel's PUB reaches the host's SUB (a marker makes it through), then drain."""
    deadline = time.monotonic() + 10
    while not sub.poll(100):
        assert time.monotonic() < deadline, "no message arrives through the route"
        pub.send_multipart([b"marker"])
    while sub.poll(100):
        sub.recv_multipart()


def address(route: Route) -> str:
    """The abstract unix address behind a route's `ipc://@NAME` url."""
    return "\0" + route.url.removeprefix("ipc://@")


def cost(frames: list[bytes]) -> int:
    return sum(frame_cost(len(f)) for f in frames)


def test_a_message_passes_up_to_its_limit_and_not_a_byte_more(kernel, host) -> None:
    pub, _ = kernel
    sub, route = host
    subscribed(pub, sub)
    head = [b"a" * 1000] * 7
    at_limit = [*head, b"z" * (LIMIT - cost(head) - FRAME_COST)]
    assert cost(at_limit) == LIMIT
    assert _received_once(pub, sub, at_limit)
    assert route.cuts == 0
    over = [*head, b"z" * (LIMIT - cost(head) - FRAME_COST + 1)]
    assert not _received_once(pub, sub, over)
    assert route.cuts >= 1
    subscribed(pub, sub)  # libzmq connected again through the route: the next messages arrive
    assert _received_once(pub, sub, [b"after", b"the cut"])


def _received_once(pub: zmq.Socket[bytes], sub: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    """Publish `frames` once, then markers until one arrives; whether `frames` arrived before it."""
    pub.send_multipart(frames, copy=False)
    seen = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pub.send_multipart([b"marker"])
        while sub.poll(100):
            got = sub.recv_multipart()
            if got == [b"marker"]:
                return seen
            seen = seen or got == frames
    raise AssertionError("no marker arrived after the message")


def test_many_frames_each_under_the_limit_are_bounded_as_one_message(kernel, host) -> None:
    pub, _ = kernel
    sub, route = host
    subscribed(pub, sub)
    frame = memoryview(bytes(LIMIT // 4))
    assert not _received_once(pub, sub, [frame] * 40)  # 40 MiB in one message of 256 KiB frames
    subscribed(pub, sub)
    assert _received_once(pub, sub, [b""] * MAX_FRAMES)
    assert not _received_once(pub, sub, [b""] * (MAX_FRAMES + 1))
    subscribed(pub, sub)
    # a frame of 34 to 8191 bytes may pin libzmq's whole receive buffer, and is charged for it
    assert _received_once(pub, sub, [b"x" * 33] * 60)
    assert cost([b"x" * 34] * 60) > LIMIT
    assert not _received_once(pub, sub, [b"x" * 34] * 60)
    assert route.cuts >= 3
    subscribed(pub, sub)
    assert _received_once(pub, sub, [b"small"] * 100)


def test_a_cut_is_logged_once_in_a_while_not_for_each(kernel, host, caplog: pytest.LogCaptureFixture) -> None:
    pub, _ = kernel
    sub, route = host
    subscribed(pub, sub)
    with caplog.at_level(logging.WARNING, logger="workbench.relay"):
        for _ in range(3):
            subscribed(pub, sub)
            assert not _received_once(pub, sub, [bytes(LIMIT)])
    assert route.cuts >= 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "workbench.relay"]
    assert len(warnings) == 1 and "kernel connection cut (1 so far on this channel)" in warnings[0], warnings


class RawKernel:
    """A kernel that writes whatever bytes it likes on each connection it accepts, and records what it read."""

    def __init__(self, path: Path, greeting: bytes) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(8)
        self.greeting = greeting
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                conn.sendall(self.greeting)
                conn.settimeout(2)
                conn.recv(4096)
            except OSError:
                pass
            conn.close()


def frame(body: bytes, flags: int = 0) -> bytes:
    """One ZMTP 3 frame: flags, a size of one byte or eight, the body."""
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + len(body).to_bytes(8, "big") + body


READY = frame(b"\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER", 4)


def through(tmp_path: Path, sent: bytes) -> tuple[bytes, Route]:
    """What passes the relay of a kernel that writes `sent` at once, and its route."""
    raw = RawKernel(tmp_path / "k-1", sent)
    route = relay().route(f"ipc://{tmp_path}/k-1", LIMIT)
    try:
        down = socket.socket(socket.AF_UNIX)
        down.connect(address(route))
        down.settimeout(5)
        got = b""
        while chunk := down.recv(65536):
            got += chunk
            if got == sent:
                break
        return got, route
    finally:
        route.close()
        raw.server.close()


NULL_GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)


@pytest.mark.parametrize("greeting,seen_by", [
    pytest.param(b"\x01\x00hello" + bytes(60), 1, id="ZMTP 1.0, no signature"),
    pytest.param(b"\xff" + bytes(8) + b"\x7f\x01" + bytes(53), 11, id="ZMTP 2.0"),
    pytest.param(b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"CURVE".ljust(20, b"\0") + bytes(32), 32, id="CURVE"),
    pytest.param(NULL_GREETING + b"\x80\x05hello", 65, id="reserved flag bits"),
])
def test_what_is_not_zmtp3_under_null_never_reaches_the_host(tmp_path: Path, greeting: bytes, seen_by: int) -> None:
    got, route = through(tmp_path, greeting)
    assert route.cuts == 1
    # nothing from the chunk where the fault shows passes, so at most what came before the fault
    assert got == greeting[:len(got)] and len(got) < seen_by, got


def test_a_well_formed_greeting_and_frames_pass_byte_for_byte(tmp_path: Path) -> None:
    sent = NULL_GREETING + READY + frame(b"abc", 1) + frame(b"x" * 300)
    got, route = through(tmp_path, sent)
    assert got == sent and route.cuts == 0


_INTRUDER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("\\0" + sys.argv[1])
s.settimeout(5)
print(repr(s.recv(64)))
"""


def test_another_process_cannot_use_a_route(tmp_path: Path, kernel, caplog: pytest.LogCaptureFixture) -> None:
    url = kernel[1]
    route = relay().route(url, LIMIT)
    try:
        with caplog.at_level(logging.WARNING, logger="workbench.relay"):
            out = subprocess.run([sys.executable, "-c", _INTRUDER, address(route)[1:]],
                                 capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "b''", out  # closed at once: not even the kernel's greeting
        assert any("refused a connection to a kernel relay" in r.getMessage() for r in caplog.records)
        mine = socket.socket(socket.AF_UNIX)  # this process gets the kernel's greeting through the same route
        mine.connect(address(route))
        mine.settimeout(5)
        assert mine.recv(1) == b"\xff"
        mine.close()
    finally:
        route.close()


def test_a_closed_route_listens_no_more_and_drops_its_connections(kernel) -> None:
    url = kernel[1]
    route = relay().route(url, LIMIT)
    where = address(route)
    held = socket.socket(socket.AF_UNIX)
    held.connect(where)
    held.settimeout(5)
    assert held.recv(1) == b"\xff"
    route.close()
    deadline = time.monotonic() + 5
    while held.recv(4096):
        assert time.monotonic() < deadline
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX).connect(where)


def test_a_route_waits_for_a_kernel_that_binds_later(tmp_path: Path) -> None:
    url = f"ipc://{tmp_path}/k-1"
    route = relay().route(url, LIMIT)
    sub = zmq_context().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(route.url)
    time.sleep(0.3)  # libzmq is refused (through the route) while nothing listens, and tries again
    pub = zmq_context().socket(zmq.PUB)
    pub.bind(url)
    try:
        subscribed(pub, sub)
    finally:
        pub.close(linger=0)
        sub.close(linger=0)
        route.close()


@pytest.mark.parametrize("commands,why", [
    pytest.param(frame(b"\x05READY" + bytes(MAX_COMMAND), 4), "a command of", id="a READY over 1 KiB"),
    pytest.param(READY + frame(b"\x09SUBSCRIBE" + bytes(100), 4 | 1), "a command marked", id="a SUBSCRIBE with MORE"),
    pytest.param(READY + frame(b"\x04PING\x00\x00", 4) * COMMANDS_IN_A_ROW, "without a message ending", id="PINGs"),
    pytest.param(READY + (frame(b"a", 1) + frame(b"\x04PING\x00\x00", 4)) * COMMANDS_IN_A_ROW + frame(b"z"),
                 "without a message ending", id="PINGs inside a message"),
])
def test_commands_are_few_small_and_alone(tmp_path: Path, commands: bytes, why: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    # libzmq keeps a READY's properties for the connection's life, at about 40 times their size; it queues a
    # SUBSCRIBE with the MORE flag as a part of a message that never ends; and it drops other commands, so a
    # flood of them would never be pushed back on.
    with caplog.at_level(logging.WARNING, logger="workbench.relay"):
        got, route = through(tmp_path, NULL_GREETING + commands)
    assert route.cuts == 1 and any(why in r.getMessage() for r in caplog.records), caplog.text
    assert len(got) < len(NULL_GREETING + commands)


def test_a_few_commands_between_messages_pass(tmp_path: Path) -> None:
    pings = frame(b"\x04PING\x00\x00", 4) * (COMMANDS_IN_A_ROW - 1)
    sent = NULL_GREETING + READY + pings + frame(b"a", 1) + frame(b"b") + pings + frame(b"c")
    got, route = through(tmp_path, sent)
    assert got == sent and route.cuts == 0


def test_the_messages_before_an_offending_one_still_pass(tmp_path: Path) -> None:
    # one write: a whole message, then the header of a 10 MiB one; the first is delivered, the second cut
    before = NULL_GREETING + READY + frame(b"hello", 1) + frame(b"world")
    got, route = through(tmp_path, before + b"\x02" + (10 << 20).to_bytes(8, "big"))
    assert got == before and route.cuts == 1


def test_cuts_in_a_row_hold_the_route_for_a_while(tmp_path: Path) -> None:
    raw = RawKernel(tmp_path / "k-1", NULL_GREETING + frame(bytes(2 * LIMIT)))
    route = relay().route(f"ipc://{tmp_path}/k-1", LIMIT)

    def greeted() -> bool:
        down = socket.socket(socket.AF_UNIX)
        down.connect(address(route))
        down.settimeout(5)
        got = down.recv(1)
        down.close()
        return got == b"\xff"

    try:
        for _ in range(3):
            assert greeted()  # the greeting passes, the message is cut
        accepted = raw.accepted
        refused = sum(not greeted() for _ in range(5))  # (each one let through is cut again, and holds longer)
        assert refused >= 1 and raw.accepted == accepted + 5 - refused  # refused at once: the kernel not even asked
        deadline = time.monotonic() + 5
        while not greeted():  # and served again after a while
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert route.cuts >= 4
    finally:
        route.close()
        raw.server.close()


_OUT_OF_DESCRIPTORS = """
import os, resource, socket, sys, time
sys.path.insert(0, sys.argv[2])
from workbench.relay import relay
pub = socket.socket(socket.AF_UNIX)
pub.bind(sys.argv[1] + "/k-1")
pub.listen(8)
route = relay().route(f"ipc://{sys.argv[1]}/k-1", 1 << 20)
time.sleep(0.2)
client = socket.socket(socket.AF_UNIX)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (client.fileno() + 1, hard))  # no descriptor left after this one
client.connect("\\0" + route.url.removeprefix("ipc://@"))   # the relay cannot accept it
time.sleep(0.3)
cpu = time.process_time()
time.sleep(1.0)
spent = time.process_time() - cpu
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
pub.settimeout(5)
kernel_side, _ = pub.accept()
kernel_side.sendall(b"\\xff")
client.settimeout(5)
print(f"{spent:.3f}", client.recv(1) == b"\\xff", flush=True)
"""


def test_a_host_out_of_descriptors_waits_without_spinning(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path), str(Path(__file__).parents[2])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    spent, served = out.stdout.split()
    assert float(spent) < 0.3, f"the relay spent {spent} s of CPU in one second waiting for a descriptor"
    assert served == "True"  # once descriptors are free again, the waiting connection is served
    assert 1 <= out.stderr.count("cannot take a connection") <= 5  # tried again twice a second, not in a loop


_DRIBBLER = """
import socket, sys, time
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
conn.sendall(bytes.fromhex(sys.argv[2]))  # the greeting, then one frame header announcing 30 MB with MORE
piece = bytes(16)
while True:
    conn.sendall(piece)
"""


def test_a_kernel_dribbling_a_message_costs_the_relay_little(tmp_path: Path) -> None:
    start = NULL_GREETING + READY + b"\x03" + (30_000_000).to_bytes(8, "big")
    kernel = subprocess.Popen([sys.executable, "-c", _DRIBBLER, str(tmp_path / "k-1"), start.hex()],
                              stdout=subprocess.PIPE, text=True)
    route = relay().route(f"ipc://{tmp_path}/k-1", 32 * LIMIT)
    down = socket.socket(socket.AF_UNIX)
    try:
        assert kernel.stdout is not None and kernel.stdout.readline().strip() == "listening"
        down.connect(address(route))
        down.settimeout(5)
        got, small, began = 0, 0, time.monotonic()
        while time.monotonic() - began < 2:  # this thread reads what passes, as libzmq would
            chunk = down.recv(65536)
            got += len(chunk)
            small += len(chunk) < SMALL_READ
        assert got > len(start), "nothing passed"
        # each small piece the relay passes cost it a round of its loop: once it sees the dribble, at most one a
        # millisecond (a busy kernel's pieces then pile up, and pass in larger reads)
        assert small <= DRIBBLE + 2 * 1000, f"{small:,} small pieces passed in 2 s"
    finally:
        down.close()
        route.close()
        kernel.kill()
        kernel.wait()


def test_the_host_side_waits_open_while_the_kernel_does_not_listen(tmp_path: Path) -> None:
    route = relay().route(f"ipc://{tmp_path}/k-1", LIMIT)
    host = socket.socket(socket.AF_UNIX)
    try:
        host.connect(address(route))
        host.sendall(NULL_GREETING)  # what libzmq sends first; it waits, unread, in the host's socket
        host.settimeout(0.3)
        with pytest.raises(TimeoutError):
            host.recv(1)  # neither closed (libzmq would start over: a cold start took 0.3 s longer so)...
        kernel = socket.socket(socket.AF_UNIX)
        kernel.bind(str(tmp_path / "k-1"))
        kernel.listen(1)
        kernel.settimeout(5)
        conn, _ = kernel.accept()  # ...nor answered by anything but the kernel, once it listens
        conn.settimeout(5)
        assert conn.recv(64) == NULL_GREETING
        conn.sendall(NULL_GREETING)
        host.settimeout(5)
        assert host.recv(64) == NULL_GREETING
        conn.close()
        kernel.close()
    finally:
        host.close()
        route.close()


def test_a_host_side_that_gives_up_while_waiting_is_dropped(tmp_path: Path) -> None:
    # libzmq gives up a handshake after 30 s and connects again: the waiting pair it leaves must not pile up
    route = relay().route(f"ipc://{tmp_path}/k-1", LIMIT)
    try:
        for _ in range(3):
            host = socket.socket(socket.AF_UNIX)
            host.connect(address(route))
            host.sendall(NULL_GREETING[:10])  # libzmq's signature, unread while the kernel does not listen
            time.sleep(0.1)
            host.close()
        deadline = time.monotonic() + 5
        while route.pairs:
            assert time.monotonic() < deadline, f"{len(route.pairs)} pairs still wait for a kernel for no one"
            time.sleep(0.05)
    finally:
        route.close()

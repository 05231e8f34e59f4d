"""Processes beside the kernel in a sandbox container: the Engine API's exec, its multiplexed output read from the
engine's socket without blocking, and a kill from the host through pidfds."""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from docker import APIClient
from docker.errors import APIError, DockerException, NotFound
from requests import RequestException

from ...errors import DockerUnavailableError
from ..base import SandboxGone, SandboxProcess

log = logging.getLogger(__name__)

_READ = 1 << 20  # bytes asked of the socket at a time
_SLICE = 0.05  # seconds of reading between two looks at the clock


def _engine(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An Engine API call, its errors as ours: SandboxGone for a container that is gone or stopped."""
    try:
        return call(*args, **kwargs)
    except NotFound as exc:
        raise SandboxGone(exc.explanation or str(exc)) from None
    except APIError as exc:
        if exc.status_code == 409:  # not running, or paused
            raise SandboxGone(exc.explanation or str(exc)) from None
        raise DockerUnavailableError(f"the Docker engine refused an exec: {exc.explanation or exc}") from exc
    except (DockerException, RequestException, OSError) as exc:
        raise DockerUnavailableError(f"lost the Docker engine during an exec: {exc}") from exc


class DockerProcess(SandboxProcess):
    """One exec in a container."""

    def __init__(self, api: APIClient, container: str, argv: list[str], *, user: str, workdir: str,
                 env: list[str] | None = None) -> None:
        self._api = api
        self.id = _engine(api.exec_create, container, argv, stdout=True, stderr=True, stdin=False, tty=False,
                          user=user, workdir=workdir, environment=env)["Id"]
        raw = _engine(api.exec_start, self.id, socket=True)
        self.started = time.monotonic()
        self._response = getattr(raw, "_response", None)
        self._sock: socket.socket = getattr(raw, "_sock", raw)  # socket.SocketIO over the engine's unix socket
        self.eof = False
        self._closed = False
        self._frames = _Frames()
        self._early = b""
        self._selector = selectors.DefaultSelector()
        try:
            self._sock.setblocking(False)
            self._selector.register(self._sock, selectors.EVENT_READ)
            if self._response is not None:  # what the HTTP layer read past the upgrade's headers, if anything
                self._early = self._response.raw._fp.fp.read1(_READ) or b""
        except (OSError, AttributeError, ValueError) as exc:
            self.close()
            raise DockerUnavailableError(f"the Docker engine's exec stream cannot be read: {exc}") from exc

    def pump(self, wait: float, sinks: Mapping[int, Callable[[bytes], Any]]) -> None:
        if self._early:
            data, self._early = self._early, b""
        elif not self._selector.select(wait):
            return
        else:
            data = b""
        end = time.monotonic() + _SLICE
        while True:
            if not data:
                try:
                    data = self._sock.recv(_READ)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    self.eof = True
                    return
            for stream, payload in self._frames.feed(data):
                sinks.get(stream, sinks[2])(payload)
            data = b""
            if time.monotonic() >= end:
                return

    def poll(self) -> tuple[bool, int | None, str | None]:
        try:
            state = _engine(self._api.exec_inspect, self.id)
        except SandboxGone as exc:
            return False, None, f"the session's container stopped during the command ({exc})"
        code = state.get("ExitCode")
        return bool(state.get("Running")), code if type(code) is int else None, None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
            if self._response is not None:
                self._response.close()
        except Exception as exc:  # closing must not hide what happened
            log.debug("closing an exec stream: %s", exc)


class _Frames:
    """Docker's multiplexed stream: each payload follows an 8-byte header (stream, 0, 0, 0, size big-endian)."""

    def __init__(self) -> None:
        self._head = b""
        self._stream = 0
        self._left = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The payloads in `data` (a frame may span reads), consecutive ones of a stream joined."""
        groups: list[tuple[int, list[memoryview]]] = []
        view = memoryview(data)
        at, size = 0, len(data)
        while at < size:
            if not self._left:
                take = min(8 - len(self._head), size - at)
                self._head += view[at:at + take].tobytes()
                at += take
                if len(self._head) == 8:
                    self._stream, self._left = struct.unpack(">BxxxL", self._head)
                    self._head = b""
                continue
            take = min(self._left, size - at)
            if groups and groups[-1][0] == self._stream:
                groups[-1][1].append(view[at:at + take])
            else:
                groups.append((self._stream, [view[at:at + take]]))
            at += take
            self._left -= take
        return [(stream, b"".join(parts)) for stream, parts in groups]


def kill_processes(api: APIClient, container: str, gid: int) -> bool:
    """Kill a container's processes of real gid `gid` from the host: the engine lists them (host pids, real gids),
    and each one with that gid, as this host sees it too, is stopped then killed (through a pidfd: a pid reused
    meanwhile is never hit), until the engine lists none. False when that cannot be done here (the engine's pids
    are not this process's, it has no `ps`, or they outlast it)."""
    for _ in range(20):
        try:
            listed = _engine(api.top, container, ps_args="-eo pid,rgid,stat")
        except SandboxGone:
            return True
        except DockerUnavailableError:
            return False
        titles = listed.get("Titles") or []
        if not {"PID", "RGID", "STAT"} <= set(titles):
            return False
        at = [titles.index(title) for title in ("PID", "RGID", "STAT")]
        marked = [row[at[0]] for row in listed.get("Processes") or []
                  if len(row) == len(titles) and row[at[1]] == str(gid) and not row[at[2]].startswith("Z")]
        if not marked:
            return True
        handles = []
        for pid in marked:
            try:
                handle = os.pidfd_open(int(pid))
            except (OSError, ValueError):
                continue  # gone already
            if _real_gid(pid) == gid:  # read after the pidfd was opened: the same process, or a dead one
                handles.append(handle)
            else:
                os.close(handle)
        if not handles:
            return False  # listed by the engine, but not seen here: another pid namespace
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for handle in handles:
                try:
                    signal.pidfd_send_signal(handle, sig)
                except OSError:
                    pass
        for handle in handles:
            os.close(handle)
        time.sleep(0.01)
    return False


def _real_gid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Gid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None

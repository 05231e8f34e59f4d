"""The warm pool: kernels started ahead of demand, per limits tier, so that creating a session is nearly free.

A pooled kernel is started with the workspace, runtime dir and session label of a session id reserved for it,
and is handed to exactly one session, never back: nothing of a previous holder can leak. Its container is
labelled `workbench.pool=<owner>`, so that once its owner is gone (closed, or its process ended) gc removes it.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable

from .config import Limits
from .kernel import Kernel

log = logging.getLogger(__name__)

LABEL_POOL = "workbench.pool"
RETRY_AFTER = 5.0  # seconds before trying again when a pooled kernel failed to start
_open_pools: set[str] = set()  # owners of this process's pools not closed yet


def owner_alive(owner: str) -> bool:
    """Whether the pool that labelled a container `owner` ("<pid>-<token>") may still hand it out."""
    pid, _, _ = owner.partition("-")
    if pid == str(os.getpid()):
        return owner in _open_pools
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: alive
        return True


class WarmPool:
    """Up to `size` ready kernels for each limits tier asked for; refilled in the background."""

    def __init__(self, launch: Callable[[str, Limits, str], Kernel], size: int) -> None:
        """`launch(session_id, limits, owner)` makes a kernel (not started yet) for a session id reserved for it,
        its container labelled as this pool's (`owner`)."""
        self.size = size
        self._launch = launch
        self._ready: dict[Limits, deque[tuple[str, Kernel]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        _open_pools.add(self.owner)

    def take(self, limits: Limits) -> tuple[str, Kernel] | None:
        """A ready kernel of this tier and the session id reserved for it, or None; asks for a refill either way."""
        if self.size <= 0:
            return None
        self.want(limits)
        while True:
            with self._lock:
                ready = self._ready.get(limits)
                if not ready:
                    return None
                session_id, kernel = ready.popleft()
            self._wake.set()
            if kernel.exit_reason() is None:
                return session_id, kernel
            discard_kernel(kernel)  # died while waiting: never hand it out

    def want(self, limits: Limits) -> None:
        """Keep this tier filled from now on."""
        if self.size <= 0 or self._stopped:
            return
        with self._lock:
            self._ready.setdefault(limits, deque())
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, name="workbench-pool", daemon=True)
                self._thread.start()
        self._wake.set()

    def count(self, limits: Limits | None = None) -> int:
        with self._lock:
            return sum(len(r) for tier, r in self._ready.items() if limits is None or tier == limits)

    def close(self) -> None:
        """Stop refilling and remove the ready kernels."""
        self._stopped = True
        _open_pools.discard(self.owner)
        self._wake.set()
        with self._lock:
            kernels = [k for ready in self._ready.values() for _, k in ready]
            self._ready.clear()
        for kernel in kernels:
            discard_kernel(kernel)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)  # a kernel being started is discarded as soon as it is up

    def _fill(self) -> None:
        while not self._stopped:
            self._wake.clear()
            with self._lock:
                short = [tier for tier, ready in self._ready.items() if len(ready) < self.size]
            if not short:
                self._wake.wait()
                continue
            session_id = secrets.token_hex(6)
            kernel = self._launch(session_id, short[0], self.owner)
            try:
                kernel.start()
            except Exception as exc:  # Docker down, image missing: keep serving cold creates, retry later
                log.warning("warm pool: could not start a kernel (%s); retrying in %.0fs", exc, RETRY_AFTER)
                discard_kernel(kernel)
                self._wake.wait(RETRY_AFTER)
                continue
            with self._lock:
                if self._stopped or short[0] not in self._ready:
                    stale = True
                else:
                    self._ready[short[0]].append((session_id, kernel))
                    stale = False
            if stale:
                discard_kernel(kernel)


def discard_kernel(kernel: Kernel) -> None:
    """Remove a kernel no session ever held: its container, runtime dir and never-used workspace."""
    try:
        kernel.shutdown()
    finally:
        kernel.disk.destroy(quiet=True)

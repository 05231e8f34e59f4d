"""A session: one user's kernel, workspace and configuration."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Limits
from .errors import SessionClosedError
from .execution import Callbacks
from .kernel import Kernel
from .results import ExecutionError, ExecutionResult, Output

if TYPE_CHECKING:
    from .client import Workbench


class Session:
    """A sandboxed kernel that keeps variables, functions and files between executions. Thread-safe:
    executions on one session run one at a time, in the order they were called."""

    def __init__(self, workbench: Workbench, session_id: str, user_id: str, limits: Limits, kernel: Kernel) -> None:
        self._workbench = workbench
        self.session_id = session_id
        self.user_id = user_id
        self.limits = limits
        self._kernel = kernel
        self._lock = threading.Lock()
        self.closed = False

    @property
    def workspace(self) -> Path:
        """The workspace folder on the host, mounted at /workspace in the sandbox."""
        return self._kernel.workspace

    def execute(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Output], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
    ) -> ExecutionResult:
        """Run code in the session's kernel and return its outputs.

        `timeout` (seconds, default the workbench's `execute_timeout`) interrupts the cell and keeps the
        kernel's state. If the kernel dies it is restarted on the same workspace and the result says so.
        """
        callbacks = Callbacks(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result, on_error=on_error)
        with self._lock:
            self._check_open()
            return self._kernel.execute(
                code, timeout=self._workbench.execute_timeout if timeout is None else timeout, callbacks=callbacks
            )

    def restart(self) -> None:
        """Restart the kernel: variables are lost, the workspace is kept."""
        with self._lock:
            self._check_open()
            self._kernel.restart()

    def close(self) -> None:
        """Stop the kernel and remove its container. The workspace stays on the host."""
        with self._lock:
            if not self.closed:
                self._kernel.shutdown()
                self.closed = True
                self._workbench._forget(self.session_id)

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(session_id={self.session_id!r}, user_id={self.user_id!r})"

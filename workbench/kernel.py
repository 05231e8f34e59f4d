"""A Jupyter kernel in a sandbox of a backend, reached with jupyter-client over IPC sockets in a runtime dir."""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient

from .backends import Backend, Sandbox, SandboxSpec
from .config import Limits
from .connection import KernelConnection
from .errors import KernelStartError, WorkbenchError
from .execution import Callbacks, Spill
from .kernelspec import PYTHON, KernelSpec
from .results import ExecutionResult
from .sandbox import RUNTIME, hand_over
from .store import KernelRecord
from .workspace import Workspace, release_runtime_dir, reset_runtime_dir

log = logging.getLogger(__name__)

LABEL_KERNEL = "workbench.kernel"  # on every sandbox: the kernel it runs
_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
SOCKETS = "kernel"  # the folder of the kernel's IPC sockets in the runtime dir
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
class Kernel:
    """One sandboxed kernel. Not thread-safe: the session layer runs one execution at a time."""

    def __init__(
        self,
        backend: Backend,
        *,
        image: str,
        workspace: Path | Workspace,
        runtime_dir: Path | None = None,
        limits: Limits,
        runtime_root: Path | None = None,
        runtime_name: str = "kernel",
        labels: dict[str, str] | None = None,
        output_limit: int = 1_000_000,
        start_timeout: float = 60.0,
        read_only_mounts: dict[str, str] | None = None,
        spec: KernelSpec = PYTHON,
    ) -> None:
        self.backend = backend
        self.image = image
        self.spec = spec
        # the workspace's disk (a filesystem image where supported; a plain folder when given a path)
        self.disk = workspace if isinstance(workspace, Workspace) else Workspace(workspace, limits.workspace_size,
                                                                                   quota=False)
        self.workspace = self.disk.path
        if (runtime_dir is None) == (runtime_root is None):
            raise ValueError("give a kernel either runtime_root (a runtime dir per kernel) or runtime_dir")
        if "/" in runtime_name or runtime_name.startswith("."):
            raise ValueError(f"not a runtime dir name: {runtime_name!r}")
        self._runtime_root, self._runtime_name, self._fixed_runtime_dir = runtime_root, runtime_name, runtime_dir
        self.limits = limits
        self.labels = dict(labels or {})
        self.output_limit = output_limit
        self.start_timeout = start_timeout
        self.read_only_mounts = read_only_mounts or {}  # host folder -> sandbox path (the image's Python trees)
        self.kernel_id = secrets.token_hex(6)
        self.lineage = self.kernel_id  # whose variables it holds: its own, or those of a paused kernel it restored
        self.sandbox: Sandbox | None = None
        self.link: KernelConnection | None = None  # this process's channels to the kernel, while connected
        self.connection: dict[str, Any] | None = None  # its connection info as stored (the in-sandbox socket path)
        self._sockets: int | None = None  # a descriptor of the kernel's socket folder, reached through /proc

    @property
    def runtime_dir(self) -> Path:
        """This kernel's runtime dir (kernel.json, the IPC sockets, the bridge socket): `<runtime_root>/<name>-<kernel
        id>`, so that each kernel has its own. A new kernel (start after restart, attach to another process's) gets
        a new one, and releasing a stopped kernel's dir can never touch its successor's."""
        if self._fixed_runtime_dir is not None:
            return self._fixed_runtime_dir
        assert self._runtime_root is not None
        return runtime_dir_of(self._runtime_root, self._runtime_name, self.kernel_id)

    # lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the container and wait until the kernel answers."""
        try:
            self.disk.ensure()  # mounted before any container starts
            reset_runtime_dir(self.runtime_dir)  # a fresh, size-limited dir: nothing of a previous kernel
        except OSError as exc:
            raise KernelStartError(f"could not prepare the kernel's folders: {exc}") from exc
        info = {"transport": "ipc", "key": secrets.token_hex(32), "signature_scheme": "hmac-sha256",
                "kernel_name": self.spec.name, **{port: n for n, port in enumerate(_PORTS, start=1)}}
        # the runtime dir is new and no container runs on it yet; still, never follow a link there
        runtime = os.open(self.runtime_dir, _DIR)
        try:
            fd = os.open("kernel.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=runtime)
            with os.fdopen(fd, "w") as out:
                hand_over(fd)  # readable by the kernel only (the runtime dir is 0700 as well)
                out.write(json.dumps({**info, "ip": f"{RUNTIME}/{SOCKETS}/k"}))
            os.mkdir(SOCKETS, 0o700, dir_fd=runtime)
            sockets = os.open(SOCKETS, _DIR, dir_fd=runtime)
            self._hold_sockets(sockets)
            hand_over(sockets)  # the kernel binds its sockets there, then the folder is locked (see _lock)
        finally:
            os.close(runtime)
        self.sandbox = self.backend.launch(SandboxSpec(
            name=f"workbench-{self.kernel_id}", image=self.image, command=self.spec.command(), limits=self.limits,
            labels={LABEL_KERNEL: self.kernel_id, **self.labels}, workspace=self.workspace,
            runtime_dir=self.runtime_dir, read_only_mounts=self.read_only_mounts,
        ))
        self._connect(info, self.start_timeout)
        try:
            self._lock()
        except BaseException:
            self.shutdown()
            raise

    def _hold_sockets(self, fd: int | None) -> None:
        if self._sockets is not None:
            os.close(self._sockets)
        self._sockets = fd

    def _lock(self) -> None:
        """Once the kernel has bound its sockets, its socket folder becomes this user's and read-only to
        everyone else: code in the sandbox cannot swap a socket for a link to somewhere else on the host.
        The folder is reached through a descriptor held since it was made, so renaming it changes nothing."""
        assert self._sockets is not None
        if os.getuid() == 0:
            os.fchown(self._sockets, 0, 0)
        os.fchmod(self._sockets, 0o700)
        for name in os.listdir(self._sockets):
            if not stat.S_ISSOCK(os.stat(name, dir_fd=self._sockets, follow_symlinks=False).st_mode):
                raise KernelStartError(f"the kernel's socket folder holds something else than sockets: {name!r}")

    def _open_locked_sockets(self) -> bool:
        """Open the socket folder of a kernel another process started; False unless it is the locked one."""
        try:
            fd = os.open(self.runtime_dir / SOCKETS, _DIR)
        except OSError:
            return False
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            os.close(fd)
            return False
        self._hold_sockets(fd)
        return True

    def attach(self, record: KernelRecord) -> bool:
        """Reconnect to a kernel started by another process; False when its container is gone or stopped.

        The kernel is not asked to answer first: it may be busy with a cell sent by that other process.
        """
        sandbox = self.backend.attach(record.sandbox_id)
        if sandbox is None:
            return False
        # From now on this object is that kernel, runtime dir included. A previous kernel of this object that is
        # not the session's any more is left to whoever replaced it, or to gc (which releases its runtime dir).
        self.sandbox, self.kernel_id = sandbox, record.kernel_id
        self.lineage = record.lineage or record.kernel_id
        if self.exit_reason() is not None:
            self.shutdown()
            return False
        if not self._open_locked_sockets():
            log.warning("kernel %s: its socket folder is not the one the host locked; it is not attached",
                        record.kernel_id)
            self.shutdown()
            return False
        self._connect(record.connection, timeout=None)
        try:
            self._wait_ready(5.0)  # makes sure iopub is subscribed before the first cell
        except KernelStartError:
            log.info("kernel %s is busy; attached without waiting for it", self.kernel_id)
        return True

    @property
    def client(self) -> BlockingKernelClient | None:
        """The jupyter-client of this process's connection to the kernel; None while not connected."""
        return self.link.client if self.link is not None else None

    def record(self) -> KernelRecord:
        """What another process needs to reattach to this kernel."""
        assert self.sandbox is not None and self.connection is not None
        return KernelRecord(kernel_id=self.kernel_id, sandbox_id=self.sandbox.id, connection=self.connection,
                            lineage=self.lineage)

    def _connect(self, info: dict[str, Any], timeout: float | None) -> None:
        assert self._sockets is not None
        self.link = KernelConnection(info, ipc_path=f"/proc/self/fd/{self._sockets}/k")
        self.connection = info
        if timeout is None:
            return
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.shutdown()
            raise

    def _reconnect(self) -> None:
        """New channels to the same kernel (the old ones may be broken)."""
        assert self.connection is not None
        info = self.connection
        self.disconnect()
        self._connect(info, timeout=None)
        try:
            self._wait_ready(5.0)
        except KernelStartError:
            log.warning("kernel %s did not answer after reconnecting", self.kernel_id)

    def _wait_ready(self, timeout: float) -> None:
        assert self.link is not None
        if self.link.wait_ready(timeout, self._check_running):
            return
        if not any((self.runtime_dir / SOCKETS).glob("k-*")):
            raise KernelStartError(
                f"the kernel's IPC sockets never appeared in {self.runtime_dir}: this Docker engine does not share the "
                "host's filesystem with its containers (Docker Desktop, a remote engine), which workbench needs"
            )
        raise KernelStartError(f"the kernel did not answer within {timeout:.0f}s\n{self._logs()}")

    def _check_running(self) -> None:
        if (reason := self.exit_reason()) is not None:
            raise KernelStartError(f"the kernel container stopped while starting: {reason}\n{self._logs()}")

    def _logs(self) -> str:
        return self.sandbox.logs(tail=20) if self.sandbox is not None else ""

    def exit_reason(self) -> str | None:
        """None while the kernel's sandbox runs, else why it stopped."""
        if self.sandbox is None:
            return "not started"
        return self.sandbox.exit_reason()

    def apply_limits(self) -> None:
        """Apply the memory and CPU limits to the running sandbox."""
        if self.sandbox is not None:
            self.sandbox.update_limits(self.limits)

    def interrupt(self) -> None:
        """SIGINT to the kernel, as a KeyboardInterrupt in the running cell."""
        if self.sandbox is not None:
            self.sandbox.interrupt()

    def disconnect(self) -> None:
        """Close this process's channels; the kernel keeps running."""
        if self.link is not None:
            self.link.close()
            self.link = None

    def shutdown(self) -> None:
        """Stop the kernel and remove its container and runtime dir; the workspace is kept."""
        self.disconnect()
        if self.sandbox is not None:
            try:
                self.sandbox.destroy()
            except WorkbenchError as exc:
                log.warning("could not remove the sandbox of kernel %s: %s", self.kernel_id, exc)
            self.sandbox = None
        self._hold_sockets(None)
        try:
            release_runtime_dir(self.runtime_dir)  # unmounted and removed, whatever the kernel left in it
        except (OSError, WorkbenchError) as exc:
            log.warning("could not remove the runtime dir %s: %s", self.runtime_dir, exc)

    def restart(self) -> None:
        """A new kernel on the same workspace: files are kept, variables are not."""
        self.shutdown()
        self.kernel_id = self.lineage = secrets.token_hex(6)
        self.start()

    # execution -------------------------------------------------------------------------------------------------

    def execute(self, code: str, *, timeout: float | None = None, callbacks: Callbacks | None = None,
                spill: Spill | None = None, silent: bool = False) -> ExecutionResult:
        """Run code; on a timeout the kernel is interrupted, on its death it is restarted (files kept). A `silent`
        cell is not counted nor kept in the kernel's history (the host's own cells)."""
        if self.link is None:
            self.start()
        assert self.link is not None
        outcome = self.link.run(code, timeout=timeout, output_limit=self.output_limit, interrupt=self.interrupt,
                                exit_reason=self.exit_reason, callbacks=callbacks or Callbacks(), spill=spill,
                                silent=silent)
        result = outcome.result
        if outcome.reply_seen != outcome.idle_seen and outcome.dead is None:
            # a channel lost messages (a flood past the queues, a message over its channel's limit that the relay
            # cut): it may be left without the reply or the idle of this cell. Connect again, to be sure.
            log.warning("kernel %s: its %s messages stopped arriving; reconnecting", self.kernel_id,
                        "iopub" if outcome.reply_seen else "shell")
            self._reconnect()
        result.started_late = outcome.started_late
        if outcome.dead is not None:
            result.kernel_died = outcome.dead
            result.not_started = not outcome.started  # dropped with the kernel that never took it up
            log.warning("kernel %s died: %s; restarting it", self.kernel_id, outcome.dead)
            self.restart()
            result.state_lost = True
        elif outcome.unresponsive:
            # The restart also drops our request when it never started: it cannot run later, unwatched.
            result.not_started = not outcome.started
            if result.not_started:
                result.kernel_died = ("was running an earlier cell of this session (its caller gone, or the start "
                                      "of this one went unseen) and did not respond to the interrupt after the "
                                      "timeout; it was restarted and this cell dropped")
            else:
                result.kernel_died = "did not respond to the interrupt after the timeout; it was restarted"
            log.warning("kernel %s ignored the interrupt; restarting it%s", self.kernel_id,
                        " (the cell never started: it is dropped)" if result.not_started else "")
            self.restart()
            result.state_lost = True
        elif outcome.started_late:
            log.warning("kernel %s: the cell was not seen to start by its timeout; the kernel was interrupted (it "
                        "ran an earlier cell of this session, or the cell's start went unseen)", self.kernel_id)
        return result


def runtime_dir_of(root: Path, name: str, kernel_id: str) -> Path:
    """The runtime dir of one kernel: `<root>/<name>-<kernel id>` (a session id and a kernel id of 12 hex digits
    each keep socket paths far below the 108 bytes of a unix socket address)."""
    return root / f"{name}-{kernel_id}"

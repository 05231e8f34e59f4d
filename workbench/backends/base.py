"""What a sandbox backend does, in the spirit of jupyter-client's KernelProvisionerBase: launch a sandbox from a
spec, watch it, signal it, change its limits, start a process in it beside the kernel, destroy it, list the ones
it manages (for gc), and name each by an opaque id that another process can attach to.

The sandbox's security defaults (DESIGN.md) are the backend's to enforce, whatever the spec says: a spec carries
no switch to turn any of them off.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..config import Limits


class SandboxSpec(BaseModel):
    """What to run: the image and its start command, the limits, labels, and the host folders to mount."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str = Field(description="a name unique among the backend's sandboxes")
    image: str
    command: list[str]
    limits: Limits
    labels: dict[str, str] = Field(default_factory=dict)
    workspace: Path = Field(description="mounted read-write at /workspace")
    runtime_dir: Path = Field(description="mounted read-write at /run/workbench: the kernel's sockets, the bridge")
    read_only_mounts: dict[str, str] = Field(default_factory=dict, description="host folder -> sandbox path")


class ManagedSandbox(BaseModel):
    """One sandbox the backend manages, as gc sees it."""

    id: str
    name: str
    labels: dict[str, str]
    status: str = Field(description="running, created, restarting, paused, exited, dead, ...")
    age: float = Field(description="seconds since it was created")
    runtime_source: Path | None = Field(default=None, description="the host folder mounted at /run/workbench")

    @property
    def live(self) -> bool:
        return self.status in ("running", "created", "restarting", "paused")


class SandboxGone(Exception):
    """The sandbox is not there, or not running (raised by `Sandbox.exec` and `Backend.sandbox`)."""


class SandboxProcess(ABC):
    """A process started in a sandbox by `Sandbox.exec`, its stdout and stderr read without blocking."""

    started: float
    """When it started (time.monotonic())."""
    eof: bool
    """True once its output has ended."""

    @abstractmethod
    def pump(self, wait: float, sinks: Mapping[int, Callable[[bytes], Any]]) -> None:
        """Wait up to `wait` seconds for output, then hand what comes for a moment to the sinks by stream (1 stdout,
        2 stderr); sets `eof` when the output ended."""

    @abstractmethod
    def poll(self) -> tuple[bool, int | None, str | None]:
        """Whether its main process runs, its exit code, and why that cannot be known (the sandbox stopped)."""

    @abstractmethod
    def close(self) -> None:
        """Stop reading its output (idempotent); the process itself is not signalled."""

    def collect(self, deadline: float, limit: int = 4096) -> tuple[bytes, int | None]:
        """Everything it prints (at most `limit` bytes kept) until it ends or the deadline; its exit code."""
        kept = bytearray()

        def keep(data: bytes) -> None:
            kept.extend(data[: limit - len(kept)])

        while not self.eof and time.monotonic() < deadline:
            self.pump(min(deadline - time.monotonic(), 0.5), {1: keep, 2: keep})
        for _ in range(50):  # the exit may be recorded a moment after the output ends
            running, code, gone = self.poll()
            if not running or gone or time.monotonic() >= deadline:
                return bytes(kept), code
            time.sleep(0.01)
        return bytes(kept), None


class Sandbox(ABC):
    """One launched sandbox; `id` is the opaque handle the store keeps."""

    id: str

    @abstractmethod
    def exit_reason(self) -> str | None:
        """None while it runs, else why it stopped (raises BackendUnavailableError when the backend is gone)."""

    @abstractmethod
    def interrupt(self) -> None:
        """SIGINT to the kernel (a KeyboardInterrupt in the running cell); nothing when it is gone."""

    @abstractmethod
    def update_limits(self, limits: Limits) -> None:
        """Apply memory and CPU limits to the running sandbox."""

    @abstractmethod
    def exec(self, argv: list[str], *, uid: int, gid: int, workdir: str, env: list[str] | None = None
             ) -> SandboxProcess:
        """Start `argv` in the sandbox beside the kernel, under its limits, as `uid`:`gid` (no supplementary
        groups), in `workdir`, with the sandbox's environment plus `env` (NAME=value) and stdin closed (raises
        SandboxGone, BackendUnavailableError)."""

    def kill_processes(self, gid: int) -> bool:
        """Stop, then kill, from outside the sandbox (where nothing in it can resist), every process in it whose
        real gid is `gid`, until none is left; True when none is left, False when this backend cannot do it here."""
        return False

    @abstractmethod
    def destroy(self) -> bool:
        """Stop and remove it; False when it was already gone."""

    @abstractmethod
    def logs(self, tail: int = 20) -> str:
        """Its last lines of output (a hint for errors; may be empty)."""


class Backend(ABC):
    """Where sandboxes run. Chosen by name (`Workbench(backend="docker")`) from the `workbench.backends` entry-point
    group, so that a third party can plug one in."""

    name: ClassVar[str]

    @abstractmethod
    def launch(self, spec: SandboxSpec) -> Sandbox:
        """Start a sandbox with the security defaults (raises ImageNotFoundError, BackendUnavailableError)."""

    @abstractmethod
    def attach(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with this id, launched by any process; None when it is gone."""

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle on the sandbox with this id, for its process calls; a backend may skip the round trip that
        `attach` makes, so its calls raise SandboxGone when it is gone."""
        sandbox = self.attach(sandbox_id)
        if sandbox is None:
            raise SandboxGone(f"sandbox {sandbox_id[:12]} is gone")
        return sandbox

    @abstractmethod
    def list_managed(self, labels: dict[str, str]) -> list[ManagedSandbox]:
        """The sandboxes carrying all these labels, running or not (for gc)."""

    @abstractmethod
    def destroy(self, sandbox_id: str) -> bool:
        """Stop and remove a sandbox by id; False when it was already gone."""

    @abstractmethod
    def ensure_image(self, tag: str, progress: Callable[[str], None], force: bool = False) -> bool:
        """Make the sandbox image available to this backend (built, or fetched); True when it had to be made."""

    @abstractmethod
    def require_image(self, tag: str) -> None:
        """Raise ImageNotFoundError, with what to do, when the image is not available."""

    @abstractmethod
    def pin_image(self, tag: str) -> tuple[str, dict[str, str]]:
        """The image `tag` names now, as an id that later changes of the tag do not move, and read-only mounts
        (host folder -> sandbox path) that go with it."""

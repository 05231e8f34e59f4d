"""What a sandbox backend does, in the spirit of jupyter-client's KernelProvisionerBase: launch a sandbox from a
spec, watch it, signal it, change its limits, destroy it, list the ones it manages (for gc), and name each by an
opaque id that another process can attach to.

The sandbox's security defaults (DESIGN.md) are the backend's to enforce, whatever the spec says: a spec carries
no switch to turn any of them off.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

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

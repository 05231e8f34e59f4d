"""The Docker backend: sandboxes as hardened containers of the local engine (the embedded default).

Docker's errors are translated here (and in the modules beside it) into workbench's: the rest of the host side
sees `Sandbox` and `ManagedSandbox`, never a container.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import docker
from docker.errors import APIError, NotFound
from docker.models.containers import Container
from requests import RequestException

from ...config import Limits
from ...errors import DockerUnavailableError
from ...sandbox import RUNTIME
from ..base import Backend, ManagedSandbox, Sandbox, SandboxGone, SandboxSpec
from . import image as images
from .container import exit_reason, remove_container, run_sandbox
from .engine import connect, security_options
from .process import DockerProcess, kill_processes

__all__ = ["DockerBackend", "DockerSandbox"]


class DockerSandbox(Sandbox):
    """A sandbox container: its exec calls go by id through the low-level API, the rest through its model (looked
    up on first need when the handle was made from an id)."""

    def __init__(self, client: docker.DockerClient, sandbox_id: str, container: Container | None = None) -> None:
        self._client = client
        self._container = container
        self.id = sandbox_id

    @property
    def container(self) -> Container:
        if self._container is None:
            try:
                self._container = self._client.containers.get(self.id)
            except NotFound:
                raise SandboxGone(f"container {self.id[:12]} is gone") from None
            except (APIError, RequestException) as exc:
                raise DockerUnavailableError(f"cannot reach the Docker engine to find a container: {exc}") from exc
        return self._container

    def exit_reason(self) -> str | None:
        try:
            return exit_reason(self.container)
        except (NotFound, SandboxGone):
            return "its container was removed"
        except (APIError, RequestException) as exc:
            raise DockerUnavailableError(f"lost the Docker engine while watching the kernel: {exc}") from exc

    def interrupt(self) -> None:
        try:
            self.container.kill(signal="SIGINT")  # through the container's init, to the kernel
        except (APIError, NotFound, SandboxGone):
            pass  # already gone; whoever waits on it sees that

    def update_limits(self, limits: Limits) -> None:
        try:
            self.container.update(mem_limit=limits.memory, memswap_limit=limits.memory, cpu_period=100_000,
                                  cpu_quota=int(limits.cpus * 100_000))
        except (APIError, RequestException) as exc:
            raise DockerUnavailableError(f"the Docker engine refused the new limits: {exc}") from exc

    def exec(self, argv: list[str], *, uid: int, gid: int, workdir: str, env: list[str] | None = None
             ) -> DockerProcess:
        return DockerProcess(self._client.api, self.id, argv, user=f"{uid}:{gid}", workdir=workdir, env=env)

    def kill_processes(self, gid: int) -> bool:
        return kill_processes(self._client.api, self.id, gid)

    def destroy(self) -> bool:
        try:
            return remove_container(self.container)
        except SandboxGone:
            return False
        except (APIError, RequestException) as exc:
            raise DockerUnavailableError(f"could not remove container {self.id[:12]}: {exc}") from exc

    def logs(self, tail: int = 20) -> str:
        try:
            return bytes(self.container.logs(tail=tail)).decode(errors="replace")
        except Exception:  # the logs are only a hint
            return ""


class DockerBackend(Backend):
    """Sandboxes as containers of one Docker engine (DOCKER_HOST, or the local socket)."""

    name = "docker"

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self.client = client or connect()
        self.security = security_options(self.client)  # what the engine enforces (seccomp); a warning if little

    def launch(self, spec: SandboxSpec) -> DockerSandbox:
        container = run_sandbox(
            self.client, image=spec.image, name=spec.name, workspace=spec.workspace, runtime_dir=spec.runtime_dir,
            limits=spec.limits, labels=spec.labels, command=spec.command, read_only_mounts=spec.read_only_mounts)
        return DockerSandbox(self.client, str(container.id), container)

    def attach(self, sandbox_id: str) -> DockerSandbox | None:
        try:
            container = self.client.containers.get(sandbox_id)
            return DockerSandbox(self.client, str(container.id), container)
        except NotFound:
            return None
        except (APIError, RequestException) as exc:
            raise DockerUnavailableError(f"cannot reach the Docker engine to find a kernel's container: {exc}") from exc

    def sandbox(self, sandbox_id: str) -> DockerSandbox:
        return DockerSandbox(self.client, sandbox_id)  # exec by id needs no look-up first

    def list_managed(self, labels: dict[str, str]) -> list[ManagedSandbox]:
        try:
            containers = self.client.containers.list(
                all=True, filters={"label": [f"{key}={value}" for key, value in labels.items()]},
                ignore_removed=True)  # one removed meanwhile is no error
        except (APIError, RequestException) as exc:
            raise DockerUnavailableError(f"cannot list containers: {exc}") from exc
        return [ManagedSandbox(id=str(c.id), name=c.name or "", labels=dict(c.labels), status=c.status, age=_age(c),
                               runtime_source=_runtime_source(c)) for c in containers]

    def destroy(self, sandbox_id: str) -> bool:
        sandbox = self.attach(sandbox_id)
        return sandbox.destroy() if sandbox is not None else False

    # the sandbox image ----------------------------------------------------------------------------------------

    def ensure_image(self, tag: str, progress: Callable[[str], None], force: bool = False) -> bool:
        """Build the kernel image (and the base image) when missing or stale; True when it built."""
        return images.ensure_image(self.client, tag, progress=progress, force=force)

    def require_image(self, tag: str) -> None:
        images.require_image(self.client, tag)

    def pin_image(self, tag: str) -> tuple[str, dict[str, str]]:
        """The image `tag` names now, by id, and the read-only mounts of its Python trees (see image.pin)."""
        return images.pin(self.client, tag)


def _age(container: Container) -> float:
    created = datetime.fromisoformat(container.attrs["Created"])
    return time.time() - created.timestamp()


def _runtime_source(container: Container) -> Path | None:
    """The host folder a kernel container had as its runtime dir (as this process mounted it, not the sandbox)."""
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Destination") == RUNTIME and mount.get("Type") == "bind" and mount.get("Source"):
            return Path(mount["Source"])
    return None

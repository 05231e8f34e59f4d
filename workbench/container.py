"""Sandbox containers: every one gets the security defaults of DESIGN.md, with no way to turn them off."""
from __future__ import annotations

import grp
import logging
import os
import pwd
from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import LogConfig, Ulimit

from .config import Limits
from .errors import DockerUnavailableError, ImageNotFoundError, WorkbenchError

log = logging.getLogger(__name__)

LABEL_MANAGED = "workbench.managed"
LABEL_KERNEL = "workbench.kernel"
WORKSPACE = "/workspace"
RUNTIME = "/run/workbench"
DEFAULT_SANDBOX_UID = 900_000_000  # no host account has it (checked at start-up); the image's passwd names it


def _configured_uid() -> int:
    text = os.environ.get("WORKBENCH_SANDBOX_UID", "")
    if not text:
        return DEFAULT_SANDBOX_UID
    try:
        uid = int(text)
    except ValueError:
        raise WorkbenchError(f"WORKBENCH_SANDBOX_UID must be a number, not {text!r}") from None
    if not 0 < uid < 2**32 - 1:
        raise WorkbenchError(f"WORKBENCH_SANDBOX_UID must be between 1 and 4294967294, not {uid}")
    return uid


SANDBOX_UID = os.getuid() if os.getuid() != 0 else _configured_uid()
"""The uid (and gid) sandboxes run as: this user's own, or, when the host side runs as root, a high one that no
host account has (`WORKBENCH_SANDBOX_UID` to choose it)."""


def check_sandbox_uid() -> None:
    """When the host side is root, refuse a sandbox uid that a host account or group has: the sandbox would
    own that account's files and sockets."""
    if os.getuid() != 0:
        return
    owners = []
    try:
        owners.append(f"user {pwd.getpwuid(SANDBOX_UID).pw_name}")
    except KeyError:
        pass
    try:
        owners.append(f"group {grp.getgrgid(SANDBOX_UID).gr_name}")
    except KeyError:
        pass
    if owners:
        raise WorkbenchError(
            f"the sandbox uid {SANDBOX_UID} belongs to the host's {' and '.join(owners)}: sandboxes would own its "
            "files; set WORKBENCH_SANDBOX_UID to a uid no host account or group has")


def hand_over(fd: int) -> None:
    """Give a file or folder the host side created (open at `fd`) to the sandbox user."""
    if os.getuid() == 0:
        os.fchown(fd, SANDBOX_UID, SANDBOX_UID)


def _folder(path: Path) -> int:
    """A descriptor of the folder at `path`, made (0700) when missing; a symlink or file there is refused."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise WorkbenchError(f"{path} must be a folder (not a symlink): {exc.strerror}") from None


def private_dir(path: Path) -> None:
    """Create (or check) a folder only the host user can enter: 0700, owned by this uid, not a symlink.
    Its parents are created as needed (0700 too)."""
    if path.parent != path and not path.parent.exists():
        private_dir(path.parent)
    fd = _folder(path)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise WorkbenchError(f"{path} is owned by uid {info.st_uid}, not by this user ({os.getuid()}): "
                                 "refusing to keep sessions there")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def prepare_dir(path: Path) -> None:
    """Create a folder the sandbox user owns (the host side, when root, hands it over); its parent must exist
    and be the host's. A symlink in its place is refused."""
    fd = _folder(path)
    try:
        hand_over(fd)
    finally:
        os.close(fd)


def run_sandbox(
    client: docker.DockerClient,
    *,
    image: str,
    name: str,
    workspace: Path,
    runtime_dir: Path,
    limits: Limits,
    labels: dict[str, str],
    command: list[str],
    read_only_mounts: dict[str, str] | None = None,
) -> Container:
    """Start a locked-down kernel container running `command`: no network, no capabilities, read-only root,
    non-root, limited."""
    uid = SANDBOX_UID
    try:
        return client.containers.run(
            image,
            command,
            name=name,
            detach=True,
            init=True,  # an init as PID 1 forwards signals to the kernel and reaps its children
            user=f"{uid}:{uid}",
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={limits.tmp_size},mode=1777"},
            mem_limit=limits.memory,
            memswap_limit=limits.memory,  # no swap beyond the memory limit
            cpu_period=100_000,
            cpu_quota=int(limits.cpus * 100_000),  # (not nano_cpus: the engine cannot update that live)
            pids_limit=limits.pids,
            ulimits=[Ulimit(name="core", soft=0, hard=0)],
            ipc_mode="private",
            hostname="sandbox",
            volumes={
                str(workspace): {"bind": WORKSPACE, "mode": "rw"},
                str(runtime_dir): {"bind": RUNTIME, "mode": "rw"},
                **{host: {"bind": inside, "mode": "ro"} for host, inside in (read_only_mounts or {}).items()},
            },
            working_dir=WORKSPACE,
            labels={LABEL_MANAGED: "true", **labels},
            log_config=LogConfig(type=LogConfig.types.JSON, config={"max-size": "1m", "max-file": "1"}),
        )
    except ImageNotFound:
        raise ImageNotFoundError(f"kernel image {image} not found: build it with `workbench image build`") from None
    except APIError as exc:
        raise DockerUnavailableError(
            f"the Docker engine refused to start the sandbox: {exc.explanation or exc}") from exc


def exit_reason(container: Container) -> str | None:
    """None while the container runs; otherwise why it stopped (OOM-killed, or its exit code)."""
    container.reload()
    state = container.attrs["State"]
    if state.get("Running") and not state.get("Restarting"):
        return None
    if state.get("OOMKilled"):
        return f"OOM-killed: the memory limit ({container.attrs['HostConfig']['Memory'] // 2**20} MiB) was exceeded"
    code = state.get("ExitCode")
    if code is not None and code > 128:
        return f"killed by signal {code - 128} (exit code {code})"
    return f"exited with code {code}"


def remove_container(container: Container) -> bool:
    """Remove a container, running or not; False when it was already gone or being removed (404, 409)."""
    try:
        container.remove(force=True)
        return True
    except NotFound:
        return False
    except APIError as exc:
        if exc.status_code == 409:  # already being removed
            return False
        raise

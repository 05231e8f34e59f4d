"""Sandbox containers: every one gets the security defaults of DESIGN.md, with no way to turn them off."""
from __future__ import annotations

from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import LogConfig, Ulimit

from ...config import Limits
from ...errors import DockerUnavailableError, ImageNotFoundError
from ...sandbox import RUNTIME, SANDBOX_UID, WORKSPACE

LABEL_MANAGED = "workbench.managed"


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

"""Settings and resource limits, with the embedded defaults."""
from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size like "512m", "1g", "1.5GiB"."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a number with k, m, g or t)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class Limits(BaseModel):
    """Resource limits of one sandbox container."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: int = Field(default=1024**3, description="memory limit in bytes (no swap on top)")
    cpus: float = Field(default=1.0, ge=0.01, allow_inf_nan=False, description="CPU share, in cores (at least "
                        "0.01: less would be a CPU quota of 0, which Docker reads as unlimited)")
    pids: int = Field(default=256, ge=16, description="maximum number of processes and threads")
    tmp_size: int = Field(default=256 * 1024**2, description="size of the tmpfs at /tmp in bytes")
    workspace_size: int = Field(default=10 * 1024**3, description="cap on the workspace's bytes for files written "
                                "through the files API and tool offload")

    @field_validator("memory", "tmp_size", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int:
        size = parse_size(value)
        if size < 32 * 1024**2:
            raise ValueError("must be at least 32 MiB")
        return size

    @field_validator("workspace_size", mode="before")
    @classmethod
    def _workspace_size(cls, value: int | str) -> int:
        size = parse_size(value)
        if size < 1024**2:
            raise ValueError("must be at least 1 MiB")
        return size


def default_home() -> Path:
    """WORKBENCH_HOME, or the user's data dir."""
    return Path(os.environ.get("WORKBENCH_HOME") or platformdirs.user_data_dir("workbench"))


def default_runtime_root() -> Path:
    """Where per-kernel runtime dirs (the IPC sockets) live: short, since unix socket paths stop at 108 bytes."""
    return Path(os.environ.get("WORKBENCH_RUNTIME_DIR") or f"/tmp/wb-{os.getuid()}")


DEFAULT_IMAGE = os.environ.get("WORKBENCH_IMAGE", "workbench-kernel:latest")
BASE_IMAGE = os.environ.get("WORKBENCH_BASE_IMAGE", "workbench-base:bookworm")

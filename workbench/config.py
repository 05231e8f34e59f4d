"""Settings and resource limits, with the embedded defaults."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated

import platformdirs
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .errors import MetadataError

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


METADATA_KEYS = 16
METADATA_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
METADATA_VALUE = 256  # characters
METADATA_BYTES = 4096  # of JSON in all: the metadata is copied into every log entry of its session


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Session metadata as it may be stored: at most 16 string keys of letters, digits and _ . : - (64 at most),
    string values of at most 256 printable characters, 4 KiB of JSON in all. Raises MetadataError."""
    if not isinstance(metadata, dict):
        raise MetadataError(f"metadata must be a dict of strings, not {type(metadata).__name__}")
    if len(metadata) > METADATA_KEYS:
        raise MetadataError(f"metadata holds at most {METADATA_KEYS} keys, not {len(metadata)}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not METADATA_KEY.fullmatch(key):
            raise MetadataError(f"a metadata key is 1 to 64 of letters, digits and _ . : -, not {str(key)[:80]!r}")
        if not isinstance(value, str) or len(value) > METADATA_VALUE or not value.isprintable():
            raise MetadataError(f"metadata {key}: a value is a string of at most {METADATA_VALUE} printable characters")
    if len(json.dumps(metadata)) > METADATA_BYTES:
        raise MetadataError(f"metadata takes at most {METADATA_BYTES} bytes of JSON")
    return metadata


Metadata = Annotated[dict[str, str], AfterValidator(check_metadata)]
"""A session's metadata (correlation ids and the like), checked by `check_metadata`."""


def default_home() -> Path:
    """WORKBENCH_HOME, or the user's data dir."""
    return Path(os.environ.get("WORKBENCH_HOME") or platformdirs.user_data_dir("workbench"))


def default_runtime_root() -> Path:
    """Where per-kernel runtime dirs (the IPC sockets) live: short, since unix socket paths stop at 108 bytes."""
    return Path(os.environ.get("WORKBENCH_RUNTIME_DIR") or f"/tmp/wb-{os.getuid()}")


DEFAULT_IMAGE = os.environ.get("WORKBENCH_IMAGE", "workbench-kernel:latest")
BASE_IMAGE = os.environ.get("WORKBENCH_BASE_IMAGE", "workbench-base:bookworm")

"""What a session store keeps and does: the records (pydantic models) and the `Store` interface. The embedded
store is SQLite (`sqlite.py`); the shared one, PostgreSQL (`postgres.py`), implements the same interface.

Every method that changes a record is atomic on its own: compare-and-set where two processes may race (a config
version, a kernel id, an idle mark), so that the store, not a process lock, decides who won.
"""
from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, Field, model_validator

from ..config import Limits, Metadata, check_metadata

LOG_KEEP = 100_000  # newest log entries kept per session: a sandbox calling tools in a loop cannot fill the disk


class SessionConfig(BaseModel):
    """What a session may use: its toolkits, tools and resource limits."""

    toolkits: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    offload_threshold: int = Field(default=20_000, ge=0, description="bytes of JSON above which a tool's "
                                   "response goes to the workspace instead of inline")
    metadata: Metadata = Field(default_factory=dict, description="the caller's labels (e.g. a correlation id): "
                               "given to every tool call and written into every log entry")

    def changed(self, *, toolkits: builtins.list[str] | None = None, tools: builtins.list[str] | None = None,
                limits: Limits | None = None, offload_threshold: int | None = None,
                metadata: dict[str, str] | None = None) -> SessionConfig:
        """A copy with the settings given (None keeps this one's), validated as a new config is."""
        return SessionConfig(
            toolkits=self.toolkits if toolkits is None else toolkits,
            tools=self.tools if tools is None else tools,
            limits=self.limits if limits is None else limits,
            offload_threshold=self.offload_threshold if offload_threshold is None else offload_threshold,
            metadata=self.metadata if metadata is None else check_metadata(metadata),
        )


class KernelRecord(BaseModel):
    """Enough to reattach to a running kernel from another process."""

    kernel_id: str
    sandbox_id: str = Field(description="the backend's opaque handle of the kernel's sandbox")
    connection: dict[str, Any]
    lineage: str | None = Field(default=None, description="the id of the kernel whose variables this one holds: "
                                "its own, or a paused kernel's it restored (None: its own, in older stores)")

    @model_validator(mode="before")
    @classmethod
    def _older_store(cls, data: Any) -> Any:
        if isinstance(data, dict) and "container_id" in data and "sandbox_id" not in data:  # written before backends
            data = {**data, "sandbox_id": data["container_id"]}
            del data["container_id"]
        return data


class PausedState(BaseModel):
    """A session asleep: its kernel stopped, its namespace saved in the workspace (`.state/`) to be restored by
    the next kernel. `error` says why nothing was saved (the kernel was stopped without a snapshot)."""

    paused_at: float
    names: list[str] = Field(default_factory=list, description="the variables saved")
    modules: dict[str, str] = Field(default_factory=dict, description="name -> module, imported again on resume")
    skipped: dict[str, str] = Field(default_factory=dict, description="name -> why it could not be saved")
    bytes: int = Field(default=0, description="size of the snapshot")
    error: str | None = Field(default=None, description="why no snapshot was saved")
    lineage: str | None = Field(default=None, description="the lineage of the kernel that was paused")


class SessionRecord(BaseModel):
    session_id: str
    user_id: str
    status: str
    config: SessionConfig
    config_version: int
    kernel: KernelRecord | None = None
    created_at: float
    last_used_at: float
    busy_until: float = 0.0  # while a cell runs: when it must have ended; the idle reaper leaves it alone until then
    paused: PausedState | None = None
    replica: str | None = None  # in a cluster, the replica whose host runs the session's kernel and workspace


class ReplicaRecord(BaseModel):
    """One `workbench serve` replica of a cluster, as its last heartbeat left it."""

    replica_id: str
    url: str = Field(description="where the other replicas reach it")
    memory: int = Field(description="bytes of memory its host has for sessions")
    started_at: float
    seen_at: float


class LogEntry(BaseModel):
    """One execution or tool call of a session; the session id is its trace id."""

    id: int
    session_id: str
    kind: str
    status: str
    duration: float
    detail: dict[str, Any]
    created_at: float

    @property
    def metadata(self) -> dict[str, str]:
        """The session's metadata when the entry was written."""
        return self.detail.get("metadata") or {}


class ApiKeyRecord(BaseModel):
    """An API key of `workbench serve`, as stored: never the key itself, only its hash."""

    key_id: str
    name: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Store(ABC):
    """A session store. Thread-safe; several processes (and, for a shared store, hosts) may use one at once."""

    # sessions
    @abstractmethod
    def add(self, record: SessionRecord) -> None: ...

    @abstractmethod
    def get(self, session_id: str) -> SessionRecord:
        """The session's record; SessionNotFoundError when there is none."""

    @abstractmethod
    def list(self, user_id: str | None = None, status: str | None = "open",
             metadata: dict[str, str] | None = None, owner: str | None = None) -> builtins.list[SessionRecord]:
        """Sessions, oldest first: of one user, of one status, with every `metadata` key at that value, of one
        API key."""

    @abstractmethod
    def update_config(self, session_id: str, config: SessionConfig, expected_version: int) -> int:
        """Store a config if the stored one is still `expected_version` (else ConflictError); the new version."""

    @abstractmethod
    def set_status(self, session_id: str, status: str) -> None:
        """Set the status (e.g. closed); the session's kernel is forgotten with it."""

    # kernels
    @abstractmethod
    def set_kernel(self, session_id: str, kernel: KernelRecord | None) -> None: ...

    @abstractmethod
    def release_kernel(self, session_id: str, kernel_id: str, idle_before: float | None = None) -> bool:
        """Forget the kernel if it is still `kernel_id` (and unused since `idle_before`): True means the caller
        owns its removal."""

    @abstractmethod
    def pause(self, session_id: str, kernel_id: str, paused: PausedState, idle_before: float | None = None) -> bool:
        """`release_kernel` that also marks the session paused, atomically."""

    @abstractmethod
    def set_paused(self, session_id: str, paused: PausedState | None) -> None: ...

    @abstractmethod
    def mark_busy(self, session_id: str, until: float) -> None:
        """Keep the idle reaper away from a session whose cell may run until `until`."""

    @abstractmethod
    def touch(self, session_id: str) -> None:
        """Mark the session used now."""

    @abstractmethod
    def data_version(self) -> int:
        """A number that changes whenever another process committed (nothing to read again while it stays)."""

    # logs
    @abstractmethod
    def log(self, session_id: str, kind: str, status: str, duration: float, detail: dict[str, Any],
            touch: bool = True) -> None:
        """Record an execution, command or tool call, durably before this returns (see the implementation)."""

    @abstractmethod
    def logs(self, session_id: str, limit: int = 1000) -> builtins.list[LogEntry]:
        """The session's newest `limit` entries, oldest first."""

    @abstractmethod
    def flush(self) -> None:
        """Make every entry logged so far visible to other processes."""

    # API keys and owners (workbench serve)
    @abstractmethod
    def add_api_key(self, key_id: str, name: str, key_hash: str) -> ApiKeyRecord: ...

    @abstractmethod
    def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None: ...

    @abstractmethod
    def api_keys(self) -> builtins.list[ApiKeyRecord]: ...

    @abstractmethod
    def revoke_api_key(self, key_id: str) -> bool: ...

    @abstractmethod
    def set_owner(self, session_id: str, key_id: str) -> None: ...

    @abstractmethod
    def owner(self, session_id: str) -> str | None: ...

    @abstractmethod
    def heartbeat(self, replica: ReplicaRecord) -> None:
        """Record that a cluster replica is alive, as of `replica.seen_at`."""

    @abstractmethod
    def replicas(self) -> builtins.list[ReplicaRecord]:
        """Every replica that ever beat, with when it was last seen."""

    @abstractmethod
    def close(self) -> None:
        """Write out what is pending and release the store; it cannot be used afterwards."""

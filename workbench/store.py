"""The session store: SQLite under WORKBENCH_HOME, the one source of truth for sessions, configs and logs."""
from __future__ import annotations

import atexit
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .config import Limits
from .errors import ConflictError, SessionNotFoundError

LOG_DELAY = 0.5  # seconds a tool call's log entry may wait to be written with others

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id     TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    status         TEXT NOT NULL,
    config         TEXT NOT NULL,
    config_version INTEGER NOT NULL,
    kernel         TEXT,
    created_at     REAL NOT NULL,
    last_used_at   REAL NOT NULL,
    busy_until     REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id, status);
CREATE TABLE IF NOT EXISTS logs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    status     TEXT NOT NULL,
    duration   REAL NOT NULL,
    detail     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_session ON logs (session_id, id);
"""


class SessionConfig(BaseModel):
    """What a session may use: its toolkits, tools and resource limits."""

    toolkits: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    offload_threshold: int = Field(default=20_000, ge=0, description="bytes of JSON above which a tool's "
                                   "response goes to the workspace instead of inline")


class KernelRecord(BaseModel):
    """Enough to reattach to a running kernel from another process."""

    kernel_id: str
    container_id: str
    connection: dict[str, Any]


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


class LogEntry(BaseModel):
    """One execution or tool call of a session; the session id is its trace id."""

    id: int
    session_id: str
    kind: str
    status: str
    duration: float
    detail: dict[str, Any]
    created_at: float


class Store:
    """Thread-safe access to the SQLite file; several processes may share it (WAL mode)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._pending: list[tuple] = []  # tool-call log entries not written yet
        atexit.register(self.flush)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; no fsync per execution log
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(sessions)")}
            if "busy_until" not in columns:  # a store written by an earlier version
                self._db.execute("ALTER TABLE sessions ADD COLUMN busy_until REAL NOT NULL DEFAULT 0")
        path.chmod(0o600)  # it holds the kernels' connection keys

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def add(self, record: SessionRecord) -> None:
        self._exec(
            "INSERT INTO sessions (session_id, user_id, status, config, config_version, kernel, created_at, "
            "last_used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.session_id, record.user_id, record.status, record.config.model_dump_json(),
             record.config_version, record.kernel.model_dump_json() if record.kernel else None,
             record.created_at, record.last_used_at),
        )

    def get(self, session_id: str) -> SessionRecord:
        row = self._exec("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return _record(row)

    def list(self, user_id: str | None = None, status: str | None = "open") -> list[SessionRecord]:
        sql, args = "SELECT * FROM sessions WHERE 1=1", []
        if user_id is not None:
            sql, args = sql + " AND user_id = ?", [*args, user_id]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        return [_record(row) for row in self._exec(sql + " ORDER BY created_at", tuple(args)).fetchall()]

    def update_config(self, session_id: str, config: SessionConfig, expected_version: int) -> int:
        """Store a new config if the stored one is still `expected_version`; returns the new version."""
        cursor = self._exec(
            "UPDATE sessions SET config = ?, config_version = config_version + 1 "
            "WHERE session_id = ? AND config_version = ?",
            (config.model_dump_json(), session_id, expected_version),
        )
        if cursor.rowcount != 1:
            current = self.get(session_id).config_version
            raise ConflictError(
                f"session {session_id} config is at version {current}, not {expected_version}: "
                "reload it (wb.use) and apply the change again"
            )
        return expected_version + 1

    def set_kernel(self, session_id: str, kernel: KernelRecord | None) -> None:
        self._exec("UPDATE sessions SET kernel = ? WHERE session_id = ?",
                   (kernel.model_dump_json() if kernel else None, session_id))

    def mark_busy(self, session_id: str, until: float) -> None:
        """Keep the idle reaper away from a session whose cell may run until `until`."""
        self._exec("UPDATE sessions SET busy_until = ? WHERE session_id = ?", (until, session_id))

    def release_kernel(self, session_id: str, kernel_id: str, idle_before: float | None = None) -> bool:
        """Forget the session's kernel if it is still `kernel_id` (and, given `idle_before`, unused since then).

        Atomic, so a reaper and an execution in another process never both win: True means the caller owns
        the kernel's removal.
        """
        sql = ("UPDATE sessions SET kernel = NULL WHERE session_id = ? AND status = 'open' "
               "AND json_extract(kernel, '$.kernel_id') = ?")
        args: tuple = (session_id, kernel_id)
        if idle_before is not None:
            sql += " AND last_used_at < ? AND busy_until < ?"
            args += (idle_before, time.time())
        return self._exec(sql, args).rowcount == 1

    def set_status(self, session_id: str, status: str) -> None:
        self._exec("UPDATE sessions SET status = ?, kernel = NULL WHERE session_id = ?", (status, session_id))

    def data_version(self) -> int:
        """Changes whenever another connection (another process) commits: nothing to re-read while it stays."""
        return self._exec("PRAGMA data_version").fetchone()[0]

    def log(self, session_id: str, kind: str, status: str, duration: float, detail: dict[str, Any],
            touch: bool = True) -> None:
        """Record an execution or tool call. An execution (`touch`) also marks the session used (its kernel is
        not idle) and is written at once; tool calls, which come in bulk, are written in batches, at the latest
        with the next execution, `logs()` or `close()`, or after LOG_DELAY seconds."""
        now = time.time()
        entry = (session_id, kind, status, duration, json.dumps(detail, default=str), now)
        with self._lock:
            self._pending.append(entry)
            if not touch and len(self._pending) < 512 and now - self._pending[0][5] < LOG_DELAY:
                return
            self._db.execute("BEGIN")
            self._flush()
            if touch:
                self._db.execute("UPDATE sessions SET last_used_at = ?, busy_until = 0 WHERE session_id = ?",
                                 (now, session_id))
            self._db.execute("COMMIT")

    def flush(self) -> None:
        """Write the log entries still waiting."""
        with self._lock:
            if self._pending:
                self._flush()

    def _flush(self) -> None:
        self._db.executemany("INSERT INTO logs (session_id, kind, status, duration, detail, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", self._pending)
        self._pending.clear()

    def logs(self, session_id: str, limit: int = 1000) -> list[LogEntry]:
        self.flush()
        rows = self._exec("SELECT * FROM logs WHERE session_id = ? ORDER BY id DESC LIMIT ?",
                          (session_id, limit)).fetchall()
        return [LogEntry(**{**dict(row), "detail": json.loads(row["detail"])}) for row in reversed(rows)]

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()


def _record(row: sqlite3.Row) -> SessionRecord:
    data = dict(row)
    data["config"] = SessionConfig.model_validate_json(data["config"])
    data["kernel"] = KernelRecord.model_validate_json(data["kernel"]) if data["kernel"] else None
    return SessionRecord(**data)

"""The embedded store: SQLite under WORKBENCH_HOME, the one source of truth for sessions, configs and logs."""
from __future__ import annotations

import builtins
import fcntl
import functools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from ..config import check_metadata
from ..errors import ConflictError, SessionNotFoundError, StoreError
from .base import (
    LOG_KEEP,
    ApiKeyRecord,
    KernelRecord,
    LogEntry,
    PausedState,
    ReplicaRecord,
    SessionConfig,
    SessionRecord,
    Store,
)

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)
LOG_DELAY = 0.5  # seconds within which a journaled tool call is copied into the logs table (with others)
_FLUSH_MARGIN = 0.05  # the flusher commits this long before LOG_DELAY is up: the commit itself takes time
LOG_BATCH = 512  # ... or until this many wait
_STALE_NEW = 60.0  # seconds after which an unlocked `.new` journal is a leftover of a process that died creating it
JOURNAL_ROTATE = 64 * 1024**2  # bytes after which a fully copied journal is replaced by a new one
_PRUNE_EVERY = 10_000  # entries a session may add before its oldest beyond LOG_KEEP are deleted
_INSERT_LOG = "INSERT INTO logs (session_id, kind, status, duration, detail, created_at) VALUES (?, ?, ?, ?, ?, ?)"

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
    busy_until     REAL NOT NULL DEFAULT 0,
    paused         TEXT,  -- a PausedState while the session sleeps: its kernel stopped, its namespace saved
    replica        TEXT   -- in a cluster: the replica whose host runs it
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id, status);
CREATE TABLE IF NOT EXISTS logs (
    id         INTEGER PRIMARY KEY,  -- rowid order is commit order (only a session's oldest entries beyond
                                     -- LOG_KEEP are deleted); no AUTOINCREMENT table to update on every commit
    session_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    status     TEXT NOT NULL,
    duration   REAL NOT NULL,
    detail     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_session ON logs (session_id, id);
CREATE TABLE IF NOT EXISTS api_keys (  -- `workbench serve`'s API keys: only their sha256 is kept
    key_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS session_owners (  -- the API key that created a session through the server
    session_id TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS session_owners_key ON session_owners (key_id);
CREATE TABLE IF NOT EXISTS replicas (  -- a cluster's `workbench serve` replicas, by heartbeat
    replica_id TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    memory     INTEGER NOT NULL,
    started_at REAL NOT NULL,
    seen_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_marks (  -- how far each tool-call journal has been copied into logs
    name   TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
);
"""


def _guarded(method: F) -> F:
    """Every sqlite3 error (and a row that no longer parses) leaves the Store as a StoreError naming the file."""
    @functools.wraps(method)
    def guarded(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, ValidationError, json.JSONDecodeError, OSError) as exc:
            raise self._error(exc) from exc

    return guarded  # type: ignore[return-value]


class SQLiteStore(Store):
    """Thread-safe access to the SQLite file; several processes may share it (WAL mode).

    Every write is durable before the call returns, against the death of the process (not of the machine):
    sessions and executions are committed (WAL with synchronous=NORMAL), group-committed when several threads log
    at once (whichever gets the connection commits everyone's queued entries in one transaction while the others
    wait for it), and visible at once to every process. A tool call, which comes in bulk, is appended to this
    Store's journal file (one write()) before `log()` returns: from then on it survives the death of this process.
    It reaches the logs table, where other processes see it, within LOG_DELAY seconds: a flusher thread of this
    Store copies the journal then (earlier when LOG_BATCH entries wait, or at the next execution, `logs()`,
    `flush()` or `close()`). The journal of a process that died is copied by the next Store opened on the file,
    or by any Store's `logs()`. `close()` stops the flusher; a Store never closed keeps it until it is garbage.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # the connection
        self._reader: sqlite3.Connection | None = None  # for API key checks (see api_key_by_hash)
        self._reader_lock = threading.Lock()
        self._queue = threading.Lock()  # the entries waiting for a commit
        self._pending: list[tuple[Any, ...]] = []
        self._added: dict[str, int] = {}  # log entries per session since its last pruning (see _prune)
        self._touched: dict[str, float] = {}  # session -> when an execution last used it, with the pending entries
        self._queued = 0  # sequence number of the last entry queued
        self._committed = 0  # ... and of the last one committed
        self._journals = path.parent / f"{path.name}.journals"  # not "-journal": SQLite's own name
        self._journal: tuple[int, str] | None = None  # this Store's journal: its descriptor, its name
        self._journal_size = 0
        self._journal_oldest = 0.0  # when the oldest tool call not yet in the logs table was journaled
        self._due = threading.Condition(self._queue)  # wakes the flusher: a tool call was journaled, or closing
        self._flusher: threading.Thread | None = None  # started with the first journaled tool call
        self._stopping = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            deadline = time.monotonic() + 30
            while True:
                try:
                    self._prepare(self._db)
                    break
                except sqlite3.OperationalError as exc:
                    # several processes opening a new file at once: switching it to WAL takes it whole and does
                    # not wait for the others (no busy handler), and two may add the same column
                    text = str(exc)
                    if not ("locked" in text or "busy" in text or "duplicate column" in text) or \
                            time.monotonic() > deadline:
                        raise
                    time.sleep(0.02 + secrets.randbelow(50) / 1000)
            path.chmod(0o600)  # it holds the kernels' connection keys
            self._recover()
        except (sqlite3.Error, OSError, ValueError) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            raise self._error(exc) from exc

    def _prepare(self, db: sqlite3.Connection) -> None:
        """The file's settings and schema (tables added, and columns an earlier version lacked)."""
        with self._lock:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable against process death; fsync at checkpoints
            # each log entry is its own commit: checkpoint (and fsync) every 10,000 pages rather than 1,000
            db.execute("PRAGMA wal_autocheckpoint=10000")
            db.executescript(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(sessions)")}
            if "busy_until" not in columns:  # a store written by an earlier version
                db.execute("ALTER TABLE sessions ADD COLUMN busy_until REAL NOT NULL DEFAULT 0")
            if "paused" not in columns:
                db.execute("ALTER TABLE sessions ADD COLUMN paused TEXT")
            if "replica" not in columns:
                db.execute("ALTER TABLE sessions ADD COLUMN replica TEXT")

    def _error(self, exc: BaseException) -> StoreError:
        if self._db is None and not isinstance(exc, (sqlite3.DatabaseError, OSError)):
            return StoreError(f"the session store {self.path} is closed")
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
            hint = "another process holds it too long; try again"
        elif isinstance(exc, (sqlite3.DatabaseError, ValidationError, json.JSONDecodeError)) and not isinstance(
                exc, sqlite3.OperationalError):
            hint = ("the file is damaged or not a workbench store: move it aside (a new store starts empty; running "
                    "kernels are left alone by gc) or restore it from a backup")
        else:
            hint = "check that the file and its folder exist, are writable and that the disk is not full"
        return StoreError(f"session store {self.path}: {type(exc).__name__}: {text[:300]}; {hint}")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the session store {self.path} is closed")
        return self._db

    @_guarded
    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._connection().execute(sql, args)

    @_guarded
    def add(self, record: SessionRecord) -> None:
        self._exec(
            "INSERT INTO sessions (session_id, user_id, status, config, config_version, kernel, created_at, "
            "last_used_at, paused, replica) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.session_id, record.user_id, record.status, record.config.model_dump_json(),
             record.config_version, record.kernel.model_dump_json() if record.kernel else None,
             record.created_at, record.last_used_at, record.paused.model_dump_json() if record.paused else None,
             record.replica),
        )

    @_guarded
    def get(self, session_id: str) -> SessionRecord:
        row = self._exec("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return _record(row)

    @_guarded
    def list(self, user_id: str | None = None, status: str | None = "open",
             metadata: dict[str, str] | None = None, owner: str | None = None) -> builtins.list[SessionRecord]:
        """Sessions, oldest first: of one user, of one status, with every `metadata` key at that value, and
        created through the server with the API key `owner`."""
        sql, args = "SELECT * FROM sessions WHERE 1=1", builtins.list[str]()
        if owner is not None:
            sql, args = (sql + " AND session_id IN (SELECT session_id FROM session_owners WHERE key_id = ?)",
                         [*args, owner])
        if user_id is not None:
            sql, args = sql + " AND user_id = ?", [*args, user_id]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        for key, value in check_metadata(metadata or {}).items():  # keys are checked: none holds a quote
            sql, args = sql + " AND json_extract(config, ?) = ?", [*args, f'$.metadata."{key}"', value]
        return [_record(row) for row in self._exec(sql + " ORDER BY created_at", tuple(args)).fetchall()]

    @_guarded
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

    @_guarded
    def set_kernel(self, session_id: str, kernel: KernelRecord | None) -> None:
        self._exec("UPDATE sessions SET kernel = ? WHERE session_id = ?",
                   (kernel.model_dump_json() if kernel else None, session_id))

    @_guarded
    def mark_busy(self, session_id: str, until: float) -> None:
        """Keep the idle reaper away from a session whose cell may run until `until`."""
        self._exec("UPDATE sessions SET busy_until = ? WHERE session_id = ?", (until, session_id))

    @_guarded
    def touch(self, session_id: str) -> None:
        """Mark a session used now (a shell command runs in its container), leaving the busy mark of a cell that
        may be running at the same time as it is: the idle reaper leaves the kernel alone."""
        self._exec("UPDATE sessions SET last_used_at = MAX(last_used_at, ?) WHERE session_id = ?",
                   (time.time(), session_id))

    @_guarded
    def release_kernel(self, session_id: str, kernel_id: str, idle_before: float | None = None) -> bool:
        """Forget the session's kernel if it is still `kernel_id` (and, given `idle_before`, unused since then).

        Atomic, so a reaper and an execution in another process never both win: True means the caller owns
        the kernel's removal.
        """
        sql = ("UPDATE sessions SET kernel = NULL WHERE session_id = ? AND status = 'open' "
               "AND json_extract(kernel, '$.kernel_id') = ?")
        args: tuple[Any, ...] = (session_id, kernel_id)
        if idle_before is not None:
            sql += " AND last_used_at < ? AND busy_until < ?"
            args += (idle_before, time.time())
        return self._exec(sql, args).rowcount == 1

    @_guarded
    def pause(self, session_id: str, kernel_id: str, paused: PausedState, idle_before: float | None = None) -> bool:
        """Forget the session's kernel and mark it paused, atomically and only while its kernel is still
        `kernel_id` (and, given `idle_before`, unused since then): True means the caller owns the kernel's removal."""
        sql = ("UPDATE sessions SET kernel = NULL, paused = ? WHERE session_id = ? AND status = 'open' "
               "AND json_extract(kernel, '$.kernel_id') = ?")
        args: tuple[Any, ...] = (paused.model_dump_json(), session_id, kernel_id)
        if idle_before is not None:
            sql += " AND last_used_at < ? AND busy_until < ?"
            args += (idle_before, time.time())
        return self._exec(sql, args).rowcount == 1

    @_guarded
    def set_paused(self, session_id: str, paused: PausedState | None) -> None:
        """Mark the session paused (a snapshot waits for its next kernel), or awake (`None`)."""
        self._exec("UPDATE sessions SET paused = ? WHERE session_id = ?",
                   (paused.model_dump_json() if paused else None, session_id))

    @_guarded
    def set_status(self, session_id: str, status: str) -> None:
        self._exec("UPDATE sessions SET status = ?, kernel = NULL WHERE session_id = ?", (status, session_id))

    # API keys and session owners (`workbench serve`) ----------------------------------------------------------

    @_guarded
    def add_api_key(self, key_id: str, name: str, key_hash: str) -> ApiKeyRecord:
        """Store a new API key by its hash (the key itself is never stored)."""
        record = ApiKeyRecord(key_id=key_id, name=name, created_at=time.time())
        self._exec("INSERT INTO api_keys (key_id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
                   (key_id, name, key_hash, record.created_at))
        return record

    @_guarded
    def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The active (not revoked) key with this hash, or None. Read on a connection of its own: a server checks a
        key on every request, and must not wait behind the commits of executions (WAL readers never do)."""
        with self._reader_lock:
            if self._reader is None:
                self._connection()  # a closed store stays closed
                self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
                self._reader.row_factory = sqlite3.Row
            row = self._reader.execute("SELECT key_id, name, created_at, revoked_at FROM api_keys WHERE key_hash = ? "
                                       "AND revoked_at IS NULL", (key_hash,)).fetchone()
        return ApiKeyRecord(**dict(row)) if row is not None else None

    @_guarded
    def api_keys(self) -> builtins.list[ApiKeyRecord]:
        """Every API key, revoked ones too, oldest first."""
        rows = self._exec("SELECT key_id, name, created_at, revoked_at FROM api_keys ORDER BY created_at").fetchall()
        return [ApiKeyRecord(**dict(row)) for row in rows]

    @_guarded
    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key for good; False when no active key has this id."""
        cursor = self._exec("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                            (time.time(), key_id))
        return cursor.rowcount == 1

    @_guarded
    def set_owner(self, session_id: str, key_id: str) -> None:
        """Record the API key that created a session (once: a session never changes hands)."""
        self._exec("INSERT INTO session_owners (session_id, key_id) VALUES (?, ?)", (session_id, key_id))

    @_guarded
    def owner(self, session_id: str) -> str | None:
        """The id of the API key that created the session through the server, or None."""
        row = self._exec("SELECT key_id FROM session_owners WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] if row is not None else None

    @_guarded
    def heartbeat(self, replica: ReplicaRecord) -> None:
        self._exec("INSERT INTO replicas (replica_id, url, memory, started_at, seen_at) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT (replica_id) DO UPDATE SET url = excluded.url, memory = excluded.memory, "
                   "started_at = excluded.started_at, seen_at = excluded.seen_at",
                   (replica.replica_id, replica.url, replica.memory, replica.started_at, replica.seen_at))

    @_guarded
    def replicas(self) -> builtins.list[ReplicaRecord]:
        return [ReplicaRecord(**dict(row)) for row in
                self._exec("SELECT * FROM replicas ORDER BY replica_id").fetchall()]

    @_guarded
    def data_version(self) -> int:
        """Changes whenever another connection (another process) commits: nothing to re-read while it stays."""
        return int(self._exec("PRAGMA data_version").fetchone()[0])

    @_guarded
    def log(self, session_id: str, kind: str, status: str, duration: float, detail: dict[str, Any],
            touch: bool = True) -> None:
        """Record an execution or tool call, durably (against this process's death) before this returns.

        An execution (`touch`) also marks the session used (its kernel is not idle) and is committed at once:
        every process sees it on return. A tool call (`touch=False`) is written to this Store's journal on return
        (it survives the process) and is in the logs table, seen by other processes, within LOG_DELAY seconds."""
        now = time.time()
        detail_json = _dumps(detail)
        entry = (session_id, kind, status, duration, detail_json.decode(), now)
        with self._queue:
            self._queued += 1
            mine = self._queued
            self._pending.append(entry)
            if touch:
                self._touched[session_id] = now
            else:
                if self._journal is None:
                    self._open_journal()
                assert self._journal is not None
                line = _dumps([session_id, kind, status, duration, now])[:-1] + b"," + detail_json + b"]\n"
                try:
                    written = os.write(self._journal[0], line)
                    if written != len(line):
                        raise OSError(f"short write to the journal: {written} of {len(line)} bytes")
                except BaseException:
                    self._pending.pop()
                    try:  # no torn line left for the next entry to be appended to
                        os.ftruncate(self._journal[0], self._journal_size)
                    except OSError:
                        pass
                    raise
                self._journal_size += written
                if len(self._pending) == 1 or not self._journal_oldest:
                    self._journal_oldest = now
                    self._wake_flusher()
                if len(self._pending) < LOG_BATCH and now - self._journal_oldest < LOG_DELAY:
                    return  # journaled: it survives this process; the flusher copies it into the table in time
        self._commit(mine)

    def _wake_flusher(self) -> None:
        """Tell the flusher a tool call waits (start it the first time); called holding `_queue`."""
        if self._flusher is None and not self._stopping:
            self._flusher = threading.Thread(target=_flush_journal, args=(weakref.ref(self), self._due),
                                             name=f"workbench-store-flusher-{self.path.name}", daemon=True)
            self._flusher.start()
        self._due.notify()

    def _flush_due(self) -> float | None:
        """For the flusher, holding `_queue`: seconds until the oldest journaled call must be in the table (0: now),
        or None when none waits."""
        if not self._journal_oldest:
            return None
        return max(self._journal_oldest + LOG_DELAY - _FLUSH_MARGIN - time.time(), 0.0)

    def _open_journal(self) -> None:
        """Create this Store's journal, locked for as long as it lives (an unlocked journal is a dead one's).

        It is made as `<name>.new`, locked, then renamed: a recovery takes only `.log` journals (and `.new` ones
        left long ago by a process that died in between), so it never takes one between its creation and its
        lock."""
        self._journals.mkdir(mode=0o700, exist_ok=True)
        for attempt in range(3):
            name = f"{os.getpid()}-{secrets.token_hex(6)}.log"
            fresh = self._journals / f"{name}.new"
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(fresh, self._journals / name)  # only now can a recovery find it, already locked
            except (FileNotFoundError, BlockingIOError):  # taken as stale: this process stalled past _STALE_NEW
                os.close(fd)
                if attempt == 2:
                    raise
                continue
            except BaseException:
                os.close(fd)
                raise
            self._journal, self._journal_size = (fd, name), 0
            return

    def _commit(self, upto: int) -> None:
        """Make sure entry `upto` is committed: by committing everything queued, unless a caller that had the
        connection before did so already (group commit: one transaction for all who queued meanwhile)."""
        with self._lock:
            with self._queue:
                if self._committed >= upto:
                    return
                batch, self._pending = self._pending, []
                touched, self._touched = self._touched, {}
                mark = (self._journal[1], self._journal_size) if self._journal is not None else None
                oldest, self._journal_oldest = self._journal_oldest, 0.0
                last = self._queued
            db = self._connection()
            try:
                db.execute("BEGIN")  # writes first: waiting for the write lock cannot deadlock
                try:
                    db.executemany(_INSERT_LOG, batch)
                    if touched:
                        db.executemany("UPDATE sessions SET last_used_at = ?, busy_until = 0 WHERE session_id = ?",
                                       [(when, sid) for sid, when in touched.items()])
                    if mark is not None:
                        db.execute("INSERT OR REPLACE INTO journal_marks (name, offset) VALUES (?, ?)", mark)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except BaseException:
                with self._queue:  # the next caller (or the flusher) tries them again
                    self._pending[:0] = batch
                    if oldest and (not self._journal_oldest or oldest < self._journal_oldest):
                        self._journal_oldest = oldest
                    for session, when in touched.items():
                        self._touched.setdefault(session, when)
                raise
            self._prune(db, batch)
            with self._queue:
                self._committed = max(self._committed, last)
                retire = None
                if (mark is not None and mark[1] > JOURNAL_ROTATE and self._journal is not None
                        and self._journal[1] == mark[0] and self._journal_size == mark[1]):
                    retire, self._journal = self._journal, None  # all of it is in the table: the next call starts anew
            if retire is not None:
                (self._journals / retire[1]).unlink(missing_ok=True)
                db.execute("DELETE FROM journal_marks WHERE name = ?", (retire[1],))
                os.close(retire[0])

    def _prune(self, db: sqlite3.Connection, batch: builtins.list[tuple[Any, ...]]) -> None:
        """Delete a session's oldest log entries beyond LOG_KEEP, every _PRUNE_EVERY entries it adds."""
        for entry in batch:
            self._added[entry[0]] = self._added.get(entry[0], 0) + 1
        for session_id in [sid for sid, n in self._added.items() if n >= _PRUNE_EVERY]:
            del self._added[session_id]
            db.execute("DELETE FROM logs WHERE session_id = ? AND id <= (SELECT id FROM logs WHERE session_id = ? "
                       "ORDER BY id DESC LIMIT 1 OFFSET ?)", (session_id, session_id, LOG_KEEP))

    def _recover(self) -> None:
        """Copy into the logs table the journals of Stores whose process died (their lock is free), then remove
        them. What a journal's mark says was copied already is skipped; a torn last line is dropped."""
        if not self._journals.is_dir():
            return
        for path in sorted(self._journals.iterdir()):
            if self._journal is not None and path.name == self._journal[1]:
                continue
            if not path.name.endswith(".log"):  # a journal being created, not yet locked: never touch it then
                try:
                    if time.time() - path.lstat().st_mtime < _STALE_NEW:
                        continue
                except FileNotFoundError:
                    continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its Store is alive
                if os.fstat(fd).st_nlink == 0:
                    continue  # another recovery took it
                if path.name.endswith(".log"):
                    self._copy_journal(path.name, fd)
                path.unlink(missing_ok=True)
                self._exec("DELETE FROM journal_marks WHERE name = ?", (path.name,))
            finally:
                os.close(fd)

    def _copy_journal(self, name: str, fd: int) -> None:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        with self._lock:
            db = self._connection()
            row = db.execute("SELECT offset FROM journal_marks WHERE name = ?", (name,)).fetchone()
            start = row[0] if row else 0
            entries = []
            for line in data[start:].split(b"\n"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if (isinstance(entry, list) and len(entry) == 6  # session, kind, status, duration, time, detail
                        and all(isinstance(part, str) for part in entry[:3])
                        and all(isinstance(part, (int, float)) for part in entry[3:5])):
                    entries.append((*entry[:4], json.dumps(entry[5]), entry[4]))
            db.execute("BEGIN")
            try:
                db.executemany(_INSERT_LOG, entries)
                db.execute("INSERT OR REPLACE INTO journal_marks (name, offset) VALUES (?, ?)", (name, len(data)))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @_guarded
    def flush(self) -> None:
        """Copy the journaled tool calls of this Store into the logs table (they are durable already)."""
        with self._queue:
            queued = self._queued
        self._commit(queued)

    @_guarded
    def logs(self, session_id: str, limit: int = 1000) -> builtins.list[LogEntry]:
        self.flush()
        self._recover()
        rows = self._exec("SELECT * FROM logs WHERE session_id = ? ORDER BY id DESC LIMIT ?",
                          (session_id, limit)).fetchall()
        return [LogEntry(**{**dict(row), "detail": json.loads(row["detail"])}) for row in reversed(rows)]

    def close(self) -> None:
        """Stop the flusher, copy what is journaled into the logs table, remove the journal and close the file;
        later calls raise StoreError. Closing twice is fine."""
        with self._queue:
            self._stopping = True
            flusher = self._flusher
            self._due.notify_all()
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        if self._db is None:
            return
        try:
            self.flush()
            with self._queue:
                journal, self._journal = self._journal, None
            if journal is not None:
                (self._journals / journal[1]).unlink(missing_ok=True)
                self._exec("DELETE FROM journal_marks WHERE name = ?", (journal[1],))
                os.close(journal[0])
        finally:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None
            with self._reader_lock:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None


def _flush_journal(ref: weakref.ref[SQLiteStore], due: threading.Condition) -> None:
    """The flusher of a Store: copies its journaled tool calls into the logs table within LOG_DELAY of the oldest,
    so that other processes see them without waiting for another call. Holds the Store only weakly: a Store
    dropped unclosed lets it end."""
    with due:
        while True:
            store = ref()
            if store is None or store._stopping:
                return
            wait = store._flush_due()
            if wait is None or wait > 0:
                del store
                due.wait(5.0 if wait is None else wait)  # bounded: it notices a Store that is gone
                continue
            upto = store._queued
            due.release()  # _commit takes the connection, then _queue
            try:
                store._commit(upto)
            except Exception as exc:
                log.warning("could not copy journaled tool calls into the logs table of %s: %s", store.path, exc)
                retry = True
            else:
                retry = False
            finally:
                due.acquire()
            if retry and not store._stopping:
                del store
                due.wait(LOG_DELAY)


def _dumps(value: Any) -> bytes:
    """JSON, fast (log entries come by the thousand per second); what orjson refuses goes through json."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # e.g. an int past 64 bits
        return json.dumps(value, default=str).encode()


def _record(row: sqlite3.Row) -> SessionRecord:
    data = dict(row)
    data["config"] = SessionConfig.model_validate_json(data["config"])
    data["kernel"] = KernelRecord.model_validate_json(data["kernel"]) if data["kernel"] else None
    data["paused"] = PausedState.model_validate_json(data["paused"]) if data.get("paused") else None
    return SessionRecord(**data)

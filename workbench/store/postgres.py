"""The shared store: PostgreSQL (psycopg 3 and its connection pool), for several processes and hosts at once.

Chosen with `WORKBENCH_STORE=postgresql://...` or `Workbench(store="postgresql://...")` (see `open_store`). Every
method has the SQLite store's semantics; races between processes and hosts are settled by the database alone:
single-statement compare-and-set updates (a row lock, and READ COMMITTED re-checking the condition on the row the
winner committed), transactions, and transaction-scoped advisory locks. No process lock decides anything.
"""
from __future__ import annotations

import builtins
import functools
import json
import re
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout
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
SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x776F726B62656E63  # advisory lock key ("workbenc") held while one process creates the schema
_PRUNE_EVERY = 10_000  # entries a session may add (through one Store) before its oldest beyond LOG_KEEP are deleted
_SESSION_COLUMNS = ("session_id, user_id, status, config::text, config_version, kernel::text, created_at, "
                    "last_used_at, busy_until, paused::text, replica")
_LOG_BATCH = ("SELECT workbench_log_batch(%s::text[], %s::text[], %s::text[], %s::float8[], %s::text[], "
              "%s::float8[], %s::text[], %s::float8[])")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS workbench_sessions (
        session_id     text PRIMARY KEY,
        user_id        text NOT NULL,
        status         text NOT NULL,
        config         json NOT NULL,
        config_version bigint NOT NULL,
        kernel         json,
        created_at     double precision NOT NULL,
        last_used_at   double precision NOT NULL,
        busy_until     double precision NOT NULL DEFAULT 0,
        paused         json,  -- a PausedState while the session sleeps: its kernel stopped, its namespace saved
        replica        text   -- in a cluster: the replica whose host runs it
    )""",
    "CREATE INDEX IF NOT EXISTS workbench_sessions_user ON workbench_sessions (user_id, status)",
    """CREATE TABLE IF NOT EXISTS workbench_logs (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session_id text NOT NULL,
        kind       text NOT NULL,
        status     text NOT NULL,
        duration   double precision NOT NULL,
        detail     text NOT NULL,
        created_at double precision NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS workbench_logs_session ON workbench_logs (session_id, id)",
    """CREATE TABLE IF NOT EXISTS workbench_api_keys (
        key_id     text PRIMARY KEY,
        name       text NOT NULL,
        key_hash   text NOT NULL UNIQUE,
        created_at double precision NOT NULL,
        revoked_at double precision
    )""",
    """CREATE TABLE IF NOT EXISTS workbench_session_owners (
        session_id text PRIMARY KEY,
        key_id     text NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS workbench_session_owners_key ON workbench_session_owners (key_id)",
    """CREATE TABLE IF NOT EXISTS workbench_replicas (
        replica_id text PRIMARY KEY,
        url        text NOT NULL,
        memory     bigint NOT NULL,
        started_at double precision NOT NULL,
        seen_at    double precision NOT NULL
    )""",
    # A batch of log entries in one statement (one round trip, one transaction in autocommit). It holds the
    # advisory locks of its sessions (taken in one order: no deadlock) until it commits, and numbers its entries
    # in their order: a session's entries get their ids in commit order, from every process, so a reader never
    # sees a gap that is filled later. Executions also mark their session used, and not busy.
    """CREATE OR REPLACE FUNCTION workbench_log_batch(
        sessions text[], kinds text[], statuses text[], durations float8[], details text[], times float8[],
        touched text[], touched_at float8[]) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(k) FROM (SELECT DISTINCT hashtextextended(s, 0) AS k
            FROM unnest(sessions) AS s ORDER BY k) AS keys;
        INSERT INTO workbench_logs (session_id, kind, status, duration, detail, created_at)
            SELECT e.session_id, e.kind, e.status, e.duration, e.detail, e.created_at
            FROM unnest(sessions, kinds, statuses, durations, details, times)
                WITH ORDINALITY AS e(session_id, kind, status, duration, detail, created_at, n)
            ORDER BY e.n;
        IF cardinality(touched) > 0 THEN
            UPDATE workbench_sessions AS s SET last_used_at = t.at, busy_until = 0
                FROM unnest(touched, touched_at) AS t(session_id, at) WHERE s.session_id = t.session_id;
        END IF;
    END
    $$""",
    "CREATE TABLE IF NOT EXISTS workbench_schema (version integer NOT NULL)",  # last: its row says all is there
]


def _describe(dsn: str) -> str:
    """A DSN as it may be shown: `postgresql://user@host:port/dbname`, never its password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://(a DSN that does not parse)"  # no part of it: where the password ends is unknown
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def _guarded(method: F) -> F:
    """Every database error (and a row that no longer parses) leaves the Store as a StoreError naming the server."""
    @functools.wraps(method)
    def guarded(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (psycopg.Error, ValidationError, ValueError) as exc:
            raise self._error(exc) from exc

    return guarded  # type: ignore[return-value]


class _Batch:
    """Log entries that go to the database in one transaction (group commit), and what came of it."""

    __slots__ = ("done", "entries", "error", "touched")

    def __init__(self) -> None:
        self.entries: builtins.list[tuple[str, str, str, float, str, float]] = []
        self.touched: dict[str, float] = {}  # session -> when an execution last used it
        self.done = False
        self.error: BaseException | None = None


class PostgresStore(Store):
    """Sessions, configs, logs and API keys in PostgreSQL; any number of processes and hosts may share it.

    Every write is committed before its call returns, log entries included: threads of one process that log at the
    same moment share one transaction (the first to get there commits everyone's entries waiting then; each learns
    the outcome of its own), so nothing is buffered in a process that could die with it. `flush()` has nothing
    left to do. The tables are created on first use (the names start with `workbench_`; the DSN's search_path
    chooses the schema).
    """

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 30.0) -> None:
        """`min_size`/`max_size`: connections the pool keeps and may open; `timeout`: seconds a call waits for a
        connection (and, when the DSN sets no connect_timeout, for the server to answer a new one)."""
        self.name = _describe(dsn)
        self._closed = False
        self._queue = threading.Lock()  # guards _batch, _committing and _added
        self._batch = _Batch()  # the log entries waiting for the next commit
        self._committing = False  # one batch in flight per Store; the next one gathers meanwhile
        self._committed = threading.Condition(self._queue)
        self._added: dict[str, int] = {}  # log entries per session since its last pruning (see _prune)
        self._version = threading.Lock()
        self._snapshot: str | None = None  # see data_version
        self._data_version = 0
        try:
            given = conninfo_to_dict(dsn)
        except psycopg.Error:
            raise StoreError(f"{self.name}: the store's DSN does not parse (psycopg's reason is not shown: it may "
                             "quote the password); write it as postgresql://user:password@host:port/dbname, with "
                             "reserved characters in the password percent-encoded") from None
        try:
            defaults = {"connect_timeout": str(max(1, round(timeout))), "application_name": "workbench"}
            conninfo = make_conninfo(dsn, **{k: v for k, v in defaults.items() if k not in given})
            with psycopg.connect(conninfo, autocommit=True) as conn:  # first alone: its error says what is wrong
                _create_schema(conn)
            self._pool: ConnectionPool = ConnectionPool(
                conninfo, min_size=min_size, max_size=max_size, timeout=timeout, open=False, check=_check,
                kwargs={"autocommit": True}, name=f"workbench-store {self.name}")
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        try:
            self._pool.open(wait=True, timeout=timeout)
        except psycopg.Error as exc:
            self._pool.close()
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> StoreError:
        if self._closed:
            return StoreError(f"the session store {self.name} is closed")
        text = str(exc).strip()
        if isinstance(exc, PoolTimeout):
            hint = "no connection could be had in time: the server is down, unreachable or out of connections"
        elif isinstance(exc, psycopg.OperationalError):
            hint = "check that the server runs and is reachable, and the DSN's user, password and database"
        elif isinstance(exc, psycopg.errors.UniqueViolation):
            hint = "a record with this id exists already"
        elif isinstance(exc, (ValidationError, ValueError)):
            hint = "a row does not parse: the database holds something else than a workbench store"
        else:
            hint = "the database refused the request"
        return StoreError(f"session store {self.name}: {type(exc).__name__}: {_scrub(text)[:300]}; {hint}")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A connection of the pool, in autocommit: each statement is a transaction of its own."""
        if self._closed:
            raise StoreError(f"the session store {self.name} is closed")
        with self._pool.connection() as conn:
            yield conn

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._connection() as conn:
            return conn.execute(sql, args).rowcount

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchall()

    # sessions ---------------------------------------------------------------------------------------------------

    @_guarded
    def add(self, record: SessionRecord) -> None:
        self._exec(
            "INSERT INTO workbench_sessions (session_id, user_id, status, config, config_version, kernel, "
            "created_at, last_used_at, busy_until, paused, replica) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (record.session_id, record.user_id, record.status, record.config.model_dump_json(),
             record.config_version, record.kernel.model_dump_json() if record.kernel else None,
             record.created_at, record.last_used_at, record.busy_until,
             record.paused.model_dump_json() if record.paused else None, record.replica))

    @_guarded
    def get(self, session_id: str) -> SessionRecord:
        row = self._one(f"SELECT {_SESSION_COLUMNS} FROM workbench_sessions WHERE session_id = %s", (session_id,))
        if row is None:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return _record(row)

    @_guarded
    def list(self, user_id: str | None = None, status: str | None = "open",
             metadata: dict[str, str] | None = None, owner: str | None = None) -> builtins.list[SessionRecord]:
        """Sessions, oldest first: of one user, of one status, with every `metadata` key at that value, and
        created through the server with the API key `owner`."""
        sql, args = f"SELECT {_SESSION_COLUMNS} FROM workbench_sessions WHERE true", builtins.list[Any]()
        if owner is not None:
            sql += " AND session_id IN (SELECT session_id FROM workbench_session_owners WHERE key_id = %s)"
            args.append(owner)
        if user_id is not None:
            sql += " AND user_id = %s"
            args.append(user_id)
        if status is not None:
            sql += " AND status = %s"
            args.append(status)
        for key, value in check_metadata(metadata or {}).items():
            sql += " AND config -> 'metadata' ->> %s = %s"
            args += [key, value]
        return [_record(row) for row in self._all(sql + " ORDER BY created_at, session_id", tuple(args))]

    @_guarded
    def update_config(self, session_id: str, config: SessionConfig, expected_version: int) -> int:
        """Store a new config if the stored one is still `expected_version`; returns the new version. Of several
        processes racing from one version, exactly one wins: the others wait for its row lock, then find the
        version moved on."""
        changed = self._exec(
            "UPDATE workbench_sessions SET config = %s, config_version = config_version + 1 "
            "WHERE session_id = %s AND config_version = %s",
            (config.model_dump_json(), session_id, expected_version))
        if changed != 1:
            current = self.get(session_id).config_version
            raise ConflictError(
                f"session {session_id} config is at version {current}, not {expected_version}: "
                "reload it (wb.use) and apply the change again")
        return expected_version + 1

    @_guarded
    def set_status(self, session_id: str, status: str) -> None:
        self._exec("UPDATE workbench_sessions SET status = %s, kernel = NULL WHERE session_id = %s",
                   (status, session_id))

    # kernels ----------------------------------------------------------------------------------------------------

    @_guarded
    def set_kernel(self, session_id: str, kernel: KernelRecord | None) -> None:
        self._exec("UPDATE workbench_sessions SET kernel = %s WHERE session_id = %s",
                   (kernel.model_dump_json() if kernel else None, session_id))

    @_guarded
    def release_kernel(self, session_id: str, kernel_id: str, idle_before: float | None = None) -> bool:
        """Forget the session's kernel if it is still `kernel_id` (and, given `idle_before`, unused since then).

        One conditional UPDATE: of a reaper and an execution in other processes or hosts, exactly one wins; True
        means the caller owns the kernel's removal."""
        return self._release("kernel = NULL", (), session_id, kernel_id, idle_before)

    @_guarded
    def pause(self, session_id: str, kernel_id: str, paused: PausedState, idle_before: float | None = None) -> bool:
        """Forget the session's kernel and mark it paused, atomically and only while its kernel is still
        `kernel_id` (and, given `idle_before`, unused since then): True means the caller owns the kernel's removal."""
        return self._release("kernel = NULL, paused = %s", (paused.model_dump_json(),), session_id, kernel_id,
                             idle_before)

    def _release(self, assignments: str, values: tuple[Any, ...], session_id: str, kernel_id: str,
                 idle_before: float | None) -> bool:
        sql = (f"UPDATE workbench_sessions SET {assignments} WHERE session_id = %s AND status = 'open' "
               "AND kernel ->> 'kernel_id' = %s")
        args = (*values, session_id, kernel_id)
        if idle_before is not None:
            sql += " AND last_used_at < %s AND busy_until < %s"
            args += (idle_before, time.time())
        return self._exec(sql, args) == 1

    @_guarded
    def set_paused(self, session_id: str, paused: PausedState | None) -> None:
        """Mark the session paused (a snapshot waits for its next kernel), or awake (`None`)."""
        self._exec("UPDATE workbench_sessions SET paused = %s WHERE session_id = %s",
                   (paused.model_dump_json() if paused else None, session_id))

    @_guarded
    def mark_busy(self, session_id: str, until: float) -> None:
        """Keep the idle reaper away from a session whose cell may run until `until`."""
        self._exec("UPDATE workbench_sessions SET busy_until = %s WHERE session_id = %s", (until, session_id))

    @_guarded
    def touch(self, session_id: str) -> None:
        """Mark a session used now (never earlier than another process marked it), leaving its busy mark."""
        self._exec("UPDATE workbench_sessions SET last_used_at = GREATEST(last_used_at, %s) WHERE session_id = %s",
                   (time.time(), session_id))

    @_guarded
    def data_version(self) -> int:
        """Changes whenever a transaction committed anywhere on the server since the last call (by any process or
        host; a commit elsewhere on the server changes it too, which only costs a re-read).

        It follows the server's current snapshot (pg_current_snapshot: the oldest running transaction, the next
        transaction id, those in flight), which is the same only while no transaction committed: a writer either
        is in the list or gets an id past its end. A counter row would serialise every writer on one row lock;
        the next transaction id alone misses a writer that got its id before and commits after the call."""
        row = self._one("SELECT pg_current_snapshot()::text")
        snapshot = row[0] if row is not None else None
        with self._version:
            if snapshot != self._snapshot:
                self._snapshot = snapshot
                self._data_version += 1
            return self._data_version

    # logs -------------------------------------------------------------------------------------------------------

    @_guarded
    def log(self, session_id: str, kind: str, status: str, duration: float, detail: dict[str, Any],
            touch: bool = True) -> None:
        """Record an execution or tool call, committed before this returns (with what other threads of this
        process logged at the same moment). An execution (`touch`) also marks the session used now, and not busy."""
        now = time.time()
        entry = (session_id, kind, status, float(duration), _dumps(detail), now)
        with self._queue:
            batch = self._batch
            batch.entries.append(entry)
            if touch:
                batch.touched[session_id] = now
            while not (batch.done or batch.error or self._closed) and self._committing:
                self._committed.wait()
            lead = not (batch.done or batch.error)
            if lead:  # no batch in flight: commit this one, with what joined it
                self._batch, self._committing = _Batch(), True
        if lead:
            self._commit(batch)
        if isinstance(batch.error, StoreError):
            raise StoreError(str(batch.error)) from batch.error
        if batch.error is not None:
            raise self._error(batch.error) from batch.error

    def _commit(self, batch: _Batch) -> None:
        """Commit a batch, then wake its writers (each raises the error, if any) and the next batch's."""
        try:
            columns = [builtins.list(column) for column in zip(*batch.entries, strict=True)]
            self._exec(_LOG_BATCH, (*columns, builtins.list(batch.touched), builtins.list(batch.touched.values())))
        except BaseException as exc:
            batch.error = exc
            if not isinstance(exc, Exception):
                raise
            return
        else:
            batch.done = True
        finally:
            with self._queue:
                self._committing = False
                self._committed.notify_all()
        try:
            self._prune(batch)
        except psycopg.Error:
            pass  # the entries are in; the next pruning of the session deletes what this one left

    def _prune(self, batch: _Batch) -> None:
        """Delete a session's oldest log entries beyond LOG_KEEP, every _PRUNE_EVERY entries it adds."""
        due = []
        with self._queue:
            for entry in batch.entries:
                self._added[entry[0]] = self._added.get(entry[0], 0) + 1
            for session_id in [sid for sid, n in self._added.items() if n >= _PRUNE_EVERY]:
                del self._added[session_id]
                due.append(session_id)
        for session_id in due:
            self._exec("DELETE FROM workbench_logs WHERE session_id = %s AND id <= (SELECT id FROM workbench_logs "
                       "WHERE session_id = %s ORDER BY id DESC LIMIT 1 OFFSET %s)", (session_id, session_id, LOG_KEEP))

    @_guarded
    def logs(self, session_id: str, limit: int = 1000) -> builtins.list[LogEntry]:
        rows = self._all("SELECT id, session_id, kind, status, duration, detail, created_at FROM workbench_logs "
                         "WHERE session_id = %s ORDER BY id DESC LIMIT %s", (session_id, limit))
        return [LogEntry(id=row[0], session_id=row[1], kind=row[2], status=row[3], duration=row[4],
                         detail=json.loads(row[5]), created_at=row[6]) for row in reversed(rows)]

    def flush(self) -> None:
        """Nothing waits: every entry is committed before `log()` returns (raises StoreError once closed)."""
        if self._closed:
            raise StoreError(f"the session store {self.name} is closed")

    # API keys and session owners (`workbench serve`) ------------------------------------------------------------

    @_guarded
    def add_api_key(self, key_id: str, name: str, key_hash: str) -> ApiKeyRecord:
        """Store a new API key by its hash (the key itself is never stored)."""
        record = ApiKeyRecord(key_id=key_id, name=name, created_at=time.time())
        self._exec("INSERT INTO workbench_api_keys (key_id, name, key_hash, created_at) VALUES (%s, %s, %s, %s)",
                   (key_id, name, key_hash, record.created_at))
        return record

    @_guarded
    def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The active (not revoked) key with this hash, or None."""
        row = self._one("SELECT key_id, name, created_at, revoked_at FROM workbench_api_keys WHERE key_hash = %s "
                        "AND revoked_at IS NULL", (key_hash,))
        return _api_key(row) if row is not None else None

    @_guarded
    def api_keys(self) -> builtins.list[ApiKeyRecord]:
        """Every API key, revoked ones too, oldest first."""
        return [_api_key(row) for row in self._all(
            "SELECT key_id, name, created_at, revoked_at FROM workbench_api_keys ORDER BY created_at")]

    @_guarded
    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key for good; False when no active key has this id."""
        return self._exec("UPDATE workbench_api_keys SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL",
                          (time.time(), key_id)) == 1

    @_guarded
    def set_owner(self, session_id: str, key_id: str) -> None:
        """Record the API key that created a session (once: a session never changes hands)."""
        self._exec("INSERT INTO workbench_session_owners (session_id, key_id) VALUES (%s, %s)", (session_id, key_id))

    @_guarded
    def owner(self, session_id: str) -> str | None:
        """The id of the API key that created the session through the server, or None."""
        row = self._one("SELECT key_id FROM workbench_session_owners WHERE session_id = %s", (session_id,))
        return row[0] if row is not None else None

    # cluster replicas -----------------------------------------------------------------------------------------

    @_guarded
    def heartbeat(self, replica: ReplicaRecord) -> None:
        """Record that a cluster replica is alive, as of `replica.seen_at`."""
        self._exec("INSERT INTO workbench_replicas (replica_id, url, memory, started_at, seen_at) "
                   "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (replica_id) DO UPDATE SET url = excluded.url, "
                   "memory = excluded.memory, started_at = excluded.started_at, seen_at = excluded.seen_at",
                   (replica.replica_id, replica.url, replica.memory, replica.started_at, replica.seen_at))

    @_guarded
    def replicas(self) -> builtins.list[ReplicaRecord]:
        """Every replica that ever beat, with when it was last seen."""
        return [ReplicaRecord(replica_id=row[0], url=row[1], memory=row[2], started_at=row[3], seen_at=row[4])
                for row in self._all("SELECT replica_id, url, memory, started_at, seen_at FROM workbench_replicas "
                                     "ORDER BY replica_id")]

    def close(self) -> None:
        """Wait for a log batch being committed, then close the pool; later calls raise StoreError. Closing twice
        is fine."""
        with self._queue:
            if self._closed:
                return
            self._closed = True
            while self._committing:
                self._committed.wait()
        self._pool.close()


def _check(conn: psycopg.Connection) -> None:
    """Before the pool hands out a connection: an idle one the server has something to say to (after a restart:
    that it terminated the connection) is tried with a query, and replaced when it fails. A plain idle one costs
    no round trip."""
    if select.select([conn.fileno()], [], [], 0)[0]:
        ConnectionPool.check_connection(conn)


def _create_schema(conn: psycopg.Connection) -> None:
    """Create the tables unless they are there; one process at a time (concurrent CREATE ... IF NOT EXISTS can
    fail on the catalog's unique indexes), the others wait for it under the same advisory lock."""
    if _schema_version(conn) == SCHEMA_VERSION:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        version = _schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        if version is not None:
            raise StoreError(f"the database holds a workbench store of schema version {version}, which this "
                             f"version of workbench (schema {SCHEMA_VERSION}) cannot use")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO workbench_schema (version) VALUES (%s)", (SCHEMA_VERSION,))


def _schema_version(conn: psycopg.Connection) -> int | None:
    found = conn.execute("SELECT to_regclass('workbench_schema')").fetchone()
    if found is None or found[0] is None:
        return None
    row = conn.execute("SELECT max(version) FROM workbench_schema").fetchone()
    return row[0] if row is not None else None


def _record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(
        session_id=row[0], user_id=row[1], status=row[2], config=SessionConfig.model_validate_json(row[3]),
        config_version=row[4], kernel=KernelRecord.model_validate_json(row[5]) if row[5] else None,
        created_at=row[6], last_used_at=row[7], busy_until=row[8],
        paused=PausedState.model_validate_json(row[9]) if row[9] else None, replica=row[10])


def _api_key(row: tuple[Any, ...]) -> ApiKeyRecord:
    return ApiKeyRecord(key_id=row[0], name=row[1], created_at=row[2], revoked_at=row[3])


def _dumps(value: Any) -> str:
    """JSON, fast (log entries come by the thousand per second); what orjson refuses goes through json."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # e.g. an int past 64 bits
        return json.dumps(value, default=str)


def _scrub(text: str) -> str:
    """A server or driver message without any password a DSN in it may hold."""
    return re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1:***@", re.sub(r"password\s*=\s*\S+", "password=***", text))

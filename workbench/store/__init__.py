"""Session stores: the interface and records (`base.py`), the embedded SQLite store (`sqlite.py`, the default) and
the shared PostgreSQL store (`postgres.py`, imported only when asked for: psycopg is an optional dependency)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import StoreError
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
from .sqlite import JOURNAL_ROTATE, LOG_BATCH, LOG_DELAY, SQLiteStore

__all__ = ["JOURNAL_ROTATE", "LOG_BATCH", "LOG_DELAY", "LOG_KEEP", "ApiKeyRecord", "KernelRecord", "LogEntry",
           "PausedState", "ReplicaRecord", "SQLiteStore", "SessionConfig", "SessionRecord", "Store", "open_store"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(spec: Store | str | None, home: Path) -> Store:
    """The store a Workbench uses: `spec` itself when it is a Store; a PostgresStore for a `postgresql://` DSN;
    with no spec, the one WORKBENCH_STORE names (a DSN), else SQLite's `workbench.db` under `home`. A DSN without
    a password takes the one in the file WORKBENCH_STORE_PASSWORD_FILE names (e.g. a Swarm secret), if set."""
    if isinstance(spec, Store):
        return spec
    if spec is None:
        spec = os.environ.get("WORKBENCH_STORE") or None
        if spec is None:
            return SQLiteStore(home / "workbench.db")
    if not isinstance(spec, str):
        raise StoreError(f"a store is a Store or a postgresql:// DSN, not {type(spec).__name__}")
    if not spec.lower().startswith(POSTGRES_SCHEMES):
        shown = spec.split("://", 1)[0] + "://..." if "://" in spec else f"{len(spec)} characters without a scheme"
        raise StoreError(f"a store DSN (store= or WORKBENCH_STORE) must start with postgresql:// or postgres://, "
                         f"not {shown} (unset WORKBENCH_STORE for the embedded SQLite store)")
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StoreError(f"the PostgreSQL store needs psycopg and psycopg-pool ({exc}): "
                         "pip install 'workbench[postgres]'") from exc
    password_file = os.environ.get("WORKBENCH_STORE_PASSWORD_FILE")
    if password_file:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        try:
            if not conninfo_to_dict(spec).get("password"):
                spec = make_conninfo(spec, password=Path(password_file).read_text().strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"WORKBENCH_STORE_PASSWORD_FILE {password_file}: {exc}") from None
        except Error:
            pass  # a malformed DSN: PostgresStore says what is wrong with it
    return PostgresStore(spec)

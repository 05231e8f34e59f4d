"""Session stores: the interface and records (`base.py`) and the embedded SQLite store (`sqlite.py`)."""
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
           "PausedState", "ReplicaRecord", "SQLiteStore", "SessionConfig", "SessionRecord", "Store"]

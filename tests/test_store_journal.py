"""The store's tool-call journal: durable on return, in the logs table (seen by other processes) within LOG_DELAY,
and never taken by another Store's recovery while it is being created."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workbench.store import LOG_DELAY, SQLiteStore
from workbench.store import sqlite as store_module


def test_a_journaled_tool_call_reaches_the_table_within_log_delay_without_another_call(tmp_path: Path) -> None:
    writer = SQLiteStore(tmp_path / "workbench.db")
    try:
        writer.log("s", "tool", "ok", 0.1, {"slug": "ECHO"}, touch=False)
        journaled = time.monotonic()
        # in the table in time, without another call or a flush
        while not _table(tmp_path):
            assert time.monotonic() - journaled < LOG_DELAY + 0.5
            time.sleep(0.01)
        assert time.monotonic() - journaled <= LOG_DELAY + 0.25  # a little slack for a loaded machine
        # so another process sees it: it reads only the logs table (the writer's journal is locked, so it is left alone)
        script = ("import sys, time\nfrom workbench.store import SQLiteStore\nstore = SQLiteStore(__import__('pathlib').Path("
                  "sys.argv[1]))\nfor _ in range(100):\n    if store.logs('s'):\n        break\n    time.sleep(0.02)\n"
                  "print(len(store.logs('s')))\nstore.close()")
        seen = subprocess.run([sys.executable, "-c", script, str(tmp_path / "workbench.db")], capture_output=True,
                              text=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert seen.stdout.strip() == "1", seen.stderr
        assert [e.detail["slug"] for e in writer.logs("s")] == ["ECHO"]
        flusher = writer._flusher
        assert flusher is not None and flusher.is_alive()
    finally:
        writer.close()
    assert not flusher.is_alive()  # close() stops it
    assert _table(tmp_path) == 1


def _table(tmp_path: Path) -> int:
    import sqlite3
    db = sqlite3.connect(tmp_path / "workbench.db")
    try:
        return db.execute("SELECT count(*) FROM logs").fetchone()[0]
    finally:
        db.close()


def test_recovery_never_takes_a_journal_being_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "workbench.db"
    first = SQLiteStore(path)
    real_flock = fcntl.flock
    opened: list[SQLiteStore] = []
    racing: list[int] = []

    def flock(fd: int, operation: int) -> None:
        # another Store opens (and recovers) right between the journal's creation and its lock
        if not racing and os.readlink(f"/proc/self/fd/{fd}").endswith(".new"):
            racing.append(fd)
            opened.append(SQLiteStore(path))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    try:
        first.log("s", "tool", "ok", 0.0, {"i": 1}, touch=False)
    finally:
        monkeypatch.undo()
    assert opened, "the race was not exercised"
    opened[0].close()
    first.log("s", "tool", "ok", 0.0, {"i": 2}, touch=False)
    assert [e.detail["i"] for e in first.logs("s")] == [1, 2]
    first.close()


def test_concurrent_store_opens_lose_no_tool_call(tmp_path: Path) -> None:
    path = tmp_path / "workbench.db"
    SQLiteStore(path).close()
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for round_ in range(4):
                store = SQLiteStore(path)  # its recovery runs while the others create their journals
                for i in range(25):
                    store.log("s", "tool", "ok", 0.0, {"t": t, "r": round_, "i": i}, touch=False)
                store.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    store = SQLiteStore(path)
    try:
        entries = store.logs("s", limit=10_000)
        assert len(entries) == 8 * 4 * 25
        assert len({(e.detail["t"], e.detail["r"], e.detail["i"]) for e in entries}) == 800
    finally:
        store.close()
    assert not any((tmp_path / "workbench.db.journals").iterdir())


def test_a_stale_unlocked_new_journal_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "workbench.db"
    SQLiteStore(path).close()
    journals = tmp_path / "workbench.db.journals"
    journals.mkdir(exist_ok=True)
    fresh, stale = journals / "1-aa.log.new", journals / "2-bb.log.new"
    fresh.write_bytes(b"")
    stale.write_bytes(b"")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    SQLiteStore(path).close()
    assert fresh.exists() and not stale.exists()


def test_a_session_keeps_only_its_newest_log_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "LOG_KEEP", 50)
    monkeypatch.setattr(store_module, "_PRUNE_EVERY", 20)
    store = SQLiteStore(tmp_path / "workbench.db")
    try:
        for i in range(500):
            store.log("s1", "tool", "ok", 0.0, {"i": i}, touch=False)
        store.log("s2", "tool", "ok", 0.0, {"i": 0}, touch=False)
        store.flush()
        kept = store.logs("s1", limit=1000)
        assert 50 <= len(kept) < 50 + 20 and kept[-1].detail == {"i": 499}  # the newest, in order
        assert len(store.logs("s2")) == 1  # another session's entries are its own
    finally:
        store.close()

"""Records the host keeps must survive whatever happens to the process, and bad records must not do harm: every
tool call and execution is logged before its result is returned (SIGKILL, SIGTERM), a damaged store gives a clear
workbench error, an empty store never makes gc remove running kernels, and ids are checked exactly."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import Session, Workbench
from workbench.config import Limits
from workbench.errors import SessionError, StoreError, WorkbenchError
from workbench.store import SQLiteStore

_CALLER = """
import sys
from workbench import Workbench
wb = Workbench(home=sys.argv[1], idle_timeout=None, pool_size=0)
wb.tools.register(lambda x: {"x": x}, slug="ECHO", toolkit="t")
session = wb.create(user_id="caller", toolkits=["t"])
n = int(sys.argv[2])
assert all(r.ok for r in session.execute_tools([("ECHO", {"x": i}) for i in range(n)], max_workers=16))
for i in range(n):
    assert session.execute_tool("ECHO", {"x": i}).ok
print("done", session.session_id, flush=True)
import time
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_tool_calls_that_returned_are_logged_when_the_process_is_killed(tmp_path: Path, wb: Workbench,
                                                                       sig: signal.Signals) -> None:
    n = 300
    caller = subprocess.Popen([sys.executable, "-c", _CALLER, str(tmp_path), str(n)], stdout=subprocess.PIPE,
                              text=True, env=os.environ.copy())
    try:
        line = caller.stdout.readline() if caller.stdout else ""
        assert line.startswith("done "), line
        caller.send_signal(sig)  # at once: nothing gets the chance to flush anything
        caller.wait(timeout=30)
    finally:
        if caller.poll() is None:
            caller.kill()
    session_id = line.split()[1]
    store = SQLiteStore(tmp_path / "workbench.db")
    try:
        tools = [e for e in store.logs(session_id, limit=10 * n) if e.kind == "tool"]
        assert len(tools) == 2 * n and all(e.status == "ok" for e in tools)
    finally:
        store.close()
        # the killed process could not close its session: closed here, its kernel, runtime dir and image with it
        other = Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker)
        try:
            other.use(session_id).close(delete_workspace=True)
        finally:
            other.close()
        assert not _mounted_under(tmp_path)


def test_an_execution_that_raises_is_logged_as_failed(session: Session) -> None:
    def broken(_: str) -> None:
        raise RuntimeError("the caller's callback broke")

    with pytest.raises(RuntimeError):
        session.execute("print('to a broken callback')", on_stdout=broken)
    entry = session.logs()[-1]
    assert entry.kind == "execution" and entry.status == "failed"
    assert "RuntimeError: the caller's callback broke" in entry.detail["error"]
    assert session.execute("'serving'").text == "'serving'"


def test_concurrent_log_entries_are_all_kept_once(tmp_path: Path) -> None:
    import threading

    def count() -> int:
        other = sqlite3.connect(tmp_path / "workbench.db")
        try:
            return other.execute("SELECT count(*) FROM logs").fetchone()[0]
        finally:
            other.close()

    store = SQLiteStore(tmp_path / "workbench.db")
    threads = [threading.Thread(target=lambda t=t: [
        store.log("s", "tool" if i % 10 else "execution", "ok", 0.0, {"t": t, "i": i}, touch=bool(i % 10 == 0))
        for i in range(200)]) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alive = SQLiteStore(tmp_path / "workbench.db")  # a second store, as another process: leaves a live journal alone
    assert count() <= 1600
    store.flush()
    assert count() == 1600
    alive.close()
    store.close()
    store.close()  # twice is fine
    assert SQLiteStore(tmp_path / "workbench.db").logs("s", limit=5000).__len__() == 1600  # nothing copied twice
    assert not any((tmp_path / "workbench.db.journals").iterdir())
    with pytest.raises(StoreError, match="closed"):
        store.logs("s")


def test_a_damaged_store_gives_a_workbench_error(tmp_path: Path, wb: Workbench) -> None:
    path = tmp_path / "workbench.db"
    store = SQLiteStore(path)
    for i in range(3000):
        store.log("s", "tool", "ok", 0.0, {"padding": "p" * 200, "i": i}, touch=False)
    store.close()
    size = path.stat().st_size
    assert size > 100_000
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(StoreError, match=str(path)) as raised:
        damaged = SQLiteStore(path)
        damaged.logs("s", limit=5000)
        damaged.list()
    assert "damaged" in str(raised.value) and isinstance(raised.value, WorkbenchError)
    path.write_bytes(b"this is not a database at all" * 1000)
    with pytest.raises(StoreError, match="move it aside"):
        Workbench(home=tmp_path, docker_client=wb.docker, idle_timeout=None)


def test_an_empty_store_at_start_up_leaves_running_kernels_alone(tmp_path: Path, wb: Workbench) -> None:
    first = Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker)
    session = first.create(user_id="alice")
    assert session.execute("x = 1").error is None
    first.close()
    first.store.close()
    for name in ("workbench.db", "workbench.db-wal", "workbench.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    second = Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker)
    try:
        assert second.startup_gc.removed == []
        assert [line.split(": ")[1] for line in second.startup_gc.unknown] == [session.session_id]
        labels = {"label": [f"workbench.home={first.home_label}", f"workbench.session={session.session_id}"]}
        assert [c.status for c in wb.docker.containers.list(all=True, filters=labels)] == ["running"]
        assert second.gc().removed == []
    finally:
        second.close()
        # the session the store forgot: its kernel (container and runtime dir) and its workspace image go
        session._kernel.shutdown()
        session._kernel.disk.destroy(quiet=True)
        for container in wb.docker.containers.list(all=True, filters={"label": f"workbench.home={first.home_label}"}):
            container.remove(force=True)
    assert not _mounted_under(tmp_path)


def _mounted_under(root: Path) -> list[Path]:
    from workbench.workspace import mounts_under

    return mounts_under(root)


def test_ids_slugs_and_limits_are_checked_exactly(wb: Workbench, session: Session) -> None:
    for user_id in ("user\n", "user\r\n", "", "a" * 129, None, 5):
        with pytest.raises(SessionError):
            wb.create(user_id=user_id)  # type: ignore[arg-type]
    for cpus in (1e-6, 0.009, 0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            Limits(cpus=cpus)
        with pytest.raises(ValueError):
            wb.create(user_id="test-user", limits={"cpus": cpus})
    assert Limits(cpus=0.01).cpus == 0.01
    with pytest.raises(WorkbenchError):
        wb.tool(slug="SLUG\n")(lambda: None)
    for slug in (123, ["ECHO"], {"a": 1}, None):
        result = session.execute_tool(slug, {})  # type: ignore[arg-type]
        assert result.error_kind == "invalid_arguments" and not result.ok
    assert session.execute_tool("NO_SUCH_TOOL\n", {}).error_kind == "not_found"
    logged = [e for e in session.logs() if e.kind == "tool"][-5:]
    assert [e.status for e in logged] == ["invalid_arguments"] * 4 + ["not_found"]


def test_a_busy_session_lock_times_out_without_sending_the_cell(fresh: Session, wb: Workbench) -> None:
    import fcntl

    fresh.execute("ran = []")
    lock = wb.home / "locks" / f"{fresh.session_id}.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds the session
        started = time.monotonic()
        result = fresh.execute("ran.append(1)", timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 2
        assert result.not_started and result.timed_out
    finally:
        os.close(fd)
    assert fresh.execute("ran").text == "[]"  # the cell was never sent

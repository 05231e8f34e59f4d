"""The `workbench` command line, run as a user would: a new process per command, sharing WORKBENCH_HOME."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from workbench import Workbench


def cli(home: Path, *args: str, input: str | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORKBENCH_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, env=env,
                          input=input, timeout=120)
    assert (proc.returncode == 0) == ok, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_session_exec_files_and_gc_from_the_command_line(wb: Workbench, home: Path, tmp_path: Path) -> None:
    session_id = cli(home, "session", "create", "--user", "carol", "--toolkit", "github", "--memory", "512m"
                     ).stdout.strip()
    assert len(session_id) == 12
    try:
        cli(home, "exec", session_id, "x = 21")
        assert cli(home, "exec", session_id, "print('twice:', x * 2)\nx").stdout == "twice: 42\n21\n"
        script = tmp_path / "cell.py"
        script.write_text("import pandas as pd\npd.DataFrame({'a': [1, 2]}).a.sum().item()")
        assert cli(home, "exec", session_id, "-f", str(script)).stdout.strip() == "3"
        assert cli(home, "exec", session_id, "-f", "-", input="x + 1").stdout.strip() == "22"
        failed = cli(home, "exec", session_id, "1 / 0", ok=False)
        assert "ZeroDivisionError" in failed.stderr

        local = tmp_path / "upload.csv"
        local.write_bytes(b"a,b\n1,2\n")
        cli(home, "files", "put", session_id, str(local), "in/data.csv")
        assert "in/data.csv" in cli(home, "files", "ls", session_id, "-r").stdout
        assert cli(home, "exec", session_id, "open('in/data.csv').read()").stdout.strip() == "'a,b\\n1,2\\n'"
        cli(home, "exec", session_id, "open('result.txt', 'w').write('made in the sandbox')")
        cli(home, "files", "get", session_id, "result.txt", str(tmp_path / "result.txt"))
        assert (tmp_path / "result.txt").read_text() == "made in the sandbox"
        assert cli(home, "files", "get", session_id, "result.txt", "-").stdout == "made in the sandbox"
        refused = cli(home, "files", "get", session_id, "../../etc/passwd", "-", ok=False)
        assert "error:" in refused.stderr and "leaves the workspace" in refused.stderr

        listed = cli(home, "session", "list", "--user", "carol").stdout
        assert session_id in listed and "running" in listed and "github" in listed
        shown = cli(home, "session", "show", session_id).stdout
        assert "memory 512 MiB" in shown and "1 / 0" in shown and "error" in shown
        assert cli(home, "gc").returncode == 0
    finally:
        cli(home, "session", "close", session_id)
    assert session_id not in cli(home, "session", "list").stdout
    assert "is closed" in cli(home, "exec", session_id, "1", ok=False).stderr
    assert "no session 'nope'" in cli(home, "exec", "nope", "1", ok=False).stderr


def test_gc_from_the_command_line_reports_the_running_kernels_it_leaves_alone(tmp_path: Path, wb: Workbench) -> None:
    import pytest

    from workbench.errors import StoreError

    first = Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker)
    session = first.create(user_id="alice")
    first.close()
    with pytest.raises(StoreError, match="closed"):  # close() closes the store as well
        first.store.logs(session.session_id)
    for name in ("workbench.db", "workbench.db-wal", "workbench.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)  # a new, empty store: its kernel is unknown to it
    try:
        shown = cli(tmp_path, "gc").stdout
        assert "left alone (running, session unknown to the store) workbench-" in shown, shown
        assert f": {session.session_id}" in shown and "nothing to clean" not in shown
    finally:
        for container in wb.docker.containers.list(all=True, filters={"label": f"workbench.home={first.home_label}"}):
            container.remove(force=True)


def test_the_demo_runs_and_leaves_nothing_behind(wb: Workbench, tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    out = cli(home, "demo").stdout
    assert "ZeroDivisionError" in out and "session closed" in out
    assert "is a DataFrame of 3,650 rows" in out  # a large response offloaded, queried as tables[id]
    assert "3650 days" in out and "exit code: 0" in out  # meta tools answered as a model reads them
    with Workbench(home=home, pool_size=0, idle_timeout=None) as again:
        left = wb.docker.containers.list(all=True, filters={"label": f"workbench.home={again.home_label}"})
    assert not left and not any((home / "workspaces").iterdir())


def test_only_workbench_gc_pauses_idle_sessions_from_the_command_line(tmp_path: Path, wb: Workbench) -> None:
    import sqlite3

    with Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker) as first:
        session = first.create(user_id="dora")
        session.execute("x = 41")
    with sqlite3.connect(tmp_path / "workbench.db") as db:  # idle for an hour (no API sets the past)
        db.execute("UPDATE sessions SET last_used_at = last_used_at - 3600 WHERE session_id = ?",
                   (session.session_id,))
    try:
        assert "running" in cli(tmp_path, "session", "list").stdout  # a command waits on nobody's save
        shown = cli(tmp_path, "gc").stdout
        assert f"paused idle session {session.session_id}" in shown, shown
        assert "paused" in cli(tmp_path, "session", "list").stdout
        assert cli(tmp_path, "exec", session.session_id, "print(x + 1)").stdout.strip() == "42"
    finally:
        cli(tmp_path, "session", "close", session.session_id)


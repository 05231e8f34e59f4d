"""Sessions persist in the store: resumed from another process, updated with optimistic concurrency, logged."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import Workbench
from workbench.errors import ConflictError, SessionClosedError, SessionError

RESUME = """
import json, sys
from workbench import Workbench
wb = Workbench(home=sys.argv[1])
s = wb.use(sys.argv[2])
r = s.execute(sys.argv[3])
print(json.dumps({"text": r.text, "state_lost": r.state_lost, "error": r.error and r.error.ename}))
wb.close()
"""


def in_other_process(home: Path, session_id: str, code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", RESUME, str(home), session_id, code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resume_from_another_process_keeps_variables(wb: Workbench, home: Path) -> None:
    with wb.create(user_id="alice") as session:
        session.execute("secret_sauce = 'tomato'")
        seen = in_other_process(home, session.session_id, "secret_sauce.upper()")
        assert seen == {"text": "'TOMATO'", "state_lost": False, "error": None}
        # and this process still drives the same kernel
        assert session.execute("secret_sauce").text == "'tomato'"


def test_resume_after_the_kernel_was_killed_says_state_was_lost(wb: Workbench, home: Path) -> None:
    with wb.create(user_id="alice") as session:
        session.execute("value = 1\nopen('note.txt', 'w').write('kept')")
        wb.docker.containers.get(session._kernel.container.id).kill()
        seen = in_other_process(home, session.session_id, "open('note.txt').read()")
        assert seen == {"text": "'kept'", "state_lost": True, "error": None}
        assert in_other_process(home, session.session_id, "value")["error"] == "NameError"
    # closing here also removes the kernel the other process started
    assert not wb.docker.containers.list(all=True, filters={"label": f"workbench.session={session.session_id}"})


def test_update_is_versioned_and_a_stale_update_conflicts(wb: Workbench, home: Path) -> None:
    with wb.create(user_id="alice", toolkits=["github"]) as session:
        assert session.config_version == 1
        other = Workbench(home=home, docker_client=wb.docker)
        stale = other.use(session.session_id)
        assert session.update(toolkits=["github", "slack"]) == 2
        with pytest.raises(ConflictError, match="version 2, not 1"):
            stale.update(toolkits=["jira"])
        assert wb.store.get(session.session_id).config.toolkits == ["github", "slack"]
        other.close()


def test_limit_changes(wb: Workbench) -> None:
    with wb.create(user_id="alice") as session:
        session.execute("x = 1")
        session.update(limits={"memory": "512m"})
        memory = session.execute(
            "from pathlib import Path\n"
            "p = next(p for p in ['/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes']"
            " if Path(p).exists())\nint(Path(p).read_text())"
        )
        assert int(memory.text) == 512 * 2**20
        assert session.execute("x").text == "1"  # applied live
        with pytest.raises(SessionError, match="restart_if_needed"):
            session.update(limits={"pids": 128})
        session.update(limits={"pids": 128}, restart_if_needed=True)
        assert session.execute("x").state_lost


def test_logs_list_and_close(wb: Workbench) -> None:
    session = wb.create(user_id="bob")
    session.execute("1 + 1")
    session.execute("1 / 0")
    entries = session.logs()
    assert [(e.kind, e.status, e.detail["code"]) for e in entries] == [
        ("execution", "ok", "1 + 1"), ("execution", "error", "1 / 0")]
    assert all(e.session_id == session.session_id for e in entries)
    assert session.session_id in [r.session_id for r in wb.list(user_id="bob")]
    assert session.session_id not in [r.session_id for r in wb.list(user_id="alice")]
    workspace = session.workspace
    session.close(delete_workspace=True)
    assert not workspace.exists()
    assert session.session_id not in [r.session_id for r in wb.list(user_id="bob")]
    with pytest.raises(SessionClosedError):
        wb.use(session.session_id)

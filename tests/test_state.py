"""Sessions that sleep and wake with their variables, forks, and notebook export."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from workbench import Session, Workbench
from workbench.errors import SessionError, SessionNotFoundError
from workbench.workspace import is_mount

VARIABLES = """
import pandas as pd
import numpy as np
import socket
df = pd.DataFrame({"city": ["Paris", "Lyon"], "revenue": [10.5, 7.25]})
arr = np.arange(12).reshape(3, 4)
nested = {"a": [1, {"b": (2, 3)}], "c": {"d": None}}
same = nested  # two names for one object stay one object
double = lambda v: v * 2
def greet(name):
    return f"hello {name}"
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return self.x ** 2 + self.y ** 2
p = Point(3, 4)
gen = (i for i in range(3))
fh = open("/workspace/notes.txt", "w")
sock = socket.socket()
"""

CHECK = """
print(df.revenue.sum(), int(arr.sum()), nested["a"][1]["b"], same is nested, double(21), greet("ann"),
      isinstance(p, Point), p.norm2(), pd.__name__, np.__name__)
"""
EXPECTED = "17.75 66 (2, 3) True 42 hello ann True 25 pandas numpy\n"


def _containers(wb: Workbench, session: Session) -> list:
    return wb.docker.containers.list(all=True, filters={"label": f"workbench.session={session.session_id}"})


def test_pause_keeps_variables_of_every_kind_and_names_what_it_could_not_save(fresh: Session, wb: Workbench) -> None:
    assert fresh.execute(VARIABLES).ok
    state = fresh.pause()
    assert set(state.names) >= {"df", "arr", "nested", "same", "double", "greet", "Point", "p"}
    assert state.modules == {"pd": "pandas", "np": "numpy", "socket": "socket"}
    assert set(state.skipped) == {"gen", "fh", "sock"}
    assert "generator" in state.skipped["gen"] and "socket" in state.skipped["sock"]
    assert "run_tool" not in state.names and "tables" not in state.names  # the sandbox's helpers are not the user's
    assert fresh.paused and wb.store.get(fresh.session_id).kernel is None
    assert _containers(wb, fresh) == []  # a paused session costs disk only
    assert fresh.files.exists(".state/namespace.pkl")

    result = fresh.execute(CHECK)
    assert result.stdout == EXPECTED, result
    assert result.state_restored and not result.state_lost
    assert set(result.state_skipped) == {"gen", "fh", "sock"}
    assert "fh, gen, sock (not saved)" in str(result)
    assert not fresh.paused and not fresh.files.exists(".state/namespace.pkl")  # restored: the room is free again
    again = fresh.execute("gen")
    assert not again.state_restored and again.error is not None and again.error.ename == "NameError"
    assert fresh.execute("run_tool.__name__").text == "'run_tool'"  # the helpers are the new kernel's own
    kinds = [(e.kind, e.status) for e in fresh.logs() if e.kind in ("pause", "resume")]
    assert kinds == [("pause", "ok"), ("resume", "ok")]


def test_resume_explicitly_or_on_a_shell_command(fresh: Session, wb: Workbench) -> None:
    fresh.execute("x = 41")
    fresh.pause()
    assert fresh.pause().names == ["x"]  # pausing a paused session changes nothing
    fresh.resume()
    assert not fresh.paused and len(_containers(wb, fresh)) == 1
    result = fresh.execute("x + 1")
    assert result.text == "42" and result.state_restored
    fresh.pause()
    assert fresh.commands.run("echo up").stdout == "up\n"
    assert fresh.execute("x").text == "41"
    fresh.pause()
    fresh.restart()  # a restart means a fresh kernel: the saved variables are dropped, not restored later
    assert not fresh.paused and not fresh.files.exists(".state/namespace.pkl")
    result = fresh.execute("'x' in globals()")
    assert result.text == "False" and not result.state_restored


RESUMER = """
import json, sys
from workbench import Workbench
with Workbench(home=sys.argv[1], pool_size=0, idle_timeout=None) as wb:
    s = wb.use(sys.argv[2])
    if sys.argv[3] == "pause":
        print(json.dumps(s.pause().names))
    else:
        r = s.execute("total")
        print(json.dumps({"text": r.text, "restored": r.state_restored, "lost": r.state_lost}))
"""


def test_pause_in_one_process_and_resume_in_another(wb: Workbench) -> None:
    s = wb.create(user_id="test-user")
    try:
        s.execute("total = sum(range(10))")
        paused = subprocess.run([sys.executable, "-c", RESUMER, str(wb.home), s.session_id, "pause"],
                                capture_output=True, text=True, timeout=120)
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.strip() == '["total"]'
        assert s.paused
        resumed = subprocess.run([sys.executable, "-c", RESUMER, str(wb.home), s.session_id, "resume"],
                                 capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.strip() == '{"text": "45", "restored": true, "lost": false}'
        # this process's object sees the other's kernel: the variables are there, nothing was lost
        result = s.execute("total * 2")
        assert result.text == "90" and not result.state_lost
    finally:
        s.close()


def test_the_idle_reaper_pauses_and_the_next_use_resumes(tmp_path: Path, wb: Workbench) -> None:
    idle = Workbench(home=tmp_path, idle_timeout=1.0, docker_client=wb.docker, pool_size=0)
    try:
        s = idle.create(user_id="test-user")
        s.execute("kept = {'n': 7}")
        deadline = time.monotonic() + 30  # (paused in the store first, then its container is removed)
        while time.monotonic() < deadline and (not s.paused or _containers(wb, s)):
            time.sleep(0.2)
        assert s.paused, "the reaper did not pause the idle session"
        assert _containers(wb, s) == []
        result = s.execute("kept['n']")
        assert result.text == "7" and result.state_restored and not result.state_lost
        s.close()
    finally:
        idle.close()


SLOW_TO_SAVE = """
import time
class Slow:
    def __reduce__(self):  # run by the save: a hostile object holds it as long as it likes
        until = time.monotonic() + 60
        while time.monotonic() < until:
            try:
                time.sleep(until - time.monotonic())
            except KeyboardInterrupt:
                if not STUBBORN:
                    raise
        return (int, ())
slow = Slow()
"""


def test_a_slow_save_holds_back_no_other_idle_session(tmp_path: Path, wb: Workbench) -> None:
    idle = Workbench(home=tmp_path, idle_timeout=1.0, idle_save_timeout=10.0, docker_client=wb.docker, pool_size=0)
    sessions: list[Session] = []
    try:
        # the older ones, which the reaper comes to first: one gives way to the interrupt, one ignores it
        sleepy, stubborn = idle.create(user_id="test-user"), idle.create(user_id="test-user")
        other = idle.create(user_id="test-user")
        sessions += [sleepy, stubborn, other]
        assert sleepy.execute("STUBBORN = False\n" + SLOW_TO_SAVE).ok
        assert stubborn.execute("STUBBORN = True\n" + SLOW_TO_SAVE).ok
        assert other.execute("kept = 7").ok
        used = time.monotonic()
        while time.monotonic() - used < 30 and not other.paused:
            time.sleep(0.2)
        # idle for 1 s, a reaper pass every 0.5 s, a pause of a second or two: not 10 s behind a hostile save
        assert other.paused and time.monotonic() - used < 8, "the other idle session was held back"
        hostile = [sleepy.session_id, stubborn.session_id]
        assert all(idle.store.get(each).kernel is not None for each in hostile)  # still saving, for at most 10 s
        while time.monotonic() - used < 45 and any(idle.store.get(each).kernel is not None for each in hostile):
            time.sleep(0.2)
        for session, why in ((sleepy, "took longer than 10s"), (stubborn, "did not respond to the interrupt")):
            assert idle.store.get(session.session_id).kernel is None, "a slow save was not cut short"
            assert _containers(wb, session) == []  # stopped without its variables, not left running
            assert not session.files.exists(".state/.namespace.pkl.partial")
            result = session.execute("'slow' in globals()")
            assert result.text == "False" and result.state_lost and why in (result.state_lost_reason or ""), result
        result = other.execute("kept")
        assert result.text == "7" and result.state_restored
    finally:
        for session in sessions:
            session.close(delete_workspace=True)
        idle.close()


def test_fork_copies_config_workspace_and_variables_then_both_are_independent(wb: Workbench) -> None:
    source = wb.create(user_id="test-user", toolkits=["demo"], metadata={"ticket": "T-1"})
    try:
        source.execute("import pandas as pd\nframe = pd.DataFrame({'a': [1, 2]})\ndef f(v):\n    return v + 1")
        source.files.write("data/in.csv", b"a\n1\n")
        fork = source.fork()
        try:
            assert fork.session_id != source.session_id and fork.user_id == source.user_id
            assert fork.config.toolkits == ["demo"] and fork.metadata == {"ticket": "T-1"}
            assert fork.files.read("data/in.csv") == b"a\n1\n"
            assert not source.files.exists(".state/namespace.pkl")  # the fork's checkpoint is not left behind
            result = fork.execute("frame['b'] = f(frame.a)\nfork_only = 1\nlist(frame.columns)")
            assert result.text == "['a', 'b']" and result.state_restored
            fork.files.write("data/in.csv", b"changed")
            # the source is untouched by its fork, and still runs its own kernel with its own variables
            after = source.execute("list(frame.columns), 'fork_only' in globals()")
            assert after.text == "(['a'], False)" and not after.state_lost
            assert source.files.read("data/in.csv") == b"a\n1\n"
            assert [e.kind for e in fork.logs()][:1] == ["fork"]
        finally:
            fork.close(delete_workspace=True)
    finally:
        source.close(delete_workspace=True)


def test_a_paused_session_can_be_forked_through_create_and_closed(wb: Workbench) -> None:
    source = wb.create(user_id="test-user")
    source.execute("word = 'kept'")
    source.pause()
    with pytest.raises(SessionNotFoundError):
        wb.create(user_id="someone-else", from_session=source.session_id)  # another user's session is not found
    with pytest.raises(SessionError, match="copies its source's config"):
        wb.create(user_id="test-user", from_session=source.session_id, toolkits=["x"])
    fork = wb.create(user_id="test-user", from_session=source.session_id)
    try:
        assert source.paused and fork.paused  # forking a paused session wakes neither
        assert fork.execute("word").text == "'kept'"
        source.close()  # a paused session closes like any other
        assert wb.store.get(source.session_id).status == "closed"
        assert fork.execute("word.upper()").text == "'KEPT'"
    finally:
        fork.close(delete_workspace=True)


def test_a_paused_session_and_its_unused_fork_hold_no_mount(wb: Workbench) -> None:
    if not wb.disk_quota:
        pytest.skip("workspaces are plain folders here: nothing is mounted")
    source = wb.create(user_id="test-user")
    try:
        source.execute("word = 'kept'")
        source.pause()
        assert not is_mount(source.workspace)
        fork = source.fork()
        try:
            assert source.paused and fork.paused
            assert not is_mount(source.workspace)  # mounted for the copy, then let go again
            assert not is_mount(fork.workspace)  # nor does a fork hold one before its first use
            result = source.execute("word")
            assert result.text == "'kept'" and result.state_restored
            assert fork.execute("word + '!'").text == "'kept!'"
        finally:
            fork.close(delete_workspace=True)
    finally:
        source.close(delete_workspace=True)


CELLS = [
    "print('hello')\nimport sys\nprint('warn', file=sys.stderr)",
    "x = 6 * 7\nx",
    "import pandas as pd\npd.DataFrame({'a': [1, 2]})",
    "from IPython.display import display, Markdown\ndisplay(Markdown('**bold**'))",
    "1 / 0",
]


def _shape(outputs: list) -> list:
    """What must agree between an exported cell and the same cell run again (not ids or counts)."""
    shaped = []
    for out in outputs:
        if out["output_type"] == "stream":
            shaped.append(("stream", out["name"], out["text"]))
        elif out["output_type"] == "error":
            shaped.append(("error", out["ename"], out["evalue"]))
        else:
            shaped.append((out["output_type"], sorted(out["data"]), out["data"].get("text/plain")))
    return shaped


def test_export_notebook_is_valid_and_reruns_to_the_same_outputs(fresh: Session, wb: Workbench,
                                                                   tmp_path: Path) -> None:
    for cell in CELLS:
        fresh.execute(cell)
    path = fresh.export_notebook(tmp_path / "session.ipynb")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert [cell.source for cell in notebook.cells] == CELLS
    assert [cell.execution_count for cell in notebook.cells] == [1, 2, 3, 4, 5]
    assert notebook.cells[1].outputs[0]["data"]["text/plain"] == "42"
    assert "text/html" in notebook.cells[2].outputs[0]["data"]
    assert notebook.cells[4].outputs[-1]["ename"] == "ZeroDivisionError"
    again = wb.create(user_id="test-user")
    try:
        from workbench.notebook import logged_outputs

        for cell in notebook.cells:
            rerun = logged_outputs(again.execute(cell.source))
            assert _shape(rerun) == _shape(cell.outputs), cell.source
    finally:
        again.close(delete_workspace=True)


def test_export_from_the_command_line(fresh: Session, wb: Workbench, tmp_path: Path) -> None:
    fresh.execute("print('from the cli')")
    fresh.pause()
    target = tmp_path / "out.ipynb"
    proc = subprocess.run([sys.executable, "-m", "workbench", "session", "export", fresh.session_id, str(target)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "WORKBENCH_HOME": str(wb.home)})
    assert proc.returncode == 0, proc.stderr
    notebook = nbformat.read(target, as_version=4)
    assert notebook.cells[-1].outputs[0]["text"] == "from the cli\n"
    assert fresh.paused  # exporting reads the log; it does not wake the session


def test_a_session_whose_container_was_removed_outside_still_pauses(tmp_path: Path, wb: Workbench) -> None:
    with Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker) as first:
        session = first.create(user_id="test-user")
        session.execute("x = 1")
        for container in wb.docker.containers.list(all=True, filters={"label": f"workbench.session={session.session_id}"}):
            container.remove(force=True)  # docker rm, an engine reset: the store still names the kernel
    with Workbench(home=tmp_path, idle_timeout=None, pool_size=0, docker_client=wb.docker) as again:
        state = again.use(session.session_id).pause()
        assert state.error is not None and "already stopped" in state.error, state
        assert again.use(session.session_id).paused
        result = again.use(session.session_id).execute("1 + 1")
        assert result.text == "2" and result.state_lost and not result.state_restored, result
        again.use(session.session_id).close(delete_workspace=True)

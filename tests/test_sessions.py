"""Sessions persist in the store: resumed from another process, updated with optimistic concurrency, logged."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workbench import AsyncWorkbench, ExecutionResult, Session, Workbench
from workbench.errors import ConflictError, SessionBusyError, SessionClosedError, SessionError
from workbench.kernel import Kernel

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
        wb.docker.containers.get(session._kernel.sandbox.id).kill()
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


def test_ten_sessions_run_in_parallel_and_each_keeps_its_order(wb: Workbench) -> None:
    with ThreadPoolExecutor(10) as pool:
        sessions = list(pool.map(lambda i: wb.create(user_id=f"user-{i}"), range(10)))
    try:
        def drive(session: Session) -> list[tuple[float, float]]:
            session.execute("import time\nseen, spans = [], []")
            for i in range(8):
                session.execute(f"t0 = time.time(); time.sleep(0.05); seen.append({i}); spans.append((t0, time.time()))")
            assert session.execute("seen").text == str(list(range(8)))
            return json.loads(session.execute("import json; print(json.dumps(spans))").stdout)

        with ThreadPoolExecutor(10) as pool:
            spans = list(pool.map(drive, sessions))
        for own in spans:  # one at a time within a session
            assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(own))
        # and sessions overlap each other: some cell of every session ran while another session's cell ran
        for i, own in enumerate(spans):
            others = [span for j, theirs in enumerate(spans) if j != i for span in theirs]
            assert any(s < oe and os_ < e for s, e in own for os_, oe in others), f"session {i} ran alone"
    finally:
        for session in sessions:
            session.close(delete_workspace=True)


def test_calls_from_many_threads_run_in_the_order_they_were_made(session: Session) -> None:
    session.execute("order = []")
    blocker = threading.Thread(target=session.execute, args=("import time; time.sleep(1)",))
    blocker.start()
    time.sleep(0.2)
    threads = []
    for i in range(6):  # queued while the session is busy, 50 ms apart
        thread = threading.Thread(target=session.execute, args=(f"order.append({i})",))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)
    for thread in [blocker, *threads]:
        thread.join()
    assert session.execute("order").text == str(list(range(6)))


def test_an_idle_kernel_is_paused_and_resumed_transparently(tmp_path: Path, wb: Workbench) -> None:
    idle = Workbench(home=tmp_path, idle_timeout=1.5, docker_client=wb.docker)
    try:
        session = idle.create(user_id="alice")
        session.execute("x = 1")
        session.files.write("kept.txt", b"still here")
        # a cell running longer than the idle timeout is not taken for idle
        assert session.execute("import time; time.sleep(4); x").text == "1"
        container_id = session._kernel.sandbox.id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (idle.store.get(session.session_id).kernel is not None
                                               or wb.docker.containers.list(all=True, filters={"id": container_id})):
            time.sleep(0.2)
        assert idle.store.get(session.session_id).kernel is None, "the reaper did not stop the idle kernel"
        assert not wb.docker.containers.list(all=True, filters={"id": container_id})
        assert [r.session_id for r in idle.list(user_id="alice")] == [session.session_id]  # still open
        assert session.paused
        result = session.execute("open('kept.txt').read()")
        assert result.text == "'still here'" and result.state_restored and not result.state_lost
        assert session.execute("x").text == "1"
        session.close()
    finally:
        idle.close()


def test_gc_removes_orphans_and_keeps_live_kernels(tmp_path: Path, wb: Workbench) -> None:
    first = Workbench(home=tmp_path, idle_timeout=None, docker_client=wb.docker)
    live, closed_in_store = first.create(user_id="alice"), first.create(user_id="alice")
    live.execute("y = 5")
    # a process died before removing a closed session's container; a container of a session nobody knows
    first.store.set_status(closed_in_store.session_id, "closed")
    stray = Kernel(wb.backend, image=first.image, workspace=tmp_path / "stray", runtime_dir=tmp_path / "rt",
                   limits=first.limits, labels={"workbench.session": "nobody", "workbench.home": first.home_label})
    stray.start()
    first.close()
    second = Workbench(home=tmp_path, idle_timeout=None, docker_client=wb.docker)  # start-up gc
    try:
        removed = second.startup_gc.removed
        assert [line.split(": ")[1] for line in removed] == ["session closed"]
        # a running kernel the store does not know is left alone (an empty or restored store), and reported
        assert [line.split(": ")[1] for line in second.startup_gc.unknown] == ["nobody"]
        labels = {"label": f"workbench.home={first.home_label}"}
        assert sorted(c.labels["workbench.session"] for c in wb.docker.containers.list(all=True, filters=labels)) == \
            sorted([live.session_id, "nobody"])
        assert second.use(live.session_id).execute("y").text == "5"
        assert second.gc().removed == []
        stray.sandbox.container.stop(timeout=0)  # once stopped, a container of an unknown session goes
        assert [line.split(": ")[1] for line in second.gc().removed] == ["session unknown, container exited"]
    finally:
        stray.shutdown()
        second.use(live.session_id).close()
        second.close()


def test_log_records_carry_the_session_id(session: Session, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="workbench"):
        session.execute("1")
    records = [r for r in caplog.records if r.name == "workbench.session"]
    assert records and all(r.session_id == session.session_id for r in records)


def test_async_twin(wb: Workbench, home: Path) -> None:
    async def main() -> None:
        async with AsyncWorkbench(home=home, docker_client=wb.docker) as awb:
            @awb.tool(slug="ASYNC_DOUBLE", toolkit="math")
            async def double(x: int) -> int:  # a coroutine tool works too
                return 2 * x

            sessions = await asyncio.gather(*(awb.create(user_id="async-user", toolkits=["math"]) for _ in range(3)))
            assert (await sessions[1].execute_tool("ASYNC_DOUBLE", {"x": 21})).data == 42
            assert [r.data for r in await sessions[1].execute_tools([("ASYNC_DOUBLE", {"x": 1})] * 2)] == [2, 2]
            loop_thread = threading.get_ident()
            seen: list[tuple[int, str]] = []
            results = await asyncio.gather(*(
                s.execute(f"print('hi from {i}')\n{i} * 2", on_stdout=lambda t: seen.append((threading.get_ident(), t)))
                for i, s in enumerate(sessions)))
            assert [r.text for r in results] == ["0", "2", "4"]
            assert sorted(t for _, t in seen) == ["hi from 0\n", "hi from 1\n", "hi from 2\n"]
            assert {ident for ident, _ in seen} == {loop_thread}  # callbacks run on the event loop
            await sessions[0].files.write("a.txt", b"async")
            assert await sessions[0].files.read("a.txt") == b"async"
            again = await awb.use(sessions[0].session_id)
            assert (await again.execute("open('a.txt').read()")).text == "'async'"
            await asyncio.gather(*(s.close(delete_workspace=True) for s in sessions))

    asyncio.run(main())


def test_a_stale_update_changes_neither_config_nor_disk(wb: Workbench) -> None:
    first = wb.create(user_id="test-user", limits={"workspace_size": "32m"})
    other = Workbench(home=wb.home, pool_size=0, idle_timeout=None)
    try:
        stale = other.use(first.session_id)
        first.update(toolkits=["fresh"])
        size = os.statvfs(first.workspace).f_blocks
        with pytest.raises(ConflictError):
            stale.update(limits={"workspace_size": "64m"}, restart_if_needed=True)
        assert os.statvfs(first.workspace).f_blocks == size
        assert first.execute("1 + 1").text == "2"  # the kernel was not stopped for a resize either
    finally:
        other.close()
        first.close(delete_workspace=True)


def test_a_restart_from_another_process_waits_for_the_running_cell(wb: Workbench) -> None:
    """restart(), and an update that needs a new kernel, never cut off another process's cell: they wait for it
    (the cell ends with its result), and past `execute_timeout` they give up with SessionBusyError, changing
    nothing."""
    first = wb.create(user_id="test-user")
    other = Workbench(home=wb.home, pool_size=0, idle_timeout=None, execute_timeout=60)
    impatient = Workbench(home=wb.home, pool_size=0, idle_timeout=None, execute_timeout=0.5)
    try:
        first.execute("x = 1")
        patient, hasty = other.use(first.session_id), impatient.use(first.session_id)
        changes: list[Callable[[Session], object]] = [
            lambda s: s.restart(), lambda s: s.update(limits={"pids": 300}, restart_if_needed=True)]
        for change in changes:
            results: list[ExecutionResult] = []
            running = threading.Thread(target=lambda out=results: out.append(first.execute(
                "import pathlib, time\npathlib.Path('running').touch()\ntime.sleep(3)\nx")))
            running.start()
            deadline = time.monotonic() + 60
            while not first.files.exists("running") and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(SessionBusyError):
                change(hasty)
            assert wb.store.get(first.session_id).config.limits.pids != 300  # the timed-out update changed nothing
            change(patient)
            running.join()
            assert results and results[0].ok and results[0].text == "1", results  # ran to its end, variables intact
            assert first.execute("x").error is not None  # then the kernel was new
            first.files.remove("running")
            first.execute("x = 1")
        assert wb.store.get(first.session_id).config.limits.pids == 300
    finally:
        other.close()
        impatient.close()
        first.close(delete_workspace=True)

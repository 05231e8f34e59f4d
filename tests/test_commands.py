"""Shell commands in a session's sandbox (`session.commands.run`), against the real engine and kernel."""
from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
import pytest
from host_probes import memory, reset_peak_memory

from workbench import (
    AsyncWorkbench,
    CommandResult,
    DockerUnavailableError,
    PathOutsideWorkspaceError,
    Session,
    SessionClosedError,
    SessionError,
    Workbench,
)
from workbench.sandbox import SANDBOX_UID

# Every process of the container, one per line: pid, real gid and command line (no ps in the image).
PROCESSES = ("for p in /proc/[0-9]*; do g=$(grep -s '^Gid:' $p/status | cut -f2); "
             "c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); [ -n \"$g\" ] && echo \"${p#/proc/} $g $c\"; done")


def processes(session: Session) -> list[str]:
    """The command lines of the processes running in the session's container now (not the scan's own)."""
    result = session.commands.run(PROCESSES)
    assert result.ok, result
    own = {line.split()[1] for line in result.stdout.splitlines() if "/proc/[0-9]*" in line}
    return [line.split(" ", 2)[2] for line in result.stdout.splitlines()
            if len(line.split(" ", 2)) == 3 and line.split()[1] not in own]


def test_exit_codes_and_separate_streams(session: Session) -> None:
    ok = session.commands.run("true")
    assert isinstance(ok, CommandResult) and ok.exit_code == 0 and ok.ok and not ok.timed_out
    assert (ok.stdout, ok.stderr, str(ok)) == ("", "", "exit code: 0")
    failed = session.commands.run("echo out; echo err >&2; exit 3")
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    assert not failed.ok and str(failed) == "exit code: 3\nstdout:\nout\nstderr:\nerr"
    missing = session.commands.run("no-such-command --flag")
    assert missing.exit_code == 127 and "command not found" in missing.stderr and missing.stdout == ""
    assert session.commands.run("kill -TERM $$").exit_code == 128 + 15
    assert session.commands.run("echo $0").stdout == "/bin/bash\n"


def test_stdin_is_closed(session: Session) -> None:
    started = time.monotonic()
    result = session.commands.run("cat; read line; echo read=$?", timeout=20)
    assert result.exit_code == 0 and result.stdout == "read=1\n" and result.stderr == ""
    assert time.monotonic() - started < 5
    assert session.commands.run("readlink /proc/self/fd/0").stdout == "/dev/null\n"


def test_env_and_cwd(session: Session) -> None:
    result = session.commands.run('echo "$GREETING|$EMPTY|$HOME"; pwd', env={"GREETING": "héllo wörld €", "EMPTY": ""})
    assert result.stdout == "héllo wörld €||/tmp\n/workspace\n", result
    assert session.commands.run("mkdir -p sub/dir && touch sub/dir/here").ok
    assert session.commands.run("pwd; ls", cwd="sub/dir").stdout == "/workspace/sub/dir\nhere\n"
    assert session.commands.run("pwd", cwd="/workspace/sub").stdout == "/workspace/sub\n"
    assert session.commands.run("pwd", cwd="sub/dir/../..").stdout == "/workspace\n"
    assert session.commands.run("pwd", cwd="/workspace").stdout == "/workspace\n"
    missing = session.commands.run("pwd", cwd="not/there")
    assert missing.exit_code == 1 and "not/there: No such file or directory" in missing.stderr and not missing.stdout
    for outside in ("..", "../etc", "/etc", "/workspace/../etc", "sub/../../tmp", "/", "//workspace"):
        with pytest.raises(PathOutsideWorkspaceError, match="leaves the workspace"):
            session.commands.run("pwd", cwd=outside)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cmd": ""}, "must not be empty"),
    ({"cmd": "  \n"}, "must not be empty"),
    ({"cmd": b"ls"}, "must be a str"),
    ({"cmd": "echo a\0b"}, "NUL"),
    ({"cmd": "echo \udc80"}, "UTF-8"),
    ({"cmd": "#" * 200_000}, "at most 131,071 bytes"),
    ({"timeout": 0}, "more than 0"),
    ({"timeout": -1}, "more than 0"),
    ({"timeout": math.inf}, "more than 0"),
    ({"timeout": math.nan}, "more than 0"),
    ({"timeout": 10**9}, "at most 86400"),
    ({"timeout": True}, "number of seconds"),
    ({"timeout": "5"}, "number of seconds"),
    ({"env": {"1X": "v"}}, "not a variable name"),
    ({"env": {"A-B": "v"}}, "not a variable name"),
    ({"env": {"A=B": "v"}}, "not a variable name"),
    ({"env": {"": "v"}}, "not a variable name"),
    ({"env": {3: "v"}}, "a int is not a variable name"),
    ({"env": {"X": 3}}, "must be a str"),
    ({"env": {"X": "a\0b"}}, "NUL"),
    ({"env": {f"V{i}": "" for i in range(300)}}, "at most 256 variables"),
    ({"env": {f"V{i}": "x" * 100_000 for i in range(6)}}, "over the 524,288 allowed"),
    ({"env": [("X", "1")]}, "must be a dict"),
    ({"cwd": 3}, "cwd must be a str"),
    ({"cwd": "a\0b"}, "without NUL"),
])
def test_arguments_are_checked_before_anything_runs(session: Session, kwargs: dict, message: str) -> None:
    arguments = {"cmd": "touch /workspace/should-not-exist", **kwargs}
    with pytest.raises(SessionError, match=message):
        session.commands.run(arguments.pop("cmd"), **arguments)
    assert not session.files.exists("should-not-exist")


def test_runs_as_the_sandbox_uid_in_the_kernels_container_and_its_limits(session: Session) -> None:
    assert session.commands.run("id -u").stdout == f"{SANDBOX_UID}\n"
    assert session.commands.run("ls /sys/class/net").stdout == "lo\n"  # network none: loopback only
    refused = session.commands.run("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), 3)\"")
    assert refused.exit_code == 1 and "Network is unreachable" in refused.stderr
    limit = session.commands.run("cat /sys/fs/cgroup/memory.max 2>/dev/null || "
                                 "cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert int(limit.stdout) == session.limits.memory
    # the kernel's cgroup (the container's init is PID 1), so the command shares its memory, CPU and pids
    assert session.commands.run("diff /proc/self/cgroup /proc/1/cgroup && echo same").stdout == "same\n"
    status = session.commands.run("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status").stdout
    assert status.split() == ["CapEff:", "0000000000000000", "CapBnd:", "0000000000000000", "NoNewPrivs:", "1"]
    read_only = session.commands.run("touch /usr/x")
    assert read_only.exit_code == 1 and "Read-only file system" in read_only.stderr
    assert session.commands.run("echo made > made.txt").ok  # the workspace is the kernel's, files shared
    assert session.execute("open('made.txt').read()").text == "'made\\n'"


def test_timeout_kills_the_command_and_every_child_but_not_the_kernel(fresh: Session) -> None:
    fresh.execute("import subprocess\nkept = 41\nchild = subprocess.Popen(['sleep', '3999'])")
    escapes = (
        "sleep 3001 & "  # a plain background child
        "setsid sleep 3002 & "  # a new session and process group
        "(sleep 3003 &) ; "  # a double fork: reparented to the container's init
        "nohup sleep 3004 > /dev/null 2>&1 & "  # detached, its output redirected
        # double fork, new session, environment wiped, renamed, closes its fds and ignores SIGTERM and SIGHUP
        "python3 -c 'import os, signal\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.closerange(0, 1000)\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "        os.execve(\"/bin/sleep\", [\"sleep\", \"3005\"], {})\n' ; "
        "echo started; sleep 3000"
    )
    before = set(processes(fresh))
    started = time.monotonic()
    seen: list[str] = []
    result = fresh.commands.run(escapes, timeout=2, on_stdout=seen.append)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code is None and not result.ok, result
    assert result.stdout == "started\n" and seen == ["started\n"]
    assert 2 <= elapsed < 2 + 3, elapsed
    assert str(result).startswith("timed out after") and "the command and its children were killed" in str(result)
    left = set(processes(fresh)) - before
    assert not [line for line in left if "sleep 300" in line], left
    assert any("sleep 3999" in line for line in processes(fresh))  # the kernel's own child is untouched
    assert fresh.execute("kept + 1").text == "42"  # the kernel too, its variables kept
    assert fresh.execute("child.poll()").text is None


def test_leftovers_holding_the_output_are_killed_when_the_command_ends(fresh: Session) -> None:
    started = time.monotonic()
    result = fresh.commands.run("sleep 1001 & sleep 1002 | cat & echo started", timeout=30)
    assert time.monotonic() - started < 1.8  # the engine alone would hold the stream 2 s after the exit
    assert result.exit_code == 0 and result.stdout == "started\n" and not result.timed_out
    assert not [line for line in processes(fresh) if "sleep 100" in line]
    # a child that let go of the command's output is the session's now: it keeps running
    detached = fresh.commands.run("nohup sleep 1003 > /dev/null 2>&1 & echo $!")
    assert detached.ok and [line for line in processes(fresh) if "sleep 1003" in line]
    assert fresh.commands.run(f"kill {detached.stdout.strip()}").ok


def test_a_command_runs_while_a_cell_runs(session: Session) -> None:
    cell: list[object] = []
    thread = threading.Thread(target=lambda: cell.append(session.execute(
        "import time\ntime.sleep(4)\n'cell done'")))
    thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        result = session.commands.run("echo during the cell")
        assert result.stdout == "during the cell\n" and time.monotonic() - started < 2
        assert thread.is_alive()  # the cell still runs: the command did not wait for it
    finally:
        thread.join()
    assert cell[0].text == "'cell done'" and cell[0].ok


def test_big_output_is_bounded_and_spilled(fresh: Session) -> None:
    reset_peak_memory()
    before = memory("VmHWM")
    result = fresh.commands.run("head -c 50000000 /dev/zero | tr '\\0' a; echo tail-marker", timeout=120)
    grown = memory("VmHWM") - before
    assert result.ok, str(result)[:300]
    assert len(result.stdout) < 1_100_000 and result.truncated["stdout"] > 48_000_000
    assert result.stdout.startswith("aaa") and result.stdout.endswith("tail-marker\n")
    spilled = result.spilled["stdout"]
    assert spilled.startswith(".outputs/") and spilled.endswith(".cmd.stdout.txt")
    assert f"/workspace/{spilled}" in result.stdout  # the account says where all of it is
    assert fresh.files.list(spilled)[0].size == 50_000_000 + len("tail-marker\n")
    assert fresh.commands.run(f"tail -c 12 {spilled}").stdout == "tail-marker\n"
    assert grown < 150 * 2**20, f"the host grew by {grown / 2**20:.0f} MiB"


def test_callbacks_stream_output_as_it_comes_and_utf8_is_decoded_across_chunks(session: Session) -> None:
    seen: list[tuple[float, str, str]] = []
    started = time.monotonic()
    result = session.commands.run(
        "echo first; printf 'caf\\xc3' ; sleep 0.3; printf '\\xa9 \\xe2\\x82'; sleep 0.3; printf '\\xac\\n'; "
        "echo oops >&2; sleep 1.5; echo last; printf '\\xff\\n'",
        on_stdout=lambda text: seen.append((time.monotonic() - started, "out", text)),
        on_stderr=lambda text: seen.append((time.monotonic() - started, "err", text)))
    assert result.stdout == "first\ncafé €\nlast\n\ufffd\n" and result.stderr == "oops\n"
    assert "".join(text for _, kind, text in seen if kind == "out") == result.stdout
    assert "\ufffd" not in "".join(text for _, _, text in seen)[:-2]  # no split character became garbage
    assert seen[0][2].startswith("first\n") and seen[0][0] < result.duration - 1.5  # long before the end


def test_a_session_without_a_running_kernel_gets_one(wb: Workbench, home: Path, tmp_path: Path) -> None:
    first = wb.create(user_id="test-user")
    try:
        first.execute("x = 1")
        other = Workbench(home=home, docker_client=wb.docker, pool_size=0, idle_timeout=None)
        try:  # wb.use of another Workbench: not attached yet; the running kernel is used as it is
            assert other.use(first.session_id).commands.run("echo attached").stdout == "attached\n"
        finally:
            other.close()
        assert first.execute("x").text == "1"
        wb.docker.containers.get(wb.store.get(first.session_id).kernel.sandbox_id).remove(force=True)
        result = first.commands.run("echo new kernel")  # the store's kernel is gone: a new one starts
        assert result.ok and result.stdout == "new kernel\n"
        after = first.execute("'x' in dir()")
        assert after.state_lost and after.text == "False"
    finally:
        first.close()
    idle = Workbench(home=tmp_path, idle_timeout=1.0, docker_client=wb.docker, pool_size=0)
    try:
        stopped = idle.create(user_id="test-user")
        deadline = time.monotonic() + 20
        while idle.store.get(stopped.session_id).kernel is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert idle.store.get(stopped.session_id).kernel is None, "the idle reaper did not stop the kernel"
        assert stopped.commands.run("echo after the reaper").stdout == "after the reaper\n"
        assert idle.store.get(stopped.session_id).kernel is not None
        stopped.close()
    finally:
        idle.close()


def test_the_idle_reaper_leaves_a_running_command_and_a_cell_beside_it_alone(wb: Workbench, tmp_path: Path) -> None:
    idle = Workbench(home=tmp_path, idle_timeout=1.0, docker_client=wb.docker, pool_size=0)
    try:
        s = idle.create(user_id="test-user")
        long = s.commands.run("sleep 3; echo still here", timeout=30)
        assert long.ok and long.stdout == "still here\n"
        # a command logged while a cell runs does not clear the cell's busy mark
        cell: list[object] = []
        thread = threading.Thread(target=lambda: cell.append(s.execute("import time\ntime.sleep(4)\n'done'")))
        thread.start()
        time.sleep(0.3)
        assert s.commands.run("true").ok
        thread.join()
        assert cell[0].text == "'done'" and cell[0].kernel_died is None and not cell[0].state_lost
        s.close()
    finally:
        idle.close()


def test_every_command_is_logged(fresh: Session) -> None:
    fresh.commands.run("true")
    fresh.commands.run("exit 4", cwd=".")
    fresh.commands.run("sleep 10", timeout=0.5)

    def boom(text: str) -> None:
        raise RuntimeError("the caller's callback failed")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="callback failed"):
        fresh.commands.run("echo x; sleep 1004", on_stdout=boom)
    assert time.monotonic() - started < 5
    assert not [line for line in processes(fresh) if "sleep 1004" in line]  # killed when the caller raised
    long = "echo " + "y" * 20_000
    fresh.commands.run(long, cwd="/workspace/")
    entries = [e for e in fresh.logs() if e.kind == "command" and e.detail["command"] != PROCESSES]
    assert [e.status for e in entries] == ["ok", "error", "timeout", "failed", "ok"]
    assert entries[0].detail == {"command": "true", "exit_code": 0, "cwd": "/workspace", "error": None}
    assert entries[1].detail["exit_code"] == 4
    assert entries[2].detail["exit_code"] is None and entries[2].duration >= 0.5
    assert entries[3].detail["error"] == "RuntimeError: the caller's callback failed"
    assert entries[4].detail["command"] == long[:10_000]


def test_a_closed_session_and_an_unreachable_engine_are_clear_errors(wb: Workbench, home: Path) -> None:
    s = wb.create(user_id="test-user")
    primer = wb.create(user_id="test-user")
    other = Workbench(home=home, docker_client=wb.docker, pool_size=0, idle_timeout=None)
    try:
        other.use(primer.session_id)  # (what a session object needs of the engine is looked up once)
        other.backend.client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
        elsewhere = other.use(s.session_id)  # a session object takes its engine from its workbench
        with pytest.raises(DockerUnavailableError, match="Docker engine"):
            elsewhere.commands.run("true")
        assert [e.status for e in wb.store.logs(s.session_id) if e.kind == "command"] == ["failed"]
        with Workbench(home=home, docker_client=wb.docker, pool_size=0, idle_timeout=None) as third:
            third.backend.client = other.backend.client
            with pytest.raises(DockerUnavailableError, match="Docker engine"):  # not a raw requests error
                third.use(s.session_id)
        other.backend.client = wb.docker
        s.close()
        with pytest.raises(SessionClosedError):
            s.commands.run("true")
        with pytest.raises(SessionClosedError):  # closed by another process: the store says so
            elsewhere.commands.run("true")
    finally:
        other.close()
        primer.close()


def test_async_twin(wb: Workbench, home: Path) -> None:
    async def main() -> None:
        async with AsyncWorkbench(home=home, docker_client=wb.docker, pool_size=0) as awb:
            s = await awb.create(user_id="test-user")
            loop_thread = threading.get_ident()
            seen: list[tuple[int, str]] = []

            async def on_stderr(text: str) -> None:
                seen.append((threading.get_ident(), text))

            results = await asyncio.gather(
                s.commands.run("echo one; sleep 0.5", on_stdout=lambda t: seen.append((threading.get_ident(), t))),
                s.commands.run("echo two >&2; exit 2", on_stderr=on_stderr),
                s.commands.run("sleep 5", timeout=0.5))
            assert [(r.exit_code, r.timed_out) for r in results] == [(0, False), (2, False), (None, True)]
            await asyncio.sleep(0.1)  # coroutine callbacks are scheduled on the loop
            assert sorted(t for _, t in seen) == ["one\n", "two\n"]
            assert {ident for ident, _ in seen} == {loop_thread}
            await s.close(delete_workspace=True)

    asyncio.run(main())


def test_cli_sh_streams_and_exits_with_the_commands_code(wb: Workbench, home: Path) -> None:
    s = wb.create(user_id="test-user")
    env = {**os.environ, "WORKBENCH_HOME": str(home)}

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "workbench", "sh", s.session_id, *args], capture_output=True,
                              text=True, env=env, timeout=120)

    try:
        failed = sh("echo out; echo err >&2; exit 3")
        assert (failed.returncode, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
        assert sh("mkdir -p d && echo ok").returncode == 0
        assert sh("pwd", "--cwd", "d").stdout == "/workspace/d\n"
        timed_out = sh("echo before; sleep 30", "--timeout", "1")
        assert timed_out.returncode == 124 and timed_out.stdout == "before\n" and "timed out" in timed_out.stderr
        refused = sh("pwd", "--cwd", "../etc")
        assert refused.returncode == 1 and "leaves the workspace" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        s.close()

"""Hostile shell commands: output floods, slow readers, fork bombs, processes that shed their marks or fight the
killer. After the timeout none of a command's processes is left, the host stays bounded and the kernel lives on."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from host_probes import memory, reset_peak_memory

from workbench import Session, Workbench
from workbench.sandbox import SANDBOX_UID

PROCESSES = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"


def left(session: Session, marker: str) -> list[str]:
    """Command lines of the container's processes holding `marker`, other than the scan's own."""
    result = session.commands.run(PROCESSES)
    assert result.ok, result
    return [line for line in result.stdout.splitlines() if marker in line and "/proc/[0-9]*" not in line]


@pytest.fixture
def small(wb: Workbench) -> Iterator[Session]:
    """A session with a 64 MiB workspace and 64 pids."""
    s = wb.create(user_id="test-user", limits={"workspace_size": "64m", "pids": 64})
    s.execute("kept = 'still here'")
    yield s
    s.close()


def test_an_output_flood_is_cut_at_the_timeout_with_the_host_bounded(small: Session) -> None:
    reset_peak_memory()
    before = memory("VmHWM")
    started = time.monotonic()
    result = small.commands.run("yes flood", timeout=4)
    elapsed = time.monotonic() - started
    grown = memory("VmHWM") - before
    assert result.timed_out and 4 <= elapsed < 4 + 4, elapsed
    assert result.truncated["stdout"] > 10_000_000 and len(result.stdout) < 1_100_000
    assert result.stdout.startswith("flood\nflood\n")
    assert grown < 150 * 2**20, f"the host grew by {grown / 2**20:.0f} MiB"
    # the spill filled the 64 MiB workspace and was dropped whole: no partial file is left behind
    assert "stdout" not in result.spilled
    assert not [f.path for f in small.files.list(".", recursive=True) if f.type == "file" and f.size > 2**20]
    assert not left(small, "yes flood")
    assert small.execute("kept").text == "'still here'"


def test_a_slow_reader_is_not_stalled_past_the_timeout(small: Session) -> None:
    calls = 0

    def slow(text: str) -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.05)

    started = time.monotonic()
    result = small.commands.run("yes slow", timeout=2, on_stdout=slow)
    assert result.timed_out and time.monotonic() - started < 2 + 3 + 1
    assert calls > 5


def test_a_fork_bomb_is_killed_and_the_kernel_survives(small: Session) -> None:
    bomb = "python3 -c 'import os  # fork-bomb\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n'"
    started = time.monotonic()
    result = small.commands.run(bomb, timeout=3)
    assert result.timed_out and time.monotonic() - started < 3 + 12
    assert not left(small, "fork-bomb")
    assert small.execute("kept").text == "'still here'"


def test_a_command_cannot_shed_its_group(small: Session) -> None:
    probe = ("python3 -c 'import os\n"
             f"for name, call in [(\"setgid\", lambda: os.setgid({SANDBOX_UID})), (\"setgroups\", lambda: "
             f"os.setgroups([{SANDBOX_UID}])), (\"setresgid\", lambda: os.setresgid({SANDBOX_UID}, {SANDBOX_UID}, "
             f"{SANDBOX_UID}))]:\n"
             "    try:\n"
             "        call(); print(name, \"worked\")\n"
             "    except PermissionError:\n"
             "        print(name, \"refused\")\n"
             "print(os.getgid() != os.getuid())'")
    result = small.commands.run(probe)
    assert result.stdout == "setgid refused\nsetgroups refused\nsetresgid refused\nTrue\n", result


def test_a_command_that_fights_the_killer_is_killed_from_the_host(small: Session) -> None:
    # A detached process of the command kills every other process of its group that looks like the killer (a
    # python3 -I -S), as soon as it appears; the command's other processes wait to be killed.
    fighter = """python3 -c 'import os, time  # fighter
gid = os.getgid()
if os.fork() == 0:
    os.setsid()
    while True:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                line = open("/proc/" + pid + "/cmdline", "rb").read()
                group = open("/proc/" + pid + "/status").read().split("Gid:")[1].split()[0]
            except (OSError, IndexError):
                continue
            if group == str(gid) and b"-I\\0-S" in line:
                try:
                    os.kill(int(pid), 9)
                except OSError:
                    pass
time.sleep(1000)
' & sleep 2000"""
    result = small.commands.run(fighter, timeout=2)
    assert result.timed_out
    assert not left(small, "fighter") and not left(small, "sleep 2000")
    assert small.execute("kept").text == "'still here'"

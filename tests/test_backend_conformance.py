"""What every sandbox backend must do, on the real thing: launch, execute, interrupt, change limits live, report a
death, run processes beside the kernel and kill them, be attached from another process, list what it manages.

Runs for each backend named in WORKBENCH_TEST_BACKENDS (comma-separated; default "docker"), so a third party's
backend can be checked with this module as it is.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workbench import Workbench
from workbench.backends import Backend, Sandbox, SandboxGone, SandboxSpec, load_backend
from workbench.config import Limits
from workbench.sandbox import SANDBOX_UID, WORKSPACE, prepare_dir, private_dir

BACKENDS = [name.strip() for name in os.environ.get("WORKBENCH_TEST_BACKENDS", "docker").split(",") if name.strip()]
IDLE = ["python3", "-c", "import time\nwhile True: time.sleep(60)"]
MIB = 1 << 20


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, wb: Workbench) -> Backend:
    options = {"client": wb.docker} if request.param == "docker" else {}
    return load_backend(request.param, **options)


@pytest.fixture
def launch(backend: Backend, wb: Workbench, tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(backend, wb.image, tmp_path)
    yield launcher
    for sandbox in launcher.launched:
        sandbox.destroy()


class Launcher:
    """Launches sandboxes of the kernel image with a command of the test's choosing, labelled for this test."""

    def __init__(self, backend: Backend, image: str, root: Path) -> None:
        self.backend = backend
        self.image, self.mounts = backend.pin_image(image)
        self.root = root
        self.labels = {"workbench.home": f"conformance-{secrets.token_hex(4)}"}
        self.launched: list[Sandbox] = []
        private_dir(root / "host")

    def __call__(self, command: list[str] = IDLE, limits: Limits | None = None) -> Sandbox:
        name = f"conformance-{secrets.token_hex(4)}"
        workspace, runtime = self.root / "host" / f"{name}-ws", self.root / "host" / f"{name}-run"
        prepare_dir(workspace)
        prepare_dir(runtime)
        sandbox = self.backend.launch(SandboxSpec(
            name=name, image=self.image, command=command, limits=limits or Limits(), labels=self.labels,
            workspace=workspace, runtime_dir=runtime, read_only_mounts=self.mounts))
        self.launched.append(sandbox)
        return sandbox


def run(sandbox: Sandbox, script: str, gid: int = SANDBOX_UID, timeout: float = 30) -> tuple[str, int | None]:
    process = sandbox.exec(["sh", "-c", script], uid=SANDBOX_UID, gid=gid, workdir=WORKSPACE)
    try:
        output, code = process.collect(time.monotonic() + timeout, limit=1 << 16)
    finally:
        process.close()
    return output.decode(), code


def count(sandbox: Sandbox, gid: int) -> int:
    """The sandbox's live processes whose real gid is `gid`."""
    script = f'grep -l "^Gid:[[:space:]]*{gid}[[:space:]]" /proc/[0-9]*/status 2>/dev/null | while read f; do ' \
             'grep -q "^State:[[:space:]]*Z" "$f" || echo; done | wc -l'
    return int(run(sandbox, script)[0])


def wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_launched_sandbox_runs_processes_beside_its_command(launch: Launcher) -> None:
    sandbox = launch()
    assert sandbox.exit_reason() is None
    output, code = run(sandbox, "echo out; echo err >&2; id -u; pwd; exit 3")
    assert code == 3
    assert sorted(output.split()) == sorted(["out", "err", str(SANDBOX_UID), WORKSPACE])  # two streams: any order


def test_a_process_streams_its_output_as_it_comes(launch: Launcher) -> None:
    sandbox = launch()
    process = sandbox.exec(["sh", "-c", "echo first; sleep 5; echo second"], uid=SANDBOX_UID, gid=SANDBOX_UID,
                           workdir=WORKSPACE)
    seen: list[bytes] = []
    try:
        deadline = time.monotonic() + 4
        while not seen and time.monotonic() < deadline:
            process.pump(0.5, {1: seen.append, 2: seen.append})
        assert b"".join(seen) == b"first\n"  # before the process ended
        assert process.poll()[0] is True
    finally:
        process.close()


def test_processes_of_a_group_are_killed_from_outside(launch: Launcher) -> None:
    sandbox = launch()
    gid = 1_234_567_890
    starter = sandbox.exec(["sh", "-c", "setsid sleep 1000 & setsid sleep 1000 & sleep 1000"], uid=SANDBOX_UID,
                           gid=gid, workdir=WORKSPACE)
    try:
        wait_for(lambda: count(sandbox, gid) >= 3)  # the three sleeps (and the shell, while it waits)
        assert sandbox.kill_processes(gid) is True
        wait_for(lambda: not starter.poll()[0])
        assert count(sandbox, gid) == 0
        assert sandbox.exit_reason() is None  # the sandbox's own command is untouched
    finally:
        starter.close()


def test_limits_change_while_it_runs(launch: Launcher) -> None:
    sandbox = launch(limits=Limits(memory=512 * MIB, cpus=1.0))
    limit = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    assert int(run(sandbox, limit)[0]) == 512 * MIB
    sandbox.update_limits(Limits(memory=300 * MIB, cpus=0.5))
    assert int(run(sandbox, limit)[0]) == 300 * MIB


def test_an_interrupt_reaches_the_command(launch: Launcher) -> None:
    sandbox = launch(["python3", "-c", "import time\ntry:\n    time.sleep(600)\nexcept KeyboardInterrupt:\n"
                      "    open('/workspace/interrupted', 'w').close()\n    time.sleep(600)\n"])
    time.sleep(1)  # the command is in its sleep
    sandbox.interrupt()
    wait_for(lambda: run(sandbox, "ls /workspace")[0].split() == ["interrupted"])


def test_a_death_is_reported_and_a_destroyed_sandbox_is_gone(launch: Launcher, backend: Backend) -> None:
    sandbox = launch(["python3", "-c", "import os, time\ntime.sleep(1)\nos._exit(7)"])
    wait_for(lambda: sandbox.exit_reason() is not None)
    assert "7" in (sandbox.exit_reason() or "")
    with pytest.raises(SandboxGone):
        run(sandbox, "true")
    assert sandbox.destroy() is True
    assert sandbox.destroy() is False
    assert backend.attach(sandbox.id) is None
    with pytest.raises(SandboxGone):
        backend.sandbox(sandbox.id).exec(["true"], uid=SANDBOX_UID, gid=SANDBOX_UID, workdir=WORKSPACE)
    assert backend.destroy(sandbox.id) is False


ATTACH = """
import sys
from workbench.backends import load_backend
from workbench.sandbox import SANDBOX_UID, WORKSPACE
sandbox = load_backend(sys.argv[1]).attach(sys.argv[2])
process = sandbox.exec(["sh", "-c", "echo attached; exit 5"], uid=SANDBOX_UID, gid=SANDBOX_UID, workdir=WORKSPACE)
output, code = process.collect(float("inf"))
print(sandbox.exit_reason(), output.decode().strip(), code)
"""


def test_another_process_attaches_by_id(launch: Launcher, backend: Backend) -> None:
    sandbox = launch()
    proc = subprocess.run([sys.executable, "-c", ATTACH, backend.name, sandbox.id], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "attached", "5"]


def test_the_backend_lists_what_it_manages_by_label(launch: Launcher, backend: Backend) -> None:
    running, dead = launch(), launch(["true"])
    wait_for(lambda: dead.exit_reason() is not None)
    listed = {sandbox.id: sandbox for sandbox in backend.list_managed(launch.labels)}
    assert set(listed) == {running.id, dead.id}
    assert listed[running.id].live and not listed[dead.id].live
    assert listed[running.id].runtime_source is not None and listed[running.id].age >= 0
    assert backend.list_managed({"workbench.home": "no-such-home"}) == []


def test_a_workbench_on_the_backend_executes_interrupts_and_recovers(backend: Backend, tmp_path: Path) -> None:
    """The kernel in its sandbox, through the Workbench: a cell, an interrupt that keeps the variables, a shell
    command beside it, and a kernel killed from inside that comes back, with state_lost."""
    with Workbench(home=tmp_path / "home", backend=backend, pool_size=0, idle_timeout=None) as bench:
        s = bench.create(user_id="conformance")
        assert s.execute("x = 6 * 7; x").text == "42"
        slow = s.execute("import time; time.sleep(60)", timeout=1)
        assert slow.timed_out and slow.error is not None and slow.error.ename == "KeyboardInterrupt"
        assert s.execute("x").text == "42"
        assert s.commands.run("echo $((x + 1)) from the shell", env={"x": "41"}).stdout == "42 from the shell\n"
        died = s.execute("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        assert died.kernel_died is not None and died.state_lost
        assert s.execute("'x' in globals()").text == "False"
        s.close(delete_workspace=True)

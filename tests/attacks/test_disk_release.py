"""What the host mounts for a session goes when the session or its kernel does, and never while another kernel needs
it: a runtime dir per kernel (gc releasing a stopped kernel's dir cannot touch its successor's), no image left
mounted by a create that failed or a session closed behind gc's back, the plain-folder watchdog running on its own,
and host writes that reserve room under the budget's lock but write outside it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from workbench import Workbench
from workbench import files as files_module
from workbench.errors import DockerUnavailableError, StoreError
from workbench.workspace import _probe, is_mount, mounts_under, release_runtime_dir

root_only = pytest.mark.skipif(not _probe(None)[0], reason="no per-session filesystems here: " + _probe(None)[1])


@pytest.fixture
def own(tmp_path: Path, wb: Workbench, monkeypatch: pytest.MonkeyPatch):
    """A workbench with a home and a runtime root of its own (other test runs share the default runtime root)."""
    monkeypatch.setenv("WORKBENCH_RUNTIME_DIR", str(tmp_path / "rt"))
    bench = Workbench(home=tmp_path / "home", idle_timeout=None, pool_size=0, docker_client=wb.docker)
    try:
        yield bench
    finally:
        for record in bench.store.list():
            bench.use(record.session_id).close(delete_workspace=True)
        bench.close()


@root_only
def test_releasing_a_stopped_kernels_runtime_dir_leaves_the_next_kernels_alone(own: Workbench) -> None:
    s = own.create(user_id="alice")
    assert s.execute("x = 1").error is None
    stopped, stopped_dir = s._kernel.kernel_id, s._kernel.runtime_dir
    assert stopped_dir.name == f"{s.session_id}-{stopped}"
    # the reaper stops the kernel (store first, then its container) ...
    assert own.store.release_kernel(s.session_id, stopped)
    own._remove_containers(s.session_id, stopped)
    # ... meanwhile the session's next use (here, or in another process) starts a new kernel ...
    assert s.execute("1 + 1").text == "2"
    # ... and then the reaper releases the runtime dir of the kernel it stopped
    release_runtime_dir(stopped_dir)
    own.gc()
    assert s._kernel.runtime_dir != stopped_dir and is_mount(s._kernel.runtime_dir)
    assert (s._kernel.runtime_dir / "kernel").is_dir()
    assert s.execute("2 + 2").text == "4"
    assert own.store.get(s.session_id).kernel.kernel_id == s._kernel.kernel_id
    s.close()
    assert not os.listdir(own.runtime_root)  # close releases every runtime dir the session had


@root_only
def test_gc_releases_the_runtime_dir_of_each_kernel_it_removes(own: Workbench) -> None:
    s = own.create(user_id="alice")
    first_dir = s._kernel.runtime_dir
    s._kernel.sandbox.container.stop(timeout=0)  # the kernel died; gc finds it
    report = own.gc()
    assert [line.split(": ")[1] for line in report.removed] == ["kernel exited"]
    assert not os.path.lexists(first_dir)
    assert s.execute("3").text == "3" and is_mount(s._kernel.runtime_dir)


@root_only
def test_a_create_that_fails_leaves_nothing_mounted(own: Workbench, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_container(*args: object, **kwargs: object) -> None:
        raise DockerUnavailableError("the engine went away")

    with monkeypatch.context() as patch:
        patch.setattr(own.backend, "launch", no_container)
        with pytest.raises(DockerUnavailableError):
            own.create(user_id="alice")
    assert mounts_under(tmp_path) == [] and os.listdir(own.runtime_root) == []
    assert os.listdir(own.home / "disks") in ([], [".lock"])

    def no_store(record: object) -> None:
        raise StoreError("the store is down")

    with monkeypatch.context() as patch:
        patch.setattr(own.store, "add", no_store)
        with pytest.raises(StoreError):
            own.create(user_id="alice")
    assert mounts_under(tmp_path) == []


@root_only
def test_a_failed_store_add_destroys_the_warm_kernels_workspace(tmp_path: Path, wb: Workbench,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("WORKBENCH_RUNTIME_DIR", str(tmp_path / "rt"))
    pooled = Workbench(home=tmp_path / "home", idle_timeout=None, pool_size=1, docker_client=wb.docker)
    try:
        pooled.pool.want(pooled.limits)
        deadline = time.monotonic() + 60
        while pooled.pool.count() < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pooled.pool.count() == 1
        pooled.pool._stopped = True  # no refill behind the test's back (a ready kernel is still handed out)

        def no_store(record: object) -> None:
            raise StoreError("the store is down")

        monkeypatch.setattr(pooled.store, "add", no_store)
        with pytest.raises(StoreError):
            pooled.create(user_id="alice")
        assert mounts_under(tmp_path) == [] and os.listdir(pooled.runtime_root) == []
        assert [n for n in os.listdir(pooled.home / "disks") if n.endswith(".img")] == []
    finally:
        pooled.close()


@root_only
def test_gc_unmounts_the_workspace_of_a_session_closed_behind_its_back(own: Workbench) -> None:
    s = own.create(user_id="alice")
    s.files.write("kept.txt", b"kept")
    # a process marked it closed and died before unmounting; its container is gone too
    own.store.set_status(s.session_id, "closed")
    own._remove_containers(s.session_id)
    assert is_mount(s.workspace)
    own.gc()
    assert not is_mount(s.workspace)
    assert (own.home / "disks" / f"{s.session_id}.img").exists()  # kept: only unmounted
    s._kernel.shutdown()
    s._kernel.disk.destroy()


WATCHDOG_ALONE = """
import json, os, sys, time
os.environ["WORKBENCH_DISK_QUOTA"] = "off"
import workbench.client
workbench.client.WATCH_INTERVAL = 0.2
from workbench import Workbench
out = {}
with Workbench(home=sys.argv[1], pool_size=0, idle_timeout=None) as wb:
    s = wb.create(user_id="filler", limits={"workspace_size": "5m"})
    out["kernel_wrote"] = s.execute("open('big', 'wb').write(b'x' * (12 << 20))").error is None
    deadline = time.monotonic() + 30
    while wb.store.get(s.session_id).kernel is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    out["stopped"] = wb.store.get(s.session_id).kernel is None
    s.close(delete_workspace=True)
print(json.dumps(out))
"""


def test_the_plain_folder_watchdog_runs_without_an_idle_timeout(wb: Workbench, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", WATCHDOG_ALONE, str(tmp_path / "home")], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"kernel_wrote": True, "stopped": True}


def test_host_writes_happen_outside_the_budget_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = files_module.Files(tmp_path / "ws", lambda: 64 << 20)
    budget = files._budget
    held: list[bool] = []
    real_write = os.write

    def watched(fd: int, data: bytes) -> int:
        if threading.current_thread() is writer_thread:
            held.append(budget.lock.locked())
        return real_write(fd, data)

    writer_thread = threading.current_thread()
    monkeypatch.setattr(files_module.os, "write", watched)
    files.write("big.bin", b"x" * (3 * files_module.CHUNK + 5))
    with files.writer("streamed.bin") as out:
        for _ in range(3):
            out.write(b"y" * 1000)
    monkeypatch.undo()
    assert held and not any(held)
    assert budget.reserved == 0 and budget.writers == 0
    assert files.usage() == 3 * files_module.CHUNK + 5 + 3000

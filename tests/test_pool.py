"""The warm pool: sessions take kernels started ahead of time, once each, per limits tier; leftovers are cleaned."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from workbench import Workbench
from workbench.pool import LABEL_POOL


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def containers(wb: Workbench) -> list:
    return wb.docker.containers.list(all=True, filters={"label": f"workbench.home={wb.home_label}"})


def test_sessions_take_warm_kernels_once_each(tmp_path: Path, wb: Workbench) -> None:
    pooled = Workbench(home=tmp_path, pool_size=2, idle_timeout=None, docker_client=wb.docker)
    try:
        first = pooled.create(user_id="alice")  # the default tier is asked for: it fills in the background
        wait_for(lambda: pooled.pool.count() == 2)
        ready = {c.id for c in containers(pooled) if LABEL_POOL in c.labels} - {first._kernel.sandbox.id}
        assert len(ready) == 2
        first.execute("secret = 'alice was here'")
        first.files.write("alice.txt", b"private")
        first.close(delete_workspace=True)

        second = pooled.create(user_id="bob")
        assert second._kernel.sandbox.id in ready  # a kernel started before the create call
        result = second.execute("import os\n(os.listdir('/workspace'), 'secret' in globals())")
        assert result.text == "([], False)"  # nothing of anyone else
        assert second.execute_tool("NOPE").error_kind == "not_found"
        assert pooled.store.get(second.session_id).kernel.sandbox_id == second._kernel.sandbox.id
        held = second._kernel.sandbox.id
        second.close()
        # a kernel is never handed out again: the pool refills with new containers
        wait_for(lambda: pooled.pool.count() == 2)
        assert held not in {c.id for c in containers(pooled)}
    finally:
        pooled.close()
    assert containers(pooled) == []  # closing the workbench removes its ready kernels
    # and their unused workspaces; the closed session's is kept, as asked
    assert [p.name for p in (tmp_path / "workspaces").iterdir()] == [second.session_id]


def test_each_limits_tier_has_its_own_kernels(tmp_path: Path, wb: Workbench) -> None:
    pooled = Workbench(home=tmp_path, pool_size=1, idle_timeout=None, docker_client=wb.docker)
    try:
        small = {"memory": "256m"}
        cold = pooled.create(user_id="alice", limits=small)
        wait_for(lambda: pooled.pool.count(pooled._limits(small)) == 1)
        assert pooled.pool.count(pooled.limits) == 0  # the default tier was never asked for
        warm = pooled.create(user_id="alice", limits=small)
        assert LABEL_POOL in warm._kernel.sandbox.container.labels and LABEL_POOL not in cold._kernel.sandbox.container.labels
        warm._kernel.sandbox.container.reload()
        assert warm._kernel.sandbox.container.attrs["HostConfig"]["Memory"] == 256 * 2**20
        cold.close()
        warm.close()
    finally:
        pooled.close()


OWNER = """
import os, sys, time
from workbench import Workbench
owner = Workbench(home=sys.argv[1], pool_size=1, idle_timeout=None)
owner.create(user_id="alice").close()
while owner.pool.count() < 1:
    time.sleep(0.05)
print("ready", flush=True)
sys.stdin.readline()
os._exit(0)  # dies without closing: its ready kernel is left behind
"""


def test_gc_removes_the_ready_kernels_of_a_workbench_that_is_gone(tmp_path: Path, wb: Workbench) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    neighbour = Workbench(home=tmp_path, pool_size=0, idle_timeout=None, docker_client=wb.docker)
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert neighbour.gc().removed == []  # the owner is alive: its ready kernel is kept
        assert [LABEL_POOL in c.labels for c in containers(neighbour)] == [True]
        owner.communicate("\n", timeout=30)
        assert [line.split(": ")[1] for line in neighbour.gc().removed] == ["warm pool of a workbench that is gone"]
        assert containers(neighbour) == []
    finally:
        if owner.poll() is None:
            owner.kill()
        neighbour.close()


def test_no_pool_when_its_size_is_zero(tmp_path: Path, wb: Workbench) -> None:
    cold = Workbench(home=tmp_path, pool_size=0, idle_timeout=None, docker_client=wb.docker)
    try:
        with cold.create(user_id="alice") as session:
            assert session.execute("1").text == "1"
            time.sleep(1)
            assert [c.id for c in containers(cold)] == [session._kernel.sandbox.id]
    finally:
        cold.close()

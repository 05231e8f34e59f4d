"""The swarm test cluster itself, on real engines: every node Ready, a global service with one task per node that the
host reaches, a killed task and a killed engine coming back, each node's own /srv/workbench, and nothing left behind
(by close(), and by cleanup_stale() after a run that died)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.models.services import Service
from docker.types import EndpointSpec, Mount, Resources, RestartPolicy, ServiceMode

from .conftest import say, wait_for
from .engines import MOUNT_POINT, NETNS_DIR, Cluster, _netns_id, cleanup_stale, leftovers

pytestmark = pytest.mark.timeout(900)  # the session fixture copies a 640 MB image to three engines on two cores

PORT = 8080
REPO = Path(__file__).resolve().parents[2]

# Run as root in a container on one node: what its /srv/workbench holds, and which engine answers on the socket there.
WHO_AM_I = """
import json, socket
print(open("/srv/workbench/whoami").read().strip())
open("/srv/workbench/written-by-container", "w").write("hello")
raw = socket.socket(socket.AF_UNIX)
raw.connect("/srv/workbench/docker.sock")
raw.sendall(b"GET /info HTTP/1.0\\r\\nHost: docker\\r\\n\\r\\n")
data = b""
while chunk := raw.recv(65536):
    data += chunk
info = json.loads(data.split(b"\\r\\n\\r\\n", 1)[1])
print(info["Swarm"]["NodeID"], info["Name"])
"""


def fetch(address: str, path: str = "/whoami", timeout: float = 3.0) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{PORT}{path}", timeout=timeout) as response:
            return str(response.read().decode())
    except OSError:
        return None


def node_id(cluster: Cluster, index: int) -> str:
    return str(cluster.client(index).info()["Swarm"]["NodeID"])


def running_tasks(service: Service) -> dict[str, str]:
    """Node id -> container id of the service's running tasks."""
    tasks = service.tasks(filters={"desired-state": "running"})
    return {
        t["NodeID"]: t["Status"]["ContainerStatus"]["ContainerID"]
        for t in tasks
        if t["Status"]["State"] == "running" and t["Status"].get("ContainerStatus", {}).get("ContainerID")
    }


def serving(cluster: Cluster, index: int) -> bool:
    return fetch(cluster.node(index).address) == f"node{index}\n"


@pytest.fixture(scope="module")
def web(swarm_cluster: Cluster) -> Iterator[Service]:
    """A global service from the kernel image: `python3 -m http.server` as the image's non-root user on every node,
    port 8080 published in host mode (no IPVS here, so no routing mesh), serving the node's /srv/workbench."""
    for node in swarm_cluster.nodes:
        (node.folder / "whoami").write_text(f"node{node.index}\n")
    service = swarm_cluster.client(1).services.create(
        swarm_cluster.images[0],
        command=["python3", "-m", "http.server", str(PORT), "--directory", MOUNT_POINT],
        name="web",
        mode=ServiceMode("global"),
        endpoint_spec=EndpointSpec(ports={PORT: (PORT, "tcp", "host")}),
        mounts=[Mount(MOUNT_POINT, MOUNT_POINT, type="bind", read_only=True)],
        user="900000000",
        cap_drop=["ALL"],
        read_only=True,
        init=True,
        resources=Resources(mem_limit=256 * 2**20),
        restart_policy=RestartPolicy(condition="any", delay=1_000_000_000),
    )
    wait_for("a web task serving on every node", lambda: all(serving(swarm_cluster, n.index)
                                                             for n in swarm_cluster.nodes))
    yield service
    service.remove()


def test_every_node_is_ready(swarm_cluster: Cluster) -> None:
    nodes = swarm_cluster.client(1).nodes.list()
    assert sorted(n.attrs["Status"]["Addr"] for n in nodes) == sorted(swarm_cluster.addresses)
    assert sorted(n.attrs["Description"]["Hostname"] for n in nodes) == ["node1", "node2", "node3"]
    assert all(n.attrs["Status"]["State"] == "ready" for n in nodes)
    assert all(n.attrs["ManagerStatus"]["Reachability"] == "reachable" for n in nodes)
    assert sum(bool(n.attrs["ManagerStatus"].get("Leader")) for n in nodes) == 1
    for client in swarm_cluster.clients:  # every engine has the image and is a member
        assert client.images.get(swarm_cluster.images[0])
        assert client.info()["Swarm"]["LocalNodeState"] == "active"


def test_global_service_runs_one_task_per_node_and_the_host_reaches_each(swarm_cluster: Cluster, web: Service) -> None:
    tasks = wait_for("one running task per node", lambda: (t := running_tasks(web)) and len(t) == 3 and t)
    assert set(tasks) == {node_id(swarm_cluster, n.index) for n in swarm_cluster.nodes}
    for node in swarm_cluster.nodes:
        assert fetch(node.address) == f"node{node.index}\n"  # each node's task serves its own node's folder
        engine = swarm_cluster.client(node.index)
        (container,) = engine.containers.list(filters={"label": f"com.docker.swarm.service.id={web.id}"})
        assert container.attrs["Config"]["User"] == "900000000"
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]


def test_each_node_binds_its_own_srv_workbench_and_engine_socket(swarm_cluster: Cluster) -> None:
    for node in swarm_cluster.nodes:
        (node.folder / "whoami").write_text(f"node{node.index}\n")
    seen = {}
    for node in swarm_cluster.nodes:
        output = swarm_cluster.client(node.index).containers.run(
            swarm_cluster.images[0], ["python3", "-c", WHO_AM_I], user="0", network_mode="none", remove=True,
            volumes={MOUNT_POINT: {"bind": MOUNT_POINT, "mode": "rw"}},
        )
        seen[node.index] = output.decode().split()
    for node in swarm_cluster.nodes:
        assert seen[node.index] == [f"node{node.index}", node_id(swarm_cluster, node.index), f"node{node.index}"]
        assert (node.folder / "written-by-container").read_text() == "hello"
        (node.folder / "written-by-container").unlink()
    assert len({tuple(v) for v in seen.values()}) == 3


def test_a_killed_task_is_restarted(swarm_cluster: Cluster, web: Service) -> None:
    engine = swarm_cluster.client(2)
    (old,) = engine.containers.list(filters={"label": f"com.docker.swarm.service.id={web.id}"})
    old.kill()
    started = time.monotonic()
    new = wait_for("a new task on node 2", lambda: [
        c for c in engine.containers.list(filters={"label": f"com.docker.swarm.service.id={web.id}"}) if c.id != old.id
    ])
    wait_for("node 2 serving again", lambda: serving(swarm_cluster, 2))
    say(f"task on node 2 killed: replaced and serving in {time.monotonic() - started:.1f} s")
    assert len(new) == 1
    # The container serves before its node's agent reports the task running to the managers: their view lags.
    wait_for("the managers to see the new task running on node 2",
             lambda: running_tasks(web).get(node_id(swarm_cluster, 2)) == new[0].id, 60)


def test_a_killed_engine_comes_back_ready_and_runs_its_task(swarm_cluster: Cluster, web: Service) -> None:
    wait_for("every task serving", lambda: all(serving(swarm_cluster, n.index) for n in swarm_cluster.nodes))
    member = node_id(swarm_cluster, 3)
    swarm_cluster.kill_engine(3)
    started = time.monotonic()
    assert fetch(swarm_cluster.node(3).address, timeout=2) is None  # its task died with it
    manager = swarm_cluster.client(1)
    wait_for("node 3 to be Down", lambda: manager.nodes.get(member).attrs["Status"]["State"] == "down", 90)
    say(f"node 3 killed: seen down after {time.monotonic() - started:.1f} s")
    assert serving(swarm_cluster, 1) and serving(swarm_cluster, 2)  # two managers of three keep the quorum

    started = time.monotonic()
    swarm_cluster.start_engine(3)
    swarm_cluster.wait_ready()
    assert node_id(swarm_cluster, 3) == member  # the same swarm node: its membership survived
    wait_for("node 3 serving again", lambda: serving(swarm_cluster, 3))
    say(f"node 3 restarted: Ready and serving in {time.monotonic() - started:.1f} s")
    wait_for("the managers to see a task running on node 3", lambda: member in running_tasks(web), 60)


def test_cleanup_stale_removes_what_a_dead_run_left(swarm_cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "dead"
    code = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from pathlib import Path\n"
        "from tests.cluster.engines import Cluster\n"
        f"cluster = Cluster(2, Path({str(root)!r}), progress=lambda _: None).start()\n"
        "print(cluster.token, flush=True)\n"
        "time.sleep(600)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        token = run.stdout.readline().strip()
        assert token, "the cluster in the subprocess did not start"
    finally:
        run.kill()  # the owner dies with its engines running: what a crashed test run leaves
        run.wait()
    netns = [ns for name in (f"wbs-{token}-sw", f"wbs-{token}-n1", f"wbs-{token}-n2")
             if (ns := _netns_id(name))]
    assert len(netns) == 3 and (NETNS_DIR / f"wbs-{token}-n1").exists()
    assert leftovers(token, root, netns)

    assert token in cleanup_stale(say)
    assert leftovers(token, root, netns) == []
    swarm_cluster.wait_ready(timeout=60)  # a live run's cluster is left alone


def test_close_leaves_nothing(swarm_cluster: Cluster, tmp_path: Path) -> None:
    host = docker.from_env()
    swarm_before = host.info()["Swarm"]["LocalNodeState"]
    images = {tag for image in host.images.list() for tag in image.tags}
    small = "workbench-base:bookworm" if "workbench-base:bookworm" in images else swarm_cluster.images[0]
    cluster = Cluster(2, tmp_path / "closing", progress=say)
    with cluster:
        missing = "unix:///nonexistent/docker.sock"
        copy = subprocess.run(  # deploy/images.py, with one target that is not there
            [sys.executable, str(REPO / "deploy" / "images.py"), *(f"--to={n.url}" for n in cluster.nodes),
             f"--to={missing}", small], capture_output=True, text=True, timeout=600,
        )
        say(copy.stdout + copy.stderr)
        assert copy.returncode == 1
        assert f"error: {missing}: {small}: cannot reach the engine" in copy.stderr
        assert "2 of 3 copies done" in copy.stdout
        for client in cluster.clients:
            assert client.images.get(small).id == host.images.get(small).id
        for client in cluster.clients:  # a container per engine: overlay mounts, a shim, cgroups, a netns
            client.containers.run(small, ["sleep", "600"], detach=True, volumes={MOUNT_POINT: {"bind": MOUNT_POINT}})
        cluster.client(1).services.create(small, ["sleep", "600"], name="sleeper", mode=ServiceMode("replicated", 2))
        wait_for("the service's two tasks", lambda: sum(
            len(c.containers.list(filters={"label": "com.docker.swarm.service.name=sleeper"})) for c in cluster.clients
        ) == 2)
        netns = [n.netns_id for n in cluster.nodes if n.netns_id]
        assert cluster.leftovers()  # the check sees a live cluster
    assert leftovers(cluster.token, cluster.root, netns) == []
    assert not list(cluster.root.iterdir())
    assert host.info()["Swarm"]["LocalNodeState"] == swarm_before  # the host's engine never joined anything
    say(f"closing cluster timings: {json.dumps({k: round(v, 1) for k, v in cluster.timings.items()})}")

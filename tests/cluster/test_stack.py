"""workbench on a real Docker Swarm of three engines: deploy/stack.yml as written (a global `workbench serve`
service and Postgres), the images brought to every node without a registry, sessions spread over the hosts, any
replica reaching any session, a replica killed and restarted by Swarm, a whole host killed and brought back."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from workbench import RemoteWorkbench, ReplicaUnavailableError
from workbench.backends.docker.cluster_images import ensure_postgres_image, ensure_server_image

from .conftest import say, wait_for
from .engines import Cluster

try:
    from deploy.swarm import deploy
except ImportError:  # the repository root is not on sys.path (pytest puts tests/ there)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from deploy.swarm import deploy

pytestmark = pytest.mark.timeout(1500)

STACK = "wb"
PORT = 8642


def healthy(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}:{PORT}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Deployed:
    def __init__(self, cluster: Cluster, key: str) -> None:
        self.cluster, self.key = cluster, key
        self.urls = {f"node{i}": f"http://{cluster.node(i).address}:{PORT}" for i in range(1, cluster.size + 1)}

    def remote(self, node: str) -> RemoteWorkbench:
        return RemoteWorkbench(self.urls[node], self.key, timeout=180)

    def replica_container(self, index: int) -> Any:
        found = self.cluster.client(index).containers.list(
            filters={"label": f"com.docker.swarm.service.name={STACK}_serve"})
        return found[0] if found else None


@pytest.fixture(scope="module")
def deployed(swarm_cluster: Cluster) -> Iterator[Deployed]:
    if shutil.which("docker") is None:
        pytest.skip("deploying a stack file needs the docker command line (docker stack deploy)")
    host = docker.from_env(timeout=600)
    server_image = ensure_server_image(host, say)
    postgres_image = ensure_postgres_image(host, say)
    swarm_cluster.load_images([server_image, postgres_image])
    manager = swarm_cluster.node(1)
    done = deploy(swarm_cluster.client(1), manager.url, server_image, stack=STACK, postgres_node="node1",
                  key_name="stack-test", docker_socket="/srv/workbench/docker.sock", progress=say,
                  addresses={f"node{n.index}": n.address for n in swarm_cluster.nodes})
    assert done.key is not None
    yield Deployed(swarm_cluster, done.key)
    subprocess.run(["docker", "--host", manager.url, "stack", "rm", STACK], capture_output=True, timeout=120)


def test_sessions_made_through_one_replica_spread_over_the_hosts(deployed: Deployed) -> None:
    with deployed.remote("node1") as remote:
        sessions = [remote.create(user_id=f"spread-{i}") for i in range(30)]
        placed = Counter(s.replica for s in sessions)
        assert placed == {"node1": 10, "node2": 10, "node3": 10}
        for s in sessions[3:]:
            s.close(delete_workspace=True)
    # each session's kernel runs on its own host's engine, with the sandbox's defaults
    for index in (1, 2, 3):
        kernels = deployed.cluster.client(index).containers.list(filters={"label": "workbench.managed=true"})
        own = [c for c in kernels if c.labels.get("workbench.session") in {s.session_id for s in sessions[:3]}]
        for container in own:
            assert container.attrs["HostConfig"]["NetworkMode"] == "none"
            assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]


def test_any_replica_reaches_any_session(deployed: Deployed) -> None:
    remotes = {node: deployed.remote(node) for node in deployed.urls}
    try:
        sessions = {}
        while len(sessions) < 3:  # one on each host
            s = remotes["node1"].create(user_id="everywhere")
            sessions.setdefault(s.replica or "", s)
        for host, s in sessions.items():
            s.execute(f"where = {host!r}")
            for node, remote in remotes.items():
                here = remote.use(s.session_id)
                assert here.execute("where").text == repr(host), (host, node)
                here.files.write(f"via-{node}.txt", node.encode())
            assert sorted(f.path for f in remotes["node2"].use(s.session_id).files.list()) == [
                "via-node1.txt", "via-node2.txt", "via-node3.txt"]
            assert remotes["node3"].use(s.session_id).commands.run("hostname").exit_code == 0
        for s in sessions.values():
            s.close(delete_workspace=True)
    finally:
        for remote in remotes.values():
            remote.close()


def session_on(deployed: Deployed, host: str, user_id: str) -> Any:
    """A new session that placement put on `host` (the others made on the way are closed)."""
    with deployed.remote("node1") as remote:
        made = [remote.create(user_id=user_id) for _ in range(3)]  # one per host, the load being even
        for s in made:
            if s.replica != host:
                s.close(delete_workspace=True)
        found = [s for s in made if s.replica == host]
    assert found, f"no session was placed on {host}: {[s.replica for s in made]}"
    return found[0]


def test_a_replica_killed_is_restarted_by_swarm_and_its_sessions_come_back(deployed: Deployed) -> None:
    session = session_on(deployed, "node3", "replica-killed")
    with deployed.remote("node1") as remote:
        remote.use(session.session_id).execute("kept = 'in the kernel'")
        old = deployed.replica_container(3)
        old.kill()
        new = wait_for("Swarm to start node3's replica again",
                       lambda: (c := deployed.replica_container(3)) is not None and c.id != old.id and c,
                       timeout=180)
        assert new.id != old.id
        wait_for("the new replica", lambda: healthy(deployed.cluster.node(3).address), timeout=180)
        # the kernel outlived its replica: the variables are there
        assert remote.use(session.session_id).execute("kept").text == "'in the kernel'"


def test_a_host_that_dies_has_its_sessions_unavailable_until_it_is_back(deployed: Deployed) -> None:
    session = session_on(deployed, "node2", "host-died")
    with deployed.remote("node1") as remote:
        remote.use(session.session_id).files.write("kept.txt", b"on node2's disk")
        remote.use(session.session_id).execute("x = 1")
        deployed.cluster.kill_engine(2)
        error = wait_for("node2's sessions to be reported unavailable", lambda: _unavailable(remote, session),
                         timeout=180)
        assert "runs on replica node2" in str(error)
        other = remote.create(user_id="while-node2-is-down")  # placed on a live host meanwhile
        assert other.replica in {"node1", "node3"}
        deployed.cluster.start_engine(2)
        wait_for("node2's replica", lambda: healthy(deployed.cluster.node(2).address), timeout=300)
        result = wait_for("node2's session to serve again", lambda: _served(remote, session), timeout=120)
        assert result.state_lost  # its kernel died with the host; its workspace did not
        assert remote.use(session.session_id).files.read("kept.txt") == b"on node2's disk"


def _unavailable(remote: RemoteWorkbench, session: Any) -> ReplicaUnavailableError | None:
    try:
        remote.use(session.session_id).execute("1")
    except ReplicaUnavailableError as exc:
        return exc
    return None


def _served(remote: RemoteWorkbench, session: Any) -> Any:
    try:
        return remote.use(session.session_id).execute("1")
    except ReplicaUnavailableError:
        return None

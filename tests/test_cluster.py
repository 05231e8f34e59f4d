"""`workbench serve` as a cluster of replicas on one shared store: placement, forwarding to the replica that runs
a session, a replica that dies and comes back. Three real servers on this host, each with its own home (its own
"host"), over real HTTP, on a real PostgreSQL and on a shared SQLite file. (tests/cluster/ runs the same on a
Docker Swarm of three engines.)"""
from __future__ import annotations

import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from served import Server

from workbench import RemoteWorkbench, ReplicaUnavailableError
from workbench.server.auth import create_key
from workbench.server.cluster import FORWARDED, signature
from workbench.store import SQLiteStore, Store, open_store

SECRET = secrets.token_hex(32)


class Cluster:
    def __init__(self, root: Path, dsn: str | None, size: int = 3) -> None:
        """On the Postgres `dsn`, or on a SQLite file under `root`."""
        self.dsn = dsn
        self.store_path = root / "shared" / "workbench.db"
        self.store_path.parent.mkdir(parents=True)
        store_env = {"WORKBENCH_STORE": dsn} if dsn else {"WORKBENCH_TEST_STORE": str(self.store_path)}
        self.replicas = {f"r{i}": Server(root / f"host{i}", app="cluster_app:make", env={
            "WORKBENCH_REPLICA": f"r{i}", "WORKBENCH_CLUSTER_SECRET": SECRET, **store_env,
            "WORKBENCH_RUNTIME_DIR": f"/tmp/wbc-{secrets.token_hex(3)}",
            "WORKBENCH_CLUSTER_HEARTBEAT": "0.5", "WORKBENCH_CLUSTER_TTL": "3"}) for i in range(1, size + 1)}
        for server in self.replicas.values():
            server.home.mkdir(parents=True)
        self.key = self.new_key("cluster-test")

    def store(self) -> Store:
        return open_store(self.dsn, self.store_path.parent) if self.dsn else SQLiteStore(self.store_path)

    def new_key(self, name: str) -> str:
        store = self.store()
        try:
            return create_key(store, name)[1]
        finally:
            store.close()


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, wb: object
            ) -> Iterator[Cluster]:
    dsn = request.getfixturevalue("postgres_server").database() if request.param == "postgres" else None
    built = Cluster(tmp_path_factory.mktemp("cluster"), dsn)
    for server in built.replicas.values():
        server.start()
    yield built
    for server in built.replicas.values():
        server.stop()
    store = built.store()
    with RemoteWorkbench(built.replicas["r1"].url, built.key) as remote:
        for record in store.list():
            try:
                remote.use(record.session_id).close(delete_workspace=True)
            except Exception:
                pass
    store.close()


@pytest.fixture(scope="module")
def key(cluster: Cluster) -> str:
    return cluster.key


def test_sessions_made_through_one_replica_spread_over_all(cluster: Cluster, key: str) -> None:
    with RemoteWorkbench(cluster.replicas["r1"].url, key) as remote:
        sessions = [remote.create(user_id=f"spread-{i}") for i in range(9)]
        assert [s.execute(f"{i} * 2").text for i, s in enumerate(sessions)] == [str(i * 2) for i in range(9)]
    store = cluster.store()
    try:
        placed = Counter(store.get(s.session_id).replica for s in sessions)
    finally:
        store.close()
    assert placed == {"r1": 3, "r2": 3, "r3": 3}


def test_any_replica_reaches_any_session(cluster: Cluster, key: str) -> None:
    remotes = {name: RemoteWorkbench(server.url, key) for name, server in cluster.replicas.items()}
    try:
        session = remotes["r1"].create(user_id="everywhere")
        session.execute("x = 20")
        for name, remote in remotes.items():
            here = remote.use(session.session_id)
            assert here.execute("x += 1; x").text in {"21", "22", "23"}, name
            here.files.write(f"from-{name}.txt", name.encode())
        assert remotes["r3"].use(session.session_id).execute("x").text == "23"
        listed = sorted(f.path for f in remotes["r2"].use(session.session_id).files.list())
        assert listed == ["from-r1.txt", "from-r2.txt", "from-r3.txt"]
        streamed: list[str] = []
        result = remotes["r2"].use(session.session_id).execute("for i in range(3): print(i)",
                                                                on_stdout=streamed.append)
        assert result.stdout == "0\n1\n2\n" and "".join(streamed) == "0\n1\n2\n"
        assert remotes["r3"].use(session.session_id).commands.run("echo $((x * 2))", env={"x": "21"}).stdout == "42\n"
    finally:
        for remote in remotes.values():
            remote.close()


def test_another_key_gets_404_through_any_replica(cluster: Cluster, key: str) -> None:
    other = cluster.new_key("cluster-other")
    with RemoteWorkbench(cluster.replicas["r1"].url, key) as mine:
        session = mine.create(user_id="private")
    for server in cluster.replicas.values():
        answer = httpx.get(f"{server.url}/v1/sessions/{session.session_id}",
                           headers={"Authorization": f"Bearer {other}"})
        assert answer.status_code == 404, answer.text
        assert httpx.get(f"{server.url}/v1/sessions/{session.session_id}").status_code == 401


def test_a_forged_or_stale_forward_is_refused(cluster: Cluster, key: str) -> None:
    url = cluster.replicas["r2"].url
    path = "/v1/sessions"
    stamp = f"{time.time():.3f}"
    forged = f"r1;{stamp};{signature(b'x' * 32, 'r1', stamp, 'POST', path, 'r2')}"
    old = f"{time.time() - 3600:.3f}"
    stale = f"r1;{old};{signature(SECRET.encode(), 'r1', old, 'POST', path, 'r2')}"
    elsewhere = f"r1;{stamp};{signature(SECRET.encode(), 'r1', stamp, 'POST', path, 'r3')}"  # signed for r3
    for mark in (forged, stale, elsewhere, "nonsense"):
        answer = httpx.post(url + path, json={"user_id": "forged"},
                            headers={"Authorization": f"Bearer {key}", FORWARDED: mark})
        assert answer.status_code == 401, answer.text


def test_a_dead_replicas_sessions_are_unavailable_until_it_is_back(cluster: Cluster, key: str) -> None:
    with RemoteWorkbench(cluster.replicas["r1"].url, key) as remote:
        session = None
        for _ in range(6):  # until one is placed on r3
            candidate = remote.create(user_id="survivor")
            store = cluster.store()
            try:
                if store.get(candidate.session_id).replica == "r3":
                    session = candidate
                    break
            finally:
                store.close()
        assert session is not None
        session.execute("kept = 'still here'")
        cluster.replicas["r3"].stop()
        time.sleep(4)  # past the ttl
        with pytest.raises(ReplicaUnavailableError, match="runs on replica r3, which is down"):
            remote.use(session.session_id).execute("kept")
        # nobody else learns even that much: another key gets 404, a wrong MCP token 401
        r1 = cluster.replicas["r1"].url
        other_key = cluster.new_key("while-r3-is-down")
        answer = httpx.get(f"{r1}/v1/sessions/{session.session_id}", headers={"Authorization": f"Bearer {other_key}"})
        assert answer.status_code == 404, answer.text
        answer = httpx.post(f"{r1}/mcp/{session.session_id}", json={}, headers={"Authorization": "Bearer wbs_x"})
        assert answer.status_code == 401, answer.text
        other = remote.create(user_id="while-r3-is-down")  # placed on a live replica
        store = cluster.store()
        try:
            assert store.get(other.session_id).replica in {"r1", "r2"}
        finally:
            store.close()
        cluster.replicas["r3"].start()
        assert remote.use(session.session_id).execute("kept").text == "'still here'"


def test_a_replica_that_hangs_mid_request_gives_503_not_a_stall(cluster: Cluster, key: str) -> None:
    """A frozen replica accepts connections and answers nothing (as a host whose network went silent): the
    replica forwarding to it watches its heartbeat and ends the request with replica_unavailable."""
    with RemoteWorkbench(cluster.replicas["r1"].url, key, timeout=60) as remote:
        session = next(s for s in (remote.create(user_id="frozen") for _ in range(3)) if s.replica == "r2")
        session.execute("y = 7")
        frozen = cluster.replicas["r2"].proc
        assert frozen is not None
        frozen.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ReplicaUnavailableError, match="r2"):
                remote.use(session.session_id).execute("y")
            assert time.monotonic() - started < 20  # the ttl is 3 s here: a few beats, not the client's timeout
        finally:
            frozen.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert remote.use(session.session_id).execute("y").text == "7"
                break
            except ReplicaUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.5)


def test_odd_paths_and_bad_mcp_tokens_are_answered_at_the_first_replica(cluster: Cluster, key: str) -> None:
    with RemoteWorkbench(cluster.replicas["r1"].url, key) as remote:
        session = next(s for s in (remote.create(user_id="odd") for _ in range(3)) if s.replica == "r2")
        assert session.mcp is not None
        headers = {"Authorization": f"Bearer {key}"}
        r1 = cluster.replicas["r1"].url
        # the MCP endpoint of a session on r2, through r1: a wrong token never leaves r1
        for token in ("wbs_wrong", "wbs_" + "A" * 43, session.mcp.headers["Authorization"].split()[-1] + "x"):
            answer = httpx.post(f"{r1}/mcp/{session.session_id}", json={}, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 401, answer.text
        # empty path segments route as the endpoints read them
        answer = httpx.get(f"{r1}/v1//sessions//{session.session_id}", headers=headers)
        assert answer.status_code in (200, 404), answer.text  # as a lone server answers it, never a 500
        answer = httpx.post(f"{r1}/mcp//{session.session_id}", json={}, headers={"Authorization": "Bearer x"})
        assert answer.status_code == 401, answer.text
        # a body on a method that usually has none is forwarded with it, not left hanging
        answer = httpx.request("DELETE", f"{r1}/v1/sessions/{session.session_id}", content=b"hello",
                               headers=headers, timeout=30)
        assert answer.status_code in (204, 400, 422), answer.text

"""workbench as a cluster, against one host in the same run.

    python -m benchmarks.cluster [--pairs 300] [--sessions 60] [--clients 6] [--no-swarm] [--json]

`measure` (forwarding): two `workbench serve` replicas on this host (each its own home, one shared store: SQLite,
or WORKBENCH_STORE's PostgreSQL), one session on replica r2. A trivial cell (`1`) through r2 itself and through
r1, which forwards it to r2 (signed, streamed), interleaved in pairs; the added time is the median of the paired
differences.

`measure_swarm` (root only): deploy/stack.yml on a Docker Swarm of three engines on this machine
(tests/cluster/engines.py) and on a swarm of one, each built in turn in the same run: `sessions` sessions created
through the first node's replica by `clients` concurrent clients, each running `1` once (sessions per second,
create to first result), and how many of them are live at the end. The three "hosts" share this machine's cores
and memory, so the figure is what the cluster's placement and forwarding cost or gain, not three machines' worth.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.paired import added, interleaved
from benchmarks.server import _free_port
from workbench import RemoteSession, RemoteWorkbench
from workbench.server.auth import create_key
from workbench.store import open_store

CELL = "1"
APP = Path(__file__).resolve().parent.parent / "tests"  # cluster_app:make, a Workbench on the shared store


def _replica(name: str, root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    home = root / name
    home.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench", "serve", "--port", str(port), "--app", "cluster_app:make"],
        env={**os.environ, **env, "WORKBENCH_HOME": str(home), "WORKBENCH_REPLICA": name,
             "WORKBENCH_RUNTIME_DIR": f"/tmp/wbb-{secrets.token_hex(3)}",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(APP), os.environ.get("PYTHONPATH")]))},
        cwd=APP, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"replica {name} did not come up")


def measure(pairs: int = 300) -> dict[str, Any]:
    """Milliseconds: p50 through the owning replica, p50 forwarded, and the paired added time."""
    with tempfile.TemporaryDirectory(prefix="wb-bench-cluster-") as tmp:
        root = Path(tmp)
        dsn = os.environ.get("WORKBENCH_STORE")
        env = {"WORKBENCH_CLUSTER_SECRET": secrets.token_hex(32)}
        env.update({"WORKBENCH_STORE": dsn} if dsn else {"WORKBENCH_TEST_STORE": str(root / "workbench.db")})
        store = open_store(None, root)  # WORKBENCH_STORE's, else the SQLite file the replicas share
        _, key = create_key(store, f"bench-{os.getpid()}")
        store.close()
        replicas = [_replica(name, root, env) for name in ("r1", "r2")]
        try:
            owner, forwarder = RemoteWorkbench(replicas[1][1], key), RemoteWorkbench(replicas[0][1], key)
            made = [forwarder.create(user_id="bench", limits={"memory": "256m"}) for _ in range(2)]
            session = next(s for s in made if s.replica == "r2")
            direct, forwarded = owner.use(session.session_id), forwarder.use(session.session_id)

            def run(on: RemoteSession) -> Callable[[], None]:
                def once() -> None:
                    result = on.execute(CELL)
                    assert result.text == "1", result
                return once

            times = dict(zip(("direct", "forwarded"), interleaved(run(direct), run(forwarded), pairs), strict=True))
            forward_added = added(times["direct"], times["forwarded"])
            for s in made:
                s.close(delete_workspace=True)
        finally:
            for proc, _ in replicas:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    ms = lambda values: statistics.median(values) * 1000
    return {"direct_p50_ms": ms(times["direct"]), "forwarded_p50_ms": ms(times["forwarded"]),
            "forward_added_ms": forward_added * 1000, "ratio": ms(times["forwarded"]) / ms(times["direct"]),
            "pairs": pairs,
            "store": "postgresql" if dsn else "sqlite",
            "baseline": "the same session through the replica that runs it, same run"}


def measure_swarm(sessions: int = 60, clients: int = 6, say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Sessions per second and live sessions on a swarm of three engines and of one (None without root)."""
    if os.geteuid() != 0:
        return None
    import docker

    from deploy.swarm import deploy
    from tests.cluster.engines import Cluster
    from workbench.backends.docker.cluster_images import ensure_postgres_image, ensure_server_image
    from workbench.config import DEFAULT_IMAGE

    host = docker.from_env(timeout=600)
    images = [DEFAULT_IMAGE, ensure_server_image(host, say), ensure_postgres_image(host, say)]
    figures: dict[str, Any] = {"sessions": sessions, "clients": clients}
    for size in (3, 1):
        with tempfile.TemporaryDirectory(prefix="wb-bench-swarm-") as tmp, Cluster(size, Path(tmp),
                                                                                  progress=lambda _: None) as swarm:
            say(f"  a swarm of {size}: loading the images, deploying the stack")
            swarm.load_images(images)
            done = deploy(swarm.client(1), swarm.node(1).url, images[1], stack="bench", postgres_node="node1",
                          key_name="bench", docker_socket="/srv/workbench/docker.sock", progress=lambda _: None,
                          addresses={f"node{n.index}": n.address for n in swarm.nodes})
            assert done.key is not None
            figures[f"hosts_{size}"] = _create_load(done.urls["node1"], done.key, sessions, clients)
            say(f"  a swarm of {size}: {figures[f'hosts_{size}']}")
    three, one = figures["hosts_3"], figures["hosts_1"]
    figures["rate_ratio"] = three["per_s"] / one["per_s"]
    figures["baseline"] = "the same stack on a swarm of one engine, same run"
    return figures


def _create_load(url: str, key: str, sessions: int, clients: int) -> dict[str, Any]:
    made: list[Any] = []
    failed: list[str] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        with RemoteWorkbench(url, key, timeout=300) as remote:
            for _ in range(count):
                try:
                    s = remote.create(user_id=f"load-{secrets.token_hex(3)}", limits={"memory": "256m"})
                    assert s.execute(CELL).text == "1"
                    with lock:
                        made.append(s)
                except Exception as exc:  # counted: a host that is full is a figure, not a crash
                    with lock:
                        failed.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    shares = [sessions // clients + (1 if i < sessions % clients else 0) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(n,)) for n in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    with RemoteWorkbench(url, key, timeout=300) as remote:
        live = sum(1 for s in made if remote.use(s.session_id).execute(CELL).text == "1")
        placed = Counter(s.replica for s in made)
        for s in made:
            remote.use(s.session_id).close(delete_workspace=True)
    return {"created": len(made), "seconds": took, "per_s": len(made) / took, "live": live,
            "per_host": dict(sorted(placed.items())), "failed": failed[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--no-swarm", action="store_true", help="only the forwarding figure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = measure(args.pairs)
    if not args.no_swarm:
        figures["swarm"] = measure_swarm(args.sessions, args.clients,
                                         say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"through the owning replica  p50 {figures['direct_p50_ms']:.2f} ms")
    print(f"forwarded by another        p50 {figures['forwarded_p50_ms']:.2f} ms "
          f"(+{figures['forward_added_ms']:.2f} ms paired, ratio {figures['ratio']:.2f}; {figures['store']})")
    swarm = figures.get("swarm")
    if swarm:
        for size in (3, 1):
            got = swarm[f"hosts_{size}"]
            print(f"swarm of {size}: {got['created']} sessions in {got['seconds']:.1f} s ({got['per_s']:.2f}/s), "
                  f"{got['live']} live, per host {got['per_host']}")
        print(f"sessions/s, three hosts against one: {swarm['rate_ratio']:.2f}")


if __name__ == "__main__":
    main()

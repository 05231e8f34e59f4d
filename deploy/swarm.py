#!/usr/bin/env python3
"""Deploy workbench on a Docker Swarm from a manager: the stack's secrets, the node that keeps Postgres's data,
`docker stack deploy` of deploy/stack.yml, a wait until every node's replica answers, and a first API key.

    python3 deploy/swarm.py --server-image workbench-server:<tag> [--host unix:///var/run/docker.sock]
                            [--postgres-node NAME] [--stack workbench] [--key-name admin]

The images must be on every node first (`workbench image build --cluster`, then deploy/images.py). Prints the
replicas' URLs and the API key (shown once). Running it again keeps the secrets and updates the stack.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
from docker import DockerClient
from docker.errors import APIError

STACK_FILE = Path(__file__).resolve().parent / "stack.yml"
PORT = 8642
SECRETS = {"workbench_db_password": 24, "workbench_cluster_secret": 48}  # name -> random bytes it is made of


@dataclass
class Deployment:
    stack: str
    urls: dict[str, str]  # node hostname -> a replica's URL
    key: str | None  # the API key made for this deployment (None when not asked for)


def deploy(client: DockerClient, host: str, server_image: str, *, addresses: dict[str, str] | None = None,
           postgres_node: str | None = None, stack: str = "workbench", key_name: str | None = "admin",
           docker_socket: str | None = None, timeout: float = 300.0,
           progress: Callable[[str], None] = print) -> Deployment:
    """Deploy the stack through the manager `client` (reached at `host`, for `docker stack deploy`); `addresses`
    are the nodes' addresses by hostname (default: each node's own `Status.Addr`); `docker_socket` is where the
    engine's socket is on every node (default /var/run/docker.sock)."""
    if shutil.which("docker") is None:
        raise SystemExit("`docker stack deploy` needs the docker command line on this machine")
    for name, size in SECRETS.items():
        if not client.secrets.list(filters={"name": name}):
            client.secrets.create(name=name, data=secrets.token_urlsafe(size).encode())
            progress(f"made the secret {name}")
    nodes = {node.attrs["Description"]["Hostname"]: node for node in client.nodes.list()}
    chosen = postgres_node or next(name for name, node in sorted(nodes.items())
                                   if node.attrs["Spec"].get("Role") == "manager")
    spec = nodes[chosen].attrs["Spec"]
    if spec.get("Labels", {}).get("workbench.postgres") != "true":
        nodes[chosen].update({**spec, "Labels": {**spec.get("Labels", {}), "workbench.postgres": "true"}})
    progress(f"Postgres keeps its data on {chosen}")
    env = {**os.environ, "WORKBENCH_SERVER_IMAGE": server_image}
    if docker_socket:
        env["WORKBENCH_DOCKER_SOCKET"] = docker_socket
    done = subprocess.run(["docker", "--host", host, "stack", "deploy", "--resolve-image", "never", "-c",
                           str(STACK_FILE), stack], capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"docker stack deploy failed: {(done.stdout + done.stderr).strip()}")
    addresses = addresses or {name: node.attrs["Status"]["Addr"] for name, node in nodes.items()}
    urls = {name: f"http://{address}:{PORT}" for name, address in sorted(addresses.items())}
    started = time.monotonic()
    for name, url in urls.items():
        while not _healthy(url):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the replica on {name} ({url}) did not answer within {timeout:.0f} s")
            time.sleep(0.5)
    progress(f"{len(urls)} replicas answer ({time.monotonic() - started:.1f} s)")
    return Deployment(stack, urls, _make_key(client, stack, key_name) if key_name else None)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _make_key(client: DockerClient, stack: str, name: str) -> str:
    """An API key, made by a replica (`workbench keys create`) in the cluster's store."""
    replicas = client.containers.list(filters={"label": f"com.docker.swarm.service.name={stack}_serve"})
    if not replicas:
        raise RuntimeError("no replica of the stack runs on this manager's node to make the API key")
    try:
        made = replicas[0].exec_run(["python3", "-m", "workbench", "keys", "create", name])
    except APIError as exc:
        raise RuntimeError(f"could not make an API key: {exc}") from exc
    if made.exit_code != 0:
        raise RuntimeError(f"could not make an API key: {made.output.decode(errors='replace').strip()}")
    return next(word for word in made.output.decode().split() if word.startswith("wbk_"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-image", required=True, help="the tag `workbench image build --cluster` printed")
    parser.add_argument("--host", default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
                        help="a swarm manager's engine")
    parser.add_argument("--postgres-node", help="the node (hostname) that keeps Postgres's data (default: a manager)")
    parser.add_argument("--stack", default="workbench")
    parser.add_argument("--key-name", default="admin", help="the name of the API key made (shown once)")
    args = parser.parse_args()
    client = docker.DockerClient(base_url=args.host, timeout=120)
    deployed = deploy(client, args.host, args.server_image, postgres_node=args.postgres_node, stack=args.stack,
                      key_name=args.key_name)
    for name, url in deployed.urls.items():
        print(f"{name}: {url}")
    print(f"API key (shown once): {deployed.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real Docker Swarm of three engines on this machine (see engines.py), for the tests of workbench on a cluster."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .engines import Cluster, missing_tools


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 120.0) -> Any:
    """`predicate()`'s first true value, polled every half second; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    return value


def cluster_unavailable() -> str | None:
    """Why a test cluster cannot be built here, or None."""
    if os.geteuid() != 0:
        return "a swarm test cluster needs root (network and mount namespaces, its own dockerd engines)"
    if missing := missing_tools():
        return f"a swarm test cluster needs these programs, missing here: {', '.join(missing)}"
    return None


@pytest.fixture(scope="session")
def swarm_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A formed 3-node Swarm (3 managers), the kernel image on every node; removed entirely at the end."""
    if reason := cluster_unavailable():
        pytest.skip(reason)
    image = request.getfixturevalue("wb").image  # built on the host engine if it is missing
    with Cluster(3, tmp_path_factory.mktemp("swarm"), progress=say) as cluster:
        cluster.load_images([image])
        yield cluster

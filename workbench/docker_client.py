"""Connecting to the Docker engine, with a clear error when it cannot be reached."""
from __future__ import annotations

import docker
import requests
from docker.errors import DockerException

from .errors import DockerUnavailableError


def connect(timeout: float = 60) -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (or the local socket), checked with a ping."""
    try:
        client = docker.from_env(timeout=timeout, max_pool_size=64)
        client.ping()
    except (DockerException, requests.RequestException) as exc:
        raise DockerUnavailableError(
            f"cannot reach the Docker engine ({exc}); is it running, and may this user use it?"
        ) from exc
    return client

"""Connecting to the Docker engine, with a clear error when it cannot be reached."""
from __future__ import annotations

import logging

import docker
import requests
from docker.errors import DockerException

from ...errors import DockerUnavailableError

log = logging.getLogger(__name__)


def connect(timeout: int = 60) -> docker.DockerClient:
    """A client for the engine named by DOCKER_HOST (or the local socket), checked with a ping."""
    try:
        client = docker.from_env(timeout=timeout, max_pool_size=64)
        client.ping()
    except (DockerException, requests.RequestException) as exc:
        raise DockerUnavailableError(
            f"cannot reach the Docker engine ({exc}); is it running, and may this user use it?"
        ) from exc
    return client


def security_options(client: docker.DockerClient) -> list[str]:
    """What the engine says it enforces on containers (e.g. `name=seccomp,profile=default`); a warning is
    logged when seccomp is not among them."""
    try:
        options = list(client.info().get("SecurityOptions") or [])
    except (DockerException, requests.RequestException) as exc:
        raise DockerUnavailableError(f"cannot read the Docker engine's security options: {exc}") from exc
    if not any(option.startswith("name=seccomp") and "profile=unconfined" not in option for option in options):
        log.warning("the Docker engine reports no seccomp profile (%s): sandboxes rely on capabilities, "
                    "namespaces and cgroups alone", ", ".join(options) or "no security options")
    return options

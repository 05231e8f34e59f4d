"""The images of a cluster deployment (deploy/stack.yml), made offline like the kernel image:

- `workbench-server:<hash>`: the base image's CPython with this workbench and its dependencies (the `postgres`
  extra included), installed on the host from wheels and imported as one layer; it runs `workbench serve`;
- `workbench-postgres:15`: Debian bookworm with PostgreSQL 15, made with debootstrap, and deploy/postgres's
  start-up script.

Other hosts get them (and the kernel image) with deploy/images.py: save on this engine, load on theirs.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import docker

from ...assets import assets_root
from ...config import BASE_IMAGE, default_home
from ...errors import ImageBuildError
from . import base_image
from .image import SITE_PACKAGES, WHEEL_TARGET, Progress, import_layer, run_pip

SERVER_REPOSITORY = "workbench-server"
POSTGRES_IMAGE = "workbench-postgres:15"
_POSTGRES_BOOTSTRAP = "workbench-postgres-rootfs:15"


def _project() -> Path:
    root = assets_root()
    if not (root / "pyproject.toml").is_file():
        raise ImageBuildError("the server image is built from workbench's source tree (pyproject.toml), which this "
                              "installation does not have: build it from a clone")
    return root


def server_tag() -> str:
    """The server image's tag: a hash of workbench's source (its package, sandbox side and pyproject)."""
    root = _project()
    digest = hashlib.sha256()
    files = [root / "pyproject.toml", *sorted(p for folder in ("workbench", "kernels", "images")
                                              for p in (root / folder).rglob("*")
                                              if p.is_file() and "__pycache__" not in p.parts)]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{SERVER_REPOSITORY}:{digest.hexdigest()[:16]}"


def ensure_server_image(client: docker.DockerClient, progress: Progress) -> str:
    """Build the server image unless it exists for this source; its tag."""
    tag = server_tag()
    if client.images.list(name=tag):
        progress(f"server image {tag} is up to date")
        return tag
    build = default_home() / "build"
    build.mkdir(parents=True, exist_ok=True)
    base_image.ensure_base_image(client, BASE_IMAGE, progress, build)
    with tempfile.TemporaryDirectory(prefix="server-", dir=build) as tmp:
        work = Path(tmp)
        progress("building workbench's wheel")
        run_pip(["wheel", "--no-deps", "-w", str(work / "dist"), str(_project())], progress)
        wheel = next((work / "dist").glob("workbench-*.whl"))
        progress("installing workbench and its dependencies for the server image (on the host)")
        site = work / "staged" / SITE_PACKAGES
        run_pip(["install", "--target", str(site), f"{wheel}[postgres]", *WHEEL_TARGET], progress)
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with the host's shebang
        import_layer(client, BASE_IMAGE, tag, site, work, progress, changes=(
            "ENV PYTHONDONTWRITEBYTECODE=1 WORKBENCH_DISK_QUOTA=off",
            'CMD ["python3", "-m", "workbench", "serve", "--host", "0.0.0.0"]'))
    progress(f"server image {tag} ready")
    return tag


def ensure_postgres_image(client: docker.DockerClient, progress: Progress) -> str:
    """Build the Postgres image unless it exists; its tag."""
    if client.images.list(name=POSTGRES_IMAGE):
        progress(f"postgres image {POSTGRES_IMAGE} is up to date")
        return POSTGRES_IMAGE
    build = default_home() / "build"
    base_image.ensure_base_image(client, _POSTGRES_BOOTSTRAP, progress, build, packages=("postgresql-15",))
    context = assets_root() / "deploy" / "postgres"
    if not (context / "Dockerfile").is_file():
        raise ImageBuildError(f"{context}/Dockerfile is missing: build the postgres image from a clone")
    progress(f"building {POSTGRES_IMAGE}")
    for chunk in client.api.build(path=str(context), tag=POSTGRES_IMAGE, buildargs={"ROOTFS": _POSTGRES_BOOTSTRAP},
                                  rm=True, forcerm=True, decode=True, pull=False):
        if "error" in chunk:
            raise ImageBuildError(f"building {POSTGRES_IMAGE} failed: {chunk['error'].strip()}")
    client.images.remove(_POSTGRES_BOOTSTRAP)
    progress(f"postgres image {POSTGRES_IMAGE} ready")
    return POSTGRES_IMAGE

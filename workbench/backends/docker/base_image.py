"""The offline base image: Debian bookworm made with debootstrap and imported through the Engine API.

Used when the base image is missing; nothing is pulled from a container registry.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound

from ...errors import ImageBuildError

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
MIRROR = os.environ.get("WORKBENCH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Trimmed from the root filesystem before import: caches and docs nothing in the sandbox needs.
_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info")

Progress = Callable[[str], None]


def recipe_hash() -> str:
    """A hash of what the base image is made from; part of the kernel image's input hash."""
    return hashlib.sha256(f"{SUITE}|{','.join(PACKAGES)}".encode()).hexdigest()


def ensure_base_image(client: docker.DockerClient, tag: str, progress: Progress, workdir: Path,
                      packages: tuple[str, ...] = PACKAGES) -> None:
    """Make sure `tag` exists locally, bootstrapping it (Debian with `packages`) with debootstrap when missing."""
    try:
        client.images.get(tag)
        return
    except ImageNotFound:
        pass
    progress(f"base image {tag} is missing: bootstrapping Debian {SUITE} with debootstrap (about a minute)")
    debootstrap = _debootstrap(progress)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="base-", dir=workdir) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs), MIRROR],
            progress,
            "debootstrap",
        )
        for part in _TRIM:
            target = rootfs / part
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        tarball = Path(tmp) / "rootfs.tar"
        progress("packing the root filesystem")
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(tarball), "."], progress, "tar")
        progress(f"importing {tag}")
        repository, _, version = tag.rpartition(":")
        try:
            client.api.import_image_from_file(
                str(tarball),
                repository=repository or tag,
                tag=version if repository else None,
                changes=['ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8', 'CMD ["/bin/bash"]'],
            )
        except APIError as exc:
            raise ImageBuildError(f"importing the base image failed: {exc}") from exc
    progress(f"base image {tag} ready")


def _debootstrap(progress: Progress) -> str:
    found = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None
    )
    if found:
        if os.geteuid() != 0:
            raise ImageBuildError("bootstrapping the base image needs root (debootstrap): run it as root once")
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        progress("installing debootstrap from Debian's packages")
        _run(["apt-get", "update", "-q"], progress, "apt-get update")
        _run(["apt-get", "install", "-y", "-q", "debootstrap"], progress, "apt-get install debootstrap")
        return shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    raise ImageBuildError(
        "the base image is missing and debootstrap is not installed: install it (apt-get install debootstrap) "
        "and run `workbench image build` as root"
    )


def _run(argv: list[str], progress: Progress, what: str) -> None:
    """Run a build step, passing its output lines to progress; raise ImageBuildError with its tail on failure."""
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail, line][-20:]
            progress(f"  {line}")
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))

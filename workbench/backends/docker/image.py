"""The kernel image, built in three steps that each run only when their inputs changed:

1. the base image: Debian made with debootstrap (see base_image.py);
2. the runtime image: the base plus the pinned Python packages, installed on the host from wheels fetched
   on the host (the container cannot reach the package index) and imported as a single layer;
3. the kernel image: images/kernel/Dockerfile on top, adding the sandbox side from kernels/python.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound
from requests import RequestException

from ...assets import assets_root
from ...config import BASE_IMAGE, DEFAULT_IMAGE, default_home
from ...errors import DockerUnavailableError, ImageBuildError, ImageNotFoundError
from . import base_image

INPUTS_LABEL = "workbench.image.inputs"
RUNTIME_REPOSITORY = "workbench-runtime"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # a site dir of Debian's CPython 3.11
# Wheels for Debian bookworm's CPython 3.11 on x86_64 (glibc 2.36).
_WHEEL_TARGET = [
    "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
    "--abi", "cp311", "--abi", "abi3", "--abi", "none",
    *[arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                      "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
                      "manylinux1_x86_64", "linux_x86_64") for arg in ("--platform", tag)],
]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _requirements() -> Path:
    return assets_root() / "images" / "kernel" / "requirements.txt"


def runtime_tag() -> str:
    """The runtime image's tag: a hash of the base recipe and the pinned packages."""
    digest = hashlib.sha256(base_image.recipe_hash().encode() + _requirements().read_bytes())
    return f"{RUNTIME_REPOSITORY}:{digest.hexdigest()[:16]}"


def inputs_hash() -> str:
    """A hash of everything the kernel image is made from: base recipe, packages, Dockerfile, sandbox code."""
    root = assets_root()
    digest = hashlib.sha256(runtime_tag().encode())
    files = [root / "images" / "kernel" / "Dockerfile"]
    files += sorted(p for p in (root / "kernels" / "python").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def image_status(client: docker.DockerClient, tag: str = DEFAULT_IMAGE) -> str:
    """"missing", "stale" (built from other inputs) or "current"."""
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        return "missing"
    return "current" if image.labels.get(INPUTS_LABEL) == inputs_hash() else "stale"


def require_image(client: docker.DockerClient, tag: str = DEFAULT_IMAGE) -> None:
    """Raise ImageNotFoundError unless the image exists locally."""
    try:
        client.images.get(tag)
    except ImageNotFound:
        raise ImageNotFoundError(f"kernel image {tag} not found: build it with `workbench image build`") from None


def ensure_image(
    client: docker.DockerClient,
    tag: str = DEFAULT_IMAGE,
    progress: Progress = _quiet,
    force: bool = False,
) -> bool:
    """Build the kernel image unless one built from the same inputs exists. Returns True when it built."""
    if not force and image_status(client, tag) == "current":
        progress(f"kernel image {tag} is up to date")
        _copy_python(client, tag, progress)
        return False
    build_dir = default_home() / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=build_dir) as tmp:
        work = Path(tmp)
        runtime = runtime_tag()
        if force or not _exists(client, runtime):
            # The packages are installed on the host while debootstrap runs.
            with ThreadPoolExecutor(1) as pool:
                staged = pool.submit(_stage_packages, work / "staged", progress)
                base_image.ensure_base_image(client, BASE_IMAGE, progress, build_dir)
                _import_runtime(client, runtime, staged.result(), work, progress)
        context = work / "context"
        context.mkdir()
        root = assets_root()
        shutil.copy(root / "images" / "kernel" / "Dockerfile", context / "Dockerfile")
        shutil.copytree(root / "kernels" / "python", context / "kernels" / "python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        progress(f"building kernel image {tag}")
        _docker_build(client, context, tag, runtime, progress)
    _copy_python(client, tag, progress)
    progress(f"kernel image {tag} ready")
    return True


# The image's Python trees, copied to the host and bind-mounted read-only into every sandbox: this engine's
# storage driver (fuse-overlayfs) makes each file a kernel imports slow to open, and a kernel imports about a
# thousand of them (0.7 s through the storage driver, 0.45 s through a bind mount, measured here).
PYTHON_TREES = ("usr/lib/python3.11", "usr/local/lib/python3.11")


def pin(client: docker.DockerClient, tag: str = DEFAULT_IMAGE) -> tuple[str, dict[str, str]]:
    """The image `tag` names now, by id, and the host folder -> sandbox path of its Python trees when they were
    copied (see ensure_image). Kernels run from the id, so that a rebuild of the tag (by another process) never
    mixes one image with another's Python trees; the copies of an image are kept as long as it exists."""
    try:
        image_id = str(client.images.get(tag).id)
    except ImageNotFound:
        raise ImageNotFoundError(f"kernel image {tag} not found: build it with `workbench image build`") from None
    except (APIError, RequestException) as exc:
        raise DockerUnavailableError(f"cannot reach the Docker engine to inspect image {tag}: {exc}") from exc
    copy = _python_copy(image_id)
    if not (copy / ".complete").exists():
        return image_id, {}
    return image_id, {str(copy / tree): "/" + tree for tree in PYTHON_TREES}


def _python_copy(image_id: str) -> Path:
    return default_home() / "cache" / "python" / image_id.split(":")[-1][:16]


def _copy_python(client: docker.DockerClient, tag: str, progress: Progress) -> None:
    """Copy the image's Python trees to the host once per image (and drop the copies of images that are gone: a
    kernel, of any process, keeps its image in existence while it runs)."""
    image_id = str(client.images.get(tag).id)
    target = _python_copy(image_id)
    if (target / ".complete").exists():
        return
    progress("copying the image's Python trees to the host, to mount them read-only (faster imports)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    container = client.containers.create(tag, command=["true"], network_disabled=True)
    try:
        tar = subprocess.Popen(["tar", "-x", "--numeric-owner", "-C", str(partial), *PYTHON_TREES],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert tar.stdin is not None
        try:
            for chunk in container.export(chunk_size=1 << 20):
                tar.stdin.write(chunk)  # docker-py yields bytes
        finally:
            tar.stdin.close()
            error = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
            if tar.wait() != 0:
                raise ImageBuildError(f"copying the image's Python trees failed: {error.strip()}")
        (partial / ".complete").touch()
        partial.rename(target)
    finally:
        container.remove(force=True)
        shutil.rmtree(partial, ignore_errors=True)
    existing = {_python_copy(str(image.id)).name for image in client.images.list(all=True)}
    for old in target.parent.iterdir():
        if old != target and old.name not in existing and not old.name.startswith(".partial-"):
            shutil.rmtree(old, ignore_errors=True)


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except ImageNotFound:
        return False


def _stage_packages(staged: Path, progress: Progress) -> Path:
    """Install the pinned packages for the sandbox's Python into staged/<site dir>, from wheels on the host."""
    wheels = _fetch_wheels(_requirements(), default_home() / "cache" / "wheels", progress)
    progress("installing the kernel's Python packages (on the host, for the image)")
    _pip(["install", "--no-index", "--find-links", str(wheels), "--no-deps", "--target",
          str(staged / SITE_PACKAGES), "-r", str(_requirements()), *_WHEEL_TARGET], progress)
    shutil.rmtree(staged / SITE_PACKAGES / "bin", ignore_errors=True)  # console scripts with the host's shebang
    return staged


def _fetch_wheels(requirements: Path, cache: Path, progress: Progress) -> Path:
    """Download the pinned wheels once per requirements file."""
    target = cache / hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    if (target / ".complete").exists():
        return target
    progress("fetching wheels for the kernel image")
    target.mkdir(parents=True, exist_ok=True)
    _pip(["download", "--no-deps", "-d", str(target), "-r", str(requirements), *_WHEEL_TARGET], progress)
    (target / ".complete").touch()
    return target


def _pip(args: list[str], progress: Progress) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_TARGET": ""}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(("Saved", "Successfully")):
            progress(f"  {line[:160]}")
    if proc.returncode != 0:
        raise ImageBuildError(f"pip {args[0]} failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))


def _import_runtime(client: docker.DockerClient, tag: str, staged: Path, work: Path, progress: Progress) -> None:
    """Export the base image's filesystem, append the staged packages, import the result as one layer."""
    progress(f"importing the runtime image {tag}")
    tarball = work / "runtime.tar"
    container = client.containers.create(BASE_IMAGE, command=["true"], network_disabled=True)
    try:
        with open(tarball, "wb") as out:
            for chunk in container.export(chunk_size=1 << 20):
                out.write(chunk)  # docker-py yields bytes
    finally:
        container.remove(force=True)
    # Only the site dir's entries are appended: the export already holds its parent folders.
    site = staged / SITE_PACKAGES
    proc = subprocess.run(["tar", "--numeric-owner", "--owner=0", "--group=0", "-rf", str(tarball), "-C", str(site),
                           f"--transform=s,^,{SITE_PACKAGES}/,", *sorted(os.listdir(site))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"packing the runtime image failed: {proc.stderr.strip()}")
    repository, _, version = tag.partition(":")
    try:
        client.api.import_image_from_file(
            str(tarball), repository=repository, tag=version,
            changes=["ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8", 'CMD ["/bin/bash"]'],
        )
    except APIError as exc:
        raise ImageBuildError(f"importing {tag} failed: {exc}") from exc
    for image in client.images.list(name=RUNTIME_REPOSITORY):  # older runtimes are no longer needed
        if tag not in image.tags:
            try:
                client.images.remove(str(image.id))
            except APIError:
                pass  # still used by an image or a container


def _docker_build(client: docker.DockerClient, context: Path, tag: str, runtime: str, progress: Progress) -> None:
    buildargs = {"RUNTIME_IMAGE": runtime, "INPUTS": inputs_hash()}  # the Dockerfile labels the image with INPUTS
    try:
        for chunk in client.api.build(path=str(context), tag=tag, buildargs=buildargs, rm=True, forcerm=True,
                                      decode=True, pull=False):
            if "error" in chunk:
                raise ImageBuildError(f"building {tag} failed: {chunk['error'].strip()}")
            line = chunk.get("stream", "").rstrip()
            if line:
                progress(f"  {line}")
    except APIError as exc:
        raise ImageBuildError(f"building {tag} failed: {exc}") from exc

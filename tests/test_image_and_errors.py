"""The kernel image is built once per set of inputs; bad setups give clear errors."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from workbench import (
    DockerUnavailableError,
    ImageNotFoundError,
    SessionError,
    SessionNotFoundError,
    Workbench,
)
from workbench.backends.docker.image import INPUTS_LABEL, image_status, inputs_hash


def test_image_is_labelled_with_its_inputs_and_not_rebuilt(wb: Workbench) -> None:
    image = wb.docker.images.get(wb.image)
    assert image.labels[INPUTS_LABEL] == inputs_hash()
    assert image_status(wb.docker, wb.image) == "current"
    started = time.monotonic()
    assert wb.build_image() is False
    assert time.monotonic() - started < 5
    assert wb.docker.images.get(wb.image).id == image.id


def test_image_runs_as_non_root_by_default(wb: Workbench) -> None:
    assert wb.docker.images.get(wb.image).attrs["Config"]["User"] not in ("", "0", "root")


def test_missing_image_is_a_clear_error(home, wb: Workbench) -> None:
    other = Workbench(home=home, image="workbench-kernel:does-not-exist", docker_client=wb.docker)
    with pytest.raises(ImageNotFoundError, match="workbench image build"):
        other.create(user_id="test-user")


def test_unreachable_docker_is_a_clear_error(home, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailableError, match="cannot reach the Docker engine"):
        Workbench(home=home)


def test_cli_reports_unreachable_docker_without_a_traceback(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "image", "status"],
        capture_output=True, text=True,
        env={"DOCKER_HOST": "unix:///nonexistent/docker.sock", "WORKBENCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "cannot reach the Docker engine" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_image_status(home) -> None:
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "image", "status"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": current")


def test_default_user_needs_an_explicit_opt_in(wb: Workbench) -> None:
    with pytest.raises(SessionError, match="default"):
        wb.create(user_id="default")
    with pytest.raises(SessionError):
        wb.create(user_id="../etc")


def test_unknown_and_closed_sessions(wb: Workbench) -> None:
    with pytest.raises(SessionNotFoundError):
        wb.use("0123456789ab")
    session = wb.create(user_id="test-user")
    assert wb.use(session.session_id) is session
    session.close()
    assert not wb.docker.containers.list(all=True, filters={"label": f"workbench.session={session.session_id}"})
    with pytest.raises(SessionError, match="closed"):
        session.execute("1")


def test_a_workbench_keeps_the_image_it_started_with_when_the_tag_moves(wb: Workbench, tmp_path) -> None:
    """Another process rebuilding the image (the tag moving to a new image) must not change what this workbench's
    kernels run, nor mix one image with another's Python trees."""
    from workbench.backends.docker.image import runtime_tag

    tag = "workbench-kernel:pin-test"
    original = wb.docker.images.get(wb.image)
    original.tag(tag)
    pinned = Workbench(home=tmp_path, image=tag, pool_size=0, idle_timeout=None, docker_client=wb.docker)
    try:
        first = pinned.create(user_id="test-user")
        assert first.execute("import pandas; 1 + 1").text == "2"
        wb.docker.images.get(runtime_tag()).tag(tag)  # the tag now names another image (the kernel's packages only)
        second = pinned.create(user_id="test-user")
        assert second.execute("import pandas; 2 + 2").text == "4"
        assert second._kernel.sandbox.container.image.id == original.id  # the image it started with, not the tag's
        first.close(delete_workspace=True)
        second.close(delete_workspace=True)
    finally:
        pinned.close()
        wb.docker.images.remove(tag)

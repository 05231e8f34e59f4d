"""Sandbox backends are chosen by name from the `workbench.backends` entry points; a third party can plug one in."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import Workbench
from workbench.backends import load_backend
from workbench.backends.docker import DockerBackend
from workbench.errors import BackendUnavailableError, DockerUnavailableError, WorkbenchError
from workbench.store import KernelRecord


def test_the_docker_backend_is_found_by_name(wb: Workbench) -> None:
    backend = load_backend("docker", client=wb.docker)
    assert isinstance(backend, DockerBackend) and backend.name == "docker"
    assert isinstance(wb.backend, DockerBackend)
    assert issubclass(DockerUnavailableError, BackendUnavailableError)


def test_an_unknown_backend_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="no sandbox backend 'kubernetes': the installed ones are docker"):
        Workbench(home=tmp_path, backend="kubernetes")


PLUGIN = '''
from workbench.backends import Backend
from workbench.backends.docker import DockerBackend

class CountingBackend(Backend):
    """A third party's backend, built on the interface alone: it hands every call to a Docker backend it holds
    and counts the sandboxes it launched."""
    name = "counting"
    launched = 0

    def __init__(self):
        self.inner = DockerBackend()

    def launch(self, spec):
        type(self).launched += 1
        assert spec.labels["workbench.session"] and spec.command[0] == "python3"
        return self.inner.launch(spec)

    def attach(self, sandbox_id):
        return self.inner.attach(sandbox_id)

    def list_managed(self, labels):
        return self.inner.list_managed(labels)

    def destroy(self, sandbox_id):
        return self.inner.destroy(sandbox_id)

    def ensure_image(self, tag, progress, force=False):
        return self.inner.ensure_image(tag, progress, force)

    def require_image(self, tag):
        self.inner.require_image(tag)

    def pin_image(self, tag):
        return self.inner.pin_image(tag)
'''

USE_PLUGIN = '''
import sys
from workbench import Workbench
from workbench.errors import WorkbenchError
from counting_backend import CountingBackend
with Workbench(home=sys.argv[1], backend="counting", pool_size=0, idle_timeout=None) as wb:
    s = wb.create(user_id="plugin-user")
    print(s.execute("6 * 7").text, s.commands.run("echo $((6 * 7))").stdout.strip(), type(wb.backend).__name__,
          CountingBackend.launched)
    try:
        wb.docker
    except WorkbenchError as exc:
        print("no-docker:", exc)
    s.close(delete_workspace=True)
'''


def test_a_backend_registered_by_another_package_is_used_by_name(tmp_path: Path, wb: Workbench) -> None:
    site = tmp_path / "site"
    (site / "counting_backend-1.0.dist-info").mkdir(parents=True)
    (site / "counting_backend.py").write_text(PLUGIN)
    (site / "counting_backend-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: counting-backend\n"
                                                                      "Version: 1.0\n")
    (site / "counting_backend-1.0.dist-info" / "entry_points.txt").write_text(
        "[workbench.backends]\ncounting = counting_backend:CountingBackend\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", USE_PLUGIN, str(tmp_path / "home")], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.split() == ["42", "42", "CountingBackend", "1"]
    assert second == "no-docker: the workbench runs on the 'counting' backend, not on Docker"


def test_a_kernel_record_of_an_older_store_names_its_sandbox() -> None:
    record = KernelRecord.model_validate({"kernel_id": "k1", "container_id": "c0ffee", "connection": {}})
    assert record.sandbox_id == "c0ffee"
    assert "container_id" not in record.model_dump()

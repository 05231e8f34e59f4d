"""Tests run against the real Docker engine and real kernels. The kernel image is built once, if needed."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled here

from workbench import Session, Workbench  # noqa: E402


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def wb(home: Path) -> Iterator[Workbench]:
    bench = Workbench(home=home, execute_timeout=120)
    bench.build_image(progress=lambda line: print(line, file=sys.stderr, flush=True))
    yield bench
    bench.close()
    for container in bench.docker.containers.list(all=True, filters={"label": f"workbench.home={bench.home_label}"}):
        container.remove(force=True)


@pytest.fixture(scope="module")
def session(wb: Workbench) -> Iterator[Session]:
    """A session shared by the tests of one module that leave its kernel alive."""
    s = wb.create(user_id="test-user")
    yield s
    s.close()


@pytest.fixture
def fresh(wb: Workbench) -> Iterator[Session]:
    """A session of its own, for a test that kills, fills or restarts its kernel."""
    s = wb.create(user_id="test-user")
    yield s
    s.close()

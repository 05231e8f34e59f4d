"""Tests run against the real Docker engine and real kernels. The kernel image is built once, if needed."""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import PostgresServer, Unavailable
from served import Server

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled here

from workbench import Session, Workbench
from workbench.config import default_runtime_root
from workbench.workspace import release_runtime_dir, unmount_all_under

_OWNER = ".workbench-tests-owner"  # in a run's basetemp: the pid of the pytest process that owns it
_UNMARKED_AFTER = 600.0  # a basetemp without any pid in it, untouched this long, is from an ended run


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _homes(root: Path) -> list[Path]:
    """Workbench homes below a test folder (a home has a workbench.db or a workspaces folder: pytest's removal of an
    old basetemp takes the rest and leaves mounted workspaces), not descending into workspaces."""
    found, todo = [], [root]
    while todo:
        folder = todo.pop()
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        if "workbench.db" in names or "workspaces" in names:
            found.append(folder)
            continue
        for name in names:
            child = folder / name
            if len(child.parts) - len(root.parts) < 4 and child.is_dir() and not child.is_symlink():
                todo.append(child)
    return found


def release_test_folder(root: Path) -> None:
    """Remove what the tests below `root` left running or mounted: the containers of every workbench home there,
    their sessions' runtime dirs, and every mount below `root` (lazily; an image's loop device goes with it)."""
    import docker

    try:
        client = docker.from_env()
    except Exception:
        client = None
    runtime_root = default_runtime_root()
    for home in _homes(root):
        label = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
        if client is not None:
            with contextlib.suppress(Exception):
                for container in client.containers.list(all=True, filters={"label": f"workbench.home={label}"}):
                    with contextlib.suppress(Exception):
                        container.remove(force=True)
        with contextlib.suppress(OSError):
            sessions = set(os.listdir(home / "workspaces"))
            for name in os.listdir(runtime_root):
                if name.split("-")[0] in sessions:
                    with contextlib.suppress(OSError):
                        release_runtime_dir(runtime_root / name)
    unmount_all_under(root)


def _stale(run: Path) -> bool:
    """Whether a pytest basetemp belongs to a run that has ended: pytest renames an old one `garbage-*` before
    deleting it, and a live run's basetemp holds the pid of its process (ours, or pytest's own `.lock`, which it
    removes at exit)."""
    if run.name.startswith("garbage-"):
        return True
    marked = False
    for name in (_OWNER, ".lock"):
        try:
            pid = int((run / name).read_text())
        except (OSError, ValueError):
            continue
        marked = True
        if _pid_alive(pid):
            return False
    if marked:
        return True
    try:  # neither: an ended run, unless it is a --basetemp made a moment ago
        return time.time() - run.stat().st_mtime > _UNMARKED_AFTER
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _release_what_tests_leave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A safety net: at the end of the run, nothing the tests started stays running or mounted, whatever a test
    did (a SIGKILLed subprocess cannot clean up). Leftovers of earlier runs whose process is gone go too."""
    base = tmp_path_factory.getbasetemp()
    with contextlib.suppress(OSError):
        (base / _OWNER).write_text(str(os.getpid()))
    yield
    release_test_folder(base)
    parent = base.parent
    if not parent.name.startswith("pytest-of-"):
        return  # a --basetemp of its own: its parent holds other things than test runs
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            run = parent / name
            if not name.startswith(("pytest-", "garbage-")) or run == base:
                continue
            if run.is_dir() and not run.is_symlink() and _stale(run):
                release_test_folder(run)


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def wb(home: Path) -> Iterator[Workbench]:
    bench = Workbench(home=home, execute_timeout=120)
    bench.build_image(progress=lambda line: print(line, file=sys.stderr, flush=True))
    yield bench
    for record in bench.store.list():  # every session a test left open, from this process or another
        with contextlib.suppress(Exception):
            bench.use(record.session_id).close(delete_workspace=True)
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


BRIDGE_CLIENT = """
import json, socket, struct
def connect():
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect("/run/workbench/bridge")
    raw.settimeout(60)
    return raw
def frame(body):
    return struct.pack(">I", len(body)) + body
def read(raw):
    head = b""
    while len(head) < 4:
        chunk = raw.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    size, body = struct.unpack(">I", head)[0], b""
    while len(body) < size:
        body += raw.recv(size - len(body))
    return json.loads(body)
def request(**fields):
    return frame(json.dumps({"v": 2, **fields}).encode())
"""


@pytest.fixture(scope="session")
def bridge_client() -> str:
    """Sandbox code speaking the bridge's wire format by hand (connect, frame, read, request), for tests that
    send what run_tool never would."""
    return BRIDGE_CLIENT


@pytest.fixture(scope="session")
def served(wb: Workbench, home: Path) -> Iterator[Server]:
    """A real `workbench serve` (the README's tools registered) on the tests' home, for the whole run."""
    server = Server(home).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_key(served: Server) -> str:
    return served.key("tests")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the tests' own (see postgres.py); skips when none can be had (not installed, not root)."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"psycopg is not installed ({exc}): pip install 'workbench[postgres]'")
    try:
        server = PostgresServer()
    except Unavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()

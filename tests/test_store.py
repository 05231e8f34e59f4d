"""The store contract, against both stores (SQLite and a real PostgreSQL): every method's behaviour, and races of
several processes on one store settled by the store alone (one winner, no log entry lost or duplicated)."""
from __future__ import annotations

import inspect
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from postgres import AUTH_PASSWORD, AUTH_USER, PostgresServer

from workbench.errors import ConflictError, SessionNotFoundError, StoreError
from workbench.store import (
    KernelRecord,
    PausedState,
    ReplicaRecord,
    SessionConfig,
    SessionRecord,
    SQLiteStore,
    Store,
    open_store,
)


@dataclass(frozen=True)
class Backing:
    """Where a store keeps its data (a SQLite file, or a Postgres DSN): any process can open a Store on it."""

    kind: str
    spec: str

    def open(self) -> Store:
        return SQLiteStore(Path(self.spec)) if self.kind == "sqlite" else open_store(self.spec, Path("/nonexistent"))


@pytest.fixture(params=["sqlite", "postgres"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backing]:
    """Fresh, empty storage: a new SQLite file, or a new schema in the tests' Postgres database."""
    if request.param == "sqlite":
        yield Backing("sqlite", str(tmp_path / "workbench.db"))
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    dsn = server.database()
    yield Backing("postgres", dsn)
    server.drop(dsn)


@pytest.fixture
def opener(backing: Backing) -> Iterator[Callable[[], Store]]:
    """Opens one more Store on the same storage (another process would do the same); all are closed at the end."""
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(backing.open())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Callable[[], Store]) -> Store:
    return opener()


def record(session_id: str = "s1", user_id: str = "u1", created_at: float | None = None, **fields: Any) -> SessionRecord:
    now = time.time() if created_at is None else created_at
    defaults: dict[str, Any] = {"status": "open", "config": SessionConfig(), "config_version": 1, "last_used_at": now}
    return SessionRecord(session_id=session_id, user_id=user_id, created_at=now, **{**defaults, **fields})


def kernel(kernel_id: str = "k1") -> KernelRecord:
    return KernelRecord(kernel_id=kernel_id, sandbox_id=f"c-{kernel_id}", connection={"key": "x", "shell_port": 1},
                        lineage=kernel_id)


# sessions ---------------------------------------------------------------------------------------------------------

def test_a_session_comes_back_as_it_was_added(store: Store) -> None:
    added = record(kernel=kernel(), replica="r1", paused=PausedState(paused_at=1.0, names=["x"], bytes=3),
                   config=SessionConfig(toolkits=["github"], metadata={"trace": "t-1"}))
    store.add(added)
    assert store.get("s1") == added
    with pytest.raises(SessionNotFoundError):
        store.get("nope")
    with pytest.raises(StoreError):
        store.add(record())  # the id is taken


def test_list_filters_by_user_status_metadata_and_owner_oldest_first(store: Store) -> None:
    now = time.time()
    store.add(record("a", "u1", now + 2, config=SessionConfig(metadata={"run": "r1", "team": "x"})))
    store.add(record("b", "u1", now + 1, config=SessionConfig(metadata={"run": "r2"})))
    store.add(record("c", "u2", now + 3, config=SessionConfig(metadata={"run": "r1"})))
    store.add(record("d", "u1", now + 4))
    store.set_status("d", "closed")
    store.set_owner("a", "key1")
    store.set_owner("c", "key1")
    ids = lambda records: [r.session_id for r in records]
    assert ids(store.list()) == ["b", "a", "c"]
    assert ids(store.list(user_id="u1")) == ["b", "a"]
    assert ids(store.list(status="closed")) == ["d"]
    assert ids(store.list(status=None)) == ["b", "a", "c", "d"]
    assert ids(store.list(metadata={"run": "r1"})) == ["a", "c"]
    assert ids(store.list(metadata={"run": "r1", "team": "x"})) == ["a"]
    assert ids(store.list(metadata={"run": "nope"})) == []
    assert ids(store.list(owner="key1")) == ["a", "c"]
    assert ids(store.list(owner="key1", user_id="u2")) == ["c"]


def test_update_config_is_compare_and_set_on_the_version(store: Store) -> None:
    store.add(record())
    assert store.update_config("s1", SessionConfig(toolkits=["a"]), 1) == 2
    with pytest.raises(ConflictError, match="version 2, not 1"):
        store.update_config("s1", SessionConfig(toolkits=["b"]), 1)
    stored = store.get("s1")
    assert (stored.config.toolkits, stored.config_version) == (["a"], 2)
    with pytest.raises(SessionNotFoundError):
        store.update_config("nope", SessionConfig(), 1)


def test_set_status_forgets_the_kernel(store: Store) -> None:
    store.add(record(kernel=kernel()))
    store.set_status("s1", "closed")
    stored = store.get("s1")
    assert (stored.status, stored.kernel) == ("closed", None)


# kernels ----------------------------------------------------------------------------------------------------------

def test_release_kernel_wins_only_for_the_current_kernel_of_an_open_session(store: Store) -> None:
    store.add(record())
    assert not store.release_kernel("s1", "k1")  # none yet
    store.set_kernel("s1", kernel("k1"))
    assert store.get("s1").kernel == kernel("k1")
    assert not store.release_kernel("s1", "k2")
    assert store.release_kernel("s1", "k1")
    assert store.get("s1").kernel is None
    assert not store.release_kernel("s1", "k1")  # already released
    store.set_kernel("s1", kernel("k3"))
    store.set_status("s1", "closed")
    store.set_kernel("s1", kernel("k3"))
    assert not store.release_kernel("s1", "k3")  # a closed session's kernel is not for the reaper
    assert not store.release_kernel("nope", "k1")


def test_release_kernel_when_idle_spares_a_used_or_busy_session(store: Store) -> None:
    store.add(record(kernel=kernel()))
    store.touch("s1")
    assert not store.release_kernel("s1", "k1", idle_before=time.time() - 60)  # used since
    store.mark_busy("s1", time.time() + 60)
    assert not store.release_kernel("s1", "k1", idle_before=time.time() + 1)  # a cell may still run
    store.mark_busy("s1", 0)
    assert store.release_kernel("s1", "k1", idle_before=time.time() + 1)


def test_pause_is_release_kernel_and_the_paused_mark_at_once(store: Store) -> None:
    paused = PausedState(paused_at=time.time(), names=["df"], modules={"pd": "pandas"}, lineage="k1")
    store.add(record(kernel=kernel()))
    assert not store.pause("s1", "k2", paused)
    assert store.get("s1").paused is None
    store.touch("s1")
    assert not store.pause("s1", "k1", paused, idle_before=time.time() - 60)
    assert store.pause("s1", "k1", paused)
    stored = store.get("s1")
    assert (stored.kernel, stored.paused) == (None, paused)
    assert not store.pause("s1", "k1", paused)
    store.set_paused("s1", None)
    assert store.get("s1").paused is None
    store.set_paused("s1", paused)
    assert store.get("s1").paused == paused


def test_touch_never_goes_back_and_an_execution_clears_the_busy_mark(store: Store) -> None:
    future = time.time() + 1000
    store.add(record("later", last_used_at=future))
    store.touch("later")
    assert store.get("later").last_used_at == future  # another process marked it later: kept
    store.add(record(created_at=time.time() - 100))
    before = store.get("s1").last_used_at
    store.touch("s1")
    assert store.get("s1").last_used_at > before
    store.mark_busy("s1", future)
    store.touch("s1")
    assert store.get("s1").busy_until == future  # a shell command leaves a running cell's mark
    store.log("s1", "tool", "ok", 0.1, {}, touch=False)
    store.flush()
    assert store.get("s1").busy_until == future
    store.log("s1", "execution", "ok", 0.1, {})
    after = store.get("s1")
    assert after.busy_until == 0 and after.last_used_at >= before


def test_data_version_changes_when_another_store_writes(opener: Callable[[], Store]) -> None:
    reader, writer = opener(), opener()
    writer.add(record())

    def changes(write: Callable[[], object]) -> bool:
        before = reader.data_version()
        write()
        return reader.data_version() != before

    # unchanged while nobody writes (on Postgres any commit on the server counts: a background one may interfere)
    assert any(reader.data_version() == reader.data_version() for _ in range(5))
    assert changes(lambda: writer.add(record("s2")))
    assert changes(lambda: writer.update_config("s1", SessionConfig(tools=["T"]), 1))
    assert changes(lambda: writer.set_kernel("s1", kernel()))
    assert changes(lambda: writer.touch("s1"))
    assert changes(lambda: writer.mark_busy("s1", time.time() + 5))
    assert changes(lambda: writer.release_kernel("s1", "k1"))
    assert changes(lambda: writer.set_status("s1", "closed"))
    assert changes(lambda: writer.log("s2", "execution", "ok", 0.1, {}))


# logs -------------------------------------------------------------------------------------------------------------

def test_logs_are_the_newest_oldest_first_per_session(store: Store) -> None:
    store.add(record())
    for n in range(6):
        store.log("s1" if n != 3 else "other", "tool" if n % 2 else "execution", "ok" if n else "error", n / 10,
                  {"n": n, "metadata": {"trace": "t"}, "big": 2**70, "text": "é\x00"}, touch=n % 2 == 0)
    entries = store.logs("s1")
    assert [e.detail["n"] for e in entries] == [0, 1, 2, 4, 5]
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    first = entries[0]
    assert (first.session_id, first.kind, first.status, first.duration) == ("s1", "execution", "error", 0.0)
    assert first.detail == {"n": 0, "metadata": {"trace": "t"}, "big": 2**70, "text": "é\x00"}
    assert first.metadata == {"trace": "t"}
    assert [e.detail["n"] for e in store.logs("s1", limit=2)] == [4, 5]
    assert [e.detail["n"] for e in store.logs("other")] == [3]
    assert store.logs("nope") == []


def test_a_sessions_oldest_entries_beyond_log_keep_are_pruned(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules[type(store).__module__]
    monkeypatch.setattr(module, "LOG_KEEP", 5)
    monkeypatch.setattr(module, "_PRUNE_EVERY", 10)
    for n in range(25):
        store.log("s1", "execution", "ok", 0.0, {"n": n})
    store.log("s2", "execution", "ok", 0.0, {"n": 0})
    assert [e.detail["n"] for e in store.logs("s1")] == list(range(15, 25))  # pruned to 5 at 10 and 20 entries
    assert len(store.logs("s2")) == 1


def test_flush_makes_what_was_logged_visible_to_another_store(opener: Callable[[], Store]) -> None:
    writer, reader = opener(), opener()
    for n in range(3):
        writer.log("s1", "tool", "ok", 0.0, {"n": n}, touch=False)
    writer.flush()
    assert [e.detail["n"] for e in reader.logs("s1")] == [0, 1, 2]


def test_threads_logging_at_once_lose_nothing_and_keep_their_order(store: Store) -> None:
    def write(thread: int) -> None:
        for n in range(50):
            store.log("s1", "tool", "ok", 0.0, {"t": thread, "n": n}, touch=n % 3 == 0)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _check_log(store.logs("s1", limit=10_000), writers=8, each=50, key="t")


def _check_log(entries: list, writers: int, each: int, key: str) -> None:
    assert len(entries) == writers * each
    assert len({(e.detail[key], e.detail["n"]) for e in entries}) == writers * each  # none twice
    assert [e.id for e in entries] == sorted({e.id for e in entries})
    for writer in range(writers):
        assert [e.detail["n"] for e in entries if e.detail[key] == writer] == list(range(each))


# API keys and owners ----------------------------------------------------------------------------------------------

def test_api_keys_are_found_by_hash_until_revoked(store: Store) -> None:
    first = store.add_api_key("k1", "agent", "hash1")
    store.add_api_key("k2", "other", "hash2")
    assert (first.key_id, first.name, first.active) == ("k1", "agent", True)
    assert store.api_key_by_hash("hash1") == first
    assert store.api_key_by_hash("nope") is None
    with pytest.raises(StoreError):
        store.add_api_key("k3", "again", "hash1")  # one hash, one key
    assert store.revoke_api_key("k1")
    assert not store.revoke_api_key("k1")
    assert not store.revoke_api_key("nope")
    assert store.api_key_by_hash("hash1") is None
    keys = store.api_keys()
    assert [(k.key_id, k.active) for k in keys] == [("k1", False), ("k2", True)]


def test_a_session_has_one_owner_for_good(store: Store) -> None:
    store.add(record())
    assert store.owner("s1") is None
    store.set_owner("s1", "k1")
    assert store.owner("s1") == "k1"
    with pytest.raises(StoreError):
        store.set_owner("s1", "k2")
    assert store.owner("s1") == "k1"


def test_replicas_are_kept_by_their_latest_heartbeat(store: Store) -> None:
    assert store.replicas() == []
    first = ReplicaRecord(replica_id="r2", url="http://h2:8642", memory=2**33, started_at=1.0, seen_at=2.0)
    store.heartbeat(first)
    store.heartbeat(ReplicaRecord(replica_id="r1", url="http://h1:8642", memory=2**34, started_at=1.0, seen_at=3.0))
    again = first.model_copy(update={"seen_at": 9.0, "memory": 2**32})
    store.heartbeat(again)
    assert store.replicas() == [ReplicaRecord(replica_id="r1", url="http://h1:8642", memory=2**34, started_at=1.0,
                                              seen_at=3.0), again]


def test_a_closed_store_refuses_every_call(store: Store) -> None:
    store.add(record())
    store.log("s1", "tool", "ok", 0.0, {}, touch=False)
    store.close()
    store.close()  # twice is fine
    calls: list[Callable[[], object]] = [
        lambda: store.get("s1"), lambda: store.list(), lambda: store.add(record("s2")), lambda: store.touch("s1"),
        lambda: store.log("s1", "tool", "ok", 0.0, {}), lambda: store.logs("s1"), store.flush, store.data_version,
        lambda: store.api_keys(), lambda: store.update_config("s1", SessionConfig(), 1)]
    for call in calls:
        with pytest.raises(StoreError, match="closed"):
            call()


def test_close_writes_out_what_was_logged(backing: Backing) -> None:
    writer = backing.open()
    for n in range(5):
        writer.log("s1", "tool", "ok", 0.0, {"n": n}, touch=False)
    writer.close()
    reader = backing.open()
    try:
        assert [e.detail["n"] for e in reader.logs("s1")] == list(range(5))
    finally:
        reader.close()


# several processes ------------------------------------------------------------------------------------------------

PROCESSES = 4
# Each child forked from a server process that imported the store modules once (not 4 fresh interpreters per race).
_PROCESSES = multiprocessing.get_context("forkserver")
_PROCESSES.set_forkserver_preload(["workbench.store", "workbench.store.postgres", "test_store"])


def _race(target: Callable[..., None], backing: Backing, *args: Any) -> list[Any]:
    """Run `target(backing, barrier, results, i, *args)` in PROCESSES new processes at once; their results."""
    barrier, results = _PROCESSES.Barrier(PROCESSES), _PROCESSES.Queue()
    processes = [_PROCESSES.Process(target=target, args=(backing, barrier, results, i, *args)) for i in range(PROCESSES)]
    for process in processes:
        process.start()
    try:
        found = [results.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes), [p.exitcode for p in processes]
    assert not [r for r in found if isinstance(r, str) and r.startswith("failed")], found
    return found


def _update_config(backing: Backing, barrier: Any, results: Any, i: int) -> None:
    store = backing.open()
    try:
        barrier.wait()
        try:
            store.update_config("s1", SessionConfig(toolkits=[f"p{i}"]), 1)
            results.put(i)
        except ConflictError:
            results.put(None)
    except Exception as exc:
        results.put(f"failed: {exc!r}")
    finally:
        store.close()


def _release(backing: Backing, barrier: Any, results: Any, i: int) -> None:
    store = backing.open()
    try:
        barrier.wait()
        if i % 2:
            won = store.release_kernel("s1", "k1", idle_before=time.time() + 60)
        else:
            won = store.pause("s1", "k1", PausedState(paused_at=time.time(), names=[str(i)]))
        results.put(i if won else None)
    except Exception as exc:
        results.put(f"failed: {exc!r}")
    finally:
        store.close()


def _write_logs(backing: Backing, barrier: Any, results: Any, i: int, each: int) -> None:
    store = backing.open()
    try:
        barrier.wait()
        for n in range(each):
            store.log("shared", "tool" if n % 2 else "execution", "ok", 0.0, {"p": i, "n": n}, touch=n % 2 == 0)
            store.log(f"own-{i}", "tool", "ok", 0.0, {"p": i, "n": n}, touch=False)
        results.put(i)
    except Exception as exc:
        results.put(f"failed: {exc!r}")
    finally:
        store.close()


def test_processes_racing_one_config_version_make_one_winner(backing: Backing, store: Store) -> None:
    store.add(record())
    winners = [r for r in _race(_update_config, backing) if r is not None]
    assert len(winners) == 1
    stored = store.get("s1")
    assert (stored.config_version, stored.config.toolkits) == (2, [f"p{winners[0]}"])


def test_processes_racing_for_one_kernel_make_one_owner_of_its_removal(backing: Backing, store: Store) -> None:
    store.add(record(created_at=time.time() - 100, kernel=kernel("k1")))
    winners = [r for r in _race(_release, backing) if r is not None]
    assert len(winners) == 1
    stored = store.get("s1")
    assert stored.kernel is None
    assert (stored.paused is not None) == (winners[0] % 2 == 0)


def test_processes_logging_at_once_lose_nothing_and_keep_each_ones_order(backing: Backing, store: Store) -> None:
    each = 150
    _race(_write_logs, backing, each)
    _check_log(store.logs("shared", limit=10_000), writers=PROCESSES, each=each, key="p")
    for i in range(PROCESSES):
        assert [e.detail["n"] for e in store.logs(f"own-{i}", limit=10_000)] == list(range(each))


def _open_and_add(backing: Backing, barrier: Any, results: Any, i: int) -> None:
    import workbench

    assert os.path.samefile(Path(workbench.__file__).parents[1], Path(__file__).parents[1]), workbench.__file__
    try:
        barrier.wait()
        store = backing.open()
        store.add(record(f"s{i}"))
        store.close()
        results.put(i)
    except Exception as exc:
        results.put(f"failed: {exc!r}")


def test_processes_opening_a_new_store_at_once_all_get_it(backing: Backing, opener: Callable[[], Store]) -> None:
    _race(_open_and_add, backing)  # the first of them creates the tables; the others wait for it, or find them
    assert sorted(r.session_id for r in opener().list()) == [f"s{i}" for i in range(PROCESSES)]


# choosing a store, and its errors ---------------------------------------------------------------------------------

def test_workbench_store_chooses_postgres_and_unset_is_sqlite(postgres_server: PostgresServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.store.postgres import PostgresStore

    dsn = postgres_server.database()
    try:
        monkeypatch.setenv("WORKBENCH_STORE", dsn)
        chosen = open_store(None, tmp_path)
        assert isinstance(chosen, PostgresStore)
        chosen.close()
        given = SQLiteStore(tmp_path / "given.db")
        assert open_store(given, tmp_path) is given  # a Store given wins over the environment
        given.close()
        for unset in ("", None):
            if unset is None:
                monkeypatch.delenv("WORKBENCH_STORE")
            else:
                monkeypatch.setenv("WORKBENCH_STORE", unset)
            default = open_store(None, tmp_path)
            assert isinstance(default, SQLiteStore) and default.path == tmp_path / "workbench.db"
            default.close()
    finally:
        postgres_server.drop(dsn)


def test_a_dsn_of_another_kind_is_refused_without_its_password(tmp_path: Path) -> None:
    for spec in ("mysql://me:hunter2-pw@db/x", "hunter2-pw", "sqlite:///tmp/x.db"):
        with pytest.raises(StoreError, match="postgresql://") as caught:
            open_store(spec, tmp_path)
        assert "hunter2" not in str(caught.value)


def test_a_store_that_cannot_connect_says_why_without_the_password(postgres_server: PostgresServer) -> None:
    wrong = postgres_server.dsn("postgres", AUTH_USER, "not-" + AUTH_PASSWORD)
    with pytest.raises(StoreError, match="password authentication failed") as caught:
        open_store(wrong, Path("/nonexistent"))
    assert AUTH_PASSWORD not in str(caught.value) and "127.0.0.1" in str(caught.value)
    right = open_store(postgres_server.dsn("postgres", AUTH_USER, AUTH_PASSWORD), Path("/nonexistent"))
    right.close()

    with socket_closed() as port:  # nothing listens there: the server is down
        down = f"postgresql://{AUTH_USER}:{AUTH_PASSWORD}@127.0.0.1:{port}/postgres?connect_timeout=5"
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"127.0.0.1:{port}") as caught:
            open_store(down, Path("/nonexistent"))
        assert time.monotonic() - started < 10
        assert AUTH_PASSWORD not in str(caught.value) and "refused" in str(caught.value)

    garbled = f"postgresql://{AUTH_USER}:{AUTH_PASSWORD}@127.0.0.1/db?no_such_option=1"
    with pytest.raises(StoreError, match="does not parse") as caught:
        open_store(garbled, Path("/nonexistent"))
    assert AUTH_PASSWORD not in str(caught.value)
    for spaced in (f"postgresql://{AUTH_USER}:correct horse@127.0.0.1/db", f"postgresql://{AUTH_USER}:pw%zzsecret@h/db"):
        with pytest.raises(StoreError, match="does not parse") as caught:  # psycopg's own message quotes it
            open_store(spaced, Path("/nonexistent"))
        assert "horse" not in str(caught.value) and "secret" not in str(caught.value)


class socket_closed:
    """A local TCP port where nothing listens (bound to no one, for as long as the block lasts)."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused
        return self.socket.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.socket.close()


# end to end -------------------------------------------------------------------------------------------------------

SECOND_PROCESS = """
import sys
from workbench import Workbench
wb = Workbench(home=sys.argv[1], pool_size=0, idle_timeout=None)  # the store: WORKBENCH_STORE
s = wb.use(sys.argv[2])
print(s.execute("x * 10").text)
print(",".join(e.kind for e in s.logs()))
wb.close()
"""


def test_two_workbenches_in_two_processes_share_sessions_through_postgres(postgres_server: PostgresServer,
                                                                           tmp_path: Path) -> None:
    from workbench import Workbench

    dsn = postgres_server.database()
    home = tmp_path / "home"
    try:
        with Workbench(home=home, store=dsn, pool_size=0, idle_timeout=None) as wb:
            s = wb.create(user_id="pg-user")
            assert s.execute("x = 1 + 1\nx").text == "2"
            env = {**os.environ, "WORKBENCH_STORE": dsn, "PYTHONPATH": os.pathsep.join(sys.path)}
            seen = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(home), s.session_id], env=env,
                                  capture_output=True, text=True, timeout=180, check=False)
            assert seen.returncode == 0, seen.stderr[-3000:]
            assert seen.stdout.split() == ["20", "execution,execution"]
            assert [e.kind for e in s.logs()] == ["execution", "execution"]
            assert [r.session_id for r in wb.store.list(user_id="pg-user")] == [s.session_id]
            s.close(delete_workspace=True)
    finally:
        postgres_server.drop(dsn)


def test_the_postgres_store_implements_the_whole_interface() -> None:
    from workbench.store.postgres import PostgresStore

    assert not PostgresStore.__abstractmethods__
    for name in Store.__abstractmethods__:
        ours, theirs = inspect.signature(getattr(PostgresStore, name)), inspect.signature(getattr(Store, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_a_store_outlives_a_restart_of_the_server(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.database()
    store = open_store(dsn, Path("/nonexistent"))
    try:
        store.add(record())
        readers = [threading.Thread(target=store.get, args=("s1",)) for _ in range(4)]
        for n, reader in enumerate(readers):  # the pool holds several connections: the restart ends them all
            reader.start()
            store.log("s1", "execution", "ok", 0.0, {"n": n})
        for reader in readers:
            reader.join()
        postgres_server.restart()
        for n in range(4, 8):  # each pooled connection is found dead before it is used, and replaced
            assert store.get("s1").session_id == "s1"
            store.touch("s1")
            store.log("s1", "tool", "ok", 0.0, {"n": n}, touch=False)
        assert [e.detail["n"] for e in store.logs("s1")] == list(range(8))
    finally:
        store.close()
        postgres_server.drop(dsn)


def test_the_command_line_keeps_api_keys_in_the_store_workbench_store_names(postgres_server: PostgresServer,
                                                                             tmp_path: Path) -> None:
    dsn = postgres_server.database()
    try:
        env = {**os.environ, "WORKBENCH_STORE": dsn, "WORKBENCH_HOME": str(tmp_path / "home"),
               "PYTHONPATH": os.pathsep.join(sys.path)}
        made = subprocess.run([sys.executable, "-m", "workbench", "keys", "create", "from-cli"], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert made.returncode == 0, made.stderr[-2000:]
        store = open_store(dsn, tmp_path)
        assert [k.name for k in store.api_keys()] == ["from-cli"]
        store.close()
        assert not (tmp_path / "home" / "workbench.db").exists()
    finally:
        postgres_server.drop(dsn)


def test_the_password_may_come_from_a_file(postgres_server: PostgresServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As a Swarm secret gives it: WORKBENCH_STORE_PASSWORD_FILE, for a DSN that holds none."""
    secret = tmp_path / "db_password"
    secret.write_text(AUTH_PASSWORD + "\n")
    monkeypatch.setenv("WORKBENCH_STORE", postgres_server.dsn("postgres", AUTH_USER))
    monkeypatch.setenv("WORKBENCH_STORE_PASSWORD_FILE", str(secret))
    open_store(None, tmp_path).close()
    secret.write_text("not-" + AUTH_PASSWORD)
    with pytest.raises(StoreError, match="password authentication failed") as caught:
        open_store(None, tmp_path)
    assert AUTH_PASSWORD not in str(caught.value)
    monkeypatch.setenv("WORKBENCH_STORE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(StoreError, match="WORKBENCH_STORE_PASSWORD_FILE"):
        open_store(None, tmp_path)

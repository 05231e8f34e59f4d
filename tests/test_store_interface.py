"""The store is an interface: the SQLite store implements all of it, and a Workbench keeps its sessions in the store
it is given."""
from __future__ import annotations

import inspect
from pathlib import Path

from workbench import Workbench
from workbench.store import SQLiteStore, Store


def test_the_sqlite_store_implements_the_whole_interface() -> None:
    abstract = {name for name, member in inspect.getmembers(Store) if getattr(member, "__isabstractmethod__", False)}
    assert abstract >= {"add", "get", "list", "update_config", "pause", "log", "logs", "close"}
    assert not SQLiteStore.__abstractmethods__
    for name in abstract:
        ours, theirs = inspect.signature(getattr(SQLiteStore, name)), inspect.signature(getattr(Store, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_a_workbench_keeps_its_sessions_in_the_store_it_is_given(tmp_path: Path, wb: Workbench) -> None:
    elsewhere = SQLiteStore(tmp_path / "elsewhere" / "sessions.db")
    with Workbench(home=tmp_path / "home", store=elsewhere, pool_size=0, idle_timeout=None,
                   docker_client=wb.docker) as given:
        s = given.create(user_id="store-user")
        assert s.execute("1 + 1").text == "2"
        assert elsewhere.get(s.session_id).user_id == "store-user"
        assert [e.kind for e in elsewhere.logs(s.session_id)] == ["execution"]
        s.close(delete_workspace=True)
    assert not (tmp_path / "home" / "workbench.db").exists()

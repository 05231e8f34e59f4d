"""Session metadata (correlation ids): validated, stored, given to tools, written into every log entry, and a filter
of the session list — from the API and the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_cli import cli

from workbench import MetadataError, SessionError, Workbench
from workbench.tools import ToolContext


@pytest.mark.parametrize("metadata", [
    {f"k{i}": "v" for i in range(17)},  # too many keys
    {"": "v"}, {"a b": "v"}, {"k" * 65: "v"}, {"quote\"": "v"},  # keys of the wrong form
    {"k": "v" * 257}, {"k": "line\nbreak"}, {"k": "nul\x00"},  # values of the wrong form
    {"k": 1}, {"k": None}, {1: "v"}, ["k", "v"],  # not strings
    {f"key{i}": "v" * 250 for i in range(16)},  # over 4 KiB of JSON in all
])
def test_bad_metadata_is_refused_before_anything_starts(wb: Workbench, metadata: Any) -> None:
    before = len(wb.list())
    with pytest.raises(MetadataError):
        wb.create("meta-user", metadata=metadata)
    assert len(wb.list()) == before
    with pytest.raises(SessionError):
        wb.list(metadata=metadata)


def test_metadata_reaches_tools_logs_and_the_list(wb: Workbench) -> None:
    if "META_ECHO" not in wb.tools:

        @wb.tool(slug="META_ECHO", toolkit="meta")
        def echo(context: ToolContext) -> dict:
            return dict(context.metadata)

    first = wb.create("meta-user", toolkits=["meta"], metadata={"x-correlation-id": "run-1", "team": "data"})
    second = wb.create("meta-user", toolkits=["meta"], metadata={"x-correlation-id": "run-2", "team": "data"})
    try:
        assert first.metadata == {"x-correlation-id": "run-1", "team": "data"}
        assert first.execute_tool("META_ECHO").data == {"x-correlation-id": "run-1", "team": "data"}
        assert first.execute("print(1)").ok
        assert first.execute_tools([("META_ECHO", {})])[0].data["team"] == "data"
        entries = first.logs()
        assert [e.kind for e in entries] == ["tool", "execution", "tool"]
        assert all(e.metadata == first.metadata for e in entries)

        ids = lambda **filters: [r.session_id for r in wb.list(**filters)]
        assert ids(metadata={"x-correlation-id": "run-2"}) == [second.session_id]
        assert ids(metadata={"team": "data"}) == [first.session_id, second.session_id]
        assert ids(metadata={"team": "data", "x-correlation-id": "run-1"}) == [first.session_id]
        assert ids(metadata={"team": "ops"}) == []
        assert ids(user_id="someone-else", metadata={"team": "data"}) == []

        version = first.update(metadata={"x-correlation-id": "run-3"})  # replaced as a whole, versioned
        assert version == 2 and wb.use(first.session_id).metadata == {"x-correlation-id": "run-3"}
        assert first.execute_tool("META_ECHO").data == {"x-correlation-id": "run-3"}
        assert first.logs()[-1].metadata == {"x-correlation-id": "run-3"}
        with pytest.raises(MetadataError):
            first.update(metadata={"k": "\x1b[31m"})
        with pytest.raises(MetadataError):
            first.update(metadata={"k": "\x9b2J\u202e"})  # C1 controls and bidi overrides are not printable
        assert first.config_version == 2

        with Workbench(home=wb.home, pool_size=0, idle_timeout=None) as other:  # another process's view
            elsewhere = other.use(first.session_id)
            first.update(metadata={"x-correlation-id": "run-4"})
            assert elsewhere.metadata == {"x-correlation-id": "run-4"}  # read again: the store changed
            assert elsewhere.commands.run("true").ok
            assert first.logs()[-1].kind == "command" and first.logs()[-1].metadata == {"x-correlation-id": "run-4"}
    finally:
        first.close()
        second.close()


def test_metadata_from_the_command_line(wb: Workbench, home: Path) -> None:
    session_id = cli(home, "session", "create", "--user", "meta-cli", "--metadata", "x-correlation-id=cli-7",
                     "--metadata", "team=[red]data[/]").stdout.strip()
    try:
        shown = cli(home, "session", "show", session_id).stdout
        assert "x-correlation-id=cli-7, team=[red]data[/]" in shown  # shown as given, never read as markup
        assert session_id in cli(home, "session", "list", "--metadata", "team=[red]data[/]").stdout
        assert session_id not in cli(home, "session", "list", "--metadata", "team=ops").stdout
        refused = cli(home, "session", "create", "--user", "meta-cli", "--metadata", "novalue", ok=False)
        assert "KEY=VALUE" in refused.stderr
    finally:
        wb.use(session_id).close()

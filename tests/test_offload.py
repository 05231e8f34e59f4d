"""Tool responses: inline when small, written into the workspace (JSON + Arrow) when large, read back in the kernel."""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from workbench import Session, Workbench
from workbench.tools import ToolContext


def api_records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """Issue-tracker-like records: nested objects, lists of objects, fields present in some records only."""
    rnd = random.Random(seed)
    records = []
    for i in range(n):
        record: dict[str, Any] = {
            "id": i, "title": f"Issue {i}: something broke", "state": rnd.choice(["open", "closed"]),
            "user": {"login": f"user{rnd.randrange(500)}", "id": rnd.randrange(10**6)},
            "labels": [{"name": rnd.choice(["bug", "docs"]), "color": "ff0000"} for _ in range(rnd.randrange(3))],
            "comments": rnd.randrange(40), "created_at": "2026-11-21T10:00:00Z",
        }
        if i % 3 == 0:
            record["milestone"] = {"title": "v1", "due_on": None}
        if i % 4 == 0:
            record["body"] = "details " * rnd.randrange(1, 20)
        records.append(record)
    return records


def deep_tree(depth: int, width: int) -> Any:
    return {f"k{i}": deep_tree(depth - 1, width) for i in range(width)} if depth else [1, "x", None, True]


class Repo(BaseModel):
    name: str
    stars: int


@dataclasses.dataclass
class Point:
    x: float
    y: float


@pytest.fixture(scope="module")
def tooled(wb: Workbench) -> Iterator[Session]:
    if "FETCH" not in wb.tools:
        @wb.tool(slug="FETCH", toolkit="data")
        def fetch(kind: str, n: int = 10) -> Any:
            """Return test data of one shape."""
            return {
                "records": lambda: api_records(n),
                "flat": lambda: [{"a": i, "b": i * 0.5, "c": f"row{i}"} for i in range(n)],
                "tree": lambda: deep_tree(6, 5),
                "text": lambda: "lorem ipsum " * n,
                "wrapped": lambda: {"total_count": n, "incomplete": False, "items": api_records(n)},
                "conflict": lambda: [{"a": i} for i in range(n)] + [{"a": "not a number"}],
                "drift": lambda: [{"i": i, "score": i, "pad": "x" * 100} for i in range(n)]
                + [{"i": i, "score": i + 0.5, "late": {"k": [i]}} for i in range(n)],
                "odd": lambda: {"when": datetime.datetime(2026, 11, 21, 10, 30, tzinfo=datetime.UTC),
                                "price": decimal.Decimal("12.30"), "raw": b"\x00\xffhi", "count": np.int64(3),
                                "vector": np.arange(3), "repo": Repo(name="a/b", stars=5), "tags": {"x"},
                                "point": Point(1.0, 2.5), "day": datetime.date(2026, 11, 21)},
                "object": lambda: {"thing": object()},
                "bigint": lambda: {"n": 2**70},
            }[kind]()

        @wb.tool(slug="WHOAMI", toolkit="data")
        def whoami(context: ToolContext) -> dict:
            return {"user": context.user_id, "session": context.session_id}

        @wb.tool(slug="BROKEN", toolkit="data")
        def broken(reason: str) -> None:
            raise RuntimeError(f"upstream said {reason}")

        @wb.tool(slug="SLOW", toolkit="data")
        def slow(seconds: float) -> str:
            time.sleep(seconds)
            return "done"

        @wb.tool(slug="SLACK_SEND", toolkit="slack")
        def slack_send(channel: str, text: str) -> dict:
            return {"ok": True, "channel": channel}

    session = wb.create(user_id="tool-user", toolkits=["data"])
    yield session
    session.close(delete_workspace=True)


def canonical_sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


KERNEL_SHA = ("import hashlib, json\n"
              "hashlib.sha256(json.dumps(responses[{rid!r}], sort_keys=True, separators=(',', ':')).encode())"
              ".hexdigest()")


def test_small_responses_stay_inline(tooled: Session) -> None:
    result = tooled.execute_tool("FETCH", {"kind": "flat", "n": 3})
    assert result.ok and result.offload is None
    assert result.data == [{"a": 0, "b": 0.0, "c": "row0"}, {"a": 1, "b": 0.5, "c": "row1"},
                           {"a": 2, "b": 1.0, "c": "row2"}]
    assert not tooled.files.exists(".responses")
    assert json.loads(str(result)) == result.data


def test_api_records_are_offloaded_as_json_and_an_arrow_table(tooled: Session) -> None:
    records = api_records(5000)
    result = tooled.execute_tool("FETCH", {"kind": "records", "n": 5000})
    envelope = result.offload
    assert result.ok and result.data is None and envelope is not None
    assert len(envelope.model_dump_json()) <= 2048 and len(str(result)) <= 2048
    assert envelope.format == "json" and envelope.records == 5000 and envelope.records_at == ""
    assert envelope.columns["user"] == "struct<login: string, id: int64>"
    assert envelope.columns["labels"] == "list<item: struct<name: string, color: string>>"
    assert {"milestone", "body"} <= set(envelope.columns)  # keys missing from the first records still count
    sizes = {entry.path: entry.size for entry in tooled.files.list(".responses")}
    assert envelope.bytes == sizes[envelope.path] > 1_000_000 and sizes[envelope.table_path] > 0
    assert f'tables["{envelope.id}"]' in envelope.hint and json.loads(envelope.preview)["id"] == 0
    # the workspace holds the exact JSON of the response, and the kernel reads exactly what the tool returned
    assert json.loads(tooled.files.read(envelope.path)) == records
    assert tooled.execute(KERNEL_SHA.format(rid=envelope.id)).text == repr(canonical_sha(records))
    check = tooled.execute(
        f"df = tables[{envelope.id!r}]\n"
        "(len(df), df['user'].iloc[7]['login'], int(df['comments'].sum()), int(df['milestone'].isna().sum()),"
        " len(df['labels'].iloc[1]), type(df).__name__)")
    assert check.text == repr((5000, records[7]["user"]["login"], sum(r["comments"] for r in records),
                               sum("milestone" not in r for r in records), len(records[1]["labels"]), "DataFrame"))
    assert envelope.id in tooled.execute("list(tables)").text


def test_a_flat_table_a_deep_tree_and_a_long_string(tooled: Session) -> None:
    flat = tooled.execute_tool("FETCH", {"kind": "flat", "n": 50_000}).offload
    assert flat.records == 50_000 and flat.columns == {"a": "int64", "b": "double", "c": "string"}
    total = sum(i * 0.5 for i in range(50_000))
    assert tooled.execute(f"float(tables[{flat.id!r}]['b'].sum())").text == repr(total)

    tree = tooled.execute_tool("FETCH", {"kind": "tree"})
    envelope = tree.offload
    assert envelope.format == "json" and envelope.table_path is None and envelope.records is None
    assert envelope.columns == {f"k{i}": "object" for i in range(5)}
    assert len(envelope.model_dump_json()) <= 2048
    assert tooled.execute(KERNEL_SHA.format(rid=envelope.id)).text == repr(canonical_sha(deep_tree(6, 5)))

    text = tooled.execute_tool("FETCH", {"kind": "text", "n": 10_000}).offload
    assert text.format == "text" and text.path.endswith(".txt") and text.preview.startswith("lorem ipsum")
    assert tooled.execute(f"responses[{text.id!r}] == 'lorem ipsum ' * 10_000").text == "True"


def test_records_inside_a_response_and_records_that_cannot_be_a_table(tooled: Session) -> None:
    wrapped = tooled.execute_tool("FETCH", {"kind": "wrapped", "n": 3000}).offload
    assert wrapped.format == "json" and wrapped.records_at == "items" and wrapped.records == 3000
    assert tooled.execute(f"responses[{wrapped.id!r}]['total_count'], len(tables[{wrapped.id!r}])").text == \
        "(3000, 3000)"

    conflict = tooled.execute_tool("FETCH", {"kind": "conflict", "n": 5000}).offload
    assert conflict.table_path is None and "changed from number to string" in conflict.table_error
    assert "could not be made into one table" in conflict.hint
    assert tooled.execute(f"responses[{conflict.id!r}][-1]").text == "{'a': 'not a number'}"


def test_records_whose_fields_change_along_a_large_response(tooled: Session) -> None:
    # 20 MB: parsed in several chunks, whose schemas differ (int then float, a field that appears late)
    drift = tooled.execute_tool("FETCH", {"kind": "drift", "n": 100_000}).offload
    assert drift.records == 200_000 and drift.table_error is None
    assert drift.columns == {"i": "int64", "score": "double", "pad": "string", "late": "struct<k: list<item: int64>>"}
    assert tooled.execute(f"df = tables[{drift.id!r}]\n(float(df.score.iloc[-1]), df.late.iloc[0], df.late.iloc[-1])"
                          ).text == "(99999.5, <NA>, {'k': [99999]})"


def test_values_that_are_not_json_native(tooled: Session) -> None:
    odd = tooled.execute_tool("FETCH", {"kind": "odd"})
    assert odd.ok, odd.error
    assert odd.data == {"when": "2026-11-21T10:30:00+00:00", "price": "12.30", "raw": "AP9oaQ==", "count": 3,
                        "vector": [0, 1, 2], "repo": {"name": "a/b", "stars": 5}, "tags": ["x"],
                        "point": {"x": 1.0, "y": 2.5}, "day": "2026-11-21"}
    for kind, message in (("object", "not JSON serializable: object"), ("bigint", "64-bit")):
        result = tooled.execute_tool("FETCH", {"kind": kind})
        assert result.error_kind == "not_serialisable" and message in result.error


def test_allowlist_arguments_errors_and_context(tooled: Session, wb: Workbench) -> None:
    denied = tooled.execute_tool("SLACK_SEND", {"channel": "#x", "text": "hi"})
    assert denied.error_kind == "not_allowed" and "may not call SLACK_SEND" in denied.error
    assert tooled.execute_tool("NOPE", {}).error_kind == "not_found"
    invalid = tooled.execute_tool("FETCH", {"kind": "flat", "n": "many"})
    assert invalid.error_kind == "invalid_arguments" and "n: Input should be a valid integer" in invalid.error
    extra = tooled.execute_tool("FETCH", {"kind": "flat", "colour": "red"})
    assert extra.error_kind == "invalid_arguments" and "colour" in extra.error
    raised = tooled.execute_tool("BROKEN", {"reason": "503"})
    assert raised.error_kind == "tool_error" and raised.error == "RuntimeError: upstream said 503"
    hung = tooled.execute_tool("SLOW", {"seconds": 5}, timeout=0.3)
    assert hung.error_kind == "timeout" and hung.duration < 2
    assert tooled.execute_tool("WHOAMI").data == {"user": "tool-user", "session": tooled.session_id}
    assert wb.tools.get("FETCH").schema["properties"]["n"] == {"default": 10, "title": "N", "type": "integer"}
    # a single tool can be allowed without its toolkit, and the change applies at once
    tooled.update(tools=["SLACK_SEND"])
    assert tooled.execute_tool("SLACK_SEND", {"channel": "#x", "text": "hi"}).data == {"ok": True, "channel": "#x"}
    tooled.update(tools=[])
    kinds = [(e.detail["slug"], e.status) for e in tooled.logs() if e.kind == "tool"]
    assert ("SLACK_SEND", "not_allowed") in kinds and ("BROKEN", "tool_error") in kinds


def test_execute_tools_runs_concurrently_in_order_and_can_sync_everything(tooled: Session) -> None:
    calls = [("SLOW", {"seconds": 0.3})] * 6 + [("FETCH", {"kind": "flat", "n": i}) for i in range(1, 4)]
    results = tooled.execute_tools(calls, max_workers=9)
    assert [r.slug for r in results] == [c[0] for c in calls] and all(r.ok for r in results)
    assert [len(r.data) for r in results[6:]] == [1, 2, 3]
    synced = tooled.execute_tools([("FETCH", {"kind": "flat", "n": 2})], sync_to_workbench=True)[0]
    assert synced.data == [{"a": 0, "b": 0.0, "c": "row0"}, {"a": 1, "b": 0.5, "c": "row1"}]
    assert synced.offload is not None and tooled.execute(f"len(tables[{synced.offload.id!r}])").text == "2"


MEMORY_PROBE = """
import sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from benchmarks.offload import records
from workbench.tools import offload
from workbench.files import Files

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

data = records(float(sys.argv[1]))
before = peak = rss()
done = False
def sample():
    global peak
    while not done:
        peak = max(peak, rss())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
routed = offload.route(data, files=Files(Path(tempfile.mkdtemp()), lambda: 1 << 40), threshold=20_000)
done = True
sampler.join()
print(routed.offload.bytes, peak - before)
"""


def test_a_large_response_is_offloaded_without_copies_of_its_whole(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "150", str(root)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    json_bytes, extra = map(int, proc.stdout.split())
    assert json_bytes > 140e6
    # beyond the response object itself: the Arrow table and the chunks in flight, never several copies
    assert extra < 2 * json_bytes, f"offloading {json_bytes >> 20} MiB took {extra >> 20} MiB more"

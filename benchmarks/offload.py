"""Offload of a large tool response, from the tool's return to `tables[id]` usable in the kernel, against the
pyarrow floor measured in the same run.

    python -m benchmarks.offload [--mb 100] [--runs 3] [--json]

The tool returns a list of issue-tracker-like records (nested objects, lists of objects, fields missing in
some records) whose JSON is about `--mb` megabytes. Timed: `session.execute_tool(...)` (serialise, write the
JSON, build and write the Arrow file) plus `execute("df = tables[id]; len(df)")` in the sandbox. The floor
is pyarrow alone on the host: reading the same records as JSON Lines (the form its reader takes) and writing
them as Arrow IPC. Each run starts from an empty `.responses/`, as the floor overwrites its one file.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson

from workbench import Workbench


def records(megabytes: float, seed: int = 1) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    size = 0
    while size < megabytes * 1e6:
        i = len(out)
        record: dict[str, Any] = {
            "id": i, "number": 1000 + i, "title": f"Issue {i}: the thing is broken again", "state": rnd.choice(
                ["open", "closed"]), "user": {"login": f"user{rnd.randrange(5000)}", "id": rnd.randrange(10**6)},
            "labels": [{"name": rnd.choice(["bug", "docs", "feature"]), "color": "ff0000"}
                       for _ in range(rnd.randrange(3))],
            "comments": rnd.randrange(50), "created_at": "2026-11-21T10:00:00Z",
            "body": "lorem ipsum dolor sit amet " * rnd.randrange(1, 6),
        }
        if i % 3 == 0:
            record["milestone"] = {"title": "v1", "due_on": None}
        if i % 5 == 0:
            record["score"] = rnd.random()
        out.append(record)
        size += len(orjson.dumps(record)) + 1
    return out


def floor(data: list[dict[str, Any]], runs: int) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "records.jsonl"
        jsonl.write_bytes(b"\n".join(map(orjson.dumps, data)))
        for _ in range(runs):
            started = time.perf_counter()
            table = pajson.read_json(jsonl)
            with pa.OSFile(f"{tmp}/floor.arrow", "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            times.append(time.perf_counter() - started)
            del table
    return times


def measure(wb: Workbench, megabytes: float = 100, runs: int = 3) -> dict[str, Any]:
    """Seconds from the tool's return to tables[id] usable in the kernel, and the pyarrow floor's."""
    data = records(megabytes)
    slug = f"BENCH_LIST_ISSUES_{len(data)}"
    wb.tools.register(lambda: data, slug=slug, toolkit="bench")
    times, envelope = [], None
    with wb.create(user_id="bench", toolkits=["bench"], limits={"memory": "4g"}) as session:
        session.execute("import pandas, pyarrow")  # imports are not part of the offload
        for _ in range(runs):
            if session.files.exists(".responses"):
                session.files.remove(".responses")
            started = time.perf_counter()
            result = session.execute_tool(slug)
            envelope = result.offload
            assert envelope is not None and envelope.records == len(data), result
            check = session.execute(f"df = tables[{envelope.id!r}]\nlen(df)")
            assert check.text == str(len(data)), check
            times.append(time.perf_counter() - started)
            session.execute("del df")
        size = envelope.bytes
        session.files.remove(".responses")
    floor_times = floor(data, runs)
    seconds, floor_seconds = statistics.median(times), statistics.median(floor_times)
    return {
        "bytes": size, "records": len(data), "seconds": seconds, "floor_seconds": floor_seconds,
        "ratio": seconds / floor_seconds, "mb_per_s": size / 1e6 / seconds,
        "floor_mb_per_s": size / 1e6 / floor_seconds,
        "runs": times, "floor_runs": floor_times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, Workbench(home=home, pool_size=0) as wb:
        wb.build_image()
        figures = measure(wb, args.mb, args.runs)
    if args.json:
        print(json.dumps(figures))
        return
    size, seconds, floor_seconds = figures["bytes"], figures["seconds"], figures["floor_seconds"]
    print(f"offload of {size / 1e6:.0f} MB ({figures['records']:,} records), tool return -> tables[id] in the kernel")
    print(f"  workbench      {seconds:6.3f} s  {figures['mb_per_s']:7.1f} MB/s")
    print(f"  pyarrow floor  {floor_seconds:6.3f} s  {figures['floor_mb_per_s']:7.1f} MB/s   "
          "(read JSON Lines + write Arrow on the host)")
    print(f"  ratio {figures['ratio']:.2f} (target: at most 1 s per 100 MB, and at most 2, i.e. at least half the "
          "floor's throughput)")


if __name__ == "__main__":
    main()

"""What the meta tools cost a model's call on top of the work they do, in the same run.

    python -m benchmarks.agent [--calls 300] [--json]

`WORKBENCH_REMOTE_WORKBENCH` of a cell against a bare `session.execute` of the same cell, interleaved (each pair
in alternating order, so that drift of this shared machine hits both alike): the overhead is the median of the
paired differences (argument parsing and validation, the answer's text and its bound). And the latency of
`WORKBENCH_SEARCH_TOOLS` over a registry of 200 tools.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

from benchmarks.paired import added, interleaved
from workbench import Workbench

CELL = "1 + 1"
SERVICES = ["github", "slack", "gmail", "jira", "notion", "salesforce", "stripe", "shopify", "zendesk", "calendar"]


def _tool(slug: str) -> Any:
    def tool(id: str) -> dict:
        return {"id": id, "slug": slug}

    tool.__doc__ = f"{slug.replace('_', ' ').capitalize()} by its id."
    return tool


def measure(wb: Workbench, n: int = 300) -> dict[str, Any]:
    """Milliseconds: bare execute and the meta tool of the same cell (p50s, paired overhead); search p50."""
    for service in SERVICES:
        for thing in ["item", "record", "note", "file"]:
            for verb in ["list", "get", "create", "update", "delete"]:
                slug = f"BENCH_{service}_{verb}_{thing}".upper()
                if slug not in wb.tools:
                    wb.tools.register(_tool(slug), slug=slug, toolkit=f"bench_{service}")
    with wb.create(user_id="bench", toolkits=[f"bench_{s}" for s in SERVICES]) as session:
        arguments = {"code_to_execute": CELL}

        def bare_cell() -> None:
            assert session.execute(CELL).text == "2"

        def meta_cell() -> None:
            assert session.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", arguments) == "result:\n2"

        bare, meta = interleaved(bare_cell, meta_cell, n)
        query = {"queries": [{"use_case": "delete a note in notion"}]}
        searches = []
        for _ in range(max(n // 3, 10)):
            started = time.perf_counter()
            answer = session.handle_tool_call("WORKBENCH_SEARCH_TOOLS", query)
            searches.append(time.perf_counter() - started)
        assert json.loads(answer)["results"][0]["tools"][0]["tool_slug"] == "BENCH_NOTION_DELETE_NOTE"
    ms = lambda values: statistics.median(values) * 1000
    return {"bare_p50_ms": ms(bare), "meta_p50_ms": ms(meta), "overhead_ms": added(bare, meta) * 1000, "pairs": n,
            "search_p50_ms": ms(searches), "search_tools": len(SERVICES) * 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, Workbench(home=home, pool_size=0) as wb:
        wb.build_image()
        figures = measure(wb, args.calls)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"meta tools ({args.calls} interleaved pairs of the cell {CELL!r})")
    print(f"  session.execute                         p50 {figures['bare_p50_ms']:6.2f} ms")
    print(f"  handle_tool_call(REMOTE_WORKBENCH)      p50 {figures['meta_p50_ms']:6.2f} ms")
    print(f"  overhead (median of paired differences)     {figures['overhead_ms']:6.3f} ms   target < 1 ms")
    print(f"  WORKBENCH_SEARCH_TOOLS over {figures['search_tools']} tools   p50 {figures['search_p50_ms']:6.2f} ms")


if __name__ == "__main__":
    main()

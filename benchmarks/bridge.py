"""Tool calls per second from inside the sandbox, through the bridge, against the host calling the same tool.

    python -m benchmarks.bridge [--calls 5000] [--json]

A trivial tool (returns its argument). Measured in the kernel: `run_tool` in a loop (one call at a time)
and `run_tools` in bulk (max_workers=64). The baseline is the host calling `session.execute_tool` in a loop,
which does the same work minus the sandbox and the socket: allowlist, validation, routing, logging.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

from workbench import Workbench


def measure(wb: Workbench, n: int = 5000) -> dict[str, Any]:
    """Calls per second: run_tool in a loop and run_tools in bulk from the sandbox; the host's own loop."""
    def echo(x: int) -> dict:
        return {"x": x}

    if "BENCH_ECHO" not in wb.tools:
        wb.tools.register(echo, slug="BENCH_ECHO", toolkit="bench")
    with wb.create(user_id="bench", toolkits=["bench"]) as session:
        session.execute("run_tools([('BENCH_ECHO', {'x': i}) for i in range(200)], progress=False)")  # warm up
        single = float(session.execute(f"""
import time
started = time.perf_counter()
for i in range({n}):
    result, error = run_tool("BENCH_ECHO", {{"x": i}})
    assert error is None, error
{n} / (time.perf_counter() - started)""").text)
        bulk = float(session.execute(f"""
started = time.perf_counter()
pairs = run_tools([("BENCH_ECHO", {{"x": i}}) for i in range({n})], max_workers=64, progress=False)
assert all(error is None for _, error in pairs)
{n} / (time.perf_counter() - started)""").text)
        started = time.perf_counter()
        for i in range(n):
            assert session.execute_tool("BENCH_ECHO", {"x": i}).ok
        host = n / (time.perf_counter() - started)
    return {"single": single, "bulk": bulk, "host_baseline": host, "calls": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, Workbench(home=home, pool_size=0) as wb:
        wb.build_image()
        figures = measure(wb, args.calls)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"tool calls per second from the sandbox ({args.calls:,} calls of a trivial tool)")
    print(f"  run_tool in a loop       {figures['single']:8,.0f} calls/s")
    print(f"  run_tools, 64 workers    {figures['bulk']:8,.0f} calls/s   (target: at least 2,000)")
    print(f"  host execute_tool loop   {figures['host_baseline']:8,.0f} calls/s   (baseline: no sandbox, no socket)")


if __name__ == "__main__":
    main()

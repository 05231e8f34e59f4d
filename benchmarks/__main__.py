"""The benchmark suite: every figure, each beside the baseline it is compared against, in one command.

    python -m benchmarks [--quick] [--out PATH]     (or: workbench bench)

Prints a table and writes the figures as JSON (seconds unless named otherwise) to results/latest.json. `--quick`
uses small sizes and counts (under two minutes) for a smoke run; its figures are noisier and go to
results/quick.json, never over the full run's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmarks import agent, bridge, cluster, mcp, offload, relay, server, sessions, state
from benchmarks.kernel import (
    bare_ipykernel_roundtrips,
    bare_ipykernel_starts,
    cold_starts,
    percentile,
    roundtrips,
)
from workbench import Workbench

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"  # the full run's figures, committed
QUICK_RESULTS = RESULTS.with_name("quick.json")  # a smoke run's: never over the full run's
FULL = {"starts": 20, "creates": 20, "roundtrips": 300, "offload_mb": 100, "offload_runs": 3, "calls": 5000,
        "idle": 3, "live": 300, "pairs": 300, "state_runs": 5, "paused": 1000, "clients": 50, "load_seconds": 10.0,
        "swarm_sessions": 60, "relay_pairs": 2000}
QUICK = {"starts": 3, "creates": 3, "roundtrips": 50, "offload_mb": 10, "offload_runs": 1, "calls": 500,
         "idle": 1, "live": 10, "pairs": 30, "state_runs": 1, "paused": 5, "clients": 5, "load_seconds": 2.0,
         "swarm_sessions": 0, "relay_pairs": 200}


def machine(wb: Workbench) -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    version = wb.docker.version()
    return {"cores": os.cpu_count(), "memory_gib": round(total_kib / 2**20, 1), "docker": version.get("Version"),
            "docker_api": version.get("ApiVersion"), "python": platform.python_version(),
            "kernel": platform.release()}


def run(quick: bool, say: Any) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    figures: dict[str, Any] = {"quick": quick, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as home:
        with Workbench(home=home, pool_size=0, idle_timeout=None) as wb:
            wb.build_image(progress=lambda line: say(f"  {line.strip()}"))
            figures["machine"] = machine(wb)
            say("cold starts")
            starts = cold_starts(wb, sizes["starts"])
            bare_starts = bare_ipykernel_starts(sizes["starts"])
            figures["cold_start"] = {
                "p50": statistics.median(starts), "p95": percentile(starts, 95), "n": len(starts),
                "baseline_p50": statistics.median(bare_starts), "ratio": statistics.median(starts) / statistics.median(
                    bare_starts), "baseline": "local ipykernel process started to its first result, same run"}
            say("execute round trips")
            with wb.create(user_id="bench") as session:
                sandboxed = roundtrips(lambda: session.execute("1"), sizes["roundtrips"])
            bare = bare_ipykernel_roundtrips(sizes["roundtrips"])
            figures["exec_roundtrip"] = {
                "p50": statistics.median(sandboxed), "p95": percentile(sandboxed, 95),
                "baseline_p50": statistics.median(bare), "baseline_p95": percentile(bare, 95),
                "ratio": statistics.median(sandboxed) / statistics.median(bare),
                "baseline": "bare local ipykernel over IPC, same run"}
            say("kernel messages through the relay, against the same sockets connected directly")
            figures["relay"] = relay.measure(sizes["relay_pairs"])
            say(f"offload of {sizes['offload_mb']} MB")
            measured = offload.measure(wb, sizes["offload_mb"], sizes["offload_runs"])
            figures["offload_100mb"] = {k: measured[k] for k in ("seconds", "floor_seconds", "ratio", "bytes",
                                                                 "records", "mb_per_s", "floor_mb_per_s")}
            figures["offload_100mb"]["floor"] = "pyarrow read_json (JSON Lines) + Arrow IPC write, same run"
            say("tool calls from the sandbox")
            calls = bridge.measure(wb, sizes["calls"])
            figures["bulk_calls_per_s"] = {"single": calls["single"], "bulk": calls["bulk"],
                                           "host_baseline": calls["host_baseline"], "calls": calls["calls"]}
            say("meta tools")
            figures["meta_tools"] = agent.measure(wb, sizes["pairs"])
            figures["meta_tools"]["baseline"] = "session.execute of the same cell, interleaved pairs, same run"
            say("MCP over Streamable HTTP")
            figures["mcp_execute"] = mcp.measure(wb, sizes["pairs"])
            say(f"workbench serve: REST against in-process, {sizes['clients']} concurrent clients")
            figures["server"] = server.measure(wb, sizes["pairs"], sizes["clients"], sizes["load_seconds"])
            say("cluster: an execution forwarded by another replica, against the one that runs the session")
            figures["cluster"] = cluster.measure(sizes["pairs"])
            if sizes["swarm_sessions"]:  # (not in a quick run: two swarms and their images take minutes)
                say(f"cluster: {sizes['swarm_sessions']} sessions created on a swarm of three engines and of one")
                figures["cluster"]["swarm"] = cluster.measure_swarm(sizes["swarm_sessions"], clients=6, say=say)
            say(f"pause and resume; {sizes['paused']} paused sessions")
            figures["pause_resume"] = state.measure(wb, sizes["state_runs"], sizes["paused"])
            say("idle session memory")
            figures["idle_session_mib"] = sessions.idle_memory_mib(wb, sizes["idle"])
        with Workbench(home=home, pool_size=2, idle_timeout=None) as wb:
            say("warm-pool creates")
            warm = sessions.warm_creates(wb, sizes["creates"])
            figures["warm_create"] = {"p50": statistics.median(warm), "p95": percentile(warm, 95), "n": len(warm)}
            say(f"live sessions, up to {sizes['live']}")
            figures["live_sessions"] = sessions.live_sessions(wb, sizes["live"])
    figures["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return figures


def table(figures: dict[str, Any]) -> Table:
    ms = lambda s: f"{s * 1000:.1f} ms"
    sec = lambda s: f"{s:.3f} s"
    cold, warm, rt = figures["cold_start"], figures["warm_create"], figures["exec_roundtrip"]
    off, calls, live = figures["offload_100mb"], figures["bulk_calls_per_s"], figures["live_sessions"]
    t = Table("figure", "p50 / value", "p95", "baseline", "ratio", "target", title="workbench benchmarks")
    t.add_row("cold start (create to first result)", sec(cold["p50"]), sec(cold["p95"]),
              f"{sec(cold['baseline_p50'])} local ipykernel", f"{cold['ratio']:.2f}", "p50 <= 1.0 s")
    t.add_row("warm-pool create", ms(warm["p50"]), ms(warm["p95"]), "", "", "p50 <= 50 ms")
    t.add_row("execute round trip", ms(rt["p50"]), ms(rt["p95"]), f"{ms(rt['baseline_p50'])} bare ipykernel",
              f"{rt['ratio']:.2f}", "<= 1.2")
    rl = figures.get("relay")
    if rl:  # (results written before the relay have none)
        t.add_row("kernel message round trip, added by the relay", f"{rl['small_added_us']:.0f} µs", "",
                  f"{rl['small_direct_p50_us']:.0f} µs direct",
                  f"{rl['small_relayed_p50_us'] / rl['small_direct_p50_us']:.2f}", "")
        t.add_row(f"{rl['big_mb']} MB kernel message through the relay", f"{rl['big_relayed_mb_per_s']:,.0f} MB/s", "",
                  f"{rl['big_direct_mb_per_s']:,.0f} MB/s direct", f"{rl['big_ratio']:.2f}", "")
    t.add_row(escape(f"offload {off['bytes'] / 1e6:.0f} MB to tables[id]"), sec(off["seconds"]), "",
              f"{sec(off['floor_seconds'])} pyarrow floor", f"{off['ratio']:.2f}", "<= 1 s / 100 MB; ratio <= 2")
    t.add_row("tool calls/s from the sandbox, run_tool loop", f"{calls['single']:,.0f}", "",
              f"{calls['host_baseline']:,.0f} host loop", "", "")
    t.add_row("tool calls/s from the sandbox, run_tools bulk", f"{calls['bulk']:,.0f}", "", "", "", ">= 2,000")
    meta = figures["meta_tools"]
    t.add_row("meta tool REMOTE_WORKBENCH overhead", f"{meta['overhead_ms']:.3f} ms", "",
              f"{meta['bare_p50_ms']:.2f} ms execute", f"{meta['meta_p50_ms'] / meta['bare_p50_ms']:.2f}", "< 1 ms")
    if "mcp_execute" in figures:  # (results written before the MCP endpoint have none)
        over = figures["mcp_execute"]
        t.add_row("execute through MCP (Streamable HTTP), added", f"{over['overhead_ms']:.2f} ms",
                  f"{over['mcp_p50_ms']:.2f} ms p50", f"{over['bare_p50_ms']:.2f} ms execute", f"{over['ratio']:.2f}",
                  "")
    t.add_row(f"meta tool SEARCH_TOOLS over {meta['search_tools']} tools", f"{meta['search_p50_ms']:.2f} ms", "", "",
              "", "")
    srv = figures.get("server")
    if srv:
        t.add_row("trivial execute through REST (workbench serve)", f"{srv['rest_p50_ms']:.2f} ms", "",
                  f"{srv['bare_p50_ms']:.2f} ms in-process", f"{srv['rest_ratio']:.2f}",
                  f"+{srv['rest_added_ms']:.2f} ms (<= +2 ms)")
        if srv.get("mcp_added_ms") is not None:  # (results written before it was measured through the server)
            t.add_row("trivial execute through MCP (workbench serve)", f"{srv['mcp_p50_ms']:.2f} ms", "",
                      f"{srv['mcp_bare_p50_ms']:.2f} ms in-process", f"{srv['mcp_ratio']:.2f}",
                      f"+{srv['mcp_added_ms']:.2f} ms")
        t.add_row(f"executions/s, {srv['clients']} concurrent REST clients", f"{srv['rest_per_s']:,.0f}", "",
                  f"{srv['in_process_per_s']:,.0f} in-process", f"{srv['throughput_ratio']:.2f}", ">= 0.7")
    cl = figures.get("cluster")
    if cl:  # (results written before cluster replicas have none)
        t.add_row("trivial execute forwarded by another replica", f"{cl['forwarded_p50_ms']:.2f} ms", "",
                  f"{cl['direct_p50_ms']:.2f} ms through its own", f"{cl['ratio']:.2f}",
                  f"+{cl['forward_added_ms']:.2f} ms")
        swarm = cl.get("swarm")
        if swarm:
            three, one = swarm["hosts_3"], swarm["hosts_1"]
            t.add_row(f"sessions/s created through a swarm of 3 ({swarm['sessions']}, {swarm['clients']} clients)",
                      f"{three['per_s']:.2f}", "", f"{one['per_s']:.2f} on a swarm of 1", f"{swarm['rate_ratio']:.2f}",
                      f"{three['live']} and {one['live']} live")
    if "pause_resume" in figures:  # (results written before pause and resume have none)
        pr = figures["pause_resume"]
        t.add_row("pause + resume, 1M-row DataFrame", sec(pr["pause_resume_p50"]), "",
                  f"pause {sec(pr['pause_p50'])}, snapshot {pr['snapshot_bytes'] / 1e6:.0f} MB", "", "p50 <= 2 s")
        t.add_row("resume (to first result)", sec(pr["resume_p50"]), "", f"{sec(pr['cold_start_p50'])} cold start",
                  f"{pr['resume_vs_cold']:.2f}", "")
        paused = pr["paused"]
        t.add_row(f"{paused['sessions']} paused sessions", f"{paused['containers']} containers", "",
                  f"{paused['snapshot_kib']:.1f} KiB snapshot, {paused['disk_per_session_kib']:.0f} KiB disk, "
                  f"{paused['host_rss_growth_kib_per_session']:+.1f} KiB host memory each; store "
                  f"{paused['store_kib'] / 1024:.1f} MiB", "", "0 containers, no memory")
    t.add_row("idle session memory", f"{figures['idle_session_mib']:.1f} MiB", "", "", "", "<= 60 MiB")
    t.add_row("live sessions reached", f"{live['reached']} of {live['target']}", "",
              f"{live['create_rate_per_s']:.1f} creates/s", "", "300")
    m = figures["machine"]
    t.caption = (f"{m['cores']} cores, {m['memory_gib']} GiB, Docker {m['docker']}"
                 + ("; --quick: small sizes, noisy figures" if figures["quick"] else ""))
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run (under two minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the JSON (default {RESULTS}, or {QUICK_RESULTS} with --quick)")
    args = parser.parse_args()
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    console = Console(stderr=True)
    started = time.monotonic()
    figures = run(args.quick, lambda line: console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}"))
    figures["wall_seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    Console(width=None if sys.stdout.isatty() else 150).print(table(figures))
    console.print(f"wrote {args.out} in {figures['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()

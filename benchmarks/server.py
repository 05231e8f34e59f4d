"""What `workbench serve` adds to an execution, against the in-process call, in the same run.

    python -m benchmarks.server [--pairs 300] [--clients 50] [--seconds 10] [--json]

Latency: a trivial cell (`1`) through REST (`RemoteWorkbench`, keep-alive connection) and through
`Session.execute` in this process, on twin sessions (one client attached to each kernel), interleaved (each pair
in alternating order); the added time is the median of the paired differences. Throughput: `clients` sessions
driven through REST (a RemoteWorkbench per client) and `clients` sessions in-process (a thread per session), each
client in a loop of trivial executions; the two loads take turns, 4 rounds of `seconds` / 4 each, and the figure of
each is its executions per second, the mean of its rounds. MCP (`mcp_*`): the same cell
through `WORKBENCH_REMOTE_WORKBENCH` on the served session's own MCP endpoint (`session.mcp.url` with
`session.mcp.headers`, the official `mcp` client over Streamable HTTP, one client session), interleaved with the
in-process call likewise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.mcp import paired
from benchmarks.paired import added, interleaved
from workbench import RemoteSession, RemoteWorkbench, Session, Workbench
from workbench.server.auth import create_key

CELL = "1"
ROUNDS = 4  # of each load, in turn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    """`workbench serve` on `home`, in a subprocess."""

    def __init__(self, home: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", "serve", "--port", self.url.rsplit(":", 1)[1]],
            env={**os.environ, "WORKBENCH_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("workbench serve did not come up")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def _loop(run: Callable[[], Any], stop: threading.Event, counts: list[int], i: int) -> None:
    while not stop.is_set():
        run()
        counts[i] += 1


def _throughput(runs: list[Callable[[], Any]], seconds: float) -> float:
    """Executions per second of one thread per callable, all at once, over `seconds` (after a short warm-up)."""
    stop, counts = threading.Event(), [0] * len(runs)
    threads = [threading.Thread(target=_loop, args=(run, stop, counts, i)) for i, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    time.sleep(min(1.0, seconds / 4))  # warm-up: every client has its connection and its session attached
    start, begun = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, took = sum(counts) - start, time.perf_counter() - begun
    stop.set()
    for thread in threads:
        thread.join()
    return done / took


def measure(wb: Workbench, pairs: int = 300, clients: int = 50, seconds: float = 10.0) -> dict[str, Any]:
    """Milliseconds (p50s, paired overhead) and executions per second; see the module's docstring."""
    _, key = create_key(wb.store, f"bench-{os.getpid()}")
    served = _Served(wb.home)
    sessions: list[RemoteSession] = []
    locals_: list[Session] = []
    try:
        remote = RemoteWorkbench(served.url, key)
        rs = remote.create(user_id="bench", limits={"memory": "256m"})
        local = wb.create(user_id="bench", limits={"memory": "256m"})  # a twin: one client attached to each kernel

        def run(on: Session | RemoteSession) -> Callable[[], None]:
            def once() -> None:
                result = on.execute(CELL)
                assert result.text == "1", result
            return once

        bare, rest = interleaved(run(local), run(rs), pairs)
        assert rs.mcp is not None, "the server gave the session no MCP endpoint"
        mcp_bare, mcp = paired(rs.mcp.url, rs.mcp.headers, local, pairs, CELL, CELL)
        rs.close(delete_workspace=True)
        local.close(delete_workspace=True)

        for i in range(clients):
            sessions.append(remote.create(user_id=f"bench-{i}", limits={"memory": "128m"}))
            locals_.append(wb.create(user_id=f"bench-{i}", limits={"memory": "128m"}))
        clients_ = [RemoteWorkbench(served.url, key).use(s.session_id) for s in sessions]
        loads = {"rest": [lambda c=c: c.execute(CELL) for c in clients_],
                 "in_process": [lambda s=s: s.execute(CELL) for s in locals_]}
        rates: dict[str, list[float]] = {"rest": [], "in_process": []}
        for i in range(ROUNDS):  # alternating, so that a drift of the machine's speed weighs on both alike
            for which in (("rest", "in_process") if i % 2 == 0 else ("in_process", "rest")):
                rates[which].append(_throughput(loads[which], seconds / ROUNDS))
        over_rest, in_process = statistics.fmean(rates["rest"]), statistics.fmean(rates["in_process"])
    finally:
        for each in [*sessions, *locals_]:  # on a failure too: no kernel outlives the benchmark
            with contextlib.suppress(Exception):
                each.close(delete_workspace=True)
        served.stop()
        wb.gc()  # this process mounted the workspaces too (its in-process runs): unmount what is closed
    ms = lambda values: statistics.median(values) * 1000
    figures: dict[str, Any] = {
        "bare_p50_ms": ms(bare), "rest_p50_ms": ms(rest), "rest_added_ms": added(bare, rest) * 1000,
        "rest_ratio": ms(rest) / ms(bare), "pairs": pairs,
        "mcp_p50_ms": ms(mcp), "mcp_bare_p50_ms": ms(mcp_bare), "mcp_ratio": ms(mcp) / ms(mcp_bare),
        "mcp_added_ms": added(mcp_bare, mcp) * 1000,
        "clients": clients, "seconds": seconds, "rest_per_s": over_rest, "in_process_per_s": in_process,
        "throughput_ratio": over_rest / in_process, "rounds": ROUNDS,
        "round_ratios": [r / b for r, b in zip(rates["rest"], rates["in_process"], strict=True)],
        "baseline": "Session.execute in the benchmark's process on twin sessions, same run"}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wb-bench-", ignore_cleanup_errors=True) as home, \
            Workbench(home=home, pool_size=0) as wb:
        wb.build_image()
        figures = measure(wb, args.pairs, args.clients, args.seconds)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"trivial execute ({args.pairs} interleaved pairs)")
    print(f"  in-process Session.execute      p50 {figures['bare_p50_ms']:6.2f} ms")
    print(f"  REST (RemoteWorkbench)          p50 {figures['rest_p50_ms']:6.2f} ms   ratio {figures['rest_ratio']:.2f}")
    print(f"  added by REST (paired median)       {figures['rest_added_ms']:6.2f} ms   target <= 2 ms")
    print(f"  MCP (its own pairs)             p50 {figures['mcp_p50_ms']:6.2f} ms   ratio {figures['mcp_ratio']:.2f}"
          f"   (in-process {figures['mcp_bare_p50_ms']:.2f} ms)")
    print(f"  added by MCP (paired median)        {figures['mcp_added_ms']:6.2f} ms")
    print(f"{args.clients} concurrent clients, {args.seconds:g}s each")
    print(f"  REST        {figures['rest_per_s']:8.0f} executions/s")
    print(f"  in-process  {figures['in_process_per_s']:8.0f} executions/s   ratio {figures['throughput_ratio']:.2f}"
          "   target >= 0.7")


if __name__ == "__main__":
    main()

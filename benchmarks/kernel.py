"""Cold start and execute round trip of a sandboxed kernel, against a bare local ipykernel in the same run.

    python -m benchmarks.kernel [--starts 20] [--roundtrips 300]

Cold start is create-to-first-result: `wb.create()` then `execute("1")` returning. The round trip is one
trivial cell on a warm kernel. The baseline is a bare ipykernel on this host over the same IPC transport,
driven by jupyter-client's own `execute_interactive`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import KernelManager

from workbench import Workbench


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cold_starts(wb: Workbench, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        session = wb.create(user_id="bench")
        assert session.execute("1").text == "1"
        times.append(time.perf_counter() - started)
        session.close()
    return times


def roundtrips(execute, n: int) -> list[float]:
    for _ in range(20):
        execute()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        execute()
        times.append(time.perf_counter() - started)
    return times


def bare_ipykernel_starts(n: int) -> list[float]:
    """The baseline of a cold start: a local ipykernel process started, then its first result (no container)."""
    times = []
    for _ in range(n):
        with tempfile.TemporaryDirectory(prefix="bk", dir="/tmp") as tmp:
            started = time.perf_counter()
            km = KernelManager(transport="ipc", ip=f"{tmp}/k", connection_file=f"{tmp}/kernel.json")
            km.start_kernel(extra_arguments=["--HistoryManager.enabled=False"])
            try:
                kc = km.client()
                kc.start_channels()
                kc.wait_for_ready(timeout=60)
                kc.execute_interactive("1", timeout=30, output_hook=lambda msg: None)
                times.append(time.perf_counter() - started)
                kc.stop_channels()
            finally:
                km.shutdown_kernel(now=True)
    return times


def bare_ipykernel_roundtrips(n: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="bk", dir="/tmp") as tmp:
        km = KernelManager(transport="ipc", ip=f"{tmp}/k", connection_file=f"{tmp}/kernel.json")
        km.start_kernel()
        try:
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            times = roundtrips(lambda: kc.execute_interactive("1", timeout=30, output_hook=lambda msg: None), n)
            kc.stop_channels()
        finally:
            km.shutdown_kernel(now=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wb-bench-") as home, Workbench(home=home) as wb:
        wb.build_image(progress=print)
        starts = cold_starts(wb, args.starts)
        with wb.create(user_id="bench") as session:
            sandboxed = roundtrips(lambda: session.execute("1"), args.roundtrips)
    bare = bare_ipykernel_roundtrips(args.roundtrips)

    figures = {
        "cold_start": {"p50": percentile(starts, 50), "p95": percentile(starts, 95), "n": len(starts)},
        "exec_roundtrip": {
            "p50": statistics.median(sandboxed), "p95": percentile(sandboxed, 95),
            "baseline_p50": statistics.median(bare), "baseline": "bare local ipykernel, IPC, same run",
            "ratio": statistics.median(sandboxed) / statistics.median(bare),
        },
    }
    print(f"\n{'figure':<34}{'p50':>10}{'p95':>10}   target")
    print(f"{'cold start (create to 1st result)':<34}{starts and figures['cold_start']['p50']:>9.3f}s"
          f"{figures['cold_start']['p95']:>9.3f}s   p50 <= 1.0 s")
    rt = figures["exec_roundtrip"]
    print(f"{'execute round trip, sandbox':<34}{rt['p50'] * 1e3:>8.2f}ms{rt['p95'] * 1e3:>8.2f}ms")
    bare_p95 = percentile(bare, 95) * 1e3
    print(f"{'execute round trip, bare ipykernel':<34}{rt['baseline_p50'] * 1e3:>8.2f}ms{bare_p95:>8.2f}ms")
    print(f"{'ratio sandbox / bare (p50)':<34}{rt['ratio']:>10.2f}{'':>10}   <= 1.2")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Sessions that sleep and wake: what a pause and a resume cost, and what paused sessions hold.

    python -m benchmarks.state [--runs 5] [--paused 100] [--json]

- pause + resume of a session holding a 1-million-row DataFrame (int, float and string columns): `pause()`, then
  the first execute (which starts a kernel and restores the namespace); target p50 <= 2 s.
- resume p50 as a ratio to a cold start (a new session to its first result), measured in the same run.
- `--paused` sessions paused at once (64 MiB workspaces): containers left (target 0), host memory of this process
  per paused session, the disk each holds (its workspace image's allocated blocks, snapshot included) and the
  snapshot's size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.kernel import cold_starts
from workbench import Session, Workbench

PAUSED_LIMITS = {"workspace_size": "64m", "memory": "256m"}  # a thousand 10 GiB workspace images would take ~70 GB
FRAME = """
import numpy as np, pandas as pd
n = 1_000_000
df = pd.DataFrame({"id": np.arange(n), "value": np.random.default_rng(0).random(n),
                   "city": pd.Series(["Paris", "Lyon", "Nice", "Lille"] * (n // 4), dtype="str")})
len(df)
"""


def pause_resume(wb: Workbench, runs: int) -> dict[str, Any]:
    """Seconds: pause, resume (to the first result), their sum; snapshot bytes."""
    pauses, resumes, totals = [], [], []
    with wb.create(user_id="bench", limits={"memory": "2g"}) as session:
        assert session.execute(FRAME).text == "1000000"
        size = 0
        for _ in range(runs):
            started = time.perf_counter()
            state = session.pause()
            paused = time.perf_counter()
            result = session.execute("len(df)")
            done = time.perf_counter()
            assert result.text == "1000000" and result.state_restored, result
            size = state.bytes
            pauses.append(paused - started)
            resumes.append(done - paused)
            totals.append(done - started)
    return {"pause_p50": statistics.median(pauses), "resume_p50": statistics.median(resumes),
            "pause_resume_p50": statistics.median(totals), "snapshot_bytes": size, "runs": runs}


def _pause_one(wb: Workbench, i: int) -> tuple[Session, int]:
    session = wb.create(user_id=f"paused-{i}", limits=PAUSED_LIMITS)
    session.execute(f"numbers = list(range({i}, {i} + 100))\ndef f(x):\n    return x * {i}")
    return session, session.pause().bytes


def paused_sessions(wb: Workbench, n: int, parallel: int = 2) -> dict[str, Any]:
    """Pause `n` small sessions: containers left, host memory and disk per paused session."""
    rss_before = _rss_kib()
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        paused = list(pool.map(lambda i: _pause_one(wb, i), range(n)))
    sessions = [session for session, _ in paused]
    seconds = time.perf_counter() - started
    containers = wb.docker.containers.list(all=True, filters={"label": f"workbench.home={wb.home_label}"})
    allocated = []
    for session in sessions:
        disk = session.files.disk
        path = disk.image if disk is not None and disk.image.exists() else session.workspace
        allocated.append(os.stat(path).st_blocks * 512 if path.is_file() else
                         sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()))
    store_bytes = sum(p.stat().st_size for p in wb.home.glob("*.db*"))
    rss_after = _rss_kib()
    check = sessions[-1].execute("f(2), numbers[0]")
    assert check.state_restored and check.text == f"({2 * (n - 1)}, {n - 1})", check
    for session in sessions:
        session.close(delete_workspace=True)
    return {"sessions": n, "containers": len(containers), "seconds_to_pause_all": seconds,
            "disk_per_session_kib": statistics.median(allocated) / 1024, "store_kib": store_bytes / 1024,
            "snapshot_kib": statistics.median(size for _, size in paused) / 1024,
            "host_rss_growth_kib_per_session": (rss_after - rss_before) / n}  # signed: memory freed shows


def _rss_kib() -> int:
    """This process's resident memory now (ru_maxrss is a peak: it cannot show growth after a larger run)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def measure(wb: Workbench, runs: int = 5, paused: int = 100) -> dict[str, Any]:
    figures = pause_resume(wb, runs)
    cold = cold_starts(wb, runs)
    figures["cold_start_p50"] = statistics.median(cold)
    figures["resume_vs_cold"] = figures["resume_p50"] / figures["cold_start_p50"]
    figures["paused"] = paused_sessions(wb, paused)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--paused", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as home, \
            Workbench(home=home, pool_size=0, idle_timeout=None) as wb:
        wb.build_image()
        figures = measure(wb, args.runs, args.paused)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()

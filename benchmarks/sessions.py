"""Session figures: warm-pool create, idle memory, and how many live sessions this machine holds.

    python -m benchmarks.sessions [--creates 20] [--live 300] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.kernel import percentile
from workbench import Session, Workbench


def warm_creates(wb: Workbench, n: int) -> list[float]:
    """create() with a ready kernel in the pool (waiting, untimed, for the pool to refill between creates)."""
    assert wb.pool.size > 0
    wb.pool.want(wb.limits)
    times = []
    for _ in range(n):
        deadline = time.monotonic() + 120
        while wb.pool.count(wb.limits) == 0:
            assert time.monotonic() < deadline, "the warm pool did not refill"
            time.sleep(0.02)
        started = time.perf_counter()
        session = wb.create(user_id="bench")
        times.append(time.perf_counter() - started)
        assert session.execute("1").text == "1"
        session.close(delete_workspace=True)
    return times


def idle_memory_mib(wb: Workbench, n: int = 3) -> float:
    """Memory of an idle session's container as Docker reports it (usage less inactive page cache)."""
    sessions = [wb.create(user_id="bench") for _ in range(n)]
    try:
        for session in sessions:
            session.execute("1")
        time.sleep(2)
        figures = []
        for session in sessions:
            stats = wb.docker.api.stats(session._kernel.sandbox.id, stream=False)["memory_stats"]
            inner = stats.get("stats", {})
            cache = inner.get("total_inactive_file", inner.get("inactive_file", inner.get("cache", 0)))
            figures.append((stats["usage"] - cache) / 2**20)
        return statistics.median(figures)
    finally:
        for session in sessions:
            session.close(delete_workspace=True)


def live_sessions(wb: Workbench, target: int, parallel: int = 4) -> dict[str, Any]:
    """Create sessions, `parallel` at a time, up to `target` or the first failure; check a sample answers."""
    sessions: list[Session] = []
    failure: str | None = None
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        pending = [pool.submit(wb.create, user_id=f"live-{i}") for i in range(target)]
        for future in pending:
            try:
                sessions.append(future.result())
            except Exception as exc:
                failure = failure or f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - started
    answering = sum(s.execute("1").text == "1" for s in sessions[:: max(1, len(sessions) // 10)])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: s.close(delete_workspace=True), sessions))
    return {"reached": len(sessions), "target": target, "create_rate_per_s": len(sessions) / elapsed,
            "sample_answering": answering, "first_failure": failure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=20)
    parser.add_argument("--live", type=int, default=300)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, Workbench(home=home, pool_size=2, idle_timeout=None) as wb:
        wb.build_image()
        warm = warm_creates(wb, args.creates)
        figures = {"warm_create": {"p50": statistics.median(warm), "p95": percentile(warm, 95)},
                   "idle_session_mib": idle_memory_mib(wb), "live_sessions": live_sessions(wb, args.live)}
    print(json.dumps(figures, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

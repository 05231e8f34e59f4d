"""Interleaved pairs: how the benchmarks time two ways of doing one thing against each other in the same run."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(baseline: Callable[[], object], other: Callable[[], object], n: int,
                warm: int = 20) -> tuple[list[float], list[float]]:
    """Seconds of `n` pairs of calls, `baseline()` and `other()`, after `warm` calls of each; the order within a pair
    alternates, so that a drift of the machine's speed weighs on both."""
    for _ in range(warm):
        baseline()
        other()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(n):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            started = time.perf_counter()
            (baseline, other)[which]()
            times[which].append(time.perf_counter() - started)
    return times


def added(baseline: list[float], other: list[float]) -> float:
    """The median of what `other` took more than `baseline`, pair by pair."""
    return statistics.median(b - a for a, b in zip(baseline, other, strict=True))

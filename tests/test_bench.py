"""The benchmark suite's quick mode runs end to end and writes sane figures (no timing is asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from workbench import Workbench


def test_quick_benchmark_suite_writes_its_figures(wb: Workbench, tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, "-m", "workbench", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "150"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workbench benchmarks" in proc.stdout
    figures = json.loads(out.read_text())
    for key in ("cold_start", "warm_create"):
        assert 0 < figures[key]["p50"] <= figures[key]["p95"]
    rt = figures["exec_roundtrip"]
    assert 0 < rt["p50"] <= rt["p95"] and rt["baseline_p50"] > 0 and rt["ratio"] > 0
    relayed = figures["relay"]
    assert relayed["small_direct_p50_us"] > 0 and relayed["small_relayed_p50_us"] > 0 and relayed["pairs"] == 200
    assert relayed["big_direct_mb_per_s"] > 0 and relayed["big_relayed_mb_per_s"] > 0
    off = figures["offload_100mb"]
    assert off["seconds"] > 0 and off["floor_seconds"] > 0 and off["ratio"] > 0 and off["records"] > 0
    assert figures["bulk_calls_per_s"]["single"] > 0 and figures["bulk_calls_per_s"]["bulk"] > 0
    assert 1 < figures["idle_session_mib"] < 1024
    meta = figures["meta_tools"]
    assert meta["bare_p50_ms"] > 0 and meta["meta_p50_ms"] > 0 and meta["pairs"] == 30 and meta["search_p50_ms"] > 0
    over_mcp = figures["mcp_execute"]
    assert over_mcp["bare_p50_ms"] > 0 and over_mcp["mcp_p50_ms"] > 0 and over_mcp["ratio"] > 0
    assert over_mcp["pairs"] == 30
    server = figures["server"]
    assert server["bare_p50_ms"] > 0 and server["rest_p50_ms"] > 0 and server["pairs"] == 30
    assert server["mcp_p50_ms"] > 0 and server["mcp_bare_p50_ms"] > 0 and server["mcp_ratio"] > 0
    assert server["rest_per_s"] > 0 and server["in_process_per_s"] > 0 and server["clients"] == 5
    paused = figures["pause_resume"]
    assert paused["pause_resume_p50"] > 0 and paused["paused"]["containers"] == 0 and paused["paused"]["sessions"] == 5
    live = figures["live_sessions"]
    assert live["reached"] == live["target"] == 10 and live["first_failure"] is None
    assert live["sample_answering"] >= 1 and live["create_rate_per_s"] > 0
    machine = figures["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0 and machine["docker"]

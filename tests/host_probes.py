"""What tests read of the host process and wait for from other processes (importable from every test folder:
pytest puts tests/ on sys.path for its conftest)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def memory(field: str = "VmRSS") -> int:
    """Bytes of a memory figure of this process from /proc/self/status: VmRSS (resident now), VmHWM (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_memory() -> None:
    """Start VmHWM again from the resident size now."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def wait_for_file(marker: Path, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Wait until another process's cell wrote `marker`; fails if that process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline and process.poll() is None, f"{what} never started"
        time.sleep(0.05)

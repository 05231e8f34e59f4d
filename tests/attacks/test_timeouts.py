"""A timed-out cell is never left running. Executions of a session are serialised across processes, so whatever the
kernel runs while a caller holds the session is that session's: its own cell, or an orphan of a caller that died.
Past the deadline the kernel is interrupted whatever it runs, and restarted when nothing answers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from host_probes import wait_for_file

from workbench import Session, Workbench

_ORPHAN = """
import sys
from workbench import Workbench
wb = Workbench(home=sys.argv[1], idle_timeout=None, pool_size=0)
wb.use(sys.argv[2]).execute(sys.argv[3], timeout=3600)
"""
_SLEEP = "open('orphan-started', 'w').close()\nimport time\ntime.sleep(1000)"
_DEAF = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + _SLEEP


def _orphan(wb: Workbench, session: Session, code: str) -> None:
    """A cell sent by another process, which is then SIGKILLed while the cell runs: nobody watches it any more."""
    other = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(wb.home), session.session_id, code],
                             env=os.environ.copy())
    try:
        wait_for_file(session.workspace / "orphan-started", other, "the orphan cell")
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


def test_a_cell_behind_an_orphan_interrupts_it_and_runs(wb: Workbench, fresh: Session) -> None:
    fresh.execute("kept = 'still here'")
    _orphan(wb, fresh, _SLEEP)
    started = time.monotonic()
    result = fresh.execute("1 + 1", timeout=3)
    elapsed = time.monotonic() - started
    assert 3 <= elapsed < 3 + 5 + 3, elapsed  # the timeout, then at most the interrupt's grace
    assert result.timed_out and result.started_late and not result.not_started, result
    assert result.kernel_died is None and not result.state_lost
    assert "before the cell was seen to start" in str(result)
    after = fresh.execute("kept", timeout=10)  # the orphan is gone, the kernel's state kept
    assert after.text == "'still here'" and not after.timed_out, after
    statuses = [e.status for e in fresh.logs() if e.kind == "execution"]
    assert statuses[-2:] == ["timeout", "ok"]


def test_an_orphan_deaf_to_the_interrupt_gets_the_kernel_restarted(wb: Workbench, fresh: Session) -> None:
    fresh.execute("kept = 1")
    (fresh.workspace / "kept.txt").write_text("file survives")
    _orphan(wb, fresh, _DEAF)
    started = time.monotonic()
    result = fresh.execute("open('ran', 'w').close()", timeout=3)
    elapsed = time.monotonic() - started
    assert elapsed < 3 + 5 + 15, elapsed  # timeout, grace, a restart
    assert result.timed_out and result.not_started and result.state_lost, result
    assert "this cell was dropped" in str(result) and "restarted" in (result.kernel_died or "")
    time.sleep(0.5)
    assert not (fresh.workspace / "ran").exists()  # dropped with the old kernel: it never runs, unwatched, later
    after = fresh.execute("open('kept.txt').read()", timeout=10)
    assert after.text == "'file survives'" and not after.timed_out, after
    assert fresh.execute("kept", timeout=10).error.ename == "NameError"
    statuses = [e.status for e in fresh.logs() if e.kind == "execution"]
    assert statuses[-3:] == ["not_started", "ok", "error"]


_FLOOD = """
import os, threading, time
k = get_ipython().kernel
send = k.session.send
def quiet(stream, msg_or_type, content=None, *args, **kwargs):
    # the start messages of our cells are lost while the flood runs, as past a full queue
    kind = msg_or_type if isinstance(msg_or_type, str) else msg_or_type.get('msg_type')
    state = (content or {}).get('execution_state') if isinstance(content, dict) else None
    if flooding.is_set() and (kind == 'execute_input' or state == 'busy'):
        return None
    return send(stream, msg_or_type, content, *args, **kwargs)
k.session.send = quiet
flooding = threading.Event()
flooding.set()
def flood():
    end = time.monotonic() + 60
    while time.monotonic() < end and not os.path.exists('/workspace/stop-flood'):
        send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'flood ' * 50})
    flooding.clear()
threading.Thread(target=flood, daemon=True).start()
"""


def test_a_cell_whose_start_is_lost_in_an_iopub_flood_is_still_interrupted(fresh: Session) -> None:
    assert fresh.execute(_FLOOD, timeout=20).error is None
    started = time.monotonic()
    result = fresh.execute("import time\nopen('sleeper', 'w').close()\ntime.sleep(120)\nopen('woke', 'w').close()",
                           timeout=3)
    elapsed = time.monotonic() - started
    assert (fresh.workspace / "sleeper").exists()
    assert elapsed < 3 + 5 + 5 + 3, elapsed  # timeout, interrupt grace, reconnecting
    assert result.timed_out and not result.not_started, result
    assert result.error is not None and result.error.ename == "KeyboardInterrupt", result
    (fresh.workspace / "stop-flood").write_text("")
    after = fresh.execute("'after the flood'", timeout=10)
    assert after.text == "'after the flood'" and not after.timed_out, after
    assert not (fresh.workspace / "woke").exists()


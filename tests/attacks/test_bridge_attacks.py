"""Attacks on the tool bridge from code running in a sandbox: each must leave the host, and every other
session, as it was."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from host_probes import memory

from workbench import Session, Workbench
from workbench.tools.bridge import CONCURRENCY, MAX_CONNECTIONS

running = {"now": 0, "most": 0}
guard = threading.Lock()


@pytest.fixture(scope="module")
def pair(wb: Workbench) -> Iterator[tuple[Session, Session]]:
    if "ATTACK_SLEEP" not in wb.tools:
        @wb.tool(slug="ATTACK_SLEEP", toolkit="attack")
        def sleep(seconds: float = 0.0, pad: str = "") -> int:
            with guard:
                running["now"] += 1
                running["most"] = max(running["most"], running["now"])
            try:
                time.sleep(seconds)
            finally:
                with guard:
                    running["now"] -= 1
            return len(pad)

    attacker = wb.create(user_id="mallory", toolkits=["attack"])
    victim = wb.create(user_id="alice", toolkits=["attack"])
    yield attacker, victim
    attacker.close(delete_workspace=True)
    victim.close(delete_workspace=True)


def run(session: Session, code: str, timeout: float = 120) -> Any:
    result = session.execute(code, timeout=timeout)
    assert result.error is None and not result.timed_out, str(result)
    return eval(result.text) if result.text is not None else None


def victim_is_served(victim: Session) -> float:
    """The other session still gets tool calls; how long one took."""
    started = time.monotonic()
    assert run(victim, "run_tool('ATTACK_SLEEP', {'pad': 'ok'})") == (2, None)
    return time.monotonic() - started


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_symlink_swapped_over_the_bridge_socket_never_changes_a_host_file(
        wb: Workbench, pair: tuple[Session, Session], tmp_path: Path) -> None:
    attacker, victim = pair
    target = tmp_path / "host-file"
    target.write_text("root's")
    os.chmod(target, 0o600)
    before = target.stat()
    # A thread in the kernel keeps renaming a symlink to the host file over the bridge's socket; every
    # execute makes the host check its socket, and bind it again when it is not the one it made.
    run(attacker, f"""
import os, threading
stop = threading.Event()
def swap():
    while not stop.is_set():
        try:
            os.symlink({str(target)!r}, "/run/workbench/evil")
            os.rename("/run/workbench/evil", "/run/workbench/bridge")
        except OSError:
            pass
threading.Thread(target=swap, daemon=True).start()
""")
    for _ in range(15):
        attacker.execute("run_tool('ATTACK_SLEEP', {})")
    run(attacker, "stop.set()")
    after = target.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert target.read_text() == "root's"
    # removing its own socket only cuts the sandbox off until its next execute binds it again
    attacker.execute("import os; os.remove('/run/workbench/bridge')")
    assert run(attacker, "run_tool('ATTACK_SLEEP', {'pad': 'xyz'})") == (3, None)  # bound again, served
    victim_is_served(victim)


def test_timeouts_of_any_size_are_bounded_and_the_bridge_keeps_serving(pair: tuple[Session, Session], bridge_client: str) -> None:
    attacker, victim = pair
    kinds = run(attacker, bridge_client + """
raw = connect()
def ask(timeout):
    raw.sendall(request(id=1, op="call", slug="ATTACK_SLEEP", arguments={}, timeout=timeout))
    reply = read(raw)
    return reply.get("kind") or "ok"
bad = [ask(t) for t in (3e6, 1e300, 2**62, -1, 0, "soon", True, [1])]
documented = run_tool("ATTACK_SLEEP", {}, timeout=3e6)
(bad, documented)
""")
    assert kinds == (["ok", "ok", "ok"] + ["bad_request"] * 5, (0, None))
    victim_is_served(victim)
    assert run(attacker, "run_tool('ATTACK_SLEEP', {'pad': 'a'})") == (1, None)


def test_thousands_of_connections_cost_the_host_a_bounded_number_of_descriptors(
        wb: Workbench, pair: tuple[Session, Session]) -> None:
    attacker, victim = pair
    before = open_fds()
    opened = run(attacker, """
import socket, resource
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(30000, hard), hard))
held = []
try:
    for _ in range(20000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(s)
        s.setblocking(False)
        try:
            s.connect("/run/workbench/bridge")
        except (BlockingIOError, ConnectionRefusedError):
            pass
except OSError:  # out of descriptors inside the sandbox
    pass
len(held)
""")
    assert opened >= 10000
    time.sleep(1)
    stats = wb._bridge.stats(attacker.session_id)
    assert stats["connections"] <= MAX_CONNECTIONS
    assert open_fds() - before < MAX_CONNECTIONS + 50, "the host holds a descriptor per sandbox connection"
    victim_is_served(victim)
    refused = run(attacker, """
import threading, time
for s in held[200:]:  # gives the sandbox descriptors back; the first connections, those the host kept, stay
    s.close()
del held[200:]
time.sleep(0.5)
out = []
worker = threading.Thread(target=lambda: out.append(run_tool('ATTACK_SLEEP', {})))  # a new connection
worker.start(); worker.join()
out[0][1].kind
""")
    assert refused == "busy"
    run(attacker, "[s.close() for s in held]; del held")
    assert run(attacker, "run_tool('ATTACK_SLEEP', {'pad': 'ab'})") == (2, None)


def test_a_flood_from_one_sandbox_does_not_starve_another(pair: tuple[Session, Session], bridge_client: str) -> None:
    attacker, victim = pair
    run(attacker, bridge_client + """
import threading
def flood():
    raw = connect()
    raw.sendall(b"".join(request(id=i, op="call", slug="ATTACK_SLEEP", arguments={"seconds": 0.05})
                         for i in range(3000)))
    for _ in range(3000):
        read(raw)
flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
for t in flooders:
    t.start()
""")
    time.sleep(1.0)  # the flood is queued on the host
    waits = [victim_is_served(victim) for _ in range(5)]
    assert max(waits) < 2.0, f"the other session waited {max(waits):.1f}s for a tool call"
    attacker.restart()  # ends the flood


def test_calls_past_their_timeout_keep_counting_until_their_thread_returns(
        wb: Workbench, pair: tuple[Session, Session]) -> None:
    attacker, victim = pair
    with guard:
        running["most"] = 0
    pairs = run(attacker, """
pairs = run_tools([("ATTACK_SLEEP", {"seconds": 3}) for _ in range(96)], max_workers=96, timeout=0.2,
                  progress=False)
sorted(set(e.kind for _, e in pairs if e))
""", timeout=60)
    assert pairs == ["timeout"]
    assert running["most"] <= CONCURRENCY, f"{running['most']} calls of one session held threads at once"
    victim_is_served(victim)


def test_large_requests_and_unread_replies_do_not_pile_up_in_host_memory(
        wb: Workbench, pair: tuple[Session, Session], bridge_client: str) -> None:
    attacker, victim = pair
    rss = memory()
    answered = run(attacker, bridge_client + """
raw = connect()
pad = "x" * (7 << 20)
for i in range(60):
    raw.sendall(request(id=i, op="call", slug="ATTACK_SLEEP", arguments={"pad": pad}))
    assert read(raw)["data"] == len(pad)
# then 60 calls whose error replies nobody reads, each naming a 7 MB slug
unread = connect()
for i in range(60):
    unread.sendall(request(id=i, op="call", slug="S" * (7 << 20), arguments={}))
probe = connect()
probe.sendall(request(id="probe", op="call", slug="S" * (7 << 20), arguments={}))
reply = read(probe)
(reply["kind"], len(json.dumps(reply)))
""", timeout=120)
    kind, size = answered
    assert kind == "bad_request" and size < 3000  # the error does not echo the slug
    grown = memory() - rss
    assert grown < 150 << 20, f"host memory grew by {grown >> 20} MiB"
    time.sleep(0.5)
    stats = wb._bridge.stats(attacker.session_id)  # every call answered: nothing is still held for them
    assert stats["holding_threads"] == 0 and stats["big_in_use"] == 0 and stats["waiting"] == 0, stats
    victim_is_served(victim)




def test_a_bridge_loop_that_dies_is_started_again(wb: Workbench, pair: tuple[Session, Session]) -> None:
    attacker, victim = pair
    loop, _ = wb._bridge._running_loop()
    loop.call_soon_threadsafe(_raise_system_exit)  # the worst a bug in the loop could do: end its thread
    time.sleep(0.5)
    assert not loop.is_running()
    assert run(attacker, "run_tool('ATTACK_SLEEP', {'pad': 'again'})") == (5, None)  # bound anew, served
    victim_is_served(victim)


def _raise_system_exit() -> None:
    raise SystemExit("a bug in the bridge loop")


def test_what_a_sandbox_puts_at_its_bridge_path_never_fails_an_execute(pair: tuple[Session, Session]) -> None:
    attacker, victim = pair
    # a folder where the socket goes: moved aside, the socket bound again, the cell runs
    result = attacker.execute("import os; os.remove('/run/workbench/bridge'); os.makedirs('/run/workbench/bridge/x')")
    assert result.error is None
    assert run(attacker, "run_tool('ATTACK_SLEEP', {'pad': 'dir'})") == (3, None)
    victim_is_served(victim)


def test_a_full_runtime_dir_only_cuts_its_own_sandbox_off(pair: tuple[Session, Session]) -> None:
    attacker, victim = pair
    assert os.path.ismount(attacker.runtime_dir), "the runtime dir must be a size-capped filesystem of its own"
    # filled to the brim: the bridge cannot be bound again, the execution still runs, only its tool calls fail
    attacker.execute("""
import os
os.remove('/run/workbench/bridge')
try:
    with open('/run/workbench/fill', 'wb') as f:
        while True:
            f.write(b'x' * (1 << 20))
except OSError:
    pass
i = 0
try:
    while True:
        os.mkdir(f'/run/workbench/d{i}'); i += 1
except OSError:
    pass
""", timeout=60)
    result = attacker.execute("1 + 1")
    assert result.text == "2"
    attacker.restart()
    assert run(attacker, "run_tool('ATTACK_SLEEP', {'pad': 'back'})") == (4, None)
    victim_is_served(victim)

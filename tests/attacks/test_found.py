"""Ways through found by attacking issue 10's fixes, each reproduced from inside a real sandbox (or from what a
sandbox controls) and now held; the one known limit is marked xfail(strict), so fixing it shows."""
from __future__ import annotations

import os
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from host_probes import memory, reset_peak_memory

from workbench import Session, Workbench
from workbench.errors import FileError


@pytest.fixture(scope="module")
def attacker(wb: Workbench) -> Iterator[Session]:
    if "FOUND_ECHO" not in wb.tools:
        @wb.tool(slug="FOUND_ECHO", toolkit="found")
        def echo(value: Any = None) -> Any:
            """Returns what it was given (as many real tools do with ids, keys or queries)."""
            return value

        @wb.tool(slug="FOUND_SLEEP", toolkit="found")
        def nap(seconds: float = 0.0, pad: Any = None) -> int:
            time.sleep(seconds)
            return 0

        @wb.tool(slug="FOUND_REPO", toolkit="found")
        def repo(repo: str) -> str:
            return repo

    s = wb.create(user_id="mallory", toolkits=["found"], limits={"workspace_size": "64m"})
    yield s
    s.close(delete_workspace=True)


def run(session: Session, code: str, timeout: float = 120) -> Any:
    result = session.execute(code, timeout=timeout)
    assert result.error is None and not result.timed_out and result.kernel_died is None, str(result)
    return eval(result.text) if result.text is not None else None


# 1. bridge: an invalid_arguments reply echoes every argument name, unbounded --------------------------------------

def test_an_invalid_arguments_reply_does_not_echo_the_arguments(attacker: Session, bridge_client: str) -> None:
    size, kind = run(attacker, bridge_client + """
raw = connect()
arguments = {f"k{i}": 0 for i in range(300_000)}   # about 3.5 MB of JSON, under the 8 MB frame limit
raw.sendall(request(id=1, op="call", slug="FOUND_REPO", arguments=arguments))
reply = read(raw)
(len(json.dumps(reply)), reply["kind"])
""")
    assert kind == "invalid_arguments"
    assert size < 10_000, f"the error reply is {size:,} bytes: it echoes the request"


def test_run_tool_with_a_long_argument_name_gets_a_bounded_error(attacker: Session) -> None:
    size = run(attacker, "r, e = run_tool('FOUND_REPO', {'k' * 7_000_000: 1}); len(e.message)")
    assert size < 10_000, f"the error message is {size:,} characters"


# 2. offload: a dict response with many keys makes _fit quadratic ----------------------------------------------------

def test_an_offloaded_dict_with_many_keys_is_described_quickly(attacker: Session) -> None:
    started = time.monotonic()
    out = run(attacker, """
r, e = run_tool('FOUND_ECHO', {'value': {f'k{i}': i for i in range(15_000)}})
(e, r.envelope['columns_omitted'] if r is not None and hasattr(r, 'envelope') else None)
""", timeout=300)
    elapsed = time.monotonic() - started
    assert out[0] is None
    assert elapsed < 3.0, f"one tool call with a 15,000-key response took {elapsed:.1f}s of host CPU"


# 3. a deep tree of long names: every walk holds each entry's full path (quadratic host memory) ---------------------

DEEP = """
import os
def deep(base, n, name):
    fd = os.open(base, os.O_RDONLY)
    for _ in range(n):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
"""


def _peak(action: Any) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_listing_a_deep_tree_of_long_names_holds_bounded_memory(attacker: Session) -> None:
    run(attacker, DEEP + "deep('/workspace', 1200, 'L' * 250)")
    try:
        def listing() -> None:
            try:
                attacker.files.list(recursive=True)
            except FileError as exc:  # too much to list at once is a clear error, not a host's memory
                assert "too much to list" in str(exc)
        peak = _peak(listing)
        assert peak < 64 << 20, f"listing a 1,200-deep tree took {peak >> 20} MiB of host memory"
    finally:
        attacker.execute("import subprocess; subprocess.run(['rm', '-rf', '/workspace/' + 'L' * 250])")


def test_removing_a_deep_tree_of_long_names_holds_bounded_memory(attacker: Session) -> None:
    run(attacker, DEEP + "deep('/workspace', 1200, 'M' * 250)")
    peak = _peak(lambda: attacker.files.remove("M" * 250))
    assert not attacker.files.exists("M" * 250)
    assert peak < 64 << 20, f"removing a 1,200-deep tree took {peak >> 20} MiB of host memory"


# 4. bridge: request parsing runs on the one loop thread, unbounded in CPU --------------------------------------------

@pytest.fixture(scope="module")
def victim(wb: Workbench, attacker: Session) -> Iterator[Session]:
    s = wb.create(user_id="alice", toolkits=["found"])
    yield s
    s.close(delete_workspace=True)


def victim_wait(victim: Session) -> float:
    started = time.monotonic()
    assert run(victim, "run_tool('FOUND_REPO', {'repo': 'a/b'})") == ("a/b", None)
    return time.monotonic() - started


def test_frames_that_are_slow_to_parse_do_not_starve_another_session(attacker: Session, victim: Session, bridge_client: str) -> None:
    assert victim_wait(victim) < 2.0
    run(attacker, bridge_client + """
import threading, time
junk = b'{"v":1,"id":1,"op":"nope","arguments":{"a":[' + b','.join([b'[]'] * 2_700_000) + b']}}'
stop_at = time.monotonic() + 20
def flood():
    raw = connect()
    raw.settimeout(5)
    while time.monotonic() < stop_at:
        try:
            raw.sendall(frame(junk))
            read(raw)
        except OSError:
            raw = connect()
for _ in range(4):
    threading.Thread(target=flood, daemon=True).start()
""")
    time.sleep(2)
    waits = [victim_wait(victim) for _ in range(4)]
    time.sleep(max(0.0, 20 - 2 - sum(waits)))  # let the flood end before the next test
    assert max(waits) < 1.0, f"another session waited {max(waits):.1f}s for one tool call"


# 5. kernel messages: every dropped message's reason is kept, unbounded -----------------------------------------------

def test_a_flood_of_distinct_bad_signatures_holds_bounded_memory(attacker: Session) -> None:
    from workbench import execution

    seen: dict[str, int] = {}
    original = execution.run_cell

    def spying(*args: Any, **kwargs: Any) -> Any:
        outcome = original(*args, **kwargs)
        seen["reasons"] = len(outcome.drop_reasons)
        seen["dropped"] = outcome.result.dropped_messages
        return outcome

    code = textwrap.dedent("""
        import os, time
        k = get_ipython().kernel
        end = time.monotonic() + 8
        while time.monotonic() < end:
            for _ in range(1000):
                k.iopub_socket.send_multipart([b'<IDS|MSG>', os.urandom(32).hex().encode(), b'{}', b'{}', b'{}', b'{}'])
        """)
    import workbench.connection as connection_module
    connection_module.run_cell = spying
    try:
        result = attacker.execute(code, timeout=60)
    finally:
        connection_module.run_cell = original
    assert result.error is None and result.dropped_messages > 10_000, result
    assert seen["reasons"] <= 100, f"{seen['reasons']:,} distinct drop reasons kept for {seen['dropped']:,} drops"


# 6. the command line: names and text the sandbox chose crash it -----------------------------------------------------

def _cli(home: Any, *args: str) -> Any:
    import subprocess
    import sys
    env = {**os.environ, "WORKBENCH_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "workbench", *args], check=False, capture_output=True, env=env,
                          text=True, timeout=120, encoding="utf-8", errors="replace")


def test_files_ls_survives_a_file_name_that_is_not_utf8(wb: Workbench, attacker: Session) -> None:
    run(attacker, "open(b'/workspace/bad-\\xff-name', 'w').write('x'); open('/workspace/good.txt', 'w').write('y')")
    try:
        proc = _cli(wb.home, "files", "ls", attacker.session_id)
        assert "Traceback" not in proc.stderr, proc.stderr[-600:]
        assert proc.returncode == 0 and "good.txt" in proc.stdout
    finally:
        attacker.execute("import os; os.remove(b'/workspace/bad-\\xff-name')")


def test_exec_survives_a_lone_surrogate_in_the_output(wb: Workbench, attacker: Session) -> None:
    code = textwrap.dedent("""
        k = get_ipython().kernel
        import json
        m = k.session.msg('stream', {}, parent=k.get_parent())
        parts = [json.dumps(m['header'], default=str).encode(), json.dumps(m['parent_header'], default=str).encode(),
                 b'{}', b'{"name": "stdout", "text": "before \\\\ud800 after\\\\n"}']
        k.iopub_socket.send_multipart([b'<IDS|MSG>', k.session.sign(parts), *parts])
        print('the end')
        """)
    proc = _cli(wb.home, "exec", attacker.session_id, code)
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert proc.returncode == 0 and "the end" in proc.stdout








def test_one_message_of_tiny_values_neither_stalls_nor_bloats_the_host(fresh: Session) -> None:
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    code = textwrap.dedent("""
        k = get_ipython().kernel
        import json
        m = k.session.msg('stream', {}, parent=k.get_parent())
        body = b'{"name": "stdout", "text": "x", "pad": [' + b'[],' * 10_000_000 + b'[]]}'
        parts = [json.dumps(m['header'], default=str).encode(), json.dumps(m['parent_header'], default=str).encode(),
                 b'{}', body]
        k.iopub_socket.send_multipart([b'<IDS|MSG>', k.session.sign(parts), *parts])
        del body, parts
        'sent'
        """)
    ticker = threading.Thread(target=tick, daemon=True)
    rss = memory()
    reset_peak_memory()
    ticker.start()
    try:
        result = fresh.execute(code, timeout=120)
    finally:
        stop.set()
        ticker.join()
    grown = memory("VmHWM") - rss
    assert result.error is None, result
    problems = [f"every other host thread was held for {max(gaps):.1f}s"] if max(gaps) >= 1.0 else []
    if grown >= 150 << 20:
        problems.append(f"a 28 MB kernel message took {grown >> 20} MiB of host memory")
    assert not problems, "; ".join(problems)


# 9. bridge: waiting requests are counted in payload bytes, but held parsed (many times larger) -----------------------

def test_waiting_requests_hold_host_memory_near_their_byte_count(wb: Workbench, attacker: Session, bridge_client: str) -> None:
    rss = memory()
    run(attacker, bridge_client + """
import threading
pad = '[' + ','.join(['[]'] * 83_000) + ']'
def calls(n):
    raw = connect()
    body = b''.join(frame(('{"v":1,"id":%d,"op":"call","slug":"FOUND_SLEEP","arguments":{"seconds":12,"pad":%s}}'
                           % (i, pad)).encode()) for i in range(n))
    raw.sendall(body)
    for _ in range(n):
        read(raw)
for _ in range(8):
    threading.Thread(target=calls, args=(12,), daemon=True).start()
""")
    time.sleep(4)
    stats = wb._bridge.stats(attacker.session_id)
    grown = memory() - rss
    time.sleep(14)  # the calls end before the next test
    assert stats["waiting_bytes"] <= 16 << 20
    assert grown < 150 << 20, f"{stats} took {grown >> 20} MiB of host memory"


# 10. the store: every tool call the sandbox makes costs host disk, forever ------------------------------------------

def _logged_bytes(wb: Workbench, session_id: str) -> int:
    """Bytes the session's log rows hold in the store's table (the journal holds them a second time)."""
    wb.store.flush()
    row = wb.store._exec("SELECT coalesce(sum(length(detail) + length(session_id) + length(kind) + length(status)), 0)"
                         " + 40 * count(*) FROM logs WHERE session_id = ?", (session_id,)).fetchone()
    return int(row[0])


def test_a_sandbox_cannot_grow_the_host_store_without_bound(wb: Workbench, attacker: Session) -> None:
    sandbox = wb.create(user_id="mallory", toolkits=["found"])  # a kernel of its own: the others hold big objects
    try:
        kinds = run(sandbox, """
pairs = run_tools([("FOUND_REPO", {"r" * 300 + str(i): 1, "s" * 300: 2, "t" * 300: 3})
                   for i in range(10_000)], max_workers=32, retries=0, progress=False)
sorted(set(e.kind for _, e in pairs if e))
""", timeout=300)
        grown = _logged_bytes(wb, sandbox.session_id)
    finally:
        sandbox.close(delete_workspace=True)
    assert kinds == ["invalid_arguments"], kinds
    assert grown < 10 << 20, f"10,000 failed tool calls from the sandbox took {grown >> 20} MiB of the host's store"


# 11. kernel messages: MAXMSGSIZE bounds each frame, not a message of many frames (the relay bounds messages) -----

def test_a_message_of_many_frames_is_bounded_in_host_memory(fresh: Session) -> None:
    code = textwrap.dedent("""
        import zmq
        k = get_ipython().kernel
        blob = memoryview(bytes(30 << 20))  # each frame under the 32 MiB limit, which libzmq checks per frame
        k.iopub_socket.send_multipart([b'<IDS|MSG>', b'0' * 64, b'{}', b'{}', b'{}', b'{}'] + [blob] * 12, copy=False)
        import time; time.sleep(2)
        'sent'
        """)
    rss = memory()
    reset_peak_memory()
    result = fresh.execute(code, timeout=60)
    grown = memory("VmHWM") - rss
    assert result.error is None and result.text == "'sent'", result  # the connection cut was made again
    assert grown < 200 << 20, f"one kernel message of 12 x 30 MB frames took {grown >> 20} MiB of host memory"
    assert fresh.execute("print('still here')").stdout == "still here\n"


def test_a_reply_of_many_frames_is_bounded_in_host_memory(fresh: Session) -> None:
    code = textwrap.dedent("""
        k = get_ipython().kernel
        ident = k._shell_parent_ident.get() if hasattr(k._shell_parent_ident, 'get') else k._shell_parent_ident
        blob = memoryview(bytes(1000_000))  # each frame under shell's 1 MiB limit, 300 MB in all
        k.shell_stream.send_multipart(list(ident) + [b'<IDS|MSG>', b'0' * 64, b'{}', b'{}', b'{}', b'{}'] + [blob] * 300,
                                      copy=False)
        print('after the giant reply')
        """)
    rss = memory()
    reset_peak_memory()
    result = fresh.execute(code, timeout=60)
    grown = memory("VmHWM") - rss
    assert result.error is None and not result.timed_out and result.stdout == "after the giant reply\n", result
    assert grown < 100 << 20, f"one reply of 300 x 1 MB frames took {grown >> 20} MiB of host memory"
    assert fresh.execute("6 * 7").text == "42"


# 12. outputs: the budget counts values, not MIME keys -----------------------------------------------------------------

def test_mime_keys_count_against_the_output_budget(fresh: Session) -> None:
    code = textwrap.dedent("""
        k = get_ipython().kernel
        for n in range(4):
            data = {f'application/x-{n}-{i:07d}': '' for i in range(300_000)}
            k.session.send(k.iopub_socket, 'display_data', {'data': data, 'metadata': {}}, parent=k.get_parent())
        del data
        """)
    result = fresh.execute(code, timeout=60)
    assert result.error is None, result.error
    kept = sum(len(mime) + len(str(value)) for output in result.results for mime, value in output.data.items())
    assert kept <= 2 * 1_000_000, f"the result keeps {kept:,} characters of outputs (output_limit 1,000,000)"


# 13. the workspace is the kernel's working folder, first on its sys.path: planted modules outlive restarts ----------

def test_a_module_planted_in_the_workspace_does_not_run_in_the_next_kernel(fresh: Session) -> None:
    run(fresh, "open('/workspace/ipykernel_launcher.py', 'w').write('raise SystemExit(3)\\n')")
    fresh.restart()
    assert fresh.execute("'clean kernel'").text == "'clean kernel'"


# 14. results that cross a boundary cannot be serialised when the sandbox picks their text ---------------------------

def test_a_listing_with_a_non_utf8_name_serialises(attacker: Session) -> None:
    run(attacker, "open(b'/workspace/odd-\\xff', 'w').write('x')")
    try:
        for entry in attacker.files.list():
            entry.model_dump_json()
    finally:
        attacker.execute("import os; os.remove(b'/workspace/odd-\\xff')")


def test_an_execution_result_with_a_forged_surrogate_serialises(attacker: Session) -> None:
    result = attacker.execute(textwrap.dedent("""
        k = get_ipython().kernel
        import json
        m = k.session.msg('stream', {}, parent=k.get_parent())
        parts = [json.dumps(m['header'], default=str).encode(), json.dumps(m['parent_header'], default=str).encode(),
                 b'{}', b'{"name": "stdout", "text": "\\\\ud800"}']
        k.iopub_socket.send_multipart([b'<IDS|MSG>', k.session.sign(parts), *parts])
        """))
    assert result.error is None
    result.model_dump_json()


# attacks that held ------------------------------------------------------------------------------------------------

def test_held_input_and_comm_and_unknown_messages_neither_hang_nor_raise(attacker: Session) -> None:
    started = time.monotonic()
    asked = attacker.execute("input('password: ')", timeout=30)  # no stdin channel: refused in the kernel
    assert asked.error is not None and not asked.timed_out and time.monotonic() - started < 10
    result = attacker.execute(textwrap.dedent("""
        k = get_ipython().kernel
        p = k.get_parent()
        for kind in ('comm_open', 'comm_msg', 'clear_output', 'debug_event', 'x' * 10_000):
            k.session.send(k.iopub_socket, kind, {'comm_id': 'c', 'data': {'x': 1}, 'wait': True}, parent=p)
        'after'
        """), timeout=30)
    assert result.error is None and result.text == "'after'"


def test_held_a_hard_link_to_a_file_outside_the_workspace_is_refused(attacker: Session) -> None:
    assert run(attacker, textwrap.dedent("""
        import errno, os
        codes = set()
        for source in ('/etc/passwd', '/run/workbench/kernel.json', '/tmp/x'):
            open('/tmp/x', 'w').close()
            try:
                os.link(source, '/workspace/linked')
                codes.add('linked')
                os.remove('/workspace/linked')
            except OSError as exc:
                codes.add(errno.errorcode[exc.errno])
        sorted(codes)
        """)) == ["EXDEV"]

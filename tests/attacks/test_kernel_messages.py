"""The kernel is hostile: it holds the HMAC key, so it can forge, replay or garble any message, flood the host and
send outputs of any size. Each attack here runs from inside a real kernel; execute() must neither raise, nor hang
past its deadline, nor hold the host's memory, nor interrupt another caller's cell."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

from host_probes import wait_for_file

from workbench import Session, Workbench

FORGE = """
k = get_ipython().kernel
p = k.get_parent()
def forge(kind, content, parent=p, **kw):
    k.session.send(k.iopub_socket, kind, content, parent=parent, **kw)
def forge_raw(kind, content=b'{}', parent=None):  # any JSON in any part, correctly signed
    import json
    m = k.session.msg(kind, {}, parent=p)
    parts = [json.dumps(m['header'], default=str).encode(),
             parent if parent is not None else json.dumps(m['parent_header'], default=str).encode(), b'{}', content]
    k.iopub_socket.send_multipart([b'<IDS|MSG>', k.session.sign(parts), *parts])
"""


def test_garbage_bad_signatures_replays_and_wrong_shapes_are_dropped_and_counted(session: Session) -> None:
    result = session.execute(FORGE + textwrap.dedent("""
        k.iopub_socket.send_multipart([b'garbage', b'frames'])              # no delimiter
        k.iopub_socket.send_multipart([b'<IDS|MSG>', b'0' * 64, b'{}', b'{}', b'{}', b'{}'])  # bad signature
        m = k.session.msg('stream', {'name': 'stdout', 'text': 'once\\n'}, parent=p)
        frames = k.session.serialize(m)
        k.iopub_socket.send_multipart(frames)
        k.iopub_socket.send_multipart(frames)                                # a replay of the same bytes
        forge('stream', {'name': 'stdout', 'text': 12345})                  # non-string text
        forge('stream', {'name': ['stdout'], 'text': 'x'})                  # non-string name
        forge('display_data', {'data': ['not', 'a', 'dict'], 'metadata': {}})
        forge('display_data', {'data': {'text/plain': 5}, 'metadata': {}})  # non-string value
        forge('display_data', {'data': {'text/plain': 'x'}, 'metadata': 'meta'})
        forge('execute_result', {'data': {'text/plain': 'x'}, 'metadata': {}, 'execution_count': 'many'})
        forge('execute_input', {'code': '', 'execution_count': 1.5})
        forge('error', {'ename': 1, 'evalue': None, 'traceback': 'no'})
        forge('status', {'execution_state': None})
        forge_raw('stream', b'[1, 2]')                                      # content not an object
        forge_raw('stream', b'{"name": "stdout", "text": "x"}', parent=b'["not a header"]')
        forge_raw('stream', b'[' * 100_000)                                 # nested past the parser's depth
        forge_raw('stream', b'{"name": "stdout", "text": "\\ud800"}')      # a lone surrogate: still a str
        forge_raw('stream', b'not json')
        print('real output')
        6 * 7
        """))
    assert result.error is None and not result.timed_out and result.kernel_died is None
    assert result.stdout == "once\n\ufffdreal output\n"  # the lone surrogate replaced: results always encode
    assert result.text == "42" and isinstance(result.execution_count, int)
    assert result.results == [r for r in result.results if r.data == {"text/plain": "42"}]
    assert result.dropped_messages == 16
    assert "16 malformed kernel messages were dropped" in str(result)
    assert session.execute("1 + 1").text == "2"


def test_a_forged_execute_reply_is_checked_too(session: Session) -> None:
    result = session.execute(FORGE + textwrap.dedent("""
        ident = k._shell_parent_ident.get() if hasattr(k._shell_parent_ident, 'get') else k._shell_parent_ident
        for content in ({'status': ['ok'], 'execution_count': 1}, {'status': 'ok', 'execution_count': 'x'},
                        {'status': 'error', 'ename': 5, 'evalue': 'e', 'traceback': []}):
            k.session.send(k.shell_stream, 'execute_reply', content, parent=p, ident=ident)
        print('ran to the end')
        """))
    assert result.error is None, result.error
    assert result.stdout == "ran to the end\n"
    assert isinstance(result.execution_count, int)
    assert result.dropped_messages == 3
    assert session.execute("'still serving'").text == "'still serving'"


def test_a_huge_error_is_cut_to_the_output_limit(session: Session) -> None:
    result = session.execute(FORGE + textwrap.dedent("""
        forge('error', {'ename': 'E' * 100_000, 'evalue': 'v' * 5_000_000, 'traceback': ['line ' * 20] * 200_000})
        """))
    error = result.error
    assert error is not None and len(error.ename) <= 200
    assert len(error.evalue) < 1_100_000 and "characters cut" in error.evalue
    assert sum(map(len, error.traceback)) < 1_100_000 and "more traceback lines cut" in error.traceback[-1]
    raised = session.execute("raise ValueError('w' * 3_000_000)").error
    assert raised is not None and raised.ename == "ValueError" and len(str(raised)) < 2_300_000


def test_an_iopub_flood_does_not_hold_the_deadline(fresh: Session) -> None:
    # a cell that floods its own iopub and ignores the interrupt: timeout, interrupt, grace, restart, in bounded time
    code = FORGE + textwrap.dedent("""
        import time
        end = time.monotonic() + 90
        while time.monotonic() < end:
            try:
                forge('stream', {'name': 'stdout', 'text': 'flood ' * 100})
            except KeyboardInterrupt:
                pass
        """)
    started = time.monotonic()
    result = fresh.execute(code, timeout=3)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.state_lost and not result.not_started
    assert elapsed < 3 + 5 + 10, elapsed  # timeout + interrupt grace + a restart
    assert result.truncated.get("stdout", 0) > 0 or len(result.stdout) > 0
    assert fresh.execute("'after the flood'").text == "'after the flood'"


def test_thirty_big_images_are_spilled_as_files_not_held_in_memory(fresh: Session) -> None:
    code = textwrap.dedent("""
        import base64, os
        from IPython.display import display
        for i in range(30):
            raw = b'\\x89PNG\\r\\n\\x1a\\n' + bytes([i]) * 16 + os.urandom(10_000_000)
            display({'image/png': base64.b64encode(raw).decode(), 'text/plain': f'<image {i}>'}, raw=True)
        """)
    tracemalloc.start()
    try:
        result = fresh.execute(code, timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.error is None and len(result.results) == 30
    kept = sum(len(json.dumps(output.data)) + len(json.dumps(output.metadata)) for output in result.results)
    assert kept < 1_100_000  # the output limit, not 30 x 13 MB of base64
    assert peak < 80 * 1024**2, peak  # one message in flight at a time (the old code held over 400 MB)
    for i, output in enumerate(result.results):
        assert output.text == f"<image {i}>"
        path = result.spilled[f"results[{i}].image/png"]
        assert path.endswith(".png") and f"/workspace/{path}" in output.data["image/png"]
        head = (fresh.workspace / path).read_bytes()[:24]
        assert head == b"\x89PNG\r\n\x1a\n" + bytes([i]) * 16 and (fresh.workspace / path).stat().st_size == 10_000_024
    first = result.spilled["results[0].image/png"]
    assert fresh.execute(f"len(open({first!r}, 'rb').read())").text == "10000024"


def test_outputs_share_one_budget_and_updates_give_theirs_back(fresh: Session) -> None:
    result = fresh.execute(textwrap.dedent("""
        from IPython.display import display
        handle = display({'text/plain': 'start'}, raw=True, display_id=True)
        for i in range(200):  # 4 MB of updates to one output: only its last state counts
            handle.update({'text/plain': str(i) + ' ' + 'u' * 20_000}, raw=True)
        for i in range(3):  # 3 outputs of 600,000 characters: the last ones go past the budget
            display({'text/plain': 't' * 600_000, 'application/json': {'n': list(range(100_000))}}, raw=True)
        """))
    assert result.error is None, result.error
    assert result.results[0].text == "199 " + "u" * 20_000 and "results[0].text/plain" not in result.spilled
    kept = sum(len(json.dumps(output.data)) for output in result.results)
    assert kept < 1_000_000 + 3 * 2_000 + 25_000
    assert result.results[1].text == "t" * 600_000  # within the budget
    for index in (2, 3):  # past it: a preview and the whole value in a file
        assert "characters cut" in result.results[index].text
        assert fresh.files.read(result.spilled[f"results[{index}].text/plain"]) == b"t" * 600_000
        spilled_json = result.spilled[f"results[{index}].application/json"]
        assert json.loads(fresh.files.read(spilled_json)) == {"n": list(range(100_000))}
        assert spilled_json in result.results[index].data["application/json"]


def test_a_message_too_big_for_the_host_is_dropped_without_hanging(fresh: Session) -> None:
    started = time.monotonic()
    result = fresh.execute(FORGE + "forge('stream', {'name': 'stdout', 'text': 'z' * 140_000_000})\nz = 1",
                           timeout=60)
    assert time.monotonic() - started < 20
    assert result.error is None and not result.timed_out
    assert "z" * 1000 not in result.stdout  # never reached this process
    assert fresh.execute("z + 1").text == "2"


def test_an_oversized_forged_reply_does_not_break_the_shell_channel(fresh: Session) -> None:
    started = time.monotonic()
    result = fresh.execute(FORGE + textwrap.dedent("""
        ident = k._shell_parent_ident.get() if hasattr(k._shell_parent_ident, 'get') else k._shell_parent_ident
        k.session.send(k.shell_stream, 'execute_reply', {'status': 'ok', 'pad': 'r' * 140_000_000}, parent=p,
                       ident=ident)
        print('after the giant reply')
        """), timeout=60)
    assert time.monotonic() - started < 20 and not result.timed_out, result
    assert result.stdout == "after the giant reply\n"
    for value in range(3):  # the shell channel was connected again
        assert fresh.execute(f"{value} * 2", timeout=10).text == str(value * 2)


def test_a_forged_execute_reply_over_a_megabyte_never_reaches_the_host(fresh: Session) -> None:
    # a 2 MB reply for our request, sent before the real one: the shell channel takes no message over 1 MiB
    result = fresh.execute(FORGE + textwrap.dedent("""
        ident = k._shell_parent_ident.get() if hasattr(k._shell_parent_ident, 'get') else k._shell_parent_ident
        k.session.send(k.shell_stream, 'execute_reply', {'status': 'error', 'ename': 'Forged', 'evalue': 'r' * 2_000_000,
                       'traceback': [], 'execution_count': 7777}, parent=p, ident=ident)
        print('after the forged reply')
        """), timeout=30)
    assert result.error is None and not result.timed_out, result
    assert result.execution_count != 7777 and result.dropped_messages == 0
    assert result.stdout == "after the forged reply\n"
    assert fresh.execute("6 * 7", timeout=10).text == "42"


def test_a_print_larger_than_an_iopub_message_arrives_in_parts(fresh: Session) -> None:
    result = fresh.execute("print('p' * 40_000_000, end='')\nprint('END')", timeout=60)
    assert result.error is None and not result.timed_out, result
    assert result.stdout.endswith("pEND\n") and result.truncated["stdout"] > 38_000_000
    assert fresh.files.list(result.spilled["stdout"])[0].size == 40_000_004


_OTHER_PROCESS = """
import json, sys
from workbench import Workbench
wb = Workbench(home=sys.argv[1], idle_timeout=None, pool_size=0)
result = wb.use(sys.argv[2]).execute(
    "import time\\nopen('b-started', 'w').close()\\ntime.sleep(4)\\nprint('B finished')", timeout=60)
print(json.dumps({"stdout": result.stdout, "error": str(result.error) if result.error else None,
                  "timed_out": result.timed_out}), flush=True)
wb.close()
"""


def test_a_timeout_in_one_process_never_interrupts_another_process_cell(wb: Workbench, fresh: Session) -> None:
    fresh.execute("1")
    other = subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS, str(wb.home), fresh.session_id],
                             stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        wait_for_file(fresh.workspace / "b-started", other, "the other process's cell")
        result = fresh.execute("'A ran'", timeout=1)
        assert result.timed_out and result.not_started and result.error is None
        assert "not interrupted" in str(result)
        out, _ = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            other.kill()
    theirs = json.loads(out.strip().splitlines()[-1])
    assert theirs == {"stdout": "B finished\n", "error": None, "timed_out": False}
    assert fresh.execute("'A again'").text == "'A again'"
    # A's first cell, A's timeout while waiting for B, B's cell (logged when it ended), A again
    assert [e.status for e in fresh.logs() if e.kind == "execution"][-4:] == ["ok", "not_started", "ok", "ok"]


def test_the_kernel_client_bounds_what_zmq_may_queue(session: Session) -> None:
    import zmq

    from workbench.connection import MAX_IOPUB_MESSAGE, MAX_SHELL_MESSAGE, RECEIVE_QUEUE
    session.execute("1")
    client = session._kernel.client
    assert client is not None
    assert (MAX_IOPUB_MESSAGE, MAX_SHELL_MESSAGE) == (32 * 2**20, 2**20)  # at most ~165 MiB of frames per session
    for channel, limit in ((client.iopub_channel, MAX_IOPUB_MESSAGE), (client.shell_channel, MAX_SHELL_MESSAGE)):
        assert channel.socket.getsockopt(zmq.MAXMSGSIZE) == limit
        assert channel.socket.getsockopt(zmq.RCVHWM) == RECEIVE_QUEUE
        assert channel.socket.getsockopt(zmq.LAST_ENDPOINT).startswith(b"ipc://@workbench-relay-")  # whole messages
    assert Path(session.workspace).is_dir()


def test_a_long_display_id_is_dropped_not_kept(session: Session) -> None:
    result = session.execute(FORGE + textwrap.dedent("""
        forge('display_data', {'data': {'text/plain': 'x'}, 'metadata': {}, 'transient': {'display_id': 'd' * 10_000}})
        'done'
        """))
    assert result.text == "'done'" and result.dropped_messages == 1 and not any(
        o.data.get("text/plain") == "x" for o in result.results)

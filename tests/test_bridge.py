"""Code in the sandbox calls the host's tools through its session's bridge: allowlisted, bulk, and sealed."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from workbench import Session, Workbench
from workbench.tools import RateLimited, ToolContext

SECRET = "sk-live-" + hashlib.sha256(b"workbench bridge test").hexdigest()[:24]
calls: Counter[str] = Counter()
lock = threading.Lock()


@pytest.fixture(scope="module")
def bridged(wb: Workbench) -> Iterator[tuple[Session, Session]]:
    if "NAP" not in wb.tools:
        os.environ["WB_TEST_API_TOKEN"] = SECRET  # a credential of the host process, as a real tool would use

        @wb.tool(slug="NAP", toolkit="bulk")
        def nap(i: int, seconds: float = 0.05) -> int:
            time.sleep(seconds)
            return i

        @wb.tool(slug="WHO", toolkit="bulk")
        def who(context: ToolContext) -> dict:
            token = os.environ["WB_TEST_API_TOKEN"]
            return {"session": context.session_id, "user": context.user_id,
                    "token_sha": hashlib.sha256(token.encode()).hexdigest()[:12]}

        @wb.tool(slug="LIMITED", toolkit="bulk")
        def limited(key: str, fail_times: int) -> str:
            with lock:
                calls[key] += 1
                n = calls[key]
            if n <= fail_times:
                raise RateLimited("slow down", retry_after=0.01)
            return f"{key} after {n} calls"

        @wb.tool(slug="FLAKY", toolkit="bulk")
        def flaky(key: str) -> str:
            with lock:
                calls[key] += 1
            raise ConnectionError("upstream reset")

        @wb.tool(slug="ROWS", toolkit="bulk")
        def rows(n: int) -> list[dict[str, Any]]:
            return [{"n": i, "square": i * i, "tags": ["a"] * (i % 3)} for i in range(n)]

        @wb.tool(slug="OTHER_KIT", toolkit="admin")
        def other_kit() -> str:
            return "should not be reachable"

    first = wb.create(user_id="bulk-user", toolkits=["bulk"])
    second = wb.create(user_id="admin-user", toolkits=["admin"])
    yield first, second
    first.close(delete_workspace=True)
    second.close(delete_workspace=True)


def run(session: Session, code: str) -> Any:
    result = session.execute(code)
    assert result.error is None, str(result)
    return result


def test_one_call_and_the_helpers_are_preloaded(bridged: tuple[Session, Session]) -> None:
    session, _ = bridged
    assert run(session, "run_tool('NAP', {'i': 7, 'seconds': 0})").text == "(7, None)"
    assert run(session, "sorted(t['slug'] for t in list_tools())").text == \
        "['FLAKY', 'LIMITED', 'NAP', 'ROWS', 'WHO']"
    schema = json.loads(run(session, "import json; print(json.dumps(tool_schema('NAP')))").stdout)
    assert schema["arguments"]["required"] == ["i"] and schema["toolkit"] == "bulk"
    assert "rate limit" in run(session, "help(run_tools)").stdout
    who = run(session, "result, error = run_tool('WHO')\nresult").text
    assert f"'session': '{session.session_id}'" in who and "'user': 'bulk-user'" in who


def test_bad_calls_each_give_an_error_pair(bridged: tuple[Session, Session]) -> None:
    session, _ = bridged
    code = """
pairs = {
    "unknown": run_tool("NO_SUCH_TOOL", {}),
    "other toolkit": run_tool("OTHER_KIT", {}),
    "invalid": run_tool("NAP", {"i": "seven"}),
    "raises": run_tool("FLAKY", {"key": "once"}),
    "hangs": run_tool("NAP", {"i": 1, "seconds": 5}, timeout=0.5),
    "too large": run_tool("NAP", {"i": 1, "pad": "x" * (9 << 20)}),
}
{name: (result, error.kind if error else None) for name, (result, error) in pairs.items()}
"""
    kinds = eval(run(session, code).text)
    assert kinds == {"unknown": (None, "not_found"), "other toolkit": (None, "not_allowed"),
                     "invalid": (None, "invalid_arguments"), "raises": (None, "tool_error"),
                     "hangs": (None, "timeout"), "too large": (None, "bad_request")}
    message = run(session, "print(run_tool('NAP', {'i': 'seven'})[1])").stdout
    assert "Input should be a valid integer" in message
    assert run(session, "run_tool('NAP', {'i': 2, 'seconds': 0})").text == "(2, None)"  # still serving




def test_malformed_oversized_and_flooding_frames_do_not_stop_the_bridge(bridged: tuple[Session, Session], bridge_client: str) -> None:
    session, _ = bridged
    code = bridge_client + """
raw = connect()
def ask(body):
    raw.sendall(frame(body))
    return read(raw)["kind"]
kinds = [ask(b"not json"), ask(b"[1, 2]"), ask(json.dumps({"v": 2, "id": 1, "op": "drop tables"}).encode()),
         ask(b"{}"), ask(json.dumps({"v": 1, "id": 1, "op": "list"}).encode()), ask(b"x" * (7 << 20))]
over = connect()
over.sendall(struct.pack(">I", 65 << 20))   # past the limit: an error, then the connection is closed
closing = (read(over)["kind"], read(over))
flood = 6000
raw.sendall(b"".join(request(id=i, op="call", slug="NAP", arguments={"i": i, "seconds": 0.001})
                     for i in range(flood)))
answers = {}
for _ in range(flood):
    kind = read(raw).get("kind") or "ok"
    answers[kind] = answers.get(kind, 0) + 1
(kinds, closing, answers)
"""
    kinds, closing, answered = eval(run(session, code).text)
    assert kinds == ["bad_request"] * 6
    assert closing == ("bad_request", None)
    assert answered == {"ok": 6000}  # every call of the flood answered: the bridge reads no faster than it runs
    assert run(session, "run_tool('NAP', {'i': 3, 'seconds': 0})").text == "(3, None)"


def test_bulk_calls_run_concurrently_in_input_order(bridged: tuple[Session, Session]) -> None:
    session, _ = bridged
    result = run(session, """
import time, random
started = time.monotonic()
pairs = run_tools([("NAP", {"i": i, "seconds": 0.05}) for i in range(1000)], max_workers=32)
elapsed = time.monotonic() - started
shuffled = run_tools([("NAP", {"i": i, "seconds": random.random() / 20}) for i in range(64)], max_workers=16)
(elapsed, [r for r, _ in pairs] == list(range(1000)), all(e is None for _, e in pairs),
 [r for r, _ in shuffled] == list(range(64)))
""")
    elapsed, in_order, no_errors, shuffled_in_order = eval(result.text)
    assert in_order and no_errors and shuffled_in_order
    assert elapsed < 3.0, f"1,000 calls of 50 ms with 32 workers took {elapsed:.2f}s"
    progress = [o.text for o in result.results if o.type == "display_data"]
    assert progress[0].startswith("run_tools done: 1,000/1,000 calls, 0 errors")


def test_only_rate_limits_are_retried(bridged: tuple[Session, Session]) -> None:
    session, _ = bridged
    result = run(session, """
pairs = run_tools([("LIMITED", {"key": "a", "fail_times": 2}), ("LIMITED", {"key": "b", "fail_times": 9}),
                   ("FLAKY", {"key": "c"})], retries=3)
[(r, e.kind if e else None) for r, e in pairs]
""")
    assert eval(result.text) == [("a after 3 calls", None), (None, "rate_limited"), (None, "tool_error")]
    assert calls["a"] == 3 and calls["b"] == 4 and calls["c"] == 1  # b: first try + 3 retries; c: never retried


def test_large_results_stay_in_the_workspace_and_tables_can_be_built(bridged: tuple[Session, Session]) -> None:
    session, _ = bridged
    result = run(session, """
big, error = run_tool("ROWS", {"n": 5000})
small = run_tools([("ROWS", {"n": 2}), ("ROWS", {"n": 3}), ("NO_SUCH_TOOL", {})], as_table=True)
(type(big).__name__, len(big.table()), big.value()[4999]["square"], small.shape, list(small["_call"]))
""")
    assert eval(result.text) == ("Offloaded", 5000, 4999**2, (5, 4), [0, 0, 1, 1, 1])


def test_no_secret_reaches_the_sandbox(bridged: tuple[Session, Session]) -> None:
    session, _ = bridged
    used = run(session, "run_tool('WHO')[0]['token_sha']").text  # the tool used the secret, on the host
    assert used == repr(hashlib.sha256(SECRET.encode()).hexdigest()[:12])
    found = run(session, f"""
import os, glob
secret = {SECRET!r}
hits = [k for k, v in os.environ.items() if secret in v or 'WB_TEST_API_TOKEN' in k]
for path in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
    try:
        if secret.encode() in open(path, 'rb').read():
            hits.append(path)
    except OSError:
        pass
for root in ('/workspace', '/run/workbench', '/tmp', '/opt'):
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                if secret.encode() in open(os.path.join(folder, name), 'rb').read():
                    hits.append(os.path.join(folder, name))
            except OSError:
                pass
hits
""").text
    assert found == "[]"


def test_a_session_reaches_only_its_own_bridge(bridged: tuple[Session, Session]) -> None:
    first, second = bridged
    assert run(second, "run_tool('OTHER_KIT')").text == "('should not be reachable', None)"
    denied = run(second, "run_tool('NAP', {'i': 1})[1].kind").text
    assert denied == "'not_allowed'"  # the toolkit the other session has is not this one's
    seen = run(second, f"""
import os
(sorted(os.listdir('/run/workbench')), os.path.exists({str(first._kernel.runtime_dir)!r}),
 {first.session_id!r} in open('/proc/self/mountinfo').read())
""").text
    files, other_visible, other_mounted = eval(seen)
    assert "bridge" in files and not other_visible and not other_mounted
    entries = [e for e in second.logs() if e.kind == "tool"]
    assert [(e.detail["slug"], e.status) for e in entries] == [("OTHER_KIT", "ok"), ("NAP", "not_allowed")]

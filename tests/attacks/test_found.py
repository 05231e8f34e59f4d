"""New ways through, found after issue 10's fixes: each reproduces an attack from inside a real sandbox (or from
what a sandbox controls) and is marked xfail(strict) until it is fixed; attacks that held are plain tests."""
from __future__ import annotations

import os
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from workbench import Session, Workbench

RAW = """
import json, socket, struct
def connect():
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect("/run/workbench/bridge")
    raw.settimeout(60)
    return raw
def frame(body):
    return struct.pack(">I", len(body)) + body
def read(raw):
    head = b""
    while len(head) < 4:
        chunk = raw.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    size, body = struct.unpack(">I", head)[0], b""
    while len(body) < size:
        body += raw.recv(size - len(body))
    return json.loads(body)
def request(**fields):
    return frame(json.dumps({"v": 1, **fields}).encode())
"""


@pytest.fixture(scope="module")
def attacker(wb: Workbench) -> Iterator[Session]:
    if "FOUND_ECHO" not in wb.tools:
        @wb.tool(slug="FOUND_ECHO", toolkit="found")
        def echo(value: Any = None) -> Any:
            """Returns what it was given (as many real tools do with ids, keys or queries)."""
            return value

        @wb.tool(slug="FOUND_REPO", toolkit="found")
        def repo(repo: str) -> str:
            return repo

    s = wb.create(user_id="mallory", toolkits=["found"], limits={"workspace_size": "64m"})
    yield s
    s.close(delete_workspace=True)


def run(session: Session, code: str, timeout: float = 120) -> Any:
    result = session.execute(code, timeout=timeout)
    assert result.error is None and not result.timed_out, str(result)
    return eval(result.text) if result.text is not None else None


# 1. bridge: an invalid_arguments reply echoes every argument name, unbounded --------------------------------------

@pytest.mark.xfail(strict=True, reason="session._tool_call puts str(pydantic ValidationError) in the reply uncut: "
                   "every unknown argument name is echoed with ~120 bytes of boilerplate (a 3 MB request gets a "
                   "~40 MB error reply built in host memory)")
def test_an_invalid_arguments_reply_does_not_echo_the_arguments(attacker: Session) -> None:
    size, kind = run(attacker, RAW + """
raw = connect()
arguments = {f"k{i}": 0 for i in range(300_000)}   # about 3.5 MB of JSON, under the 8 MB frame limit
raw.sendall(request(id=1, op="call", slug="FOUND_REPO", arguments=arguments))
reply = read(raw)
(len(json.dumps(reply)), reply["kind"])
""")
    assert kind == "invalid_arguments"
    assert size < 10_000, f"the error reply is {size:,} bytes: it echoes the request"


@pytest.mark.xfail(strict=True, reason="same echo through the documented run_tool: one long argument name comes "
                   "back whole in the error")
def test_run_tool_with_a_long_argument_name_gets_a_bounded_error(attacker: Session) -> None:
    size = run(attacker, "r, e = run_tool('FOUND_REPO', {'k' * 7_000_000: 1}); len(e.message)")
    assert size < 10_000, f"the error message is {size:,} characters"


# 2. offload: a dict response with many keys makes _fit quadratic ----------------------------------------------------

@pytest.mark.xfail(strict=True, reason="offload._fit drops envelope columns one at a time and re-serialises the "
                   "whole envelope each time: O(keys^2) host CPU, holding the GIL (20,000 keys ~ 25 s, 100,000 keys "
                   "~ 10 min)")
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


@pytest.mark.xfail(strict=True, reason="files.list(recursive=True) keeps every entry's full path, and fstree.walk "
                   "keeps each level's full path on its stack: memory grows with depth^2 x name length (1,200 folders "
                   "of 250-character names ~ 180 MB each; a 10 GiB workspace allows 100,000s of folders)")
def test_listing_a_deep_tree_of_long_names_holds_bounded_memory(attacker: Session) -> None:
    run(attacker, DEEP + "deep('/workspace', 1200, 'L' * 250)")
    try:
        peak = _peak(lambda: attacker.files.list(recursive=True))
        assert peak < 64 << 20, f"listing a 1,200-deep tree took {peak >> 20} MiB of host memory"
    finally:
        attacker.execute("import subprocess; subprocess.run(['rm', '-rf', '/workspace/' + 'L' * 250])")


@pytest.mark.xfail(strict=True, reason="fstree.empty (files.remove, rmtree) keeps each level's full relative path "
                   "on its stack: depth^2 x name length of host memory to remove a folder")
def test_removing_a_deep_tree_of_long_names_holds_bounded_memory(attacker: Session) -> None:
    run(attacker, DEEP + "deep('/workspace', 1200, 'M' * 250)")
    peak = _peak(lambda: attacker.files.remove("M" * 250))
    assert not attacker.files.exists("M" * 250)
    assert peak < 64 << 20, f"removing a 1,200-deep tree took {peak >> 20} MiB of host memory"

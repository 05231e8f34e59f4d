"""A paused session's snapshot lives in its workspace, which the sandbox writes: it is the sandbox's data, never the
host's. The host never unpickles it; a missing, corrupt or hostile snapshot costs the session its variables (and
says why), nothing more; a snapshot that does not fit leaves the session running; a fork copies links as links."""
from __future__ import annotations

import os
import pickle
import secrets
import time
from pathlib import Path

import pytest

from workbench import Session, Workbench
from workbench.errors import SessionError, WorkspaceFullError


def test_a_snapshot_too_large_for_the_workspace_is_refused_and_the_session_keeps_running(wb: Workbench) -> None:
    s = wb.create(user_id="test-user", limits={"workspace_size": "16m", "memory": "512m"})
    try:
        assert s.execute("import os\nblob = os.urandom(40 * 2**20)\nsmall = 5").ok
        with pytest.raises(WorkspaceFullError, match="do not fit"):
            s.pause()
        assert not s.paused
        result = s.execute("len(blob), small")
        assert result.text == f"({40 * 2**20}, 5)" and not result.state_lost  # the same kernel, still running
        assert not s.files.exists(".state/namespace.pkl") and not s.files.exists(".state/.namespace.pkl.partial")
        assert s.execute("del blob").ok
        assert s.pause().names == ["small"]  # with room, it pauses
        assert s.execute("small").text == "5"
    finally:
        s.close(delete_workspace=True)


def test_a_corrupt_snapshot_resumes_with_state_lost_and_says_why(fresh: Session) -> None:
    fresh.execute("x = 1")
    fresh.pause()
    garbage = b"\x80\x05garbage, not a pickle"
    fresh.files.write(".state/namespace.pkl", garbage)
    result = fresh.execute("'x' in globals()")
    assert result.text == "False" and result.state_lost and not result.state_restored
    assert "not restored" in (result.state_lost_reason or "") and "Unpickling" in (result.state_lost_reason or "")
    assert "not restored" in str(result)
    assert not fresh.paused
    # nothing is kept silently: the snapshot is set aside under a name that says what it is, and the reason says so
    kept = [entry for entry in fresh.files.list(".state")]
    assert [entry.path.rsplit("/", 1)[1][:7] for entry in kept] == ["failed-"]
    assert fresh.files.read(kept[0].path) == garbage
    assert f"kept as {kept[0].path}" in (result.state_lost_reason or "")
    assert f"({len(garbage)} bytes)" in (result.state_lost_reason or "")
    assert fresh.execute("1 + 1").text == "2"
    assert [e.status for e in fresh.logs() if e.kind == "resume"] == ["state_lost"]


def test_only_the_newest_failed_snapshots_are_kept(fresh: Session) -> None:
    from workbench.state import KEEP_FAILED
    fresh.files.write(".state/failed-notes.txt", "the sandbox's own file, not a snapshot")
    link = ".state/failed-20000101-000000-abcdef.pkl"  # named as the oldest snapshot, a link to a host file
    assert fresh.execute(f"import os; os.symlink('/etc/hostname', '/workspace/{link}')").ok
    reasons = []
    for n in range(KEEP_FAILED + 2):
        fresh.execute(f"x = {n}")
        fresh.pause()
        fresh.files.write(".state/namespace.pkl", f"garbage {n}".encode())
        result = fresh.execute("'x' in globals()")
        assert result.state_lost, result
        reasons.append(result.state_lost_reason or "")
    kept = [entry.path for entry in fresh.files.list(".state") if entry.path.endswith(".pkl") and entry.path != link]
    assert len(kept) == KEEP_FAILED, kept
    assert sorted(fresh.files.read(path) for path in kept) == [f"garbage {n}".encode() for n in (2, 3, 4)]
    assert any(f"kept as {path}" in reasons[-1] for path in kept)  # the newest is the one the last result names
    assert fresh.files.read(".state/failed-notes.txt") == b"the sandbox's own file, not a snapshot"
    assert [e.type for e in fresh.files.list(".state") if e.path == link] == ["symlink"]  # never followed nor removed
    assert Path("/etc/hostname").exists()


def test_a_missing_snapshot_resumes_with_state_lost_and_says_why(fresh: Session) -> None:
    fresh.execute("x = 1")
    fresh.pause()
    fresh.files.remove(".state")
    result = fresh.execute("'x' in globals()")
    assert result.text == "False" and result.state_lost
    assert "FileNotFoundError" in (result.state_lost_reason or "") and "kept" not in (result.state_lost_reason or "")
    assert "set aside" not in (result.state_lost_reason or "")  # there was no snapshot to set aside


def test_a_hostile_snapshot_runs_in_the_sandbox_never_on_the_host(fresh: Session, tmp_path: Path) -> None:
    marker = tmp_path / f"pwned-{secrets.token_hex(4)}"

    class Payload:
        def __reduce__(self):  # unpickling runs this: inside the sandbox, where the host's tmp_path does not exist
            return (os.system, (f"touch {marker}; touch /tmp/ran-in-sandbox",))

    fresh.execute("x = 1")
    fresh.pause()
    fresh.files.write(".state/namespace.pkl", pickle.dumps({"x": Payload()}))
    result = fresh.execute("import os; os.path.exists('/tmp/ran-in-sandbox'), x")
    assert result.text == "(True, 0)" and result.state_restored  # it ran, in the sandbox: os.system returned 0
    assert not marker.exists()


def test_a_forged_report_line_is_ignored(fresh: Session) -> None:
    # user code cannot know the nonce of the host's next cell: its own report lines do not count
    fresh.execute("import builtins\nprint('WORKBENCH-STATE 0123456789abcdef {\"ok\": true, \"names\": [\"forged\"]}')")
    state = fresh.pause()
    assert "forged" not in state.names and "builtins" in state.modules


def test_a_fork_copies_links_as_links_and_skips_what_is_not_a_file(fresh: Session, wb: Workbench,
                                                                   tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only")
    fresh.execute(f"""
import os
os.symlink({str(secret)!r}, '/workspace/link-to-host')
os.symlink('/etc/passwd', '/workspace/passwd')
os.mkfifo('/workspace/a-fifo')
d = '/workspace/deep'
for _ in range(300):
    d += '/d'
os.makedirs(d)
open(d + '/leaf.txt', 'w').write('bottom')
""")
    fork = fresh.fork()
    try:
        assert fork.files.exists("link-to-host")  # (mounts the fork's workspace: an unused fork holds no mount)
        root = fork.workspace
        assert os.readlink(root / "link-to-host") == str(secret)  # a link, pointing where it pointed
        assert not (root / "a-fifo").exists()
        with pytest.raises(Exception):  # noqa: B017  (the files API refuses to follow it out of the workspace)
            fork.files.read("link-to-host")
        deep = fork.execute("import glob; open(glob.glob('/workspace/deep/**/leaf.txt', recursive=True)[0]).read()")
        assert deep.text == "'bottom'"
        assert fork.execute("open('/workspace/link-to-host').read()").error.ename == "FileNotFoundError"
        owner = fork.execute("import os; os.stat('/workspace/deep').st_uid == os.getuid()")
        assert owner.text == "True"  # the copies belong to the sandbox user: the fork can change its files
    finally:
        fork.close(delete_workspace=True)


def _swap_state_for_link(session: Session, target: str) -> None:
    """What a sandbox's background thread can leave behind a paused session: its `.state` folder moved aside and a
    link put in its place (done here from the host, to be certain it happened)."""
    session.files.exists(".")  # mounts the paused session's workspace
    root = session.workspace
    os.rename(root / ".state", root / f".state-moved-{secrets.token_hex(4)}")
    os.symlink(target, root / ".state")


def test_a_state_folder_leading_out_of_the_workspace_is_never_followed(fresh: Session, tmp_path: Path) -> None:
    outside = tmp_path / "host-state"
    outside.mkdir()
    for name in ("namespace.pkl", "manifest.json", ".namespace.pkl.partial", "failed.pkl"):
        (outside / name).write_bytes(b"the host's own " + name.encode())
    before = {p.name: p.read_bytes() for p in outside.iterdir()}

    # the kernel points .state at the host's folder (made in its own container too): the pause is refused, clearly
    assert fresh.execute(f"x = 1\nimport os\nos.makedirs({str(outside)!r}, exist_ok=True)\n"
                         f"os.symlink({str(outside)!r}, '/workspace/.state')").ok
    with pytest.raises(SessionError, match="not into the workspace"):
        fresh.pause()
    assert not fresh.paused and fresh.execute("x").text == "1"

    # paused, then .state swapped for a link to the host's folder: a restart still restarts, and says what it left
    assert fresh.execute("os.remove('/workspace/.state')").ok
    fresh.pause()
    _swap_state_for_link(fresh, str(outside))
    fresh.restart()
    assert not fresh.paused
    result = fresh.execute("'x' in globals()")
    assert result.text == "False" and result.state_lost
    assert "could not be removed" in (result.state_lost_reason or "") and "leads out" in (result.state_lost_reason or "")

    # paused, then .state swapped for a relative link out: the resume loses the variables and says why
    assert fresh.execute("x = 2\nimport os\nos.remove('/workspace/.state')").ok
    fresh.pause()
    _swap_state_for_link(fresh, "../../../" + str(outside).lstrip("/"))
    result = fresh.execute("'x' in globals()")
    assert result.text == "False" and result.state_lost and not fresh.paused
    assert "not restored" in (result.state_lost_reason or "") and "leads out" in (result.state_lost_reason or "")
    assert fresh.execute("1 + 1").text == "2"  # usable

    fresh.close(delete_workspace=True)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


_LYING_SAVE = """
import contextlib, io, json, os
import workbench_sandbox.state as _st
_honest = _st._save_state
def _lying(nonce, *args):
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        _honest(nonce, *args)
    mark, got, report = said.getvalue().strip().split(' ', 2)
    print(mark, got, json.dumps({**json.loads(report), 'bytes': 10**18}), flush=True)  # a size the host must not take
    if os.environ.get('FIFO_TOO') == '1':
        os.remove('/workspace/.state/namespace.pkl')
        os.mkfifo('/workspace/.state/namespace.pkl')  # a snapshot the host would hang reading, were it not careful
_st._save_state = _lying
x = 41
"""


def test_the_size_of_a_snapshot_is_the_hosts_measure_and_a_fifo_in_its_place_is_refused(fresh: Session) -> None:
    assert fresh.execute(_LYING_SAVE).ok
    state = fresh.pause()  # the sandbox claims an exabyte: the paused record holds what the host measured
    assert state.error is None and 0 < state.bytes < 10 << 20, state
    assert fresh.execute("x + 1").text == "42"  # restored (the lying save comes back with the namespace)
    # a module attribute is not a variable: the new kernel's save is honest until the cell sets it again
    assert fresh.execute("_st._save_state = _lying; os.environ['FIFO_TOO'] = '1'").ok
    started = time.monotonic()
    with pytest.raises(SessionError, match="not a regular file"):
        fresh.pause()
    assert time.monotonic() - started < 30  # never blocked on the fifo
    assert not fresh.paused and fresh.execute("x").text == "41"
    assert not fresh.files.exists(".state/namespace.pkl")  # the fifo went with the refused pause

"""The files API works on the host side of the workspace: streamed, capped, and never lets a path out."""
from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from workbench import Files, Session, Workbench
from workbench.errors import (
    FileError,
    PathOutsideWorkspaceError,
    WorkspaceFileNotFoundError,
    WorkspaceFullError,
)


def test_write_read_list_remove_and_the_kernel_sees_the_same_files(session: Session) -> None:
    files = session.files
    files.write("data/table.csv", b"a,b\n1,2\n")
    files.write("/workspace/data/notes.txt", "héllo")  # the sandbox's own view of a path works too
    assert session.execute("open('data/table.csv').read()").text == "'a,b\\n1,2\\n'"
    assert session.execute("open('/workspace/data/notes.txt', encoding='utf-8').read()").text == "'héllo'"
    # the kernel can change what the host wrote (ownership handed over), and the host reads it back
    session.execute("open('data/table.csv', 'a').write('3,4\\n')\nimport os; os.makedirs('out/deep')\n"
                    "open('out/deep/r.txt', 'w').write('from the kernel')")
    assert files.read("data/table.csv") == b"a,b\n1,2\n3,4\n"
    assert files.read_text("out/deep/r.txt") == "from the kernel"
    assert [(e.path, e.type) for e in files.list("data")] == [("data/notes.txt", "file"), ("data/table.csv", "file")]
    listed = {e.path: e for e in files.list(recursive=True)}
    assert {"data", "data/table.csv", "out", "out/deep", "out/deep/r.txt"} <= set(listed)
    assert listed["data/table.csv"].size == 12 and listed["out"].type == "dir"
    assert files.exists("out/deep/r.txt") and not files.exists("out/nothing")
    files.remove("out")
    assert not files.exists("out")
    assert session.execute("import os; os.path.exists('out')").text == "False"
    with pytest.raises(WorkspaceFileNotFoundError, match=r"no file data/missing\.txt"):
        files.read("data/missing.txt")
    with pytest.raises(FileNotFoundError):  # also a plain FileNotFoundError
        files.remove("data/missing.txt")


def test_every_way_out_is_refused(session: Session, wb: Workbench) -> None:
    files = session.files
    files.write("inside/ok.txt", b"fine")
    # the sandbox plants symlinks that point out of the workspace (as the host sees them) and one that stays in
    session.execute("import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/etc', 'etc')\n"
                    "os.symlink('../..', 'up')\nos.symlink('inside', 'alias')")
    escapes = ["../outside.txt", "inside/../../outside.txt", "/etc/passwd", "/workspace/../etc/passwd",
               str(session.workspace.parent / "other-session" / "x"), "passwd", "etc/hostname", "up/x",
               "etc", "bad\0name"]
    for path in escapes:
        for attempt in (lambda p=path: files.read(p), lambda p=path: files.write(p, b"x"),
                        lambda p=path: files.list(p)):
            with pytest.raises(PathOutsideWorkspaceError):
                attempt()
    with pytest.raises(PathOutsideWorkspaceError):
        files.remove("etc/hostname")
    with pytest.raises(PathOutsideWorkspaceError):
        files.exists("../outside.txt")
    # nothing was written outside, and the host's files are intact
    assert not (session.workspace.parent / "outside.txt").exists()
    assert not (session.workspace.parent.parent / "outside.txt").exists()
    # a symlink that stays inside is followed; a bad symlink itself can be listed and removed
    assert files.read("alias/ok.txt") == b"fine"
    assert {e.path: e.type for e in files.list()}["passwd"] == "symlink"
    files.remove("passwd")
    assert not files.exists("passwd")
    # a FIFO left by the sandbox does not hang the host
    session.execute("os.mkfifo('pipe')")
    with pytest.raises(FileError, match="not a regular file"):
        files.read("pipe")
    with pytest.raises(FileError, match="folder"):
        files.write("inside", b"x")


def test_users_cannot_see_each_others_files(wb: Workbench) -> None:
    with wb.create(user_id="alice") as alice, wb.create(user_id="mallory") as mallory:
        alice.files.write("secret.txt", b"alice's secret")
        seen = mallory.execute(
            "import os\n"
            f"print(os.listdir('/workspace'), os.path.exists({str(alice.workspace)!r}),"
            f" os.path.exists('/workspace/../{alice.session_id}'))"
        )
        assert seen.stdout.strip() == "[] False False"
        # nothing of alice's is mounted into mallory's container
        mounts = mallory.execute("print(open('/proc/self/mountinfo').read())").stdout
        assert "/workspace" in mounts and alice.session_id not in mounts
        for path in (f"../{alice.session_id}/secret.txt", str(alice.workspace / "secret.txt")):
            with pytest.raises(PathOutsideWorkspaceError):
                mallory.files.read(path)


def test_a_write_past_the_workspace_cap_is_refused_and_loses_nothing(wb: Workbench) -> None:
    with wb.create(user_id="alice", limits={"workspace_size": "1m"}) as session:
        files = session.files
        files.write("a.bin", b"a" * 600_000)
        with pytest.raises(WorkspaceFullError, match=r"size cap of 1\.0 MiB"):
            files.write("b.bin", b"b" * 600_000)
        assert not files.exists("b.bin")
        assert [e.path for e in files.list()] == ["a.bin"]  # no partial file left behind
        with pytest.raises(WorkspaceFullError):
            files.write("a.bin", iter([b"c" * 500_000] * 3))  # a failed overwrite keeps the old content
        assert files.read("a.bin") == b"a" * 600_000
        # as on any filesystem, the new content takes room beside the old until it replaces it; then the old
        # file's room is free again
        files.write("a.bin", b"d" * 300_000)
        assert files.list()[0].size == 300_000
        files.write("b.bin", b"e" * 600_000)
        assert files.read("b.bin") == b"e" * 600_000


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(total // size):
        yield bytes([i % 251]) * size


def test_a_1_gib_file_is_streamed_both_ways(session: Session) -> None:
    total = 1 << 30
    expected = hashlib.sha256()
    for chunk in _chunks(total):
        expected.update(chunk)
    tracemalloc.start()
    try:
        info = session.files.write("big.bin", _chunks(total))
        got = hashlib.sha256()
        with session.files.open("big.bin") as handle:
            while chunk := handle.read(1 << 20):
                got.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.size == total and got.hexdigest() == expected.hexdigest()
    assert peak < 32 << 20, f"peak Python memory {peak >> 20} MiB while moving 1 GiB"
    assert session.execute("import os; os.path.getsize('big.bin')").text == str(total)
    session.files.remove("big.bin")


def test_rename_keeps_to_its_folder_and_renames_a_link_itself(session: Session) -> None:
    session.files.write("a.txt", b"hello")
    session.execute("import os; os.symlink('/etc/passwd', 'link')")
    info = session.files.rename("a.txt", "b.txt")
    assert (info.path, info.size) == ("b.txt", 5) and session.files.read("b.txt") == b"hello"
    assert not session.files.exists("a.txt")
    assert session.files.rename("link", "moved").type == "symlink"  # the link itself, never its target
    assert session.execute("print(os.readlink('moved'))").stdout.strip() == "/etc/passwd"
    for bad in ("../b.txt", "x/y", "", ".", ".."):
        with pytest.raises(FileError):
            session.files.rename("b.txt", bad)
    with pytest.raises(WorkspaceFileNotFoundError):
        session.files.rename("nothing-here", "c.txt")
    # a folder the sandbox made a link out of the workspace is never followed: the host's own files stay put
    session.execute("os.symlink('/etc', 'etc-link')")
    host_hostname = Path("/etc/hostname").read_bytes()
    for path in ("etc-link/hostname", "/workspace/etc-link/hostname"):
        with pytest.raises(PathOutsideWorkspaceError):
            session.files.rename(path, "taken")
    assert Path("/etc/hostname").read_bytes() == host_hostname and not Path("/etc/taken").exists()
    assert session.files.read("b.txt") == b"hello"


def test_a_rename_over_a_file_takes_its_bytes_off_a_plain_folders_count(tmp_path: Path) -> None:
    plain = Files(tmp_path / "plain", lambda: 8 << 20)  # no quota filesystem: the host keeps a running count
    plain.write("big.bin", b"b" * (3 << 20))
    plain.write("small.bin", b"s" * 1000)
    assert plain.usage() == (3 << 20) + 1000
    plain.rename("small.bin", "big.bin")
    assert plain.usage() == 1000 == sum(p.stat().st_size for p in (tmp_path / "plain").iterdir())
    plain.write("again.bin", b"a" * (7 << 20))  # the room the replaced file held is the workspace's again
    with pytest.raises(WorkspaceFullError):
        plain.write("over.bin", b"o" * (1 << 20))

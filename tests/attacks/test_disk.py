"""Disk attacks from inside a sandbox (issue 10): caps that hold, walks that do not recurse or crawl, roots that
another host user cannot enter, and every OS error on a workspace path a workbench error."""
from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from workbench import Session, Workbench, fstree
from workbench.errors import (
    FileError,
    PathOutsideWorkspaceError,
    SessionError,
    WorkbenchError,
    WorkspaceFullError,
)
from workbench.files import Files
from workbench.sandbox import SANDBOX_UID, private_dir
from workbench.tools.offload import route
from workbench.workspace import RUNTIME_SIZE, Workspace, _probe, is_mount

MiB = 1 << 20
root_only = pytest.mark.skipif(not _probe(None)[0], reason="no per-session filesystems here: " + _probe(None)[1])


def run(session: Session, code: str, timeout: float = 120) -> str:
    result = session.execute(code, timeout=timeout)
    assert result.error is None, str(result.error)
    return result.stdout.strip()


FILL = """
import errno
def fill(path, total_mib):
    written = 0
    try:
        with open(path, 'wb') as out:
            for _ in range(total_mib):
                out.write(b'x' * (1 << 20))
                written += 1
            out.flush()
            os.fsync(out.fileno())
        return 'wrote all', written
    except OSError as exc:
        return errno.errorcode[exc.errno], written
import os
"""


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


@root_only
def test_a_kernel_writing_300_mb_into_a_50_mb_workspace_gets_enospc_and_the_host_disk_holds(wb: Workbench) -> None:
    assert wb.disk_quota, "this host can mount filesystem images: the quota must be on"
    cap = 50 * MiB
    with wb.create(user_id="attacker", limits={"workspace_size": cap}) as s:
        out = run(s, FILL + "print(*fill('/workspace/big', 300))")
        code, written = out.split()[-2:]
        assert code == "ENOSPC" and int(written) < 56, out
        image = s._kernel.disk.image
        info = os.stat(image)
        # the image is sparse and sized for the cap plus ext4's own overhead (inode tables, journal)
        assert info.st_blocks * 512 <= info.st_size <= cap * 1.12 + MiB
        # the sandbox sees a filesystem of the cap's size; a host write past it is a workbench error
        seen = int(run(s, "import os; v = os.statvfs('/workspace'); print(v.f_blocks * v.f_frsize)"))
        assert cap <= seen <= cap * 1.06
        with pytest.raises(WorkspaceFullError):
            s.files.write("more.bin", b"y" * MiB)
        # deleting frees the room again (and, with discard, the host's disk)
        s.files.remove("big")
        s.files.write("more.bin", b"y" * MiB)
        deadline = time.monotonic() + 15  # ext4 discards freed blocks when its journal commits
        while os.stat(image).st_blocks * 512 > 20 * MiB and time.monotonic() < deadline:
            os.sync()
            time.sleep(0.2)
        assert os.stat(image).st_blocks * 512 < 20 * MiB


@root_only
def test_a_kernel_writing_300_mb_into_its_runtime_dir_gets_enospc(session: Session) -> None:
    out = run(session, FILL + "print(*fill('/run/workbench/big', 300))\nos.remove('/run/workbench/big')")
    code, written = out.split()[-2:]
    assert code == "ENOSPC" and int(written) <= RUNTIME_SIZE // MiB, out
    # inodes are capped too, and the kernel keeps working afterwards
    out = run(session, "import os\nn = 0\ntry:\n    for n in range(100_000):\n"
                       "        os.mkdir(f'/run/workbench/d{n}')\nexcept OSError as exc:\n    print(exc.errno)\n"
                       "for i in range(n):\n    os.rmdir(f'/run/workbench/d{i}')\nprint(n)")
    assert out.split() and int(out.split()[-1]) < 5000
    assert session.execute("6 * 7").text == "42"
    assert is_mount(session._kernel.runtime_dir)


def test_concurrent_host_writes_never_overshoot_the_cap(wb: Workbench, tmp_path: Path) -> None:
    slug = "DISK_BIG_RESPONSE"
    if slug not in wb.tools:
        @wb.tool(slug=slug, toolkit="disk-attack")
        def big() -> str:
            return "z" * (5 * MiB)

    cap = 10 * MiB
    with wb.create(user_id="attacker", toolkits=["disk-attack"], limits={"workspace_size": cap}) as s:
        results: list[object] = []

        def offload() -> None:
            results.append(s.execute_tool(slug, {}))

        def write(i: int) -> None:
            try:
                results.append(s.files.write(f"w{i}.bin", b"w" * (5 * MiB)))
            except WorkspaceFullError as exc:
                results.append(exc)

        threads = [threading.Thread(target=offload) for _ in range(4)]
        threads += [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 8
        total = sum(e.size for e in s.files.list(recursive=True) if e.type == "file")
        assert total <= cap and s.files.usage() <= cap
        assert 1 <= total // (5 * MiB) <= 2
    # the same holds for a plain folder (no quota filesystem): the running count is charged under a lock
    plain = Files(tmp_path / "plain", lambda: cap)
    failures: list[Exception] = []

    def plain_write(i: int) -> None:
        try:
            plain.write(f"p{i}.bin", iter([b"p" * MiB] * 5))
        except WorkspaceFullError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=plain_write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert on_disk <= cap and len(failures) >= 6 and plain.usage() == on_disk


def test_many_empty_files_do_not_make_host_writes_walk(fresh: Session) -> None:
    count = 50_000
    run(fresh, f"import os\nos.makedirs('many', exist_ok=True)\nfor i in range({count}):\n"
               "    open(f'many/{i}', 'w').close()", timeout=300)
    fd = fstree.open_dir(fresh.workspace)
    try:
        started = time.perf_counter()
        assert sum(1 for _ in fstree.walk(fd)) > count
        walk = time.perf_counter() - started
    finally:
        os.close(fd)
    fresh.files.write("warm.txt", b"x")
    started = time.perf_counter()
    for i in range(20):
        fresh.files.write(f"small-{i}.txt", b"hello")
    per_write = (time.perf_counter() - started) / 20
    print(f"walk of {count:,} files {walk * 1000:.0f} ms; a host write {per_write * 1000:.2f} ms")
    assert per_write < max(walk / 10, 0.002), (per_write, walk)


def test_folders_1500_deep_break_nothing(wb: Workbench) -> None:
    s = wb.create(user_id="attacker")
    deep = ("import os\ndef deep(base, n):\n    fd = os.open(base, os.O_RDONLY)\n    for _ in range(n):\n"
            "        os.mkdir('d', dir_fd=fd)\n        child = os.open('d', os.O_RDONLY, dir_fd=fd)\n"
            "        os.close(fd)\n        fd = child\n    open(f'/proc/self/fd/{fd}/leaf', 'w').write('x')\n"
            "    os.close(fd)\n")
    run(s, deep + "deep('/workspace', 1500)\ndeep('/run/workbench', 1500)\n"
                  "os.makedirs('/workspace/.responses', exist_ok=True)\ndeep('/workspace/.responses', 1500)")
    listed = s.files.list(recursive=True)
    assert sum(1 for e in listed if e.type == "dir") >= 3000
    assert any(e.path.endswith("/leaf") and e.path.count("/") >= 1500 for e in listed)
    assert s.files.usage() > 0
    routed = route("r" * 100_000, files=s.files, threshold=1000)  # offload beside a hostile tree
    assert routed.offload is not None and s.files.read(routed.offload.path) == b"r" * 100_000
    s.restart()  # removes the runtime dir with its 1,500 levels
    assert s.execute("import os; len(os.listdir('/run/workbench')) < 10").text == "True"
    s.files.remove("d")  # an iterative remove
    assert not s.files.exists("d")
    run(s, deep + "deep('/workspace', 1500)\ndeep('/run/workbench', 1500)")
    s.close(delete_workspace=True)
    assert wb.store.get(s.session_id).status == "closed"
    assert not os.path.lexists(s.workspace) and not os.path.lexists(s._kernel.runtime_dir)
    # a plain folder's tree is removed iteratively too
    with tempfile.TemporaryDirectory() as tmp:
        fd = os.open(tmp, os.O_RDONLY)
        for _ in range(1500):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.symlink("/etc", f"/proc/self/fd/{fd}/etc")
        os.close(fd)
        plain = Files(Path(tmp), lambda: 1 << 30)
        assert len(plain.list(recursive=True)) == 1501 and plain.usage() == 0
        plain.remove("d")
        assert os.listdir(tmp) == [] and os.path.exists("/etc/hostname")


@root_only
def test_sandboxes_run_as_a_uid_no_host_account_has_and_another_host_user_reaches_nothing(session: Session,
                                                                                         wb: Workbench) -> None:
    uid = int(run(session, "import os; print(os.getuid())"))
    assert uid == SANDBOX_UID and uid >= 100_000
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    with pytest.raises(KeyError):
        grp.getgrgid(uid)
    for root in (wb.home, wb.home / "workspaces", wb.home / "disks", wb.runtime_root):
        info = os.lstat(root)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    session.execute("1")  # the bridge socket is bound for the session's first execution
    runtime = session._kernel.runtime_dir
    assert (runtime / "bridge").exists() and (runtime / "kernel.json").exists()
    session.files.write("secret.txt", b"secret")
    probe = (
        "import os, socket, sys\n"
        "for path in sys.argv[1:4]:\n"
        "    try:\n"
        "        open(path, 'rb').read(); print('read', path)\n"
        "    except OSError as exc: print('refused', exc.errno)\n"
        "try:\n"
        "    os.listdir(sys.argv[4]); print('listed')\n"
        "except OSError as exc: print('refused', exc.errno)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[5]); print('connected')\n"
        "except OSError as exc: print('refused', exc.errno)\n"
    )
    # a real login of this host (uid 1000 when there is one, the sandbox's old uid), and an unused uid
    others = [*[u.pw_uid for u in pwd.getpwall() if 1000 <= u.pw_uid < 60000][:1], 54321]
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # not under /root
    for other in others:
        proc = subprocess.run(
            [python, "-I", "-c", probe, str(session.workspace / "secret.txt"), str(runtime / "kernel.json"),
             str(wb.home / "workbench.db"), str(session.workspace), str(runtime / "bridge")],
            check=False, user=other, group=other, capture_output=True, text=True, timeout=60, cwd="/")
        lines = proc.stdout.split("\n")
        assert proc.returncode == 0, proc.stderr
        assert [line.split()[0] for line in lines if line] == ["refused"] * 5, (other, proc.stdout)


@root_only
def test_the_reaper_leaves_no_runtime_dir_and_no_mount(wb: Workbench, tmp_path: Path) -> None:
    reaper = Workbench(home=tmp_path, idle_timeout=1, pool_size=0, docker_client=wb.docker)
    try:
        s = reaper.create(user_id="idle-user")
        s.files.write("kept.txt", b"kept")
        s.execute("x = 1")
        runtime = s._kernel.runtime_dir
        assert is_mount(runtime)
        deadline = time.monotonic() + 20  # the reaper's thread pauses the session once idle past one second
        # a paused session holds no mount either (the workspace goes last, after the kernel's container): the next
        # use mounts it again, before the kernel
        while (os.path.lexists(runtime) or is_mount(s.workspace)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reaper.store.get(s.session_id).kernel is None
        assert not os.path.lexists(runtime) and f" {runtime} " not in _mounts()
        assert not is_mount(s.workspace)
        result = s.execute("open('kept.txt').read(), x")
        assert result.text == "('kept', 1)" and result.state_restored
        assert s._kernel.runtime_dir != runtime  # a runtime dir per kernel: the reaper's never is the next one's
        runtime = s._kernel.runtime_dir
        assert is_mount(s.workspace) and is_mount(runtime)
        s.close()
        assert not os.path.lexists(runtime) and not is_mount(s.workspace)
        assert s.files.read("kept.txt") == b"kept"  # a closed session's files stay readable (mounted on demand)
        s._kernel.disk.unmount()
    finally:
        reaper.close()


def test_os_errors_on_workspace_paths_are_file_errors(session: Session) -> None:
    files = session.files
    long_name = "n" * 300
    for attempt in (lambda: files.write(long_name, b"x"), lambda: files.read(long_name),
                    lambda: files.list(long_name), lambda: files.write(f"dir/{long_name}/x", b"x")):
        with pytest.raises(FileError, match="too long"):
            attempt()
    files.write("plain.txt", b"x")
    with pytest.raises(FileError, match="not a folder"):
        files.write("plain.txt/inner", b"x")
    run(session, "import os\nos.symlink('loop', 'loop')\nos.mkdir('locked', 0)")
    with pytest.raises(FileError):
        files.read("loop")
    with pytest.raises(FileError):
        files.write("loop/x", b"x")
    files.remove("loop")
    files.remove("locked")


def test_a_file_or_symlink_at_responses_or_outputs_gives_a_file_error(fresh: Session) -> None:
    big = "q" * 50_000
    for planted in ("open('.responses', 'w').write('no')", "os.symlink('/etc', '.responses')",
                    "os.symlink('.responses', '.responses')",
                    "open('x', 'w').close(); os.symlink('/workspace/x', '.responses')"):
        run(fresh, "import os, shutil\n"
                   "if os.path.islink('.responses') or os.path.isfile('.responses'): os.remove('.responses')\n"
                   "elif os.path.isdir('.responses'): shutil.rmtree('.responses')\n" + planted)
        with pytest.raises(FileError):
            route(big, files=fresh.files, threshold=1000)
        with pytest.raises(FileError):
            route([{"a": i} for i in range(5000)], files=fresh.files, threshold=1000)
    run(fresh, "import os\nos.symlink('/etc', '.outputs')")
    with pytest.raises(PathOutsideWorkspaceError):
        fresh.files.writer(".outputs/cell.stdout")
    # the kernel's own outputs past the limit still come back (the spill is dropped, not raised)
    result = fresh.execute("print('o' * 3_000_000)")
    assert result.error is None and result.stdout.startswith("o")
    assert not os.path.exists("/etc/cell.stdout")


@root_only
def test_workspace_size_can_be_changed_and_not_below_what_is_used(wb: Workbench) -> None:
    def seen() -> int:
        return int(run(s, "import os; v = os.statvfs('/workspace'); print(v.f_bavail * v.f_frsize)"))

    with wb.create(user_id="resizer", limits={"workspace_size": "32m"}) as s:
        s.files.write("keep.bin", b"k" * (3 * MiB))
        with pytest.raises(SessionError, match=r"shrink|remove files"):
            s.update(limits={"workspace_size": "2m"})
        try:
            s.update(limits={"workspace_size": "128m"})  # online, when this host's kernel allows it (root with
        except SessionError as exc:                     # CAP_SYS_RESOURCE), else with a new kernel
            assert "restart_if_needed" in str(exc)
            s.update(limits={"workspace_size": "128m"}, restart_if_needed=True)
        assert 125 * MiB <= seen() <= 135 * MiB
        assert s.files.read("keep.bin") == b"k" * (3 * MiB)
        s.update(limits={"workspace_size": "48m"}, restart_if_needed=True)  # shrinking is offline
        assert 45 * MiB <= seen() <= 52 * MiB
        assert s.files.read("keep.bin") == b"k" * (3 * MiB)
        assert s.limits.workspace_size == 48 * MiB


@root_only
def test_two_processes_never_mount_a_workspace_twice(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    private_dir(root)
    disk = Workspace(root / "shared", 8 * MiB)
    disk.ensure()
    disk.unmount()  # as after a host restart: the image is there, nothing is mounted
    assert not is_mount(disk.path)
    code = ("import sys; from pathlib import Path; from workbench.workspace import Workspace\n"
            "Workspace(Path(sys.argv[1]), 8 << 20).ensure()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(disk.path)]) for _ in range(4)]
    assert [proc.wait(timeout=60) for proc in procs] == [0] * 4
    mounted = [line for line in _mounts().splitlines() if line.split()[4] == str(disk.path)]
    assert len(mounted) == 1 and is_mount(disk.path)
    disk.destroy()
    assert not os.path.lexists(disk.image) and not os.path.lexists(disk.path)


def test_a_runtime_root_that_is_a_symlink_or_someone_elses_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(WorkbenchError, match="symlink"):
        private_dir(tmp_path / "link")
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    private_dir(loose)  # an existing root is made private
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    if os.getuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 54321, 54321)
        with pytest.raises(WorkbenchError, match="owned by uid 54321"):
            private_dir(theirs)


WATCHDOG = """
import json, os, sys
os.environ["WORKBENCH_DISK_QUOTA"] = "off"
from workbench import Workbench
from workbench.errors import WorkspaceFullError
out = {}
with Workbench(home=sys.argv[1], pool_size=0, idle_timeout=None) as wb:
    out["quota"] = wb.disk_quota
    s = wb.create(user_id="filler", limits={"workspace_size": "10m"})
    r = s.execute("open('big', 'wb').write(b'x' * (30 << 20))")  # no filesystem stops it here
    out["kernel_wrote"] = r.error is None
    try:
        s.files.write("host.bin", b"y" * 1024)
        out["host_write"] = "ok"
    except WorkspaceFullError:
        out["host_write"] = "refused"
    out["over_cap"] = wb.gc().over_cap == [s.session_id]
    out["kernel_after"] = wb.store.get(s.session_id).kernel
    s.files.remove("big")
    out["next"] = s.execute("1 + 1").text
    s.close(delete_workspace=True)
    out["closed"] = wb.store.get(s.session_id).status
print(json.dumps(out))
"""


def test_without_a_filesystem_quota_a_watchdog_stops_a_kernel_past_its_cap(wb: Workbench, tmp_path: Path) -> None:
    # a process of its own: the quota is decided once per process (WORKBENCH_DISK_QUOTA=off turns it off)
    proc = subprocess.run([sys.executable, "-c", WATCHDOG, str(tmp_path / "home")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"quota": False, "kernel_wrote": True, "host_write": "refused", "over_cap": True,
                   "kernel_after": None, "next": "2", "closed": "closed"}
    assert "no per-session disk quota" in proc.stderr  # said once, at start-up

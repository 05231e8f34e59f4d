"""The kernel's IPC sockets live in a folder the host locks once they are bound: a sandbox cannot make the
host connect to a socket of its choosing."""
from __future__ import annotations

import socket
from pathlib import Path

from workbench import Session, Workbench


def test_a_sandbox_cannot_swap_its_kernel_sockets_for_links(wb: Workbench, fresh: Session, tmp_path: Path) -> None:
    trap = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trap.bind(str(tmp_path / "trap"))
    trap.listen(16)
    trap.setblocking(False)
    seen = fresh.execute(f"""
import os
try:
    os.listdir('/run/workbench/kernel')
    listed = 'listed'
except PermissionError:
    listed = 'refused'
try:
    os.symlink({str(tmp_path / 'trap')!r}, '/run/workbench/kernel/k-9')
    planted = 'planted'
except PermissionError:
    planted = 'refused'
# the folder itself can be moved aside (it is in the sandbox's runtime dir) and a fake one put in its place
os.rename('/run/workbench/kernel', '/run/workbench/kernel.old')
os.mkdir('/run/workbench/kernel')
for i in range(1, 6):
    os.symlink({str(tmp_path / 'trap')!r}, f'/run/workbench/kernel/k-{{i}}')
x = 41
(listed, planted)
""")
    assert seen.text == "('refused', 'refused')", str(seen)
    assert fresh.execute("x + 1").text == "42"  # this process holds the real folder: nothing changed for it
    other = Workbench(home=wb.home, pool_size=0, idle_timeout=None)
    try:
        result = other.use(fresh.session_id).execute("'x' in globals()")
        assert result.text == "False" and result.state_lost  # the fake folder was refused: a new kernel
    finally:
        other.close()
    try:
        trap.accept()
        raise AssertionError("the host connected to the socket the sandbox pointed at")
    except BlockingIOError:
        pass
    finally:
        trap.close()

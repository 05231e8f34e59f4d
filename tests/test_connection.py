"""The kernel connection knows only connection info: a kernel reached over TCP (here a plain local ipykernel, as a
kernel on another host would be) runs cells through the same code as the sandboxed ones over IPC."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from jupyter_client.manager import KernelManager

from workbench.connection import KernelConnection
from workbench.execution import Callbacks


@pytest.fixture
def tcp_kernel() -> Iterator[KernelManager]:
    manager = KernelManager(kernel_name="python3", transport="tcp", ip="127.0.0.1")
    manager.start_kernel()
    try:
        yield manager
    finally:
        manager.shutdown_kernel(now=True)


def test_a_kernel_over_tcp_runs_cells_through_the_same_code(tcp_kernel: KernelManager) -> None:
    info = dict(tcp_kernel.get_connection_info(session=False))
    assert info["transport"] == "tcp"
    link = KernelConnection(info)
    try:
        assert link.wait_ready(30)
        streamed: list[str] = []
        outcome = link.run("print('over tcp'); 6 * 7", timeout=30, output_limit=10_000, interrupt=lambda: None,
                           exit_reason=lambda: None, callbacks=Callbacks(on_stdout=streamed.append))
        assert outcome.result.text == "42" and outcome.result.stdout == "over tcp\n" and streamed == ["over tcp\n"]
        # a timeout interrupts the cell through whatever `interrupt` the caller gives (here the kernel manager's)
        outcome = link.run("import time; time.sleep(30)", timeout=1, output_limit=10_000,
                           interrupt=lambda: threading.Thread(target=tcp_kernel.interrupt_kernel).start(),
                           exit_reason=lambda: None, callbacks=Callbacks())
        assert outcome.result.timed_out and outcome.result.error is not None
        assert outcome.result.error.ename == "KeyboardInterrupt"
    finally:
        link.close()


def test_a_connection_needs_a_known_transport() -> None:
    with pytest.raises(ValueError, match="ipc or tcp"):
        KernelConnection({"transport": "udp"})
    with pytest.raises(ValueError, match="path of the kernel's sockets"):
        KernelConnection({"transport": "ipc", "ip": "/run/workbench/kernel/k"})

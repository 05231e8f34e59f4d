"""Kernel languages as data: what a sandbox runs to speak the Jupyter protocol, and from which image.

Python is the only one for now. Another language (bash, R) is another `KernelSpec` and an image that holds its
kernel, registered in `KERNELS`: the host's execution code speaks the Jupyter protocol, not a language.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .config import DEFAULT_IMAGE

CONNECTION_FILE = "/run/workbench/kernel.json"  # where the host writes the connection file, inside the sandbox


class KernelSpec(BaseModel):
    """One kernel language: its Jupyter kernel name, the image it runs in and the command that starts it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the Jupyter kernel name, e.g. python3")
    display_name: str
    language: str
    image: str = Field(description="the image the sandbox runs, with the kernel and the sandbox's helpers")
    argv: tuple[str, ...] = Field(description="the start command in the sandbox; {connection_file} is replaced")

    def command(self) -> list[str]:
        """The start command with the connection file's path in place."""
        return [arg.replace("{connection_file}", CONNECTION_FILE) for arg in self.argv]


PYTHON = KernelSpec(
    name="python3", display_name="Python 3", language="python", image=DEFAULT_IMAGE,
    # -P: nothing in /workspace (the working dir) can shadow a module the kernel imports as it starts
    argv=("python3", "-P", "-m", "ipykernel_launcher", "-f", "{connection_file}", "--HistoryManager.enabled=False",
          "--IPKernelApp.exec_files=/opt/workbench/python/startup.py"),
)
KERNELS: dict[str, KernelSpec] = {PYTHON.name: PYTHON}


def kernel_spec(kernel: str | KernelSpec) -> KernelSpec:
    """The spec of a kernel given by name or as a spec."""
    if isinstance(kernel, KernelSpec):
        return kernel
    try:
        return KERNELS[kernel]
    except KeyError:
        raise ValueError(f"no kernel {kernel!r}: known kernels are {', '.join(sorted(KERNELS))}") from None

"""Where sandboxes run: one interface (`base.Backend`) and one package per backend (`docker/` first), found by
name through the `workbench.backends` entry-point group."""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from ..errors import WorkbenchError
from .base import Backend, ManagedSandbox, Sandbox, SandboxGone, SandboxProcess, SandboxSpec

ENTRY_POINTS = "workbench.backends"

__all__ = ["ENTRY_POINTS", "Backend", "ManagedSandbox", "Sandbox", "SandboxGone", "SandboxProcess", "SandboxSpec",
           "load_backend"]


def load_backend(name: str, **options: Any) -> Backend:
    """The backend registered under `name` in the `workbench.backends` entry points, made with `options`."""
    found = {point.name: point for point in entry_points(group=ENTRY_POINTS)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none (is workbench installed?)"
        raise WorkbenchError(f"no sandbox backend {name!r}: the installed ones are {known}")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise WorkbenchError(f"the backend {name!r} ({found[name].value}) is not a workbench Backend")
    return cls(**options)

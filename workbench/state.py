"""Sessions that sleep and wake: the host side of the namespace snapshot.

The sandbox side (`workbench_sandbox.state`) pickles the kernel's variables into the workspace's `.state/`; the
host only ever runs it as a silent cell and reads its one-line report, which comes from the sandbox and is
validated and bounded here. The host never unpickles anything.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError

from .errors import SessionError, WorkspaceFileNotFoundError
from .files import FileInfo, Files
from .kernel import Kernel
from .store import PausedState

STATE_DIR = ".state"
SNAPSHOT, MANIFEST = "namespace.pkl", "manifest.json"
_LEFTOVERS = (SNAPSHOT, MANIFEST, f".{SNAPSHOT}.partial", f".{MANIFEST}.partial")  # what a save writes
KEEP_FAILED = 3  # snapshots that could not be restored, kept for diagnosis (the newest; older ones are removed)
_FAILED = re.compile(r"failed-\d{8}-\d{6}(\.\d{6})?-[0-9a-f]{6}\.pkl")
_LINE = re.compile(r"^WORKBENCH-STATE ([0-9a-f]{16}) (\{.*\})$", re.MULTILINE)
_Name = Annotated[str, Field(max_length=256)]
_Reason = Annotated[str, Field(max_length=1000)]


class StateReport(BaseModel):
    """What the sandbox says it saved or restored (untrusted: every size bounded)."""

    ok: bool
    full: bool = False
    error: _Reason | None = None
    names: list[_Name] = Field(default_factory=list, max_length=20_000)
    modules: dict[_Name, _Name] = Field(default_factory=dict, max_length=2_000)
    skipped: dict[_Name, _Reason] = Field(default_factory=dict, max_length=20_000)
    bytes: int = Field(default=0, ge=0)


def run_state_cell(kernel: Kernel, action: Literal["save", "restore"], timeout: float) -> StateReport:
    """Save the kernel's namespace into `.state/`, or restore it from there, in a silent cell; raises SessionError
    when the cell gave no report (it timed out, the kernel died, its output was not the report)."""
    nonce = secrets.token_hex(8)
    code = f"__import__('workbench_sandbox.state').state._{action}_state({nonce!r})"
    result = kernel.execute(code, timeout=timeout, silent=True)
    what = "saving the variables" if action == "save" else "restoring the variables"
    if result.kernel_died:
        raise SessionError(f"the kernel died while {what}: {result.kernel_died}")
    if result.timed_out:
        raise SessionError(f"{what} took longer than {timeout:g}s")
    for found in _LINE.finditer(result.stdout):
        if found.group(1) == nonce:
            try:
                return StateReport.model_validate_json(found.group(2))
            except ValidationError as exc:
                raise SessionError(f"the sandbox's report on {what} is malformed: {exc.errors()[0]['msg']}") from None
    detail = str(result.error) if result.error else result.stderr[-500:] or "no output"
    raise SessionError(f"the sandbox gave no report on {what}: {detail}")


def paused_state(report: StateReport, size: int, lineage: str) -> PausedState:
    """The record of a pause whose save `report` described; `size` is the snapshot's size as the host measured it
    (the sandbox's own figure is not taken)."""
    return PausedState(paused_at=time.time(), names=report.names, modules=report.modules, skipped=report.skipped,
                       bytes=size, lineage=lineage)


def snapshot_size(files: Files) -> int:
    """The size of the snapshot a save just wrote, measured by the host; raises FileError when it is not a regular
    file of the workspace (the sandbox made `.state` a link out of it, or put a fifo or a link in its place)."""
    with files.open(f"{STATE_DIR}/{SNAPSHOT}") as handle:  # a regular file, reached without leaving the workspace
        return os.fstat(handle.fileno()).st_size


def remove_snapshot(files: Files) -> None:
    """Remove the snapshot files from the workspace (after a restore, a restart, a fork's checkpoint, a failed
    save). Raises FileError when they cannot be: `.state` leads out of the workspace (never followed there) or is
    not a folder."""
    for name in _LEFTOVERS:
        try:
            files.remove(f"{STATE_DIR}/{name}")
        except WorkspaceFileNotFoundError:
            pass


def keep_failed_snapshot(files: Files) -> FileInfo | None:
    """Set aside a snapshot that could not be restored, as `.state/failed-<time>-<random>.pkl` (kept for diagnosis; its
    manifest and any leftovers removed, and all but the newest KEEP_FAILED of those files); None when there was no
    snapshot file. Raises FileError when it cannot be (`.state` leads out of the workspace, never followed there, or
    is not a folder)."""
    try:
        now = time.time()  # (to the microsecond: the names sort as the failures came)
        kept: FileInfo | None = files.rename(
            f"{STATE_DIR}/{SNAPSHOT}",
            f"failed-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}-"
            f"{secrets.token_hex(3)}.pkl")
    except WorkspaceFileNotFoundError:
        kept = None
    if kept is not None and kept.type != "file":  # a link or a folder the sandbox put there: nothing to diagnose
        files.remove(kept.path)
        kept = None
    remove_snapshot(files)
    try:
        listed = files.list(STATE_DIR)
    except WorkspaceFileNotFoundError:  # (the sandbox removed .state: nothing was kept, nothing to prune)
        return kept
    failed = sorted(entry.path for entry in listed
                    if entry.type == "file" and _FAILED.fullmatch(entry.path.rsplit("/", 1)[1])
                    and (kept is None or entry.path != kept.path))
    for path in failed[:max(0, len(failed) - (KEEP_FAILED - (kept is not None)))]:
        files.remove(path)
    return kept

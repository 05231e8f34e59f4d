"""The host's side of the sandbox contract, whatever backend runs it: the sandbox's uid, where the workspace and
the runtime dir appear inside, and folders handed over to the sandbox user."""
from __future__ import annotations

import grp
import logging
import os
import pwd
from pathlib import Path

from .errors import WorkbenchError

log = logging.getLogger(__name__)

WORKSPACE = "/workspace"
RUNTIME = "/run/workbench"
DEFAULT_SANDBOX_UID = 900_000_000  # no host account has it (checked at start-up); the image's passwd names it


def _configured_uid() -> int:
    text = os.environ.get("WORKBENCH_SANDBOX_UID", "")
    if not text:
        return DEFAULT_SANDBOX_UID
    try:
        uid = int(text)
    except ValueError:
        raise WorkbenchError(f"WORKBENCH_SANDBOX_UID must be a number, not {text!r}") from None
    if not 0 < uid < 2**32 - 1:
        raise WorkbenchError(f"WORKBENCH_SANDBOX_UID must be between 1 and 4294967294, not {uid}")
    return uid


SANDBOX_UID = os.getuid() if os.getuid() != 0 else _configured_uid()
"""The uid (and gid) sandboxes run as: this user's own, or, when the host side runs as root, a high one that no
host account has (`WORKBENCH_SANDBOX_UID` to choose it)."""


def check_sandbox_uid() -> None:
    """When the host side is root, refuse a sandbox uid that a host account or group has: the sandbox would
    own that account's files and sockets."""
    if os.getuid() != 0:
        return
    owners = []
    try:
        owners.append(f"user {pwd.getpwuid(SANDBOX_UID).pw_name}")
    except KeyError:
        pass
    try:
        owners.append(f"group {grp.getgrgid(SANDBOX_UID).gr_name}")
    except KeyError:
        pass
    if owners:
        raise WorkbenchError(
            f"the sandbox uid {SANDBOX_UID} belongs to the host's {' and '.join(owners)}: sandboxes would own its "
            "files; set WORKBENCH_SANDBOX_UID to a uid no host account or group has")


def hand_over(fd: int) -> None:
    """Give a file or folder the host side created (open at `fd`) to the sandbox user."""
    if os.getuid() == 0:
        os.fchown(fd, SANDBOX_UID, SANDBOX_UID)


def _folder(path: Path) -> int:
    """A descriptor of the folder at `path`, made (0700) when missing; a symlink or file there is refused."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise WorkbenchError(f"{path} must be a folder (not a symlink): {exc.strerror}") from None


def private_dir(path: Path) -> None:
    """Create (or check) a folder only the host user can enter: 0700, owned by this uid, not a symlink.
    Its parents are created as needed (0700 too)."""
    if path.parent != path and not path.parent.exists():
        private_dir(path.parent)
    fd = _folder(path)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise WorkbenchError(f"{path} is owned by uid {info.st_uid}, not by this user ({os.getuid()}): "
                                 "refusing to keep sessions there")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def prepare_dir(path: Path) -> None:
    """Create a folder the sandbox user owns (the host side, when root, hands it over); its parent must exist
    and be the host's. A symlink in its place is refused."""
    fd = _folder(path)
    try:
        hand_over(fd)
    finally:
        os.close(fd)

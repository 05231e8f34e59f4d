"""Where a session's files live, with a real size cap: its workspace and its kernel's runtime dir.

When the host side runs as root and loop devices work (checked once at start-up), each workspace is an ext4
filesystem image, a sparse file `<home>/disks/<session id>.img` sized for `limits.workspace_size` of
usable space, loop-mounted (nosuid, nodev, discard: deleted files give the host its disk back) at the
workspace folder before any container starts. A write past the cap fails inside the sandbox with ENOSPC and
the host disk is untouched; usage is one statvfs. Each kernel's runtime dir (kernel.json, the IPC sockets, the
bridge socket) is a small tmpfs, limited in bytes and inodes, owned by the sandbox uid and mounted 0700.

Otherwise (not root, no loop devices, or WORKBENCH_DISK_QUOTA=off) a workspace is a plain folder: the cap
holds for what the host writes (files API, offload, spills: a running count, see files.py) but not for what
the kernel writes itself, which is only seen when the count is refreshed. That is said once, at start-up.

Nothing outside this module knows about loop devices or mounts.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import fstree
from .errors import FileError, SessionError, WorkbenchError
from .sandbox import SANDBOX_UID, hand_over, prepare_dir

log = logging.getLogger(__name__)

RUNTIME_SIZE = 16 << 20  # bytes of a kernel's runtime dir (kernel.json and sockets need a few KiB)
RUNTIME_INODES = 4096
_MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8

_support: tuple[bool, str] | None = None
_support_lock = threading.Lock()
_image_sizes: dict[int, int] = {}  # usable size asked for -> image size that gave it (ext4's overhead)
_libc = ctypes.CDLL(None, use_errno=True)


class WorkspaceError(FileError):
    """A workspace could not be mounted, resized or removed."""


class NeedsOffline(SessionError):
    """The workspace can be resized only with its kernel stopped (this host cannot grow ext4 online)."""


def quota_support(root: Path | None = None) -> tuple[bool, str]:
    """Whether workspaces are filesystem images here, and if not why; probed once per process (with a real
    mount of a tiny image in `root` when given), and a warning logged once when they are not."""
    global _support
    with _support_lock:
        if _support is None:
            _support = _probe(root)
            if not _support[0]:
                log.warning("no per-session disk quota: %s. Workspaces are plain folders; the workspace_size cap "
                            "holds for files the host writes, not for what a kernel writes itself, and runtime "
                            "dirs are plain folders.", _support[1])
        return _support


def _probe(root: Path | None) -> tuple[bool, str]:
    if os.environ.get("WORKBENCH_DISK_QUOTA", "").lower() in ("0", "off", "false", "no"):
        return False, "WORKBENCH_DISK_QUOTA is off"
    if os.getuid() != 0:
        return False, "the host side does not run as root (mounting filesystem images needs it)"
    for tool in ("mkfs.ext4", "mount", "losetup", "dumpe2fs"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed"
    if root is None:
        return True, ""
    probe = root / f".probe-{os.getpid()}"
    disk = Workspace(probe, 1 << 20)
    try:
        prepare_dir(probe)
        disk._create_image()
        disk._mount()
        disk.destroy()
    except (OSError, WorkbenchError, subprocess.SubprocessError) as exc:
        disk.destroy(quiet=True)
        return False, f"a filesystem image could not be mounted ({exc})"
    return True, ""


# mounts ----------------------------------------------------------------------------------------------------------

def _mount_tmpfs(target: Path, options: str) -> None:
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mounting a tmpfs at {target}: {os.strerror(code)}")


def _umount(target: Path) -> None:
    """Detach whatever is mounted at target (lazily: a kernel's leftovers cannot keep it)."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point
            raise OSError(code, f"unmounting {target}: {os.strerror(code)}")


def _unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it: space, tab, newline and backslash as octal escapes (\\040)."""
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and all(0x30 <= c <= 0x37 for c in raw[i + 1:i + 4]):
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mounts_under(root: Path) -> list[Path]:
    """The mount points strictly below `root` in this process's mount namespace, deepest first."""
    prefix = os.path.abspath(root).rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            lines = info.read().splitlines()
    except OSError:
        return []
    found = {_unescape(line.split(" ")[4]) for line in lines if len(line.split(" ")) > 4}
    return sorted((Path(p) for p in found if p.startswith(prefix)), key=lambda p: len(p.parts), reverse=True)


def unmount_all_under(root: Path) -> list[Path]:
    """Detach (lazily) every mount below `root`; the loop devices of images go once nothing uses them. Returns
    what was mounted."""
    found = mounts_under(root)
    for path in found:
        try:
            unmount_fully(path)
        except OSError as exc:
            log.warning("could not unmount %s: %s", path, exc)
    return found


def unmount_fully(path: Path) -> None:
    """Detach every mount at `path` (stacked mounts come off one at a time); nothing mounted: nothing to do."""
    for _ in range(8):
        if not is_mount(path):
            return
        _umount(path)


def is_mount(path: Path) -> bool:
    """Whether a filesystem is mounted at path (never following a symlink there)."""
    try:
        here = os.lstat(path)
        parent = os.stat(path.parent)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(here.st_mode) and (here.st_dev != parent.st_dev or here.st_ino == parent.st_ino)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Across threads and processes: one mounts or creates at a time in this folder."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise WorkspaceError(f"{' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


# the workspace ---------------------------------------------------------------------------------------------------

class Workspace:
    """A session's workspace folder on the host, with its size cap (a filesystem image where supported)."""

    def __init__(self, path: Path, size: int, quota: bool | None = None, image: Path | None = None) -> None:
        self.path = path
        self.image = image or path.with_name(path.name + ".img")  # in a folder only the host user enters
        self.size = size
        self._quota = quota  # None: decided on ensure() (image when supported and the folder is new)

    @property
    def quota(self) -> bool:
        """Whether this workspace is a filesystem image with a real cap."""
        if self._quota is None:
            self._quota = os.path.lexists(self.image)
        return self._quota

    def ensure(self) -> None:
        """Make the workspace ready for a kernel and for host writes: created, and mounted if it is an image.
        Safe from several threads and processes at once; a no-op when it already is."""
        if self._quota is False or (self._quota and self.mounted()):
            return
        with _locked(self.image.parent):
            if os.path.lexists(self.image):
                self._quota = True
                if not self.mounted():
                    prepare_dir(self.path)
                    try:
                        self._mount()
                    except WorkspaceError:  # e.g. left unclean by a host crash: repaired, then tried again
                        subprocess.run(["e2fsck", "-p", "-f", str(self.image)], check=False, capture_output=True,
                                       timeout=600)
                        self._mount()
                return
            fresh = not os.path.lexists(self.path) or _is_empty_dir(self.path)
            if self._quota is None and fresh and quota_support()[0]:
                prepare_dir(self.path)
                try:
                    self._create_image()
                    self._mount()
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(self.image)  # no half-made image taken for the workspace next time
                    raise
                self._quota = True
                return
            self._quota = False
            prepare_dir(self.path)

    def mounted(self) -> bool:
        return is_mount(self.path)

    def _create_image(self) -> None:
        """A sparse image whose ext4 has at least `size` bytes free (ext4's own overhead comes on top)."""
        known = _image_sizes.get(self.size)
        target = known or self.size + self.size // 25 + (128 << 10)
        for _ in range(6):
            fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, target)
            finally:
                os.close(fd)
            _run([*_MKFS, *_layout(self.size), "-E", f"root_owner={SANDBOX_UID}:{SANDBOX_UID}", str(self.image)])
            if known:
                return  # this size was measured before in this process
            fields = _dumpe2fs(self.image)
            block = int(fields["Block size"])
            free = int(fields["Free blocks"]) * block
            # ext4 keeps min(2%, 4096 blocks) back for delayed allocation: not available to files
            wanted = self.size + min(self.size // 50, 4096 * block)
            if free >= wanted:
                _image_sizes[self.size] = target
                return
            target += (wanted - free) + (wanted - free) // 8 + 4 * block
        raise WorkspaceError(f"could not make a filesystem of {self.size} bytes at {self.image}")

    def _mount(self) -> None:
        _run(["mount", "-o", "loop,nosuid,nodev,noatime,discard", "--", str(self.image), str(self.path)])
        # lost+found belongs to root: the sandbox cannot use it, the host has no need of it
        try:
            os.rmdir(self.path / "lost+found")
        except OSError:
            pass

    def unmount(self, quiet: bool = False) -> None:
        """Unmount the image (the kernel must be stopped); the next `ensure` mounts it again. `quiet`: a failure is
        logged, not raised (where nothing depends on the mount being gone)."""
        if not self.quota:
            return
        try:
            unmount_fully(self.path)
        except (OSError, WorkbenchError) as exc:
            if not quiet:
                raise
            log.warning("could not unmount the workspace %s: %s", self.path, exc)

    def usage(self) -> int:
        """Bytes the workspace's files take on its filesystem (blocks, with ext4's folders and extents)."""
        info = os.statvfs(self.path)
        return (info.f_blocks - info.f_bfree) * info.f_frsize

    def free(self) -> int:
        """Bytes the filesystem still has."""
        info = os.statvfs(self.path)
        return info.f_bavail * info.f_frsize

    def resize(self, size: int, *, offline_ok: bool = False) -> None:
        """Give the workspace a new cap. An image grows online when this kernel allows it (it needs
        CAP_SYS_RESOURCE); otherwise, and to shrink, it must be unmounted (`offline_ok`, kernel stopped)."""
        if size == self.size or not self.quota:
            self.size = size
            return
        if self.mounted():
            used = self.usage()
            if size < used:
                raise SessionError(f"cannot shrink the workspace to {size} bytes: its files take {used} bytes; "
                                   "remove files first")
            if size > self.size and self._grow_online(size):
                return
            if not offline_ok:
                raise NeedsOffline("changing workspace_size of this session needs its kernel stopped here "
                                   "(variables are lost): pass restart_if_needed=True")
            raise SessionError("unmount the workspace before resizing it offline")
        self._resize_offline(size)

    def _grow_online(self, size: int) -> bool:
        device = self._loop_device()
        if device is None:
            return False
        before = os.stat(self.image).st_size
        os.truncate(self.image, before + (size - self.size) + (size - self.size) // 16)
        try:
            _run(["losetup", "-c", device])
            _run(["resize2fs", device])
        except WorkspaceError as exc:
            log.info("workspace %s cannot grow online: %s", self.path.name, exc)
            os.truncate(self.image, before)
            subprocess.run(["losetup", "-c", device], check=False, capture_output=True)
            return False
        self.size = size
        return True

    def _resize_offline(self, size: int) -> None:
        for _ in range(40):  # a removed container's mount namespace lets go of the loop device a bit later
            if self._loop_device() is None:
                break
            time.sleep(0.05)
        else:
            raise SessionError("the workspace image is still in use; stop its kernel first")
        subprocess.run(["e2fsck", "-f", "-p", str(self.image)], check=False, capture_output=True, timeout=300)
        before = _dumpe2fs(self.image)
        block = int(before["Block size"])
        # blocks the files hold: neither free nor ext4's own (inode tables, journal, bitmaps)
        files = (int(before["Block count"]) - int(before["Free blocks"])
                 - int(before.get("Overhead clusters", "0"))) * block
        target = _image_sizes.get(size, size + size // 25 + (128 << 10))
        for _ in range(6):
            if target >= os.stat(self.image).st_size:
                os.truncate(self.image, target)
                _run(["resize2fs", str(self.image)])
            else:
                proc = subprocess.run(["resize2fs", str(self.image), str(target // block)], check=False,
                                      capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise SessionError(f"cannot shrink the workspace to {size} bytes (its files, or the journal "
                                       f"and inodes of its filesystem, need more): {proc.stderr.strip()}")
                os.truncate(self.image, target // block * block)
            free = int(_dumpe2fs(self.image)["Free blocks"]) * block
            wanted = size + min(size // 50, 4096 * block)
            if free + max(files, 0) >= wanted:
                break
            target += (wanted - free - files) + (wanted - free - files) // 8 + 4 * block
        self.size = size

    def _loop_device(self) -> str | None:
        proc = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", str(self.image)], check=False, capture_output=True,
                              text=True)
        names = proc.stdout.split()
        return names[0] if names else None

    def destroy(self, quiet: bool = False) -> None:
        """Remove the workspace and its files: an image is unmounted and unlinked; a plain folder is removed
        without recursion and without following any link."""
        try:
            if os.path.lexists(self.image):
                unmount_fully(self.path)
                try:
                    os.unlink(self.image)
                except FileNotFoundError:
                    pass
            fstree.rmtree(self.path)
        except OSError as exc:
            if not quiet:
                raise WorkspaceError(f"could not remove the workspace {self.path}: {exc}") from exc


def _layout(size: int) -> list[str]:
    """mkfs options that keep ext4's overhead small: a journal of about 1/64 of the size (none below 16 MiB),
    and fewer inodes on small filesystems than mke2fs's "small" type (which takes 6% for them)."""
    small = size < 512 << 20  # mke2fs makes 1 KiB blocks below this
    if size < 16 << 20:
        journal = ["-O", "^has_journal"]
    else:
        journal = ["-J", f"size={max(1 if small else 4, min(64, size // (64 << 20)))}"]
    return [*journal, *(["-i", "8192"] if small else [])]


def _is_empty_dir(path: Path) -> bool:
    try:
        fd = fstree.open_dir(path)
    except OSError:
        return False
    try:
        return not os.listdir(fd)
    finally:
        os.close(fd)


def _dumpe2fs(image: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in _run(["dumpe2fs", "-h", str(image)]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


# runtime dirs ----------------------------------------------------------------------------------------------------

def reset_runtime_dir(path: Path) -> None:
    """An empty runtime dir for a new kernel: a tmpfs of RUNTIME_SIZE bytes and RUNTIME_INODES inodes owned by
    the sandbox uid (0700), or a plain folder handed to it where mounts are not available."""
    release_runtime_dir(path)
    os.mkdir(path, 0o700)
    if quota_support()[0]:
        try:
            _mount_tmpfs(path, f"size={RUNTIME_SIZE},nr_inodes={RUNTIME_INODES},mode=0700,"
                               f"uid={SANDBOX_UID},gid={SANDBOX_UID}")
            return
        except OSError as exc:
            log.warning("runtime dir %s is a plain folder: %s", path, exc)
    fd = fstree.open_dir(path)
    try:
        hand_over(fd)
    finally:
        os.close(fd)


def release_runtime_dir(path: Path) -> None:
    """Unmount and remove a kernel's runtime dir (its kernel stopped). Missing: nothing to do."""
    unmount_fully(path)
    fstree.rmtree(path)

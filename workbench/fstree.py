"""Walking and deleting trees the sandbox can write: iteratively, by directory descriptor, never following a link.

Python's `os.fwalk` and `shutil.rmtree` recurse once per level, so a tree 1,500 folders deep (one loop in the
sandbox) raises RecursionError in the host. Here every folder is opened relative to its parent with O_NOFOLLOW
and the walk keeps its own stack. At most `_MAX_OPEN` ancestors stay open; deeper ones are closed and reopened
through `..` on the way back up, checked to be the same folder (device and inode) as before, so a sandbox that
moves folders around while the host walks cannot lead it anywhere else.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_OPEN = 64  # ancestors' descriptors kept open during a walk; deeper ones are reopened through ".."


class TreeChangedError(OSError):
    """A folder was moved while it was being walked (the walk stops rather than go somewhere else)."""


@dataclass
class Entry:
    """One entry met by `walk`: `rel` is its path below the walk's start ("a/b/c", "/" separators)."""

    rel: str
    name: str
    dir_fd: int  # its parent folder, open while the entry is yielded
    stat: os.stat_result


@dataclass
class _Level:
    fd: int | None
    name: str  # its own name only: full paths of every level would cost depth^2 x name length
    ident: tuple[int, int]
    names: list[str] = field(default_factory=list)
    relisted: bool = False


def open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """A descriptor of a folder, refusing a symlink in its place (ELOOP/ENOTDIR)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _list(fd: int) -> list[str]:
    try:
        names = os.listdir(fd)
    except FileNotFoundError:
        return []
    names.sort(reverse=True)  # popped from the end: visited in name order
    return names


class _Stack:
    """The open path from the walk's start down to the current folder."""

    def __init__(self, fd: int) -> None:
        info = os.fstat(fd)
        self.root = _Level(fd, "", (info.st_dev, info.st_ino), _list(fd))  # the caller's descriptor: never closed
        self.levels = [self.root]

    def push(self, fd: int, name: str) -> None:
        info = os.fstat(fd)
        self.levels.append(_Level(fd, name, (info.st_dev, info.st_ino), _list(fd)))
        far = len(self.levels) - _MAX_OPEN - 1
        if far > 0 and self.levels[far].fd is not None:
            os.close(self.levels[far].fd)  # type: ignore[arg-type]
            self.levels[far].fd = None

    def pop(self) -> _Level:
        """Leave the current folder; its parent is reopened through ".." if it was closed."""
        level = self.levels.pop()
        parent = self.levels[-1] if self.levels else None
        if parent is not None and parent.fd is None:
            assert level.fd is not None
            fd = os.open("..", DIR_FLAGS, dir_fd=level.fd)
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != parent.ident:
                os.close(fd)
                self.close_all(level)
                raise TreeChangedError(errno.ESTALE, f"{parent.name or '.'} was moved while being walked")
            parent.fd = fd
        return level

    def close_all(self, *extra: _Level) -> None:
        for level in [*self.levels, *extra]:
            if level.fd is not None and level is not self.root:
                os.close(level.fd)
                level.fd = None
        self.levels = []


def walk(fd: int, paths: bool = True) -> Iterator[Entry]:
    """Every entry below the folder open at `fd` (not closed here), parents before children, never following a
    symlink. Entries that vanish while walking are skipped; an entry's `dir_fd` is valid while it is yielded.
    Without `paths`, an entry's `rel` is only its name (nothing is built per entry)."""
    stack = _Stack(fd)
    try:
        while stack.levels:
            level = stack.levels[-1]
            if not level.names:
                done = stack.pop()
                if done is not stack.root and done.fd is not None:
                    os.close(done.fd)
                continue
            name = level.names.pop()
            assert level.fd is not None
            info = _lstat(name, level.fd)
            if info is None:
                continue
            rel = "/".join([*(up.name for up in stack.levels[1:]), name]) if paths else name
            yield Entry(rel, name, level.fd, info)
            if stat.S_ISDIR(info.st_mode):
                try:
                    child = open_dir(name, level.fd)
                except OSError as exc:  # gone, swapped for a link or a file, or unreadable: not descended
                    if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                        raise
                    continue
                stack.push(child, name)
    finally:
        stack.close_all()


def usage(fd: int) -> int:
    """Bytes of the regular files below the folder open at `fd`."""
    return sum(entry.stat.st_size for entry in walk(fd, paths=False) if stat.S_ISREG(entry.stat.st_mode))


def _unlink(name: str | Path, dir_fd: int | None) -> None:
    """Unlink (a folder swapped in after the lstat raises IsADirectoryError: it is emptied on the next pass)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _open_for_removal(name: str, dir_fd: int) -> int | None:
    """The folder to empty, made writable if the sandbox took the rights away; None when it is not a folder."""
    try:
        return open_dir(name, dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        if exc.errno != errno.EACCES:
            raise
    # mode 000 folder of our own uid: give us the rights back, through an O_PATH descriptor (never a link)
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{handle}", 0o700)
    finally:
        os.close(handle)
    return open_dir(name, dir_fd)


def empty(fd: int) -> None:
    """Remove everything below the folder open at `fd`, iteratively and without following any link."""
    stack = _Stack(fd)
    try:
        while stack.levels:
            level = stack.levels[-1]
            assert level.fd is not None
            if not level.names:
                if not level.relisted:  # anything made meanwhile by a running sandbox
                    level.names, level.relisted = _list(level.fd), True
                    if level.names:
                        continue
                done = stack.pop()
                if done is not stack.root:
                    parent = stack.levels[-1]
                    assert parent.fd is not None and done.fd is not None
                    os.close(done.fd)
                    try:
                        os.rmdir(done.name, dir_fd=parent.fd)
                    except FileNotFoundError:
                        pass
                continue
            name = level.names.pop()
            info = _lstat(name, level.fd)
            if info is None:
                continue
            if not stat.S_ISDIR(info.st_mode):
                try:
                    _unlink(name, level.fd)
                except IsADirectoryError:
                    level.names.append(name)
                continue
            child = _open_for_removal(name, level.fd)
            if child is None:
                _unlink(name, level.fd)
                continue
            stack.push(child, name)
    finally:
        stack.close_all()


def rmtree(path: str | Path, dir_fd: int | None = None) -> None:
    """Remove a folder and everything in it (a symlink or file there is unlinked, never followed). Missing: no-op."""
    try:
        fd = open_dir(path, dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        _unlink(path, dir_fd)
        return
    try:
        empty(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def copy_tree(source: int, target: int, *, limit: int, owner: Callable[[int], None] = lambda fd: None) -> int:
    """Copy everything below the folder open at `source` into the empty folder open at `target`: folders, regular
    files (their bytes, mode without set-id bits, times) and symlinks as symlinks; never following one (a file swapped
    for a link while copying is skipped). Other kinds (fifos, sockets, devices) are left out. `owner` is given the
    descriptor of every folder and file made. Raises OSError(EFBIG) past `limit` bytes of files; returns bytes copied.
    """
    copied = 0
    made: dict[str, int] = {"": target}  # folder rel -> descriptor in the target (the caller's `target` not closed)
    try:
        for entry in walk(source):
            parent_rel = entry.rel.rpartition("/")[0]
            parent = made.get(parent_rel)
            if parent is None:
                continue  # its folder was not copied
            mode = entry.stat.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(entry.name, 0o700, dir_fd=parent)
                fd = open_dir(entry.name, parent)
                owner(fd)
                os.fchmod(fd, stat.S_IMODE(mode) & 0o1777)
                made[entry.rel] = fd
            elif stat.S_ISLNK(mode):
                try:
                    link = os.readlink(entry.name, dir_fd=entry.dir_fd)
                except OSError:
                    continue
                os.symlink(link, entry.name, dir_fd=parent)
                if os.getuid() == 0:
                    os.chown(entry.name, entry.stat.st_uid, entry.stat.st_gid, dir_fd=parent, follow_symlinks=False)
            elif stat.S_ISREG(mode):
                copied += _copy_file(entry, parent, limit - copied, owner)
    finally:
        for rel, fd in made.items():
            if rel:
                os.close(fd)
    return copied


def _copy_file(entry: Entry, parent: int, room: int, owner: Callable[[int], None]) -> int:
    try:
        src = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.dir_fd)
    except OSError:
        return 0  # gone, or swapped for a link or a fifo since it was listed
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            return 0
        dst = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=parent)
        try:
            owner(dst)
            copied, in_kernel = 0, True
            while True:
                if copied > room:
                    raise OSError(errno.EFBIG, f"the workspace holds more than its cap of {room + copied:,} bytes")
                chunk = 0
                if in_kernel:
                    try:
                        chunk = os.copy_file_range(src, dst, 1 << 24)
                    except OSError as exc:  # e.g. across filesystems on an older kernel: copy through here
                        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                            raise
                        in_kernel = False
                if chunk == 0:
                    data = os.read(src, 1 << 20)
                    if not data:
                        break
                    view = memoryview(data)
                    while view:
                        view = view[os.write(dst, view):]
                    chunk = len(data)
                copied += chunk
            os.fchmod(dst, stat.S_IMODE(info.st_mode) & 0o777)
            os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(dst)
        return copied
    finally:
        os.close(src)

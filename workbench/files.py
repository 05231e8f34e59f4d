"""A session's workspace files, read and written on the host side of the mount, never through the kernel.

The sandbox can put symlinks in its workspace, so every path is resolved and checked to stay inside, then
opened one component at a time relative to the workspace's folder with O_NOFOLLOW: a symlink swapped in
between the check and the open is refused, never followed out.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import BinaryIO, Literal

from pydantic import BaseModel, field_serializer

from . import fstree
from .errors import (
    FileError,
    PathOutsideWorkspaceError,
    WorkspaceFileNotFoundError,
    WorkspaceFullError,
)
from .sandbox import WORKSPACE, hand_over, prepare_dir
from .workspace import Workspace

OUTPUTS = ".outputs"  # where cell and command outputs past the output limit are written whole
CHUNK = 1024 * 1024
RECOUNT = 60.0  # seconds after which a plain folder's running count is taken again (the kernel writes too)
_DIR = fstree.DIR_FLAGS
MAX_LISTED = 200_000  # entries of one recursive listing
MAX_LISTED_CHARS = 32 << 20  # characters of their paths (a deep tree of long names costs depth^2 x length)


class FileInfo(BaseModel):
    """One entry of the workspace."""

    path: str  # relative to the workspace, with "/" separators
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    modified: float

    @field_serializer("path", when_used="json")
    def _printable(self, path: str) -> str:
        """A name that is not UTF-8 (the sandbox can make one) is shown with its bytes escaped, as text."""
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


Data = bytes | str | BinaryIO | Iterable[bytes]


class _Budget:
    """What host writes may still put in one workspace, shared by every Files object of that folder in this
    process. Room for each write is reserved under the lock before it is written (the write itself happens
    outside it), so concurrent writers never take the workspace past its cap together and never wait on each
    other's disk writes. An image's usage is one statvfs; a plain folder's is a running count, taken by one
    walk and then moved by each host write (and taken again after RECOUNT seconds, since the kernel writes there
    too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used: int | None = None
        self.counted_at = 0.0
        self.writers = 0  # host writes in flight (a recount waits until there are none)
        self.reserved = 0  # bytes promised to writers in flight and not written yet

    def usage(self, files: Files) -> int:
        """Bytes used now (the lock held)."""
        disk = files.disk
        if disk is not None and disk.quota:
            return disk.usage()
        stale = time.monotonic() - self.counted_at > RECOUNT
        if self.used is None or (stale and self.writers == 0):
            self.used = _walk_usage(files.root)
            self.counted_at = time.monotonic()
        return self.used

    def removed(self, info: os.stat_result) -> None:
        """Take an entry the host removed (or replaced) off the running count: a regular file's bytes."""
        with self.lock:
            if self.used is not None and stat.S_ISREG(info.st_mode):
                self.used = max(0, self.used - info.st_size)

    def forget(self) -> None:
        with self.lock:
            if self.writers == 0:
                self.used = None


_budgets: dict[str, _Budget] = {}
_budgets_lock = threading.Lock()


def _budget(root: Path) -> _Budget:
    with _budgets_lock:
        return _budgets.setdefault(str(root), _Budget())


def _walk_usage(root: Path) -> int:
    try:
        fd = fstree.open_dir(root)
    except FileNotFoundError:
        return 0
    try:
        return fstree.usage(fd)
    finally:
        os.close(fd)


class Files:
    """Files of one workspace; paths are relative to it (`/workspace/...` as the sandbox sees them works too)."""

    def __init__(self, root: Path, size_cap: Callable[[], int], disk: Workspace | None = None) -> None:
        self.root = root
        self.disk = disk  # the workspace's disk (mounted on demand), or None for a plain folder
        self._size_cap = size_cap
        self._budget = _budget(root)

    # public API --------------------------------------------------------------------------------------------------

    def write(self, path: str | PurePath, data: Data) -> FileInfo:
        """Write a file (bytes, str, a binary file object or an iterable of byte chunks), streamed to disk.

        Missing folders are created. The file is replaced atomically: a write that fails or would take the
        workspace past its size cap leaves no partial file and the previous content in place. While it is
        written, the new content takes room beside the old (as on any filesystem); the old file's room is
        given back when the new one is in place.
        """
        with self.writer(path) as out:
            if isinstance(data, (bytes, bytearray, memoryview, str)):
                data = data.encode() if isinstance(data, str) else data
                out.reserve(memoryview(data).nbytes)  # all or nothing: concurrent writes cannot starve each other
            for chunk in _chunks(data):
                out.write(chunk)
        assert out.info is not None
        return out.info

    def writer(self, path: str | PurePath) -> Writer:
        """A binary file to write in steps, put in place when closed without error (see `write`):
        `with s.files.writer("out.bin") as f: f.write(...)`."""
        rel = self._relative(path)
        if rel == ".":
            raise FileError("cannot write to the workspace folder itself: give a file path")
        parent_rel, name = posixpath.split(rel)
        with self._dir(parent_rel, create=True) as parent, _mapped(rel):
            try:
                previous = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(previous.st_mode):
                    raise FileError(f"{rel} is a folder")
            except FileNotFoundError:
                pass
            return Writer(self, os.dup(parent), name, rel)

    @contextmanager
    def open(self, path: str | PurePath) -> Iterator[BinaryIO]:
        """A file opened for reading in binary, to stream it: `with s.files.open("big.bin") as f: ...`."""
        rel = self._relative(path)
        parent_rel, name = posixpath.split(rel)
        with self._dir(parent_rel) as parent:
            try:
                # O_NONBLOCK: a FIFO the sandbox left there must not hang the host
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
            except FileNotFoundError:
                raise WorkspaceFileNotFoundError(f"no file {rel} in the workspace") from None
            except OSError as exc:
                raise _refusal(rel, exc) from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileError(f"{rel} is not a regular file")
            with _mapped(rel):
                yield handle

    def read(self, path: str | PurePath) -> bytes:
        """The whole file as bytes (use `open` to stream a large one)."""
        with self.open(path) as handle:
            return handle.read()

    def read_text(self, path: str | PurePath, encoding: str = "utf-8") -> str:
        """The whole file as text."""
        return self.read(path).decode(encoding)

    def list(self, path: str | PurePath = ".", recursive: bool = False) -> list[FileInfo]:
        """The entries of a folder (all the way down with `recursive`), sorted by path; a file lists itself."""
        rel = self._relative(path)
        entries: list[FileInfo] = []
        if rel != ".":
            parent_rel, name = posixpath.split(rel)
            with self._dir(parent_rel) as parent, _mapped(rel):
                try:
                    info = self._info(parent, name, rel)
                except FileNotFoundError:
                    raise WorkspaceFileNotFoundError(f"no file or folder {rel} in the workspace") from None
                if info.type != "dir":
                    return [info]
        with self._dir(rel) as folder, _mapped(rel):
            if recursive:
                chars = 0
                for entry in fstree.walk(folder):
                    entries.append(_info_of(entry.stat, _join(rel, ".", entry.rel)))
                    chars += len(entries[-1].path)
                    if len(entries) > MAX_LISTED or chars > MAX_LISTED_CHARS:
                        raise FileError(f"{rel} holds too much to list at once (over {MAX_LISTED:,} entries or "
                                        f"{MAX_LISTED_CHARS:,} characters of paths): list a folder inside it")
            else:
                for name in os.listdir(folder):
                    try:
                        entries.append(self._info(folder, name, _join(rel, ".", name)))
                    except FileNotFoundError:
                        pass  # removed by the kernel meanwhile
        return sorted(entries, key=lambda entry: entry.path)

    def exists(self, path: str | PurePath) -> bool:
        """Whether a file, folder or symlink is there (a path leaving the workspace is an error, not False)."""
        rel = self._relative(path, follow_last=False)
        parent_rel, name = posixpath.split(rel)
        try:
            with self._dir(parent_rel) as parent, _mapped(rel):
                if name in ("", "."):
                    return True
                os.stat(name, dir_fd=parent, follow_symlinks=False)
                return True
        except (FileNotFoundError, WorkspaceFileNotFoundError):
            return False

    def remove(self, path: str | PurePath) -> None:
        """Remove a file, a symlink (not what it points to) or a folder with everything in it."""
        rel = self._relative(path, follow_last=False)
        if rel == ".":
            raise FileError("cannot remove the workspace folder itself")
        parent_rel, name = posixpath.split(rel)
        with self._dir(parent_rel) as parent, _mapped(rel):
            try:
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    try:
                        fstree.rmtree(name, dir_fd=parent)
                    finally:
                        self._budget.forget()  # a plain folder is counted again on the next write
                else:
                    os.unlink(name, dir_fd=parent)
                    self._budget.removed(info)
            except FileNotFoundError:
                raise WorkspaceFileNotFoundError(f"no file {rel} in the workspace") from None

    def rename(self, path: str | PurePath, new_name: str) -> FileInfo:
        """Give an entry another name in its folder (a link is renamed itself, never followed); its new info. An
        entry of that name is replaced, as by `os.rename`."""
        rel = self._relative(path, follow_last=False)
        if (rel == "." or not isinstance(new_name, str) or new_name in ("", ".", "..") or "/" in new_name
                or "\0" in new_name or not _encodable(new_name)):
            raise FileError(f"cannot rename {rel[:300]} to {str(new_name)[:300]!r}")
        parent_rel, name = posixpath.split(rel)
        target = posixpath.join(parent_rel, new_name)
        with self._dir(parent_rel) as parent, _mapped(target):
            try:
                replaced = os.stat(new_name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
            try:
                os.rename(name, new_name, src_dir_fd=parent, dst_dir_fd=parent)
            except FileNotFoundError:
                raise WorkspaceFileNotFoundError(f"no file {rel} in the workspace") from None
            if replaced is not None:
                self._budget.removed(replaced)
            return self._info(parent, new_name, target)

    def usage(self) -> int:
        """Bytes held by the workspace's files: its filesystem's used blocks when it is an image (no walk), else
        the running count of its files' sizes."""
        if self.disk is not None:
            self.disk.ensure()
        if not self.root.exists():
            return 0
        with self._budget.lock, _mapped("."):
            return self._budget.usage(self)

    def capacity(self) -> int:
        """The workspace's size cap in bytes."""
        return self._size_cap()

    # path handling -----------------------------------------------------------------------------------------------

    def _relative(self, path: str | PurePath, follow_last: bool = True) -> str:
        """The normalised path relative to the workspace, refusing every way out of it. Symlinks that stay
        inside are followed, the last component's only when `follow_last`."""
        text = os.fspath(path)
        if not isinstance(text, str):
            raise FileError(f"a workspace path must be text, not {type(text).__name__}")
        if "\0" in text:
            raise PathOutsideWorkspaceError("a workspace path cannot hold a NUL character")
        if not _encodable(text):
            raise FileError(f"{text[:300]!r} is not a file name this system can encode (a lone surrogate)")
        if text.startswith("/"):
            for prefix in (WORKSPACE, str(self.root)):
                if text == prefix or text.startswith(prefix + "/"):
                    text = text[len(prefix):].lstrip("/") or "."
                    break
            else:
                raise PathOutsideWorkspaceError(
                    f"{path} is outside the workspace: give a path relative to it, or under {WORKSPACE}/")
        rel = posixpath.normpath(text)
        if rel == ".." or rel.startswith("../"):
            raise PathOutsideWorkspaceError(f"{path} leaves the workspace through '..'")
        return self._resolve(str(path), rel, follow_last)

    def _resolve(self, shown: str, rel: str, follow_last: bool) -> str:
        """Resolve symlinks as the sandbox sees them (an absolute target means /workspace/...), refusing any
        that leads out."""
        done: list[str] = []
        todo = [part for part in rel.split("/") if part not in ("", ".")]
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                if not done:
                    raise PathOutsideWorkspaceError(f"{shown} leads out of the workspace through a symlink")
                done.pop()
                continue
            here = os.path.join(self.root, *done, part)
            if (todo or follow_last) and os.path.islink(here):
                hops += 1
                if hops > 40:
                    raise FileError(f"{shown}: too many levels of symlinks")
                try:
                    target = os.readlink(here)
                except OSError as exc:
                    raise _refusal(shown, exc) from None
                if target.startswith("/"):
                    if target != WORKSPACE and not target.startswith(WORKSPACE + "/"):
                        raise PathOutsideWorkspaceError(
                            f"{shown} leads out of the workspace through a symlink ({part} -> {target})")
                    done, target = [], target[len(WORKSPACE):]
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                continue
            done.append(part)
        return "/".join(done) or "."

    @contextmanager
    def _dir(self, rel: str, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder at a checked relative path, opened without following any symlink."""
        if self.disk is not None:
            self.disk.ensure()  # an image is mounted again after a host restart or a close
        elif create:
            prepare_dir(self.root)
        try:
            fd = os.open(self.root, _DIR)
        except FileNotFoundError:
            raise WorkspaceFileNotFoundError("the workspace does not exist (any more)") from None
        except OSError as exc:
            raise _refusal(".", exc) from None
        try:
            for part in [] if rel in ("", ".") else rel.split("/"):
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise WorkspaceFileNotFoundError(f"no folder {rel} in the workspace") from None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass  # made meanwhile (by another writer or the kernel): opened below, if a folder
                    except OSError as exc:
                        raise _refusal(rel, exc) from None
                    try:
                        child = os.open(part, _DIR, dir_fd=fd)
                        hand_over(child)
                    except OSError as exc:
                        raise _refusal(rel, exc) from None
                except OSError as exc:
                    raise _refusal(rel, exc) from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _info(dirfd: int, name: str, rel: str) -> FileInfo:
        return _info_of(os.stat(name, dir_fd=dirfd, follow_symlinks=False), rel)


def _info_of(info: os.stat_result, rel: str) -> FileInfo:
    kind: Literal["file", "dir", "symlink", "other"] = (
        "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode)
        else "symlink" if stat.S_ISLNK(info.st_mode) else "other")
    return FileInfo(path=rel, type=kind, size=info.st_size if kind == "file" else 0, modified=info.st_mtime)


def _refusal(rel: str, exc: OSError) -> FileError:
    """The workbench error for an OS error on a workspace path."""
    code = exc.errno
    if isinstance(exc, FileError):
        return exc
    if code == errno.ENOENT:
        return WorkspaceFileNotFoundError(f"no file or folder {rel} in the workspace")
    if code == errno.ELOOP:
        return PathOutsideWorkspaceError(f"{rel}: a symlink is in the way (changed while being opened?); refused")
    if code == errno.ENOTDIR:
        return FileError(f"a part of {rel} is not a folder")
    if code == errno.EISDIR:
        return FileError(f"{rel} is a folder")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return WorkspaceFullError(f"the workspace is full (writing {rel}): remove files or raise "
                                  "limits.workspace_size")
    if code == errno.ENAMETOOLONG:
        return FileError(f"a name in {rel[:100]}... is too long (at most 255 bytes a name)")
    return FileError(f"{rel[:300]}: {exc.strerror or exc}")


def _encodable(text: str) -> bool:
    """Whether `text` is a name the OS takes: a name listed from the disk always is (undecodable bytes come back as
    surrogate escapes); other lone surrogates, as JSON can carry, are not."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def _mapped(rel: str) -> Iterator[None]:
    """OS errors on a workspace path become workbench errors (FileError and its kinds)."""
    try:
        yield
    except FileError:
        raise
    except OSError as exc:
        raise _refusal(rel, exc) from None


class Writer(io.RawIOBase):
    """A workspace file being written: a temporary file renamed into place on close, removed on error. Each
    write is charged to the workspace's budget before it reaches the disk."""

    def __init__(self, files: Files, parent: int, name: str, rel: str) -> None:
        super().__init__()
        self._files, self._parent, self._name, self.path = files, parent, name, rel
        self._budget = files._budget
        self._temp = f".{name[:200]}.{secrets.token_hex(4)}.part"
        self._fd: int | None = None
        try:
            with _mapped(rel):
                self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   0o644, dir_fd=parent)
        except BaseException:
            os.close(parent)
            io.RawIOBase.close(self)  # nothing to abort: never counted as a writer
            raise
        with self._budget.lock:
            self._budget.writers += 1
        self.written = 0
        self._reserved = 0
        self.info: FileInfo | None = None

    def reserve(self, size: int) -> None:
        """Claim room for `size` bytes now (WorkspaceFullError if there is none); writes draw from it. A write
        past what was claimed claims the rest itself."""
        cap = self._files.capacity()
        budget = self._budget
        with budget.lock:
            used = budget.usage(self._files) + budget.reserved
            if used + size > cap:
                raise self._full(cap, used)
            budget.reserved += size
            self._reserved += size

    def _full(self, cap: int, used: int) -> WorkspaceFullError:
        return WorkspaceFullError(
            f"writing {self.path} would take the workspace past its size cap of {_human(cap)} "
            f"({_human(max(cap - used, 0))} left); remove files or raise limits.workspace_size")

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._fd is None:
            raise ValueError("write to a closed workspace file")
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size > self._reserved:
            self.reserve(size - self._reserved)  # one usage reading, under the lock
        # the room is ours: written without holding the budget's lock
        done = 0
        try:
            with _mapped(self.path):
                while done < size:
                    done += os.write(self._fd, view[done:])
        finally:
            budget = self._budget
            with budget.lock:  # written bytes are usage now (statvfs, or the running count), not a reservation
                self._reserved -= done
                budget.reserved -= done
                self.written += done
                disk = self._files.disk
                if budget.used is not None and not (disk is not None and disk.quota):
                    budget.used += done
        return size

    def _finish(self, keep: bool) -> None:
        fd, self._fd = self._fd, None
        budget = self._budget
        if fd is not None:
            os.close(fd)
        with budget.lock:
            budget.writers -= 1
            budget.reserved -= self._reserved
            self._reserved = 0
            if budget.used is not None and not keep:
                budget.used -= self.written
        os.close(self._parent)
        super().close()

    def abort(self) -> None:
        """Drop what was written; the previous file, if any, stays."""
        if self.closed:
            return
        try:
            os.unlink(self._temp, dir_fd=self._parent)
        except OSError:
            pass
        self._finish(keep=False)

    def close(self) -> None:
        """Put the file in place."""
        if self.closed:
            return
        try:
            with _mapped(self.path):
                assert self._fd is not None
                hand_over(self._fd)
                try:
                    replaced = os.stat(self._name, dir_fd=self._parent, follow_symlinks=False)
                    freed = replaced.st_size if stat.S_ISREG(replaced.st_mode) else 0
                except FileNotFoundError:
                    freed = 0
                os.replace(self._temp, self._name, src_dir_fd=self._parent, dst_dir_fd=self._parent)
                self.info = Files._info(self._parent, self._name, self.path)
        except BaseException:
            self.abort()
            raise
        with self._budget.lock:
            if self._budget.used is not None:
                self._budget.used -= freed
        self._finish(keep=True)

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:  # a writer dropped without close() must not put a partial file in place
        with contextlib.suppress(Exception):  # nothing can be reported from a finaliser
            self.abort()


def _chunks(data: Data) -> Iterator[bytes]:
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start:start + CHUNK])
    elif isinstance(data, io.TextIOBase):
        raise FileError("open the file in binary mode ('rb') to write it to the workspace")
    elif hasattr(data, "read"):
        while chunk := data.read(CHUNK):
            yield chunk
    else:
        for chunk in data:
            if not isinstance(chunk, (bytes, bytearray)):
                raise FileError(f"chunks to write must be bytes, not {type(chunk).__name__}")
            yield bytes(chunk)


def _join(base: str, dirpath: str, name: str) -> str:
    return posixpath.normpath(posixpath.join(base, dirpath, name))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value} B"

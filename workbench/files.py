"""A session's workspace files, read and written on the host side of the mount, never through the kernel.

The sandbox can put symlinks in its workspace, so every path is resolved and checked to stay inside, then
opened one component at a time relative to the workspace's folder with O_NOFOLLOW: a symlink swapped in
between the check and the open is refused, never followed out.
"""
from __future__ import annotations

import errno
import io
import os
import posixpath
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import BinaryIO, Literal

from pydantic import BaseModel

from .container import SANDBOX_UID, WORKSPACE, prepare_dir
from .errors import FileError, PathOutsideWorkspaceError, WorkspaceFileNotFoundError, WorkspaceFullError

CHUNK = 1024 * 1024
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileInfo(BaseModel):
    """One entry of the workspace."""

    path: str  # relative to the workspace, with "/" separators
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    modified: float


Data = bytes | str | BinaryIO | Iterable[bytes]


class Files:
    """Files of one workspace; paths are relative to it (`/workspace/...` as the sandbox sees them works too)."""

    def __init__(self, root: Path, size_cap: Callable[[], int]) -> None:
        self.root = root
        self._size_cap = size_cap

    # public API --------------------------------------------------------------------------------------------------

    def write(self, path: str | PurePath, data: Data) -> FileInfo:
        """Write a file (bytes, str, a binary file object or an iterable of byte chunks), streamed to disk.

        Missing folders are created. The file is replaced atomically: a write that fails or would take the
        workspace past its size cap leaves no partial file and the previous content in place.
        """
        with self.writer(path) as out:
            for chunk in _chunks(data):
                out.write(chunk)
        return out.info

    def writer(self, path: str | PurePath) -> Writer:
        """A binary file to write in steps, put in place when closed without error (see `write`):
        `with s.files.writer("out.bin") as f: f.write(...)`."""
        rel = self._relative(path)
        if rel == ".":
            raise FileError("cannot write to the workspace folder itself: give a file path")
        parent_rel, name = posixpath.split(rel)
        cap = self._size_cap()
        with self._dir(parent_rel, create=True) as parent:
            try:
                previous = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(previous.st_mode):
                    raise FileError(f"{rel} is a folder")
                previous_size = previous.st_size
            except FileNotFoundError:
                previous_size = 0
            room = cap - (self.usage() - previous_size)
            return Writer(os.dup(parent), name, rel, room, cap)

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
                raise self._refusal(rel, exc) from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileError(f"{rel} is not a regular file")
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
            with self._dir(parent_rel) as parent:
                try:
                    info = self._info(parent, name, rel)
                except FileNotFoundError:
                    raise WorkspaceFileNotFoundError(f"no file or folder {rel} in the workspace") from None
                if info.type != "dir":
                    return [info]
        with self._dir(rel) as folder:
            if recursive:
                for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=folder, follow_symlinks=False):
                    for name in dirnames + filenames:
                        entries.append(self._info(dirfd, name, _join(rel, dirpath, name)))
            else:
                for name in os.listdir(folder):
                    entries.append(self._info(folder, name, _join(rel, ".", name)))
        return sorted(entries, key=lambda entry: entry.path)

    def exists(self, path: str | PurePath) -> bool:
        """Whether a file, folder or symlink is there (a path leaving the workspace is an error, not False)."""
        rel = self._relative(path, follow_last=False)
        parent_rel, name = posixpath.split(rel)
        try:
            with self._dir(parent_rel) as parent:
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
        with self._dir(parent_rel) as parent:
            try:
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(name, dir_fd=parent)
                else:
                    os.unlink(name, dir_fd=parent)
            except FileNotFoundError:
                raise WorkspaceFileNotFoundError(f"no file {rel} in the workspace") from None

    def usage(self) -> int:
        """Bytes held by the workspace's files."""
        total = 0
        if not self.root.exists():
            return 0
        for _, _, filenames, dirfd in os.fwalk(self.root, follow_symlinks=False):
            for name in filenames:
                try:
                    total += os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
        return total

    # path handling -----------------------------------------------------------------------------------------------

    def _relative(self, path: str | PurePath, follow_last: bool = True) -> str:
        """The normalised path relative to the workspace, refusing every way out of it. Symlinks that stay
        inside are followed, the last component's only when `follow_last`."""
        text = os.fspath(path)
        if not isinstance(text, str):
            raise FileError(f"a workspace path must be text, not {type(text).__name__}")
        if "\0" in text:
            raise PathOutsideWorkspaceError("a workspace path cannot hold a NUL character")
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
                target = os.readlink(here)
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
        if create:
            prepare_dir(self.root)
        try:
            fd = os.open(self.root, _DIR)
        except FileNotFoundError:
            raise WorkspaceFileNotFoundError("the workspace does not exist (any more)") from None
        try:
            for part in [] if rel in ("", ".") else rel.split("/"):
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise WorkspaceFileNotFoundError(f"no folder {rel} in the workspace") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR, dir_fd=fd)
                    _hand_over(child)
                except OSError as exc:
                    raise self._refusal(rel, exc) from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _refusal(rel: str, exc: OSError) -> FileError:
        if exc.errno == errno.ELOOP:
            return PathOutsideWorkspaceError(f"{rel} changed into a symlink while being opened; refused")
        if exc.errno == errno.ENOTDIR:
            return FileError(f"a part of {rel} is not a folder")
        if exc.errno == errno.EISDIR:
            return FileError(f"{rel} is a folder")
        return FileError(f"{rel}: {exc.strerror}")

    @staticmethod
    def _info(dirfd: int, name: str, rel: str) -> FileInfo:
        info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        kind = ("dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode)
                else "symlink" if stat.S_ISLNK(info.st_mode) else "other")
        return FileInfo(path=rel, type=kind, size=info.st_size if kind == "file" else 0, modified=info.st_mtime)


class Writer(io.RawIOBase):
    """A workspace file being written: a temporary file renamed into place on close, removed on error."""

    def __init__(self, parent: int, name: str, rel: str, room: int, cap: int) -> None:
        super().__init__()
        self._parent, self._name, self.path, self._room, self._cap = parent, name, rel, room, cap
        self._temp = f".{name[:200]}.{secrets.token_hex(4)}.part"
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=parent)
        self._file = os.fdopen(fd, "wb")
        self.written = 0
        self.info: FileInfo | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self.written + size > self._room:
            raise WorkspaceFullError(
                f"writing {self.path} would take the workspace past its size cap of {_human(self._cap)} "
                f"({_human(max(self._room, 0))} left); remove files or raise limits.workspace_size"
            )
        self.written += size
        return self._file.write(data)

    def abort(self) -> None:
        """Drop what was written; the previous file, if any, stays."""
        if self.closed:
            return
        self._file.close()
        try:
            os.unlink(self._temp, dir_fd=self._parent)
        except FileNotFoundError:
            pass
        os.close(self._parent)
        super().close()

    def close(self) -> None:
        """Put the file in place."""
        if self.closed:
            return
        try:
            self._file.flush()
            _hand_over(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self._name, src_dir_fd=self._parent, dst_dir_fd=self._parent)
            self.info = Files._info(self._parent, self._name, self.path)
        except BaseException:
            self.abort()
            raise
        os.close(self._parent)
        super().close()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:  # a writer dropped without close() must not put a partial file in place
        try:
            self.abort()
        except Exception:
            pass


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


def _hand_over(fd: int) -> None:
    """Give a file or folder the host side created to the sandbox user, so the kernel can change it."""
    if os.getuid() == 0:
        os.fchown(fd, SANDBOX_UID, SANDBOX_UID)


def _join(base: str, dirpath: str, name: str) -> str:
    return posixpath.normpath(posixpath.join(base, dirpath, name))


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"

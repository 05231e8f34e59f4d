"""The exception hierarchy: every error workbench raises on purpose is a WorkbenchError."""
from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error raised by workbench."""


class BackendUnavailableError(WorkbenchError):
    """The backend where sandboxes run cannot be reached (for the default backend: the Docker engine)."""


class DockerUnavailableError(BackendUnavailableError):
    """The Docker engine cannot be reached."""


class ImageError(WorkbenchError):
    """The kernel image is missing or could not be built."""


class ImageNotFoundError(ImageError):
    """The kernel image does not exist locally (run `workbench image build`)."""


class ImageBuildError(ImageError):
    """Building the base or kernel image failed."""


class KernelError(WorkbenchError):
    """A kernel could not be started or reached."""


class KernelStartError(KernelError):
    """The kernel container started but the kernel never became ready."""


class SessionError(WorkbenchError):
    """A session cannot be used as asked."""


class MetadataError(SessionError, ValueError):
    """Session metadata that cannot be stored: too many keys, a key or value of the wrong kind or size."""


class SessionNotFoundError(SessionError):
    """No session has this id."""


class SessionClosedError(SessionError):
    """The session was closed."""


class ReplicaUnavailableError(SessionError):
    """The session runs on another replica of the cluster, which cannot be reached now (or not from here)."""


class SessionBusyError(SessionError):
    """Another process held the session (a cell, a pause, a restart) for all the time this call could wait: retry
    when it is done."""


class ConflictError(SessionError):
    """The session's config changed since it was read (optimistic concurrency on config_version)."""


class FileError(WorkbenchError):
    """A workspace file cannot be read or written as asked."""


class PathOutsideWorkspaceError(FileError, ValueError):
    """The path leaves the workspace (`..`, an absolute path elsewhere, or a symlink leading out)."""


class WorkspaceFileNotFoundError(FileError, FileNotFoundError):
    """No file or folder at this workspace path."""


class WorkspaceFullError(FileError):
    """The write would take the workspace past its size cap (`Limits.workspace_size`)."""


class StoreError(WorkbenchError):
    """The session store (the SQLite file under the home, or a PostgreSQL server) cannot be read or written: damaged,
    locked, unreachable or gone."""


class ServerError(WorkbenchError):
    """A `workbench serve` server refused a request, or could not be reached (the remote client raises these)."""


class AuthenticationError(ServerError):
    """No API key, or one the server does not know (or revoked)."""


class TooManyExecutionsError(ServerError):
    """The API key has as many executions running as the server allows it at once; retry when one ends."""


class RequestTooLargeError(ServerError):
    """The request's body is larger than the server accepts."""


class InvalidRequestError(ServerError, ValueError):
    """The request does not fit the API (a missing or malformed field)."""

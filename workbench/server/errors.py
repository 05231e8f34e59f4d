"""The one mapping between workbench's exceptions and the HTTP API's errors: a status and a stable code.

The server answers an exception with `{"error": {"code": ..., "message": ...}}` and the status of the first row
its class matches; the remote client turns the code back into the same exception class. Rows go from the most
specific class to the most general.
"""
from __future__ import annotations

from typing import Any

from ..errors import (
    AuthenticationError,
    ConflictError,
    DockerUnavailableError,
    FileError,
    ImageBuildError,
    ImageError,
    ImageNotFoundError,
    InvalidRequestError,
    KernelError,
    KernelStartError,
    MetadataError,
    PathOutsideWorkspaceError,
    ReplicaUnavailableError,
    RequestTooLargeError,
    ServerError,
    SessionBusyError,
    SessionClosedError,
    SessionError,
    SessionNotFoundError,
    StoreError,
    TooManyExecutionsError,
    WorkbenchError,
    WorkspaceFileNotFoundError,
    WorkspaceFullError,
)

ERRORS: list[tuple[type[WorkbenchError], int, str]] = [
    (AuthenticationError, 401, "unauthorized"),
    (TooManyExecutionsError, 429, "too_many_executions"),
    (RequestTooLargeError, 413, "request_too_large"),
    (InvalidRequestError, 422, "invalid_request"),
    (SessionNotFoundError, 404, "session_not_found"),
    (SessionClosedError, 410, "session_closed"),
    (ConflictError, 409, "conflict"),
    (SessionBusyError, 409, "session_busy"),
    (ReplicaUnavailableError, 503, "replica_unavailable"),
    (MetadataError, 422, "invalid_metadata"),
    (SessionError, 400, "session_error"),
    (PathOutsideWorkspaceError, 400, "path_outside_workspace"),
    (WorkspaceFileNotFoundError, 404, "file_not_found"),
    (WorkspaceFullError, 507, "workspace_full"),
    (FileError, 400, "file_error"),
    (DockerUnavailableError, 503, "docker_unavailable"),
    (ImageNotFoundError, 503, "image_not_found"),
    (ImageBuildError, 500, "image_build_failed"),
    (ImageError, 503, "image_error"),
    (KernelStartError, 503, "kernel_start_failed"),
    (KernelError, 503, "kernel_error"),
    (StoreError, 503, "store_unavailable"),
    (ServerError, 500, "server_error"),
    (WorkbenchError, 400, "workbench_error"),
]
BY_CODE: dict[str, type[WorkbenchError]] = {code: cls for cls, _, code in ERRORS}
INTERNAL = "internal"  # an unexpected failure on the server: logged there, never described to the caller
MAX_MESSAGE = 4000  # characters of an error message sent (paths and names in it come from the sandbox)


def status_and_code(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and stable code of an exception (500 `internal` for one that is not a WorkbenchError)."""
    for cls, status, code in ERRORS:
        if isinstance(exc, cls):
            return status, code
    return 500, INTERNAL


def clean_text(text: str, limit: int = MAX_MESSAGE) -> str:
    """Text safe to put in a JSON body: bounded, lone surrogates (a sandbox's non-UTF-8 file name) escaped."""
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit:,} characters cut]"
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": clean_text(message)}}


def exception_for(status: int, body: Any) -> WorkbenchError:
    """The exception a client raises for an error answer: the class of its code (a ServerError when the body is
    not one of ours, e.g. a proxy's page)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        message = str(error.get("message") or error["code"])
        cls = BY_CODE.get(error["code"], ServerError)
        return cls(message)
    return ServerError(f"the server answered HTTP {status}: {str(body)[:500]}")

"""workbench: sandboxed Jupyter kernels in Docker for AI agents."""
from .aio import AsyncCommands, AsyncFiles, AsyncSession, AsyncWorkbench
from .client import GcReport, Workbench
from .commands import Commands
from .config import Limits
from .errors import (
    BackendUnavailableError,
    ConflictError,
    DockerUnavailableError,
    FileError,
    ImageBuildError,
    ImageError,
    ImageNotFoundError,
    KernelError,
    KernelStartError,
    MetadataError,
    PathOutsideWorkspaceError,
    SessionClosedError,
    SessionError,
    SessionNotFoundError,
    WorkbenchError,
    WorkspaceFileNotFoundError,
    WorkspaceFullError,
)
from .files import FileInfo, Files
from .results import (
    CommandResult,
    ExecutionError,
    ExecutionResult,
    OffloadEnvelope,
    Output,
    ToolResult,
)
from .session import Session
from .store import LogEntry, PausedState, SessionConfig, SessionRecord
from .tools import RateLimited, Tool, ToolContext

__all__ = [
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSession",
    "AsyncWorkbench",
    "BackendUnavailableError",
    "CommandResult",
    "Commands",
    "ConflictError",
    "DockerUnavailableError",
    "ExecutionError",
    "ExecutionResult",
    "FileError",
    "FileInfo",
    "Files",
    "GcReport",
    "ImageBuildError",
    "ImageError",
    "ImageNotFoundError",
    "KernelError",
    "KernelStartError",
    "Limits",
    "LogEntry",
    "MetadataError",
    "OffloadEnvelope",
    "Output",
    "PathOutsideWorkspaceError",
    "PausedState",
    "RateLimited",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionError",
    "SessionNotFoundError",
    "SessionRecord",
    "Tool",
    "ToolContext",
    "ToolResult",
    "Workbench",
    "WorkbenchError",
    "WorkspaceFileNotFoundError",
    "WorkspaceFullError",
]

"""workbench: sandboxed Jupyter kernels in Docker for AI agents."""
from .aio import AsyncFiles, AsyncSession, AsyncWorkbench
from .client import GcReport, Workbench
from .config import Limits
from .errors import (
    ConflictError,
    DockerUnavailableError,
    FileError,
    ImageBuildError,
    ImageError,
    ImageNotFoundError,
    KernelError,
    KernelStartError,
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
    ExecutionError,
    ExecutionResult,
    OffloadEnvelope,
    Output,
    ToolResult,
)
from .session import Session
from .store import LogEntry, SessionConfig, SessionRecord
from .tools import RateLimited, Tool, ToolContext

__all__ = [
    "Workbench", "Session", "AsyncWorkbench", "AsyncSession", "AsyncFiles", "Files", "FileInfo", "Limits",
    "ExecutionResult", "ExecutionError", "Output", "ToolResult", "OffloadEnvelope", "Tool", "ToolContext",
    "RateLimited", "GcReport", "LogEntry", "SessionConfig", "SessionRecord",
    "WorkbenchError", "DockerUnavailableError", "ImageError", "ImageNotFoundError", "ImageBuildError",
    "KernelError", "KernelStartError", "SessionError", "SessionNotFoundError", "SessionClosedError",
    "ConflictError", "FileError", "PathOutsideWorkspaceError", "WorkspaceFileNotFoundError", "WorkspaceFullError",
]

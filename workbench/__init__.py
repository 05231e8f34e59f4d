"""workbench: sandboxed Jupyter kernels in Docker for AI agents."""
from .client import Workbench
from .config import Limits
from .errors import (
    DockerUnavailableError,
    ImageBuildError,
    ImageError,
    ImageNotFoundError,
    KernelError,
    KernelStartError,
    SessionClosedError,
    SessionError,
    SessionNotFoundError,
    WorkbenchError,
)
from .results import ExecutionError, ExecutionResult, Output
from .session import Session

__all__ = [
    "Workbench", "Session", "Limits", "ExecutionResult", "ExecutionError", "Output",
    "WorkbenchError", "DockerUnavailableError", "ImageError", "ImageNotFoundError", "ImageBuildError",
    "KernelError", "KernelStartError", "SessionError", "SessionNotFoundError", "SessionClosedError",
]

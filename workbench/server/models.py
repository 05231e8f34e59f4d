"""The HTTP API's request and response bodies. Results reuse the library's own models (`ExecutionResult`,
`ToolResult`, `CommandResult`, `FileInfo`, `SessionRecord`, `LogEntry`), so the remote client returns the same
types as the in-process API."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import Limits
from ..store import SessionRecord


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class McpConfig(BaseModel):
    """How an MCP client reaches one session: its Streamable HTTP endpoint and the headers to send."""

    url: str
    headers: dict[str, str] = Field(default_factory=dict)


class SessionInfo(SessionRecord):
    """A session as the API shows it: its record (never its kernel's connection keys) and its MCP endpoint."""

    mcp: McpConfig | None = None


class CreateSession(_Body):
    user_id: str
    toolkits: list[str] | None = None
    tools: list[str] | None = None
    limits: Limits | None = None
    offload_threshold: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    allow_default_user: bool = False


class UpdateSession(_Body):
    toolkits: list[str] | None = None
    tools: list[str] | None = None
    limits: dict[str, Any] | None = None
    offload_threshold: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    restart_if_needed: bool = False
    config_version: int | None = Field(default=None, description="the version the caller read: 409 when the "
                                       "stored config is at another")


class Updated(BaseModel):
    config_version: int


class Execute(_Body):
    code: str
    timeout: float | None = Field(default=None, gt=0, le=86_400)


class RenameFile(_Body):
    path: str
    new_name: str = Field(description="the entry's new name in the same folder (no /)")


class FilesUsage(BaseModel):
    used: int = Field(description="bytes held by the workspace's files")


class FilesCapacity(BaseModel):
    capacity: int = Field(description="the workspace's size cap in bytes")


class RunCommand(_Body):
    cmd: str
    timeout: float = Field(default=60, gt=0, le=86_400)
    cwd: str | None = None
    env: dict[str, str] | None = None


class ExecuteTool(_Body):
    slug: str
    arguments: dict[str, Any] | None = None
    sync_to_workbench: bool = False
    timeout: float | None = Field(default=None, gt=0, le=86_400)
    inline_limit: int | None = Field(default=None, ge=0)


class ToolCall(_Body):
    slug: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ExecuteTools(_Body):
    calls: list[ToolCall] = Field(max_length=1000)
    sync_to_workbench: bool = False
    max_workers: int = Field(default=8, ge=1, le=64)
    timeout: float | None = Field(default=None, gt=0, le=86_400)
    inline_limit: int | None = Field(default=None, ge=0)


class SearchTools(_Body):
    queries: list[dict[str, Any]] = Field(min_length=1, max_length=10, description="{use_case, known_fields?}")


class HandleToolCall(_Body):
    name: str
    arguments: dict[str, Any] | str | None = None


class HandleToolCalls(_Body):
    response: dict[str, Any] = Field(description="a model's response as JSON (an OpenAI ChatCompletion or Response, "
                                     "or an Anthropic Message)")
    include_tools: bool = False


class ToolAnswer(BaseModel):
    text: str
    is_error: bool = False


class ToolInfo(BaseModel):
    """One tool a session may call."""

    slug: str
    toolkit: str
    description: str
    arguments: dict[str, Any] = Field(description="the JSON Schema of its arguments")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail

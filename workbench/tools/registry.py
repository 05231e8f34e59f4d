"""The host's tool registry: Python callables with pydantic-validated arguments, called on a session's behalf."""
from __future__ import annotations

import asyncio
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from ..errors import WorkbenchError
from .protocol import (
    SLUG as _SLUG,  # always fullmatch: `$` would let a trailing newline in
)
from .protocol import ErrorKind


class ToolContext(BaseModel):
    """What a tool learns about its caller; declare a parameter of this type to receive it."""

    user_id: str
    session_id: str
    slug: str
    metadata: dict[str, str] = Field(default_factory=dict, description="the session's metadata, e.g. a "
                                     "correlation id to pass on to the service behind the tool")


class ToolCallError(WorkbenchError):
    """An error a tool call ended with, as it is reported to the caller (in a ToolResult, never raised to the
    caller of execute_tool); `kind` says which."""

    MAX_MESSAGE = 2000  # characters: an error never grows with what the caller sent

    def __init__(self, kind: ErrorKind, message: str, retry_after: float | None = None) -> None:
        if len(message) > self.MAX_MESSAGE:
            message = f"{message[:self.MAX_MESSAGE]}... [{len(message) - self.MAX_MESSAGE:,} characters cut]"
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class RateLimited(Exception):
    """Raise from a tool when the service behind it is rate limiting; bulk callers retry these calls (only these).

    `retry_after` (seconds), when the service says it, is the earliest worth retrying.
    """

    def __init__(self, message: str = "rate limited", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Tool:
    """One registered tool: its slug, toolkit, argument model and JSON schema."""

    def __init__(self, fn: Callable[..., Any], slug: str, toolkit: str, description: str | None) -> None:
        if not isinstance(slug, str) or not isinstance(toolkit, str) or not _SLUG.fullmatch(slug) or not \
                _SLUG.fullmatch(toolkit):
            raise WorkbenchError(f"tool slug and toolkit must be 1 to 128 of letters, digits and _ . -: {slug!r}")
        self.fn, self.slug, self.toolkit = fn, slug, toolkit
        self.description = description or inspect.getdoc(fn) or ""
        self._context_param: str | None = None
        hints = typing.get_type_hints(fn)
        fields: dict[str, Any] = {}
        for name, param in inspect.signature(fn).parameters.items():
            hint = hints.get(name, Any)
            if hint is ToolContext:
                self._context_param = name
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise WorkbenchError(f"tool {slug}: *args and **kwargs cannot be described by a schema")
            fields[name] = (hint, ... if param.default is param.empty else param.default)
        self.arguments: type[BaseModel] = create_model(
            f"{slug}_arguments", __config__=ConfigDict(extra="forbid"), **fields)

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the tool's arguments."""
        return self.arguments.model_json_schema()

    @functools.cached_property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON Schema of what the tool returns, when its return annotation says (else None)."""
        hint = typing.get_type_hints(self.fn).get("return")
        if hint is None or hint is Any or hint is type(None):
            return None
        try:
            return TypeAdapter(hint).json_schema()
        except Exception:  # a type pydantic cannot describe
            return None

    def describe(self) -> dict[str, Any]:
        return {"slug": self.slug, "toolkit": self.toolkit, "description": self.description,
                "arguments": self.schema}

    def call(self, arguments: dict[str, Any] | None, context: ToolContext) -> Any:
        """Validate the arguments and run the tool; raises ToolCallError (invalid_arguments) or what it raises."""
        try:
            parsed = self.arguments.model_validate(arguments or {})
        except ValidationError as exc:
            raise ToolCallError("invalid_arguments",
                                f"invalid arguments for {self.slug}: {validation_message(exc)}") from None
        kwargs = {name: getattr(parsed, name) for name in type(parsed).model_fields}
        if self._context_param:
            kwargs[self._context_param] = context
        result = self.fn(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        return result


def validation_message(exc: ValidationError, shown: int = 5) -> str:
    """A validation error in words, naming where and what but quoting none of the input."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    text = "; ".join(f"{'.'.join(map(str, e['loc']))[:80] or 'arguments'}: {e['msg'][:200]}" for e in errors[:shown])
    return text + (f" (and {len(errors) - shown:,} more)" if len(errors) > shown else "")


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class ToolRegistry:
    """The tools of one Workbench, by slug."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, fn: Callable[..., Any], slug: str | None = None, toolkit: str = "default",
                 description: str | None = None) -> Tool:
        tool = Tool(fn, slug or fn.__name__, toolkit, description)
        if tool.slug in self._tools and self._tools[tool.slug].fn is not fn:
            raise WorkbenchError(f"a tool {tool.slug} is already registered")
        self._tools[tool.slug] = tool
        return tool

    def __contains__(self, slug: object) -> bool:
        return isinstance(slug, str) and slug in self._tools

    def get(self, slug: str) -> Tool:
        if not isinstance(slug, str):
            raise ToolCallError("invalid_arguments", f"a tool slug must be a string, not {type(slug).__name__}")
        try:
            return self._tools[slug]
        except KeyError:
            raise ToolCallError("not_found", f"no tool {slug!r} is registered") from None

    def registered(self) -> list[Tool]:
        """Every registered tool, in the order they were registered."""
        return list(self._tools.values())

    def allowed(self, toolkits: list[str], tools: list[str]) -> list[Tool]:
        """The tools a session with this config may call."""
        return [t for t in self._tools.values() if t.slug in tools or t.toolkit in toolkits]

    def check_allowed(self, slug: str, toolkits: list[str], tools: list[str]) -> Tool:
        tool = self.get(slug)
        if tool.slug not in tools and tool.toolkit not in toolkits:
            raise ToolCallError("not_allowed", f"this session may not call {slug} (toolkit {tool.toolkit}); "
                                f"allowed toolkits: {toolkits or 'none'}, tools: {tools or 'none'}")
        return tool

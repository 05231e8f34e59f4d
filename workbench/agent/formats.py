"""Tool definitions in the shapes tool-calling frameworks take: OpenAI (Chat Completions and Responses),
Anthropic, MCP and LangChain."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from ..errors import WorkbenchError
from .meta import Definition

Format = Literal["openai", "openai_responses", "anthropic", "mcp", "langchain"]
FORMATS: tuple[str, ...] = ("openai", "openai_responses", "anthropic", "mcp", "langchain")


def render(definitions: list[Definition], format: str, call: Callable[[str, dict[str, Any]], str]) -> list[Any]:
    """The definitions as `format` wants them; `call(name, arguments)` answers a call (used by LangChain's tools,
    which run themselves)."""
    if format == "openai":
        return [{"type": "function", "function": {"name": d.name, "description": d.description,
                                                  "parameters": d.parameters}} for d in definitions]
    if format == "openai_responses":
        return [{"type": "function", "name": d.name, "description": d.description, "parameters": d.parameters,
                 "strict": False} for d in definitions]
    if format == "anthropic":
        return [{"name": d.name, "description": d.description, "input_schema": d.parameters} for d in definitions]
    if format == "mcp":
        return [{"name": d.name, "description": d.description, "inputSchema": d.parameters} for d in definitions]
    if format == "langchain":
        return [_structured_tool(d, call) for d in definitions]
    raise WorkbenchError(f"unknown tool format {format!r}; one of: {', '.join(FORMATS)}")


def _structured_tool(definition: Definition, call: Callable[[str, dict[str, Any]], str]) -> Any:
    try:
        from langchain_core.tools import StructuredTool
    except ImportError:
        raise WorkbenchError('format="langchain" needs langchain-core: pip install "workbench[langchain]"') from None

    def run(**arguments: Any) -> str:
        return call(definition.name, arguments)

    return StructuredTool.from_function(func=run, name=definition.name, description=definition.description,
                                        args_schema=definition.parameters)

"""Tool definitions in the shapes tool-calling frameworks take: OpenAI (Chat Completions and Responses),
Anthropic, MCP and LangChain."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

from ..errors import WorkbenchError
from .meta import Answer, Definition

Format = Literal["openai", "openai_responses", "anthropic", "mcp", "langchain"]
FORMATS: tuple[str, ...] = get_args(Format)


def render(definitions: list[Definition], format: Format, call: Callable[[str, dict[str, Any]], Answer]) -> list[Any]:
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


def _structured_tool(definition: Definition, call: Callable[[str, dict[str, Any]], Answer]) -> Any:
    """A StructuredTool that answers through `call`; an error answer is a ToolException, which LangChain hands the
    model as the tool message's content with status "error". (LangChain keeps arguments named `config` and
    `run_manager` for itself: a direct tool with such a parameter does not get it this way.)"""
    try:
        from langchain_core.tools import StructuredTool, ToolException
    except ImportError:
        raise WorkbenchError('format="langchain" needs langchain-core: pip install "workbench[langchain]"') from None

    def run(**arguments: Any) -> str:
        answer = call(definition.name, arguments)
        if answer.is_error:
            raise ToolException(answer.text)
        return answer.text

    return StructuredTool.from_function(func=run, name=definition.name, description=definition.description,
                                        args_schema=definition.parameters, handle_tool_error=True)

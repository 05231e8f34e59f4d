"""What a model is given to use a session: meta tools, their definitions for each framework, and the dispatch of
the calls a model makes."""
from .answers import DEFAULT_LIMIT, bound
from .formats import FORMATS, Format, render
from .meta import (
    GET_TOOL_SCHEMAS,
    MULTI_EXECUTE_TOOL,
    NAMES,
    REMOTE_BASH_TOOL,
    REMOTE_WORKBENCH,
    SEARCH_TOOLS,
    Answer,
    Definition,
    MetaTools,
)
from .providers import Call, Provider, answer_calls, read_calls, write_results

__all__ = [
    "DEFAULT_LIMIT",
    "FORMATS",
    "GET_TOOL_SCHEMAS",
    "MULTI_EXECUTE_TOOL",
    "NAMES",
    "REMOTE_BASH_TOOL",
    "REMOTE_WORKBENCH",
    "SEARCH_TOOLS",
    "Answer",
    "Call",
    "Definition",
    "Format",
    "MetaTools",
    "Provider",
    "answer_calls",
    "bound",
    "read_calls",
    "render",
    "write_results",
]

"""Host tools: the registry (`registry`), the one tool-call pipeline (`pipeline`), offload routing of large
responses (`offload`), the sandbox's tool bridge (`bridge`) and its wire protocol (`protocol`)."""
from .registry import RateLimited, Tool, ToolCallError, ToolContext, ToolRegistry, validation_message

__all__ = ["RateLimited", "Tool", "ToolCallError", "ToolContext", "ToolRegistry", "validation_message"]

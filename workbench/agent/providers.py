"""Reading the tool calls out of a model's response as the official SDKs return it (OpenAI Chat Completions and
Responses, Anthropic Messages), and writing the results back in that provider's shape."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import WorkbenchError

Provider = Literal["openai", "openai_responses", "anthropic"]


@dataclass(frozen=True)
class Call:
    """One tool call a model asked for: its id (to answer it by), the tool's name and the arguments as sent."""

    id: str
    name: Any  # a str, unless the response is malformed
    arguments: Any  # JSON text (OpenAI) or a dict (Anthropic)


def _plain(value: Any) -> Any:
    """The SDKs' response objects are pydantic models; a dict (e.g. from JSON) is taken as it is."""
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else value


def read_calls(response: Any) -> tuple[Provider, list[Call]]:
    """The provider a response comes from and the tool calls it holds, in order. Calls without an id (nothing
    could answer them) are skipped; a shape that is no model response raises WorkbenchError."""
    data = _plain(response)
    if not isinstance(data, dict):
        raise WorkbenchError(f"not a model response: {type(response).__name__} (give an OpenAI ChatCompletion or "
                             "Response, or an Anthropic Message, as their SDKs return them)")
    choices = data.get("choices")
    if isinstance(choices, list):  # a ChatCompletion: the calls of its (first) choice
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        return "openai", _chat_calls(choice.get("message"))
    if "tool_calls" in data and data.get("role") == "assistant":  # a ChatCompletionMessage alone
        return "openai", _chat_calls(data)
    if isinstance(data.get("output"), list):  # a Responses API response
        return "openai_responses", _calls(
            (item.get("call_id"), item.get("name"), item.get("arguments"))
            for item in data["output"] if isinstance(item, dict) and item.get("type") == "function_call")
    if isinstance(data.get("content"), list) and data.get("role") == "assistant":  # an Anthropic Message
        return "anthropic", _calls(
            (block.get("id"), block.get("name"), block.get("input"))
            for block in data["content"] if isinstance(block, dict) and block.get("type") == "tool_use")
    raise WorkbenchError("not a model response this workbench knows: give an OpenAI ChatCompletion or Response, or "
                         "an Anthropic Message, as their SDKs return them")


def _chat_calls(message: Any) -> list[Call]:
    items = message.get("tool_calls") if isinstance(message, dict) else None
    functions = [(item.get("id"), item.get("function")) for item in items if isinstance(item, dict)] \
        if isinstance(items, list) else []
    return _calls((cid, function.get("name"), function.get("arguments"))
                  for cid, function in functions if isinstance(function, dict))


def _calls(found: Iterable[tuple[Any, Any, Any]]) -> list[Call]:
    """The calls that can be answered: an id that is a non-empty string. (A name of another type is kept, to be
    answered as unknown.)"""
    return [Call(cid, name, arguments) for cid, name, arguments in found if isinstance(cid, str) and cid]


def write_results(provider: Provider, answered: list[tuple[Call, str, bool]]) -> list[dict[str, Any]]:
    """The messages (or input items) that carry the answers back, ready to append to the conversation:
    `answered` holds each call with its answer text and whether that reports an error."""
    if provider == "openai":
        return [{"role": "tool", "tool_call_id": call.id, "content": text} for call, text, _ in answered]
    if provider == "openai_responses":
        return [{"type": "function_call_output", "call_id": call.id, "output": text} for call, text, _ in answered]
    if not answered:
        return []
    return [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": text, **({"is_error": True} if error else {})}
        for call, text, error in answered]}]


def answer_calls(response: Any, handles: Callable[[str], bool],
                 answer: Callable[[str, Any], tuple[str, bool]]) -> list[dict[str, Any]]:
    """Answer, in order, every call in `response` that `handles` claims; calls of other tools are left to the
    caller (no message is made for them)."""
    provider, calls = read_calls(response)
    answered = [(call, *answer(call.name, call.arguments)) for call in calls if handles(call.name)]
    return write_results(provider, answered)

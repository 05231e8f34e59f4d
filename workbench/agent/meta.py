"""The meta tools a model is given: find tools, read their schemas, run many of them at once, run Python and
shell commands in the session's sandbox. Each answer is text a model reads, bounded in size."""
from __future__ import annotations

import copy
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python

from ..errors import WorkbenchError
from ..files import OUTPUTS
from ..results import ToolResult
from ..tools import Tool, validation_message
from .answers import bound
from .search import index_of

if TYPE_CHECKING:
    from ..session import Session

log = logging.getLogger(__name__)
PREFIX = "WORKBENCH_"
SEARCH_TOOLS = "WORKBENCH_SEARCH_TOOLS"
GET_TOOL_SCHEMAS = "WORKBENCH_GET_TOOL_SCHEMAS"
MULTI_EXECUTE_TOOL = "WORKBENCH_MULTI_EXECUTE_TOOL"
REMOTE_WORKBENCH = "WORKBENCH_REMOTE_WORKBENCH"
REMOTE_BASH_TOOL = "WORKBENCH_REMOTE_BASH_TOOL"
ANSWERS = f"{OUTPUTS}/answers"  # where an answer past the limit is written whole
MAX_ARGUMENTS = 8 * 1024**2  # characters of JSON arguments a call may bring
PER_QUERY = 5  # tools a search returns for each use case
_DIRECT_NAME = re.compile(r"[^A-Za-z0-9_-]")  # tool names as every provider accepts them: 1 to 64 of these


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchQuery(_Arguments):
    use_case: str = Field(min_length=1, max_length=2000, description="What you want to do, in plain words, "
                          "e.g. 'list the open issues of a GitHub repository'.")
    known_fields: str | None = Field(default=None, max_length=2000, description="Values you already have that a "
                                     "tool would take, e.g. 'repo: octo/hello, state: open'.")


class SearchToolsArguments(_Arguments):
    queries: list[SearchQuery] = Field(min_length=1, max_length=10, description="One entry per use case (1 to 10).")


class GetToolSchemasArguments(_Arguments):
    tool_slugs: list[str] = Field(min_length=1, max_length=50, description="The slugs of the tools (1 to 50).")


class ToolCall(_Arguments):
    tool_slug: str = Field(description="The tool's slug, as WORKBENCH_SEARCH_TOOLS gives it.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="The tool's arguments, as its input "
                                      "schema describes them.")


class MultiExecuteArguments(_Arguments):
    tools: list[ToolCall] = Field(min_length=1, max_length=50, description="The calls to run concurrently "
                                  "(1 to 50).")
    sync_response_to_workbench: bool = Field(default=False, description="Write every response into the "
                                             "workbench, small ones too, instead of returning it inline.")


class RemoteWorkbenchArguments(_Arguments):
    code_to_execute: str = Field(min_length=1, max_length=1_000_000, description="Python to run in the "
                                 "session's Jupyter kernel; the value of the last line is returned.")
    timeout: float | None = Field(default=None, gt=0, le=86_400, description="Seconds before the cell is "
                                  "interrupted (its variables are kept); at most the host's limit.")


class RemoteBashArguments(_Arguments):
    command: str = Field(min_length=1, max_length=32_000, description="The shell command (run by bash).")
    timeout: float = Field(default=60, gt=0, le=86_400, description="Seconds before the command and its "
                           "children are killed (at most the host's limit).")


@dataclass(frozen=True)
class Definition:
    """One tool as a model is shown it: a name, what it is for, and the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """What a model reads back from one call, and whether it reports a failure."""

    text: str
    is_error: bool = False
    files: tuple[str, ...] = ()
    """Workspace files the answer refers to (relative paths): offloaded responses, spilled outputs, the whole
    answer when it was cut. An MCP client gets them as resource links."""


_HELPERS = ("In the workbench kernel these helpers are preloaded: run_tool(slug, arguments) -> (result, error); "
            "run_tools([(slug, arguments), ...], max_workers=16, as_table=False) for bulk calls with retries of "
            "rate limits and progress; responses[id] (a response written to the workbench) and tables[id] (its "
            "records as a pandas DataFrame); list_tools() and tool_schema(slug).")


def _describe(name: str, *, answer_limit: int, execute_timeout: float, tool_timeout: float) -> str:
    bounded = (f"Answers longer than {answer_limit:,} characters are cut to their head and tail; the whole answer "
               f"is then written to /workspace/{ANSWERS}/ and the answer names the file.")
    texts = {
        SEARCH_TOOLS: (
            "Find the tools available to this session for one or more use cases. Returns, for each use case, the "
            f"best-matching tools (at most {PER_QUERY}), best first, with their slugs, descriptions and input "
            "schemas. Call this first when you do not know which tool does what you need. " + bounded),
        GET_TOOL_SCHEMAS: (
            "Get the input schema (and the output schema where known) of tools by slug, to call them with valid "
            "arguments. " + bounded),
        MULTI_EXECUTE_TOOL: (
            "Run 1 to 50 tool calls concurrently on the host (credentials stay there) and return each result in "
            "order: small responses inline as JSON; a response too large to read here is written to the "
            "workbench's /workspace/.responses/ and you get an envelope instead: its path, the number of records "
            "and their columns, a preview, and how to load it in the workbench (responses[id], tables[id]). "
            "Query large results with WORKBENCH_REMOTE_WORKBENCH rather than reading them whole. Errors are "
            f"reported per call with their kind. Each call may take up to {tool_timeout:g} seconds. " + bounded),
        REMOTE_WORKBENCH: (
            "Run Python in this session's persistent Jupyter kernel (a sandbox with no network): variables, "
            "functions and imports persist between calls, files persist in /workspace (the working folder). "
            "pandas, numpy and pyarrow are installed. " + _HELPERS + " Use it to process tool responses "
            "(e.g. tables[id].groupby(...)), to call tools in bulk from code, and to compute. Returns stdout, "
            "stderr, the value of the last line and any error with its traceback. A cell is interrupted after "
            f"{execute_timeout:g} seconds, or `timeout` if shorter; its variables are kept. " + bounded),
        REMOTE_BASH_TOOL: (
            "Run a shell command in this session's sandbox, in /workspace, as the sandbox's user, with no network. "
            "It runs beside the Python kernel (also while a cell runs) and shares its files. Returns the exit "
            "code, stdout and stderr. Past `timeout` (default 60 seconds, at most "
            f"{execute_timeout:g}) the command and every process it started are killed. " + bounded),
    }
    return texts[name]


_ARGUMENTS: dict[str, type[_Arguments]] = {
    SEARCH_TOOLS: SearchToolsArguments,
    GET_TOOL_SCHEMAS: GetToolSchemasArguments,
    MULTI_EXECUTE_TOOL: MultiExecuteArguments,
    REMOTE_WORKBENCH: RemoteWorkbenchArguments,
    REMOTE_BASH_TOOL: RemoteBashArguments,
}
NAMES: tuple[str, ...] = tuple(_ARGUMENTS)


def direct_name(slug: str) -> str:
    """The name a session's own tool is offered under: its slug, in the characters every provider accepts."""
    return _DIRECT_NAME.sub("_", slug)[:64]


_VALUES = frozenset({"default", "examples", "enum", "const", "example"})


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema as a model is best shown it: local `$ref`s replaced by what they point to (some providers
    accept no `$defs`) and pydantic's generated titles dropped. A schema that refers to itself keeps its refs."""
    defs = schema.get("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...], inline: bool) -> Any:
        if isinstance(node, list):
            return [resolve(item, seen, inline) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if inline and isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen or name not in defs:
                raise RecursionError(name)
            return resolve({**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, (*seen, name), inline)
        cleaned = {}
        for key, value in node.items():
            if (key == "title" and isinstance(value, str)) or (key == "$defs" and inline):
                continue
            if key in _VALUES:  # data, not schemas: kept as they are
                cleaned[key] = value
            elif key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):  # name -> schema
                cleaned[key] = {name: resolve(sub, seen, inline) for name, sub in value.items()}
            else:
                cleaned[key] = resolve(value, seen, inline)
        return cleaned

    try:
        resolved: dict[str, Any] = resolve(schema, (), True)
    except RecursionError:
        resolved = resolve(schema, (), False)
    return resolved


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return clean_schema(model.model_json_schema())


@functools.cache
def _meta_schemas() -> dict[str, dict[str, Any]]:
    return {name: _schema(model) for name, model in _ARGUMENTS.items()}


def meta_input_schema(name: str) -> dict[str, Any] | None:
    """The JSON Schema of a meta tool's arguments (the same in every session), or None for any other name."""
    schema = _meta_schemas().get(name)
    return copy.deepcopy(schema) if schema is not None else None


class MetaTools:
    """The meta tools of one session: their definitions, and the answers to calls of them."""

    def __init__(self, session: Session, *, answer_limit: int, execute_timeout: float, tool_timeout: float) -> None:
        self.session = session
        self.answer_limit = answer_limit
        self._timeouts = {"execute_timeout": execute_timeout, "tool_timeout": tool_timeout}

    def definitions(self, include_tools: bool = False) -> list[Definition]:
        """The meta tools, and with `include_tools` the session's allowed tools as direct tools too."""
        found = [Definition(name, _describe(name, answer_limit=self.answer_limit, **self._timeouts),
                            copy.deepcopy(schema)) for name, schema in _meta_schemas().items()]
        if include_tools:
            names = set(NAMES)
            for tool in self.session.available_tools():
                name = direct_name(tool.slug)
                if name in names or name.startswith(PREFIX):
                    continue  # never shadows a meta tool, nor another tool of the same name
                names.add(name)
                found.append(Definition(name, tool.description[:4000] or tool.slug, clean_schema(tool.schema)))
        return found

    def handles(self, name: object, include_tools: bool = False) -> bool:
        """Whether a call of this name is for the session: a meta tool, or with `include_tools` one of its allowed
        tools offered directly. Never raises (a closed session claims only the meta tools)."""
        if not isinstance(name, str):
            return False
        if name in _ARGUMENTS:
            return True
        try:
            return include_tools and self._direct_slug(name) is not None
        except WorkbenchError:
            return False

    def _direct_slug(self, name: str) -> str | None:
        for tool in self.session.available_tools():
            if direct_name(tool.slug) == name and not name.startswith(PREFIX):
                return tool.slug
        return None

    def call(self, name: Any, arguments: Any) -> Answer:
        """Answer one call as a model made it: `arguments` a dict or a JSON text. Never raises for what the model
        sent; an error is an answer that says so. Every answer is bounded by `answer_limit`."""
        files: tuple[str, ...] = ()
        try:
            answer = self._call(name, arguments)
            text, is_error, files = answer.text, answer.is_error, answer.files
        except _Refused as exc:
            text, is_error = f"[error: {exc.kind}] {exc}", True
        except WorkbenchError as exc:  # e.g. the session was closed, or Docker is gone: the model is told
            kind = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower()
            text, is_error = f"[error: {kind}] {exc}", True
        except Exception:
            log.exception("meta tool %s failed on the host", name if isinstance(name, str) and name in _ARGUMENTS
                          else "<direct tool>")
            text, is_error = "[error: internal] the host failed to handle this call; it was logged there", True
        shown = name if isinstance(name, str) and name in _ARGUMENTS else "answer"
        saved: list[str] = []

        def save(whole: str) -> str | None:
            path = self._save(shown, whole)
            saved.extend([path] if path else [])
            return path

        return Answer(bound(text, self.answer_limit, save), is_error, tuple(dict.fromkeys((*files, *saved))))

    def _call(self, name: Any, arguments: Any) -> Answer:
        if not isinstance(name, str) or (name not in _ARGUMENTS and self._direct_slug(name) is None):
            shown = name[:100] if isinstance(name, str) else type(name).__name__
            raise _Refused("not_found", f"no tool {shown!r} in this workbench; its tools are {', '.join(NAMES)}")
        given = _parse(arguments)
        if name not in _ARGUMENTS:
            slug = self._direct_slug(name)
            assert slug is not None
            result = self.session.execute_tool(slug, given, inline_limit=self._inline_budget(1))
            return Answer(_tool_answer(result), is_error=not result.ok, files=_offloaded([result]))
        try:
            parsed = _ARGUMENTS[name].model_validate(given)
        except ValidationError as exc:
            raise _Refused("invalid_arguments", f"{name}: {validation_message(exc)}") from None
        handler: Callable[[Any], Answer] = getattr(self, f"_{name.removeprefix(PREFIX).lower()}")
        return handler(parsed)

    # the meta tools -------------------------------------------------------------------------------------------

    def _search_tools(self, arguments: SearchToolsArguments) -> Answer:
        index = index_of(tuple(self.session.available_tools()))
        results = []
        for query in arguments.queries:
            text = query.use_case + (f" {query.known_fields}" if query.known_fields else "")
            found = index.search(text, PER_QUERY)
            results.append({"use_case": query.use_case, "tools": [_summary(tool) for tool, _ in found]})
        answer: dict[str, Any] = {"results": results}
        if not index.tools:
            answer["note"] = "this session is allowed no tools"
        elif not any(r["tools"] for r in results):
            answer["note"] = ("no tool matched; try other words (tools of this session's toolkits: "
                              f"{', '.join(sorted({t.toolkit for t in index.tools}))})")
        return Answer(_json(answer))

    def _get_tool_schemas(self, arguments: GetToolSchemasArguments) -> Answer:
        available = {tool.slug: tool for tool in self.session.available_tools()}
        schemas: dict[str, Any] = {}
        missing = []
        for slug in arguments.tool_slugs:
            tool = available.get(slug)
            if tool is None:
                missing.append(slug[:128])
            else:
                schemas[slug] = {**_summary(tool), **({"output_schema": tool.output_schema}
                                                      if tool.output_schema else {})}
        answer: dict[str, Any] = {"schemas": schemas}
        if missing:
            answer["not_found"] = missing
            answer["note"] = "these slugs are not tools this session may use; WORKBENCH_SEARCH_TOOLS finds them"
        return Answer(_json(answer), is_error=not schemas)

    def _multi_execute_tool(self, arguments: MultiExecuteArguments) -> Answer:
        calls = [(call.tool_slug, call.arguments) for call in arguments.tools]
        results = self.session.execute_tools(calls, sync_to_workbench=arguments.sync_response_to_workbench,
                                             max_workers=16, inline_limit=self._inline_budget(len(calls)))
        items = []
        for result in results:
            item: dict[str, Any] = {"tool_slug": result.slug, "ok": result.ok}
            if not result.ok:
                item.update(error_kind=result.error_kind, error=result.error)
                if result.retry_after is not None:
                    item["retry_after"] = result.retry_after
            elif result.offload is not None:
                item["offload"] = result.offload.model_dump(exclude_defaults=True)
            else:
                item["data"] = result.data
            items.append(item)
        failed = sum(not r.ok for r in results)
        answer = {"results": items, "succeeded": len(results) - failed, "failed": failed}
        return Answer(_json(answer), is_error=failed == len(results), files=_offloaded(results))

    def _remote_workbench(self, arguments: RemoteWorkbenchArguments) -> Answer:
        result = self.session.execute(arguments.code_to_execute, timeout=self._timeout(arguments.timeout))
        return Answer(str(result) or "(the cell ran and gave no output)", is_error=not result.ok,
                      files=tuple(result.spilled.values()))

    def _remote_bash_tool(self, arguments: RemoteBashArguments) -> Answer:
        result = self.session.commands.run(arguments.command, timeout=self._timeout(arguments.timeout))
        return Answer(str(result) + ("" if result.stdout or result.stderr else "\n(no output)"), is_error=not result.ok,
                      files=tuple(result.spilled.values()))

    def _timeout(self, asked: float | None) -> float:
        """A model's timeout, never past the host's `execute_timeout` (a model does not hold a session for days)."""
        limit = self._timeouts["execute_timeout"]
        return limit if asked is None else min(asked, limit)

    # answers --------------------------------------------------------------------------------------------------

    def _inline_budget(self, calls: int) -> int:
        """Bytes of one response kept inline when `calls` responses share an answer: a larger one goes to the
        workspace with an envelope rather than being cut in the middle. (Many envelopes or errors can still
        outgrow the answer, which is then bounded like any other.)"""
        return max((self.answer_limit - 100 * calls) // calls, 0)

    def _save(self, name: str, text: str) -> str | None:
        path = f"{ANSWERS}/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}-{name.lower()}.txt"
        try:
            self.session.files.write(path, text.encode())
        except (WorkbenchError, OSError):
            return None
        return path


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _parse(arguments: Any) -> dict[str, Any]:
    """A call's arguments as a dict: given as one, as JSON text, or as pydantic models (LangChain's)."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        if len(arguments) > MAX_ARGUMENTS:
            raise _Refused("invalid_arguments", f"the arguments exceed {MAX_ARGUMENTS:,} characters")
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as exc:
            raise _Refused("invalid_arguments", f"the arguments are not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(arguments, dict):
        raise _Refused("invalid_arguments", f"the arguments must be a JSON object, not {type(arguments).__name__}")
    try:
        plain = to_jsonable_python(arguments)
    except Exception as exc:  # a value that has no JSON form
        raise _Refused("invalid_arguments", f"the arguments have no JSON form: {str(exc)[:200]}") from None
    assert isinstance(plain, dict)
    return plain


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _summary(tool: Tool) -> dict[str, Any]:
    return {"tool_slug": tool.slug, "toolkit": tool.toolkit, "description": tool.description[:1000],
            "input_schema": clean_schema(tool.schema)}


def _offloaded(results: list[ToolResult]) -> tuple[str, ...]:
    """The workspace files of the responses that were offloaded: each response, and its Arrow table."""
    return tuple(path for r in results if r.offload is not None
                 for path in (r.offload.path, r.offload.table_path) if path)


def _tool_answer(result: ToolResult) -> str:
    if result.error is not None:
        return f"[error: {result.error_kind}] {result.error}"
    if result.offload is not None:
        return _json({"offload": result.offload.model_dump(exclude_defaults=True)})
    return _json(result.data)

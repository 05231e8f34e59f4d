"""The one tool-call pipeline: every call of a host tool for a session goes through `ToolPipeline.call`, whether it
came from `execute_tool`, `execute_tools`, a model's meta tool or the sandbox's bridge.

In one place: the slug and arguments checked, the allowlist as the store has it now, the tool's context, argument
validation, the timeout (or, for the bridge, the caller's abandonment), error mapping to an `ErrorKind`, offload
routing of the response, and a log entry whatever happens.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from ..errors import FileError, SessionClosedError, WorkspaceFullError
from ..files import Files
from ..results import ToolResult
from ..store import SessionConfig
from .offload import NotSerialisable, Routed, route
from .protocol import MAX_INLINE, SLUG, Request, error_reply
from .registry import RateLimited, Tool, ToolCallError, ToolContext, ToolRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """What the pipeline needs of the session a call is made for."""

    session_id: str
    user_id: str
    files: Files  # where large responses go
    config: Callable[[], SessionConfig]  # the config as stored now; raises SessionClosedError once closed
    log_entry: Callable[..., None]  # (kind, status, duration, detail, touch=, metadata=): one log entry


class ToolPipeline:
    """Runs host tools for sessions: see the module's docstring. Tools run in a pool of their own threads, so that
    one past its timeout is reported as timed out while it finishes in the background (a thread cannot be
    stopped)."""

    def __init__(self, registry: ToolRegistry, timeout: Callable[[], float], max_workers: int = 128) -> None:
        self.registry = registry
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="workbench-tool")

    def allowed(self, caller: Caller) -> list[Tool]:
        """The tools the caller's session may call now."""
        config = caller.config()
        return self.registry.allowed(config.toolkits, config.tools)

    def call(self, caller: Caller, slug: str, arguments: dict[str, Any] | None = None, *,
             sync_to_workbench: bool = False, timeout: float | None = None,
             abandoned: threading.Event | None = None, inline_limit: int | None = None) -> ToolResult:
        """Run one tool call and route its response; errors come back in the result, never raised.

        With `abandoned` (the bridge's calls), the tool runs in this thread and the caller enforces the timeout,
        setting `abandoned` when it gave up. `inline_limit` caps the bytes kept inline below the session's
        offload threshold; `sync_to_workbench` writes every response to the workspace."""
        started = time.perf_counter()
        routed: Routed | None = None
        error: ToolCallError | None = None
        metadata: dict[str, str] | None = None  # as the call's config has it, once read
        shown = slug if isinstance(slug, str) and SLUG.fullmatch(slug) else "<invalid slug>"
        try:
            if not isinstance(slug, str):  # a slug from an agent can be anything
                raise ToolCallError("invalid_arguments", f"a tool slug must be a string, not {type(slug).__name__}")
            if shown != slug:
                raise ToolCallError("not_found", "a tool slug is 1 to 128 letters, digits and _ . -")
            if arguments is not None and not isinstance(arguments, dict):
                raise ToolCallError("invalid_arguments", f"arguments must be a dict, not {type(arguments).__name__}")
            config = caller.config()  # the allowlist as the store has it now
            metadata = config.metadata
            tool = self.registry.check_allowed(slug, config.toolkits, config.tools)
            context = ToolContext(user_id=caller.user_id, session_id=caller.session_id, slug=slug,
                                  metadata=config.metadata)
            if abandoned is None:
                value = self._run_pooled(tool, arguments, context, timeout)
            else:
                value = _run(tool, arguments, context)
                if abandoned.is_set():
                    raise ToolCallError("timeout", f"{slug} answered after its caller gave up")
            threshold = config.offload_threshold if inline_limit is None else min(config.offload_threshold,
                                                                                  inline_limit)
            routed = route(value, files=caller.files, threshold=threshold, sync_to_workbench=sync_to_workbench)
        except ToolCallError as exc:
            error = exc
        except NotSerialisable as exc:
            error = ToolCallError("not_serialisable", str(exc))
        except WorkspaceFullError as exc:
            error = ToolCallError("workspace_full", str(exc))
        except SessionClosedError as exc:
            error = ToolCallError("session_closed", str(exc))
        except (FileError, OSError) as exc:
            error = ToolCallError("workspace_error", f"the response could not be written to the workspace: {exc}")
        except Exception as exc:  # a bug here must still be answered and logged
            log.exception("tool %s failed on the host", shown, extra={"session_id": caller.session_id})
            error = ToolCallError("internal", f"the host failed to handle this call ({type(exc).__name__}); it "
                                  "was logged there")
        finally:
            duration = time.perf_counter() - started
            status = error.kind if error else "ok" if routed is not None else "internal"
            try:
                caller.log_entry("tool", status, duration, {
                    "slug": shown, "error": str(error)[:2000] if error else None,
                    "offload": routed.offload.id if routed and routed.offload else None,
                    "bytes": routed.offload.bytes if routed and routed.offload else None,
                }, touch=False, metadata=metadata)
            except Exception:  # the store failing must not hide the call's outcome; it is logged here instead
                log.exception("tool %s (%s): could not write its log entry", shown, status,
                              extra={"session_id": caller.session_id})
        if error is not None:
            return ToolResult(slug=shown, error=str(error), error_kind=error.kind, retry_after=error.retry_after,
                              duration=duration)
        assert routed is not None
        return ToolResult(slug=slug, data=routed.data, offload=routed.offload, duration=duration)

    def call_many(self, caller: Caller, calls: list[tuple[str, dict[str, Any]]], *, sync_to_workbench: bool = False,
                  max_workers: int = 8, timeout: float | None = None,
                  inline_limit: int | None = None) -> list[ToolResult]:
        """Several calls concurrently (at most `max_workers` at a time); results in the calls' order."""
        if not calls:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(calls)))) as pool:
            return list(pool.map(
                lambda call: self.call(caller, call[0], call[1], sync_to_workbench=sync_to_workbench,
                                       timeout=timeout, inline_limit=inline_limit), calls))

    def bridge_reply(self, caller: Caller, request: Request, abandoned: threading.Event) -> dict[str, Any]:
        """The reply to one request from the sandbox's tool bridge (run in the calling thread)."""
        if request.op == "call":
            assert request.slug is not None
            result = self.call(caller, request.slug, request.arguments, sync_to_workbench=request.sync_to_workbench,
                               abandoned=abandoned, inline_limit=MAX_INLINE)
            reply: dict[str, Any] = {"id": request.id, "ok": result.ok, "duration": result.duration}
            if result.ok:
                reply["data"] = result.data
                reply["offload"] = result.offload.model_dump() if result.offload else None
            else:
                reply.update(kind=result.error_kind, error=result.error, retry_after=result.retry_after)
            return reply
        try:
            allowed = self.allowed(caller)
        except SessionClosedError as exc:
            return error_reply(request.id, "session_closed", str(exc))
        if request.op == "list":
            return {"id": request.id, "ok": True,
                    "data": [{"slug": t.slug, "toolkit": t.toolkit, "description": t.description} for t in allowed]}
        for tool in allowed:
            if tool.slug == request.slug:
                return {"id": request.id, "ok": True, "data": tool.describe()}
        return error_reply(request.id, "not_found", f"no tool {request.slug!r} is available to this session")

    def close(self) -> None:
        """Stop taking calls; tools still running finish in the background."""
        self._pool.shutdown(wait=False)

    def _run_pooled(self, tool: Tool, arguments: dict[str, Any] | None, context: ToolContext,
                    timeout: float | None) -> Any:
        future = self._pool.submit(_run, tool, arguments, context)
        limit = self._timeout() if timeout is None else timeout
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            raise ToolCallError("timeout", f"{tool.slug} did not answer within {limit:g}s") from None


def _run(tool: Tool, arguments: dict[str, Any] | None, context: ToolContext) -> Any:
    """Run a tool in this thread; its exceptions become ToolCallErrors."""
    try:
        return tool.call(arguments, context)
    except ToolCallError:
        raise
    except RateLimited as exc:
        raise ToolCallError("rate_limited", str(exc) or "rate limited", exc.retry_after) from None
    except Exception as exc:
        raise ToolCallError("tool_error", f"{type(exc).__name__}: {exc}") from None

"""A session: one user's kernel, workspace and configuration."""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agent import Answer, Format, MetaTools, answer_calls, render
from .bridge_protocol import MAX_INLINE, error_reply
from .bridge_protocol import SLUG as _SLUG
from .bridge_protocol import Request as BridgeRequest
from .commands import Commands
from .config import Limits, check_metadata
from .errors import (
    ConflictError,
    FileError,
    SessionClosedError,
    SessionError,
    WorkbenchError,
    WorkspaceFullError,
)
from .execution import Callbacks
from .files import OUTPUTS, Files
from .kernel import Kernel
from .offload import NotSerialisable, Routed, route
from .results import ExecutionError, ExecutionResult, Output, ToolResult
from .store import LogEntry, SessionConfig, SessionRecord
from .tools import Tool, ToolCallError, ToolContext
from .workspace import NeedsOffline

if TYPE_CHECKING:
    from .client import Workbench

log = logging.getLogger(__name__)
_CODE_IN_LOG = 10_000  # characters of a cell's code kept in its log entry
_GRACE = 30.0  # beyond a cell's timeout: the interrupt's grace and a restart


class _FifoLock:
    """A lock granted in the order it was asked for (threading.Lock makes no such promise)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            try:
                self._cond.wait_for(lambda: self._serving == ticket)
            except BaseException:  # e.g. KeyboardInterrupt while queued: give the turn away
                if self._serving == ticket:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._advance()

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
        self._cond.notify_all()


class _SessionFileLock:
    """An exclusive flock on the session's lock file under the home, held for one execution, so that processes
    sharing a session run its cells one at a time (and one's timeout never interrupts another's cell). Waits at
    most `timeout` seconds: `__enter__` gives the seconds waited, or None when the lock never came."""

    def __init__(self, home: Path, session_id: str, timeout: float) -> None:
        folder = home / "locks"
        folder.mkdir(mode=0o700, exist_ok=True)
        self._fd = os.open(folder / f"{session_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._timeout = timeout
        self._held = False

    def __enter__(self) -> float | None:
        started = time.monotonic()
        pause = 0.002
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
                return time.monotonic() - started
            except BlockingIOError:
                left = self._timeout - (time.monotonic() - started)
                if left <= 0:
                    return None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)

    def __exit__(self, *exc: object) -> None:
        try:
            if self._held:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)


class Session:
    """A sandboxed kernel that keeps variables, functions and files between executions. Thread-safe:
    executions on one session run one at a time, in the order they were called."""

    def __init__(self, workbench: Workbench, record: SessionRecord, kernel: Kernel) -> None:
        self._workbench = workbench
        self.session_id = record.session_id
        self.user_id = record.user_id
        self.config = record.config
        self.config_version = record.config_version
        self._kernel = kernel
        self._lock = _FifoLock()
        self._state_lost = False  # set when the kernel had to be started anew; told by the next result
        self._attached = kernel.client is not None  # False until `wb.use` reattaches on first need
        self._config_cache: tuple[int, SessionConfig] | None = None  # (store data_version, config)
        self.closed = False
        self.log = logging.LoggerAdapter(log, {"session_id": self.session_id})
        self.files = Files(kernel.workspace, lambda: self.config.limits.workspace_size, disk=kernel.disk)
        """The workspace's files, read and written on the host: `write`, `read`, `open`, `list`, `exists`,
        `remove`."""
        self.commands = Commands(
            self.session_id, api=workbench.docker.api, store=workbench.store, files=self.files,
            container=self._kernel_container, check_open=self._check_open, log_entry=self._log,
            output_limit=workbench.output_limit, idle_timeout=workbench.idle_timeout)
        """Shell commands in the session's sandbox, beside the kernel: `run`."""

    @property
    def metadata(self) -> dict[str, str]:
        """The session's metadata (correlation ids and the like), as given to `create` or `update` (by any
        process: read from the store when it changed)."""
        try:
            return self._current_config().metadata
        except WorkbenchError:  # closed, or the store failing: what this object last knew
            return self.config.metadata

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def workspace(self) -> Path:
        """The workspace folder on the host, mounted at /workspace in the sandbox."""
        return self._kernel.workspace

    def execute(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Output], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
    ) -> ExecutionResult:
        """Run code in the session's kernel and return its outputs.

        `timeout` (seconds, default the workbench's `execute_timeout`) interrupts the cell and keeps the
        kernel's state. If the kernel dies it is restarted on the same workspace and the result says so.
        """
        callbacks = Callbacks(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result, on_error=on_error)
        timeout = self._workbench.execute_timeout if timeout is None else timeout
        with self._lock:
            self._check_open()
            started = time.monotonic()
            result: ExecutionResult | None = None
            failure: BaseException | None = None
            try:
                with _SessionFileLock(self._workbench.home, self.session_id, timeout) as waited:
                    if waited is None:  # another process's cell held the session for all of our timeout
                        result = ExecutionResult(timed_out=True, not_started=True,
                                                 duration=time.monotonic() - started)
                        return result
                    result = self._execute_locked(code, timeout - waited, callbacks)
                    result.duration += waited
                    return result
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._log_execution(code, result, failure, time.monotonic() - started)

    def _execute_locked(self, code: str, timeout: float, callbacks: Callbacks) -> ExecutionResult:
        store = self._workbench.store
        store.mark_busy(self.session_id, time.time() + timeout + _GRACE)
        self._sync()
        self._workbench._bridge.ensure(self)  # the cell may call tools: this process serves them
        cell = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        result = self._kernel.execute(code, timeout=timeout, callbacks=callbacks,
                                      spill=lambda name: self.files.writer(f"{OUTPUTS}/{cell}.{name}"))
        if self._state_lost:
            result.state_lost, self._state_lost = True, False
        if result.kernel_died:
            store.set_kernel(self.session_id, self._kernel.record())
        return result

    def _log_execution(self, code: str, result: ExecutionResult | None, failure: BaseException | None,
                       duration: float) -> None:
        """Log an execution, whatever became of it: committed before its result is returned. An execution that
        raised (Docker gone, the store failing, an interrupt of this process) is logged as failed."""
        if result is None or failure is not None:
            status = "failed"
        else:
            status = ("not_started" if result.not_started else "died" if result.kernel_died
                      else "timeout" if result.timed_out else "error" if result.error else "ok")
        detail = {
            "code": code[:_CODE_IN_LOG],
            "execution_count": result.execution_count if result else None,
            "error": (result.error.ename if result and result.error
                      else f"{type(failure).__name__}: {str(failure)[:2000]}" if failure else None),
            "kernel_died": result.kernel_died if result else None,
            "dropped_messages": result.dropped_messages if result else 0,
        }
        try:
            self._log("execution", status, result.duration if result and not failure else duration, detail)
        except Exception:
            if failure is None:
                raise  # the result is not returned unlogged
            self.log.exception("could not log a failed execution")  # the original error is raised
            return
        self.log.info("execution %s in %.3fs", status, duration)

    def update(
        self,
        *,
        toolkits: list[str] | None = None,
        tools: list[str] | None = None,
        limits: Limits | dict | None = None,
        offload_threshold: int | None = None,
        metadata: dict[str, str] | None = None,
        restart_if_needed: bool = False,
        config_version: int | None = None,
    ) -> int:
        """Change the session's config in place; returns the new `config_version`.

        `metadata` replaces the session's metadata as a whole. Raises ConflictError when another caller changed
        the config since this session object read it, or, given `config_version` (the version the caller read,
        e.g. a remote client), when the stored config is at another version.
        Memory and CPU limits apply to the running kernel; a change of `pids` or `tmp_size` needs a new
        container (variables lost) and is refused unless `restart_if_needed`.
        """
        with self._lock:
            self._check_open()
            if config_version is not None:
                record = self._workbench.store.get(self.session_id)
                if record.config_version != config_version:
                    raise ConflictError(f"session {self.session_id} config is at version {record.config_version}, "
                                        f"not {config_version}: reload it and apply the change again")
                self.config, self.config_version = record.config, record.config_version
            new_limits = self._workbench._limits(limits) if limits is not None else self.config.limits
            needs_restart = (new_limits.pids, new_limits.tmp_size) != (self.limits.pids, self.limits.tmp_size)
            if needs_restart and not restart_if_needed:
                raise SessionError("changing pids or tmp_size needs a new container, which loses the kernel's "
                                   "variables: pass restart_if_needed=True")
            config = SessionConfig(
                toolkits=self.config.toolkits if toolkits is None else toolkits,
                tools=self.config.tools if tools is None else tools,
                limits=new_limits,
                offload_threshold=self.config.offload_threshold if offload_threshold is None else offload_threshold,
                metadata=self.config.metadata if metadata is None else check_metadata(metadata),
            )
            if new_limits.workspace_size != self.limits.workspace_size:
                # the disk changes only for an update that is not stale (checked again when it is stored)
                current = self._workbench.store.get(self.session_id).config_version
                if current != self.config_version:
                    raise ConflictError(f"session {self.session_id} config is at version {current}, not "
                                        f"{self.config_version}: reload it (wb.use) and apply the change again")
                needs_restart |= self._resize_workspace(new_limits.workspace_size, restart_if_needed)
            self.config_version = self._workbench.store.update_config(self.session_id, config, self.config_version)
            self.config = config
            self._config_cache = None
            self._kernel.limits = new_limits
            if needs_restart:
                self._new_kernel()
            elif limits is not None and self._workbench.store.get(self.session_id).kernel is not None:
                self._sync(config=False)
                self._kernel.apply_limits()
            return self.config_version

    def execute_tool(
        self, slug: str, arguments: dict[str, Any] | None = None, *, sync_to_workbench: bool = False,
        timeout: float | None = None, inline_limit: int | None = None,
    ) -> ToolResult:
        """Run one of the host's tools for this session and route its response.

        A response of at most the session's `offload_threshold` bytes of JSON comes back as `data`; a larger one
        is written into the workspace (`.responses/`) and `offload` describes it in at most 2 KB: the kernel reads
        it as `responses[id]`, and a list of records also as the DataFrame `tables[id]`. `sync_to_workbench`
        writes every response to the workspace, small ones too; `inline_limit` (bytes) lowers the threshold for
        this call. Errors come back in the result, never raised.
        """
        return self._tool_call(slug, arguments, sync_to_workbench, timeout, inline_limit=inline_limit)

    def available_tools(self) -> list[Tool]:
        """The tools this session may call now (its toolkits' and the single tools named in its config)."""
        config = self._current_config()
        return self._workbench.tools.allowed(config.toolkits, config.tools)

    @property
    def runtime_dir(self) -> Path:
        """The host folder mounted at /run/workbench in the sandbox (kernel sockets, the tool bridge)."""
        return self._kernel.runtime_dir

    def handle_bridge_request(self, request: BridgeRequest, abandoned: threading.Event) -> dict[str, Any]:
        """One request from the sandbox's tool bridge, run in this thread; the reply to send back."""
        if request.op == "call":
            assert request.slug is not None
            result = self._tool_call(request.slug, request.arguments, request.sync, None, abandoned,
                                     inline_limit=MAX_INLINE)
            reply: dict[str, Any] = {"id": request.id, "ok": result.ok, "duration": result.duration}
            if result.ok:
                reply["data"] = result.data
                reply["offload"] = result.offload.model_dump() if result.offload else None
            else:
                reply.update(kind=result.error_kind, error=result.error, retry_after=result.retry_after)
            return reply
        try:
            config = self._current_config()
        except SessionClosedError as exc:
            return error_reply(request.id, "session_closed", str(exc))
        allowed = self._workbench.tools.allowed(config.toolkits, config.tools)
        if request.op == "list":
            return {"id": request.id, "ok": True,
                    "data": [{"slug": t.slug, "toolkit": t.toolkit, "description": t.description} for t in allowed]}
        for tool in allowed:
            if tool.slug == request.slug:
                return {"id": request.id, "ok": True, "data": tool.describe()}
        return error_reply(request.id, "not_found", f"no tool {request.slug!r} is available to this session")

    def _tool_call(self, slug: str, arguments: dict[str, Any] | None, sync_to_workbench: bool,
                   timeout: float | None, abandoned: threading.Event | None = None,
                   inline_limit: int | None = None) -> ToolResult:
        """The one tool-call pipeline: allowlist, arguments, timeout, routing, and a log entry whatever happens.

        With `abandoned` (the bridge's calls), the tool runs in this thread and the caller enforces the timeout,
        setting `abandoned` when it gave up. `inline_limit` caps the bytes kept inline below the session's
        offload threshold."""
        started = time.perf_counter()
        routed: Routed | None = None
        error: ToolCallError | None = None
        metadata: dict[str, str] | None = None  # as the call's config has it, once read
        shown = slug if isinstance(slug, str) and _SLUG.fullmatch(slug) else "<invalid slug>"
        try:
            if not isinstance(slug, str):  # a slug from an agent can be anything
                raise ToolCallError("invalid_arguments", f"a tool slug must be a string, not {type(slug).__name__}")
            if shown != slug:
                raise ToolCallError("not_found", "a tool slug is 1 to 128 letters, digits and _ . -")
            if arguments is not None and not isinstance(arguments, dict):
                raise ToolCallError("invalid_arguments", f"arguments must be a dict, not {type(arguments).__name__}")
            config = self._current_config()  # the allowlist as the store has it now
            metadata = config.metadata
            tool = self._workbench.tools.check_allowed(slug, config.toolkits, config.tools)
            context = ToolContext(user_id=self.user_id, session_id=self.session_id, slug=slug,
                                  metadata=config.metadata)
            if abandoned is None:
                value = self._workbench._call_tool(tool, arguments, context, timeout)
            else:
                value = self._workbench._call_tool_here(tool, arguments, context)
            if abandoned is not None and abandoned.is_set():
                raise ToolCallError("timeout", f"{slug} answered after its caller gave up")
            threshold = config.offload_threshold if inline_limit is None else min(config.offload_threshold,
                                                                                  inline_limit)
            routed = route(value, files=self.files, threshold=threshold, always_offload=sync_to_workbench)
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
            self.log.exception("tool %s failed on the host", shown)
            error = ToolCallError("internal", f"the host failed to handle this call ({type(exc).__name__}); it "
                                  "was logged there")
        finally:
            duration = time.perf_counter() - started
            status = error.kind if error else "ok" if routed is not None else "internal"
            try:
                self._log("tool", status, duration, {
                    "slug": shown, "error": str(error)[:2000] if error else None,
                    "offload": routed.offload.id if routed and routed.offload else None,
                    "bytes": routed.offload.bytes if routed and routed.offload else None,
                }, touch=False, metadata=metadata)
            except Exception:  # the store failing must not hide the call's outcome; it is logged here instead
                self.log.exception("tool %s (%s): could not write its log entry", shown, status)
        if error is not None:
            result = ToolResult(slug=shown, error=str(error), error_kind=error.kind, retry_after=error.retry_after,
                                duration=duration)
        else:
            assert routed is not None
            result = ToolResult(slug=slug, data=routed.data, offload=routed.offload, duration=duration)
        self.log.debug("tool %s %s in %.3fs", shown, status, duration)
        return result

    def _log(self, kind: str, status: str, duration: float, detail: dict[str, Any], touch: bool = True,
             metadata: dict[str, str] | None = None) -> None:
        """One log entry of this session, carrying its metadata (as stored now, unless given)."""
        metadata = self.metadata if metadata is None else metadata
        if metadata:
            detail["metadata"] = metadata
        self._workbench.store.log(self.session_id, kind, status, duration, detail, touch=touch)

    def _current_config(self) -> SessionConfig:
        """The session's config as stored, read again only when the store changed (another process wrote to it,
        or this session was updated or closed)."""
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")
        store = self._workbench.store
        data_version = store.data_version()
        cached = self._config_cache
        if cached is None or cached[0] != data_version:
            record = store.get(self.session_id)
            if record.status != "open":
                raise SessionClosedError(f"session {self.session_id} is closed")
            cached = self._config_cache = (data_version, record.config)
        return cached[1]

    def execute_tools(
        self, calls: list[tuple[str, dict[str, Any]]], *, sync_to_workbench: bool = False, max_workers: int = 8,
        timeout: float | None = None, inline_limit: int | None = None,
    ) -> list[ToolResult]:
        """Run several tool calls concurrently (at most `max_workers` at a time); results in the calls' order."""
        if not calls:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(calls)))) as pool:
            return list(pool.map(
                lambda call: self.execute_tool(call[0], call[1], sync_to_workbench=sync_to_workbench,
                                               timeout=timeout, inline_limit=inline_limit), calls))

    # for models -----------------------------------------------------------------------------------------------

    def tools(self, format: Format = "openai", *, include_tools: bool = False) -> list[Any]:
        """The session's meta tools as tool definitions for a model: `format` is "openai" (Chat Completions),
        "openai_responses", "anthropic", "mcp" (MCP Tool dicts) or "langchain" (StructuredTools, which run
        themselves; needs langchain-core). `include_tools` adds the session's allowed tools as direct tools.

        The meta tools: WORKBENCH_SEARCH_TOOLS, WORKBENCH_GET_TOOL_SCHEMAS, WORKBENCH_MULTI_EXECUTE_TOOL,
        WORKBENCH_REMOTE_WORKBENCH (Python in this kernel) and WORKBENCH_REMOTE_BASH_TOOL (a shell command)."""
        return render(self._meta.definitions(include_tools), format, self._meta.call)

    def handle_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> str:
        """Answer one tool call a model made (`arguments` as a dict or JSON text): the text the model reads,
        bounded by the workbench's `answer_limit`. Unknown tools and bad arguments are answered with an error
        text, never raised."""
        return self._meta.call(name, arguments).text

    def answer_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> Answer:
        """`handle_tool_call`, with whether the answer reports an error (`Answer.text`, `Answer.is_error`)."""
        return self._meta.call(name, arguments)

    def handle_tool_calls(self, response: Any, *, include_tools: bool = False) -> list[dict[str, Any]]:
        """Run every call in a model's response that names a tool of this session, in order, and return the
        messages that carry the results, in the provider's shape, ready to append to the conversation.

        `response` is an OpenAI `ChatCompletion` (-> `{"role": "tool", ...}` messages) or Responses API
        `Response` (-> `function_call_output` items), or an Anthropic `Message` (-> one user message of
        `tool_result` blocks), as their SDKs return them (or as dicts of the same shape). Calls of other tools
        are left to the caller; the session's own tools are answered too when `include_tools` (as they were
        offered by `tools(include_tools=True)`)."""
        def answer(name: str, arguments: Any) -> tuple[str, bool]:
            given = self._meta.call(name, arguments)
            return given.text, given.is_error

        return answer_calls(response, lambda name: self._meta.handles(name, include_tools), answer)

    @functools.cached_property
    def _meta(self) -> MetaTools:
        return MetaTools(self, answer_limit=self._workbench.answer_limit,
                         execute_timeout=self._workbench.execute_timeout, tool_timeout=self._workbench.tool_timeout)

    def logs(self, limit: int = 1000) -> list[LogEntry]:
        """The session's executions and tool calls, oldest first; `session_id` is their trace id."""
        return self._workbench.store.logs(self.session_id, limit)

    def restart(self) -> None:
        """Restart the kernel: variables are lost, the workspace is kept."""
        with self._lock:
            self._check_open()
            self._new_kernel()

    def close(self, delete_workspace: bool = False) -> None:
        """Stop the kernel and remove its container; the workspace is kept unless `delete_workspace`.

        The session is marked closed first; removing what it leaves behind never raises (a problem is logged)."""
        with self._lock:
            if self.closed:
                return
            self._workbench.store.set_status(self.session_id, "closed")  # if the store fails, nothing is removed
            self.closed = True
            self._workbench._forget(self.session_id)
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("stop its bridge", lambda: self._workbench._bridge.stop(self.session_id)),
                ("stop its kernel", self._kernel.shutdown),
                # another process may have started the session's current kernel: remove every container it had
                ("remove its containers", lambda: self._workbench._remove_containers(self.session_id)),
                ("release its runtime dir", lambda: self._workbench._release_runtime_dir(self.session_id)),
                ("delete its workspace" if delete_workspace else "unmount its workspace",
                 self._kernel.disk.destroy if delete_workspace else self._kernel.disk.unmount),
            ]
            for what, step in steps:
                try:
                    step()
                except Exception as exc:
                    self.log.warning("closing session: could not %s: %s", what, exc)

    def _resize_workspace(self, size: int, restart_if_needed: bool) -> bool:
        """Give the workspace a new size cap; True when its kernel had to be stopped for it (offline resize)."""
        disk = self._kernel.disk
        try:
            disk.resize(size)
            return False
        except NeedsOffline:
            if not restart_if_needed:
                raise
        self._workbench._remove_containers(self.session_id)
        self._kernel.shutdown()
        try:
            disk.unmount()
            disk.resize(size, offline_ok=True)
        except (OSError, WorkbenchError) as exc:
            raise SessionError(f"could not resize the workspace: {exc}") from exc
        return True

    def _sync(self, config: bool = True) -> None:
        """Catch up with what another process or the idle reaper did to this session, and make sure a kernel
        runs: reattach to the session's current one, or start a new one (which loses variables)."""
        record = self._workbench.store.get(self.session_id)
        if record.status != "open":
            self.closed = True
            self._workbench._bridge.stop(self.session_id)
            self._kernel.disconnect()
            self._workbench._forget(self.session_id)
            raise SessionClosedError(f"session {self.session_id} was closed")
        if config:
            self.config, self.config_version = record.config, record.config_version
            self._kernel.limits = record.config.limits
        current = record.kernel
        if current is not None and self._kernel.client is not None and current.kernel_id == self._kernel.kernel_id:
            return
        self._kernel.disconnect()
        if current is not None and self._kernel.attach(current):
            if self._attached:
                self._state_lost = True  # another process restarted the kernel since this one last used it
        else:
            self.log.info("starting a new kernel: the previous one was stopped when idle, or is gone")
            self._kernel.restart()
            self._workbench.store.set_kernel(self.session_id, self._kernel.record())
            self._state_lost = True
        self._attached = True

    def _kernel_container(self, timeout: float) -> str:
        """The container of the session's kernel, for a shell command that found none running (stopped when idle,
        its container gone, or another process's kernel not yet attached): got as an execution gets one, under the
        session's locks, reattached or started anew (which loses variables). Waits at most `timeout` seconds for
        another process's cell."""
        with self._lock:
            self._check_open()
            with _SessionFileLock(self._workbench.home, self.session_id, timeout) as waited:
                if waited is None:
                    raise SessionError(f"session {self.session_id}: another process held it for all of the "
                                       f"command's timeout ({timeout:g}s) while it had no running kernel")
                self._sync()
                if self._kernel.exit_reason() is not None:  # the store's kernel, but its container is gone
                    self.log.info("starting a new kernel: its container is gone")
                    self._kernel.restart()
                    self._workbench.store.set_kernel(self.session_id, self._kernel.record())
                    self._state_lost = True
                assert self._kernel.container is not None
                return str(self._kernel.container.id)

    def _new_kernel(self) -> None:
        """Replace the session's kernel, wherever it runs, with a new one of the current limits."""
        self._workbench._remove_containers(self.session_id)
        self._kernel.restart()
        self._workbench.store.set_kernel(self.session_id, self._kernel.record())
        self._attached = True
        self._state_lost = True

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(session_id={self.session_id!r}, user_id={self.user_id!r})"

"""A session: one user's kernel, workspace and configuration."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .agent import Answer, Format, MetaTools, answer_calls, render
from .backends import Backend
from .commands import Commands
from .config import Limits
from .errors import (
    ConflictError,
    FileError,
    SessionBusyError,
    SessionClosedError,
    SessionError,
    WorkbenchError,
    WorkspaceFullError,
)
from .execution import Callbacks
from .files import OUTPUTS, Files
from .kernel import Kernel
from .notebook import LOG_OUTPUTS, logged_outputs, notebook_of
from .results import ExecutionError, ExecutionResult, Output, ToolResult
from .state import (
    StateReport,
    keep_failed_snapshot,
    paused_state,
    remove_snapshot,
    run_state_cell,
    snapshot_size,
)
from .store import LOG_KEEP, LogEntry, PausedState, SessionConfig, SessionRecord, Store
from .tools import Tool
from .tools.bridge import BridgeServer
from .tools.pipeline import Caller, ToolPipeline
from .tools.protocol import Request as BridgeRequest
from .workspace import NeedsOffline

log = logging.getLogger(__name__)
_CODE_IN_LOG = 100_000  # characters of a cell's code kept in its log entry (and exported to a notebook)
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


@dataclass(frozen=True)
class SessionServices:
    """The narrow collaborators a session works with, given by its Workbench (never the Workbench itself)."""

    home: Path  # the lock files of sessions' executions live under it
    store: Store
    pipeline: ToolPipeline
    bridge: BridgeServer
    backend: Backend  # where the kernels run, and shell commands beside them
    execute_timeout: float
    tool_timeout: float
    answer_limit: int
    output_limit: int
    idle_timeout: float | None
    limits: Callable[[Limits | dict[str, Any] | None], Limits]  # limits as given -> complete, on the defaults
    remove_sandboxes: Callable[[str], None]  # remove every container of a session, whichever process made it
    release_runtime_dir: Callable[[str], None]  # release every runtime dir of a session
    forget: Callable[[str], None]  # the workbench stops handing out this session object (it was closed)
    open_fork: Callable[[SessionRecord, PausedState | None, Path], Session]  # a new session copied from one


class Session:
    """A sandboxed kernel that keeps variables, functions and files between executions. Thread-safe:
    executions on one session run one at a time, in the order they were called."""

    def __init__(self, services: SessionServices, record: SessionRecord, kernel: Kernel) -> None:
        self._services = services
        self.session_id = record.session_id
        self.user_id = record.user_id
        self.config = record.config
        self.config_version = record.config_version
        self._kernel = kernel
        self._lock = _FifoLock()
        self._state_lost = False  # set when the kernel had to be started anew; told by the next result
        self._state_lost_reason: str | None = None
        self._state_restored: dict[str, str] | None = None  # after a resume: what was not saved; told likewise
        self._attached = kernel.client is not None  # False until `wb.use` reattaches on first need
        self._config_cache: tuple[int, SessionConfig] | None = None  # (store data_version, config)
        self.closed = False
        self.log = logging.LoggerAdapter(log, {"session_id": self.session_id})
        self.files = Files(kernel.workspace, lambda: self.config.limits.workspace_size, disk=kernel.disk)
        """The workspace's files, read and written on the host: `write`, `read`, `open`, `list`, `exists`,
        `remove`."""
        self.commands = Commands(
            self.session_id, store=services.store, files=self.files, sandbox=services.backend.sandbox,
            start_kernel=self._kernel_sandbox, check_open=self._check_open, log_entry=self._log,
            output_limit=services.output_limit, idle_timeout=services.idle_timeout)
        """Shell commands in the session's sandbox, beside the kernel: `run`."""
        self._tools = services.pipeline
        self._caller = Caller(self.session_id, self.user_id, self.files, self._current_config, self._log)

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
        timeout = self._services.execute_timeout if timeout is None else timeout
        with self._lock:
            self._check_open()
            started = time.monotonic()
            result: ExecutionResult | None = None
            failure: BaseException | None = None
            try:
                with _SessionFileLock(self._services.home, self.session_id, timeout) as waited:
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
        store = self._services.store
        store.mark_busy(self.session_id, time.time() + timeout + _GRACE)
        self._sync(restore=True)
        self._services.bridge.ensure(self)  # the cell may call tools: this process serves them
        cell = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        result = self._kernel.execute(code, timeout=timeout, callbacks=callbacks,
                                      spill=lambda name: self.files.writer(f"{OUTPUTS}/{cell}.{name}"))
        if self._state_lost:
            result.state_lost, self._state_lost = True, False
            result.state_lost_reason, self._state_lost_reason = self._state_lost_reason, None
        if self._state_restored is not None:
            result.state_restored, result.state_skipped, self._state_restored = True, self._state_restored, None
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
            "outputs": logged_outputs(result, LOG_OUTPUTS) if result else [],
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
        limits: Limits | dict[str, Any] | None = None,
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
                record = self._services.store.get(self.session_id)
                if record.config_version != config_version:
                    raise ConflictError(f"session {self.session_id} config is at version {record.config_version}, "
                                        f"not {config_version}: reload it and apply the change again")
                self.config, self.config_version = record.config, record.config_version
            new_limits = self._services.limits(limits) if limits is not None else self.config.limits
            needs_restart = (new_limits.pids, new_limits.tmp_size) != (self.limits.pids, self.limits.tmp_size)
            if needs_restart and not restart_if_needed:
                raise SessionError("changing pids or tmp_size needs a new container, which loses the kernel's "
                                   "variables: pass restart_if_needed=True")
            config = self.config.changed(toolkits=toolkits, tools=tools, limits=new_limits,
                                         offload_threshold=offload_threshold, metadata=metadata)
            offline = False
            if new_limits.workspace_size != self.limits.workspace_size:
                # the disk changes only for an update that is not stale (checked again when it is stored)
                current = self._services.store.get(self.session_id).config_version
                if current != self.config_version:
                    raise ConflictError(f"session {self.session_id} config is at version {current}, not "
                                        f"{self.config_version}: reload it (wb.use) and apply the change again")
                try:
                    self._kernel.disk.resize(new_limits.workspace_size)  # grown in place: no cell waits for it
                except NeedsOffline:
                    if not restart_if_needed:
                        raise
                    offline = True
            exclusive = needs_restart or offline  # a new kernel waits for another process's cell, never cuts it off
            with self._held("its config was not changed") if exclusive else contextlib.nullcontext():
                if exclusive:
                    self._open_record()  # closed by another process meanwhile: nothing is started for it
                if offline:
                    self._resize_offline(new_limits.workspace_size)
                self.config_version = self._services.store.update_config(self.session_id, config,
                                                                         self.config_version)
                self.config = config
                self._config_cache = None
                self._kernel.limits = new_limits
                if exclusive:
                    self._new_kernel()
                elif limits is not None and self._attach(self._services.store.get(self.session_id)):
                    self._kernel.apply_limits()  # with no kernel running, the next one starts with them
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
        return self._tools.call(self._caller, slug, arguments, sync_to_workbench=sync_to_workbench, timeout=timeout,
                                inline_limit=inline_limit)

    def available_tools(self) -> list[Tool]:
        """The tools this session may call now (its toolkits' and the single tools named in its config)."""
        return self._tools.allowed(self._caller)

    @property
    def runtime_dir(self) -> Path:
        """The host folder mounted at /run/workbench in the sandbox (kernel sockets, the tool bridge)."""
        return self._kernel.runtime_dir

    def handle_bridge_request(self, request: BridgeRequest, abandoned: threading.Event) -> dict[str, Any]:
        """One request from the sandbox's tool bridge, run in this thread; the reply to send back."""
        return self._tools.bridge_reply(self._caller, request, abandoned)

    def _log(self, kind: str, status: str, duration: float, detail: dict[str, Any], touch: bool = True,
             metadata: dict[str, str] | None = None) -> None:
        """One log entry of this session, carrying its metadata (as stored now, unless given)."""
        metadata = self.metadata if metadata is None else metadata
        if metadata:
            detail["metadata"] = metadata
        self._services.store.log(self.session_id, kind, status, duration, detail, touch=touch)

    def _current_config(self) -> SessionConfig:
        """The session's config as stored, read again only when the store changed (another process wrote to it,
        or this session was updated or closed)."""
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")
        store = self._services.store
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
        return self._tools.call_many(self._caller, calls, sync_to_workbench=sync_to_workbench,
                                     max_workers=max_workers, timeout=timeout, inline_limit=inline_limit)

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
        """`handle_tool_call` as structured data: the text, whether it reports a failure, and the workspace files
        it refers to (offloaded responses, spilled outputs, the whole answer when it was cut)."""
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
        return MetaTools(self, answer_limit=self._services.answer_limit,
                         execute_timeout=self._services.execute_timeout, tool_timeout=self._services.tool_timeout)

    def logs(self, limit: int = 1000) -> list[LogEntry]:
        """The session's executions and tool calls, oldest first; `session_id` is their trace id."""
        return self._services.store.logs(self.session_id, limit)

    def restart(self) -> None:
        """Restart the kernel: variables are lost, the workspace is kept. A cell another process runs on the session
        is waited for (up to `execute_timeout`; SessionBusyError past it), never cut off."""
        with self._lock:
            self._check_open()
            with self._held("it was not restarted"):
                self._open_record()  # closed by another process meanwhile: nothing is started for it
                self._new_kernel()

    @contextlib.contextmanager
    def _held(self, undone: str, timeout: float | None = None) -> Iterator[None]:
        """The session's lock across processes, for work on its kernel: waits up to `timeout` (by default
        `execute_timeout`) for another process's cell, then raises SessionBusyError ending with `undone`."""
        timeout = self._services.execute_timeout if timeout is None else timeout
        with _SessionFileLock(self._services.home, self.session_id, timeout) as waited:
            if waited is None:
                raise SessionBusyError(f"session {self.session_id}: another process held it (a cell, a pause, a "
                                       f"restart) for {timeout:g}s; {undone}")
            yield

    def close(self, delete_workspace: bool = False) -> None:
        """Stop the kernel and remove its container; the workspace is kept unless `delete_workspace`.

        The session is marked closed first; removing what it leaves behind never raises (a problem is logged)."""
        with self._lock:
            if self.closed:
                return
            self._services.store.set_status(self.session_id, "closed")  # if the store fails, nothing is removed
            self.closed = True
            self._services.forget(self.session_id)
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("stop its bridge", lambda: self._services.bridge.stop(self.session_id)),
                ("stop its kernel", self._kernel.shutdown),
                # another process may have started the session's current kernel: remove every container it had
                ("remove its containers", lambda: self._services.remove_sandboxes(self.session_id)),
                ("release its runtime dir", lambda: self._services.release_runtime_dir(self.session_id)),
                ("delete its workspace" if delete_workspace else "unmount its workspace",
                 self._kernel.disk.destroy if delete_workspace else self._kernel.disk.unmount),
            ]
            for what, step in steps:
                try:
                    step()
                except Exception as exc:
                    self.log.warning("closing session: could not %s: %s", what, exc)

    def disconnect(self) -> None:
        """Close this process's connection to the kernel; the kernel keeps running (another process, or this one
        later, reattaches)."""
        self._kernel.disconnect()

    def _resize_offline(self, size: int) -> None:
        """Give the workspace a new size cap with its kernel stopped (the caller starts a new one)."""
        disk = self._kernel.disk
        self._services.remove_sandboxes(self.session_id)
        self._kernel.shutdown()
        try:
            disk.unmount()
            disk.resize(size, offline_ok=True)
        except (OSError, WorkbenchError) as exc:
            raise SessionError(f"could not resize the workspace: {exc}") from exc

    def _open_record(self) -> SessionRecord:
        """The session's record, after making sure it is still open (closed by another process: raises)."""
        record = self._services.store.get(self.session_id)
        if record.status != "open":
            self.closed = True
            self._services.bridge.stop(self.session_id)
            self._kernel.disconnect()
            self._services.forget(self.session_id)
            raise SessionClosedError(f"session {self.session_id} was closed")
        return record

    def _sync(self, config: bool = True, restore: bool = False) -> None:
        """Catch up with what another process or the idle reaper did to this session, and make sure a kernel
        runs: reattach to the session's current one, or start a new one (which loses variables, unless the session
        was paused: with `restore`, which needs the session's file lock, the new kernel gets them back)."""
        record = self._open_record()
        if config:
            self.config, self.config_version = record.config, record.config_version
            self._kernel.limits = record.config.limits
        current = record.kernel
        if current is None or self._kernel.client is None or current.kernel_id != self._kernel.kernel_id:
            self._kernel.disconnect()
            known = self._kernel.lineage
            if current is not None and self._kernel.attach(current):
                if self._attached and self._kernel.lineage != known and record.paused is None:
                    self._state_lost = True  # another process restarted the kernel since this one last used it
            else:
                self.log.info("starting a new kernel: the session was paused, or its kernel stopped when idle or "
                              "is gone")
                self._kernel.restart()
                self._services.store.set_kernel(self.session_id, self._kernel.record())
                self._state_lost = record.paused is None
            self._attached = True
        if restore and record.paused is not None:
            self._wake(record.paused)

    def _wake(self, paused: PausedState) -> None:
        """Restore a paused session's variables into its new kernel; the next result tells how it went."""
        started = time.perf_counter()
        lost = paused.error
        skipped: dict[str, str] = dict(paused.skipped)
        if lost is None:
            try:
                report = self._state_cell("restore")
                if report.ok:
                    skipped = report.skipped
                else:
                    lost = report.error or "the sandbox gave no reason"
            except SessionError as exc:
                lost = str(exc)
        if lost is None and paused.lineage:
            self._kernel.lineage = paused.lineage  # it holds the paused kernel's variables now
            self._services.store.set_kernel(self.session_id, self._kernel.record())
        self._services.store.set_paused(self.session_id, None)
        kept: str | None = None
        if lost is None:
            self._state_restored = skipped
            self._drop_snapshot("the restored snapshot")  # restored: its room is the workspace's again
        else:
            self._state_lost = True
            self._state_lost_reason = f"the paused session's variables were not restored: {lost}"
            if paused.error is None:  # a snapshot was made: it is set aside, never left in place unsaid
                told, kept = self._keep_failed_snapshot()
                self._state_lost_reason += told
        self._log("resume", "ok" if lost is None else "state_lost", time.perf_counter() - started,
                  {"names": len(paused.names) + len(paused.modules), "skipped": skipped, "error": lost, "kept": kept})

    def _keep_failed_snapshot(self) -> tuple[str, str | None]:
        """Set aside the snapshot a restore failed on (see `keep_failed_snapshot`): the words for the state_lost
        reason, and the path it is kept at."""
        try:
            kept = keep_failed_snapshot(self.files)
        except (WorkbenchError, OSError) as exc:
            self.log.warning("could not set aside a snapshot that was not restored: %s", exc)
            return f"; its snapshot could not be set aside: {exc}", None
        if kept is None:
            return "", None
        return (f"; its snapshot ({kept.size:,} bytes) is kept as {kept.path} for diagnosis: remove it to free its "
                "room"), kept.path

    def _state_cell(self, action: Literal["save", "restore"], timeout: float | None = None) -> StateReport:
        """Run the sandbox's save or restore cell in the current kernel (at most `timeout` seconds, by default the
        workbench's execute_timeout); a kernel that died meanwhile was replaced: the store is told, and the next
        result that its variables are gone."""
        kernel_id = self._kernel.kernel_id
        try:
            return run_state_cell(self._kernel, action, self._services.execute_timeout if timeout is None else timeout)
        finally:
            if self._kernel.kernel_id != kernel_id:
                self._services.store.set_kernel(self.session_id, self._kernel.record())
                self._state_lost = True
                what = "saving" if action == "save" else "restoring"
                self._state_lost_reason = (f"the kernel was restarted while {what} its variables (it died, or did "
                                           "not answer an interrupt)")

    def _attach(self, record: SessionRecord) -> bool:
        """Make sure this object talks to the session's current kernel, without starting one; False when the
        session has none running."""
        current = record.kernel
        if current is None:
            return False
        if self._kernel.client is not None and current.kernel_id == self._kernel.kernel_id:
            return True
        self._kernel.disconnect()
        if not self._kernel.attach(current):
            return False
        self._attached = True
        return True

    # sleeping, waking, forking --------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while the session sleeps: no kernel runs, its variables wait in the workspace (`.state/`)."""
        return self._services.store.get(self.session_id).paused is not None

    def pause(self) -> PausedState:
        """Save the kernel's variables, functions, classes and imported modules into the workspace (`.state/`),
        then stop the kernel: a paused session costs disk only. The next use (an execute, a command, `resume()`)
        starts a kernel and restores them; that result says `state_restored`, and `state_skipped` names what could
        not be saved and why (a generator, an open file, a socket). Raises WorkspaceFullError when the snapshot
        does not fit the workspace, SessionError when it could not be made: the session then keeps running."""
        paused = self._pause(idle_before=None)
        assert paused is not None
        return paused

    def pause_if_idle(self, idle_before: float, save_timeout: float | None = None) -> PausedState | None:
        """Pause the session if it has not been used since `idle_before` (a time.time()) and no other caller holds
        it (the idle reaper's call); None when it was left running. When the variables cannot be saved (within
        `save_timeout` seconds, by default the workbench's execute_timeout), the kernel is stopped all the same and
        the next result says why they were lost."""
        return self._pause(idle_before=idle_before, save_timeout=save_timeout)

    def _pause(self, idle_before: float | None, save_timeout: float | None = None) -> PausedState | None:
        reaping = idle_before is not None
        wait = 0.0 if reaping else self._services.execute_timeout
        with self._lock:
            self._check_open()
            with _SessionFileLock(self._services.home, self.session_id, wait) as waited:
                if waited is None:
                    if reaping:
                        return None
                    raise SessionBusyError(f"session {self.session_id}: another process held it (a cell, a pause, a "
                                           f"restart) for {wait:g}s; it was not paused")
                record = self._open_record()
                if record.paused is not None and record.kernel is None:
                    return record.paused
                if reaping and (record.kernel is None
                                or max(record.last_used_at, record.busy_until) >= (idle_before or 0)):
                    return None
                started = time.perf_counter()
                kernel = record.kernel
                if kernel is None or not self._attach(record):
                    state = PausedState(paused_at=time.time(), error="its kernel had already stopped: there were no "
                                        "variables to save")
                    if kernel is None:
                        self._services.store.set_paused(self.session_id, state)
                        return state
                    ran_in = kernel.kernel_id  # the kernel the store names (this object never reached it)
                else:
                    try:
                        state = self._save_snapshot(save_timeout)
                    except WorkbenchError as exc:
                        if not reaping:
                            raise
                        self.log.warning("idle session: its variables could not be saved (%s); stopping it", exc)
                        state = PausedState(paused_at=time.time(), error=f"they could not be saved when the session "
                                            f"was paused for being idle: {exc}")
                    # the kernel the save ended in: a new one when the save's kernel died and was replaced (the
                    # store names it already), which is stopped too, its variables gone (said above)
                    ran_in = self._kernel.kernel_id
                if not self._services.store.pause(self.session_id, ran_in, state, idle_before):
                    if state.error is None:
                        self._drop_snapshot("the snapshot of a pause that did not happen")
                    if reaping:
                        return None  # used meanwhile (a shell command), or another process replaced the kernel
                    raise SessionError(f"session {self.session_id}: its kernel was replaced while pausing; try again")
                self._stop_kernel()
                self._log("pause", "ok" if state.error is None else "state_lost", time.perf_counter() - started,
                          {"names": len(state.names) + len(state.modules), "skipped": state.skipped,
                           "bytes": state.bytes, "error": state.error, "idle": reaping}, touch=False)
                self.log.info("paused%s: %d names saved, %d skipped", " (idle)" if reaping else "",
                              len(state.names) + len(state.modules), len(state.skipped))
                return state

    def _save_snapshot(self, timeout: float | None = None) -> PausedState:
        """Save the current kernel's namespace into `.state/` (the kernel keeps running); what a failed save left
        there is removed."""
        try:
            report = self._state_cell("save", timeout)
        except SessionError:  # timed out, or the kernel died: maybe with a partial snapshot left behind
            self._drop_snapshot("what a failed save left")
            raise
        if not report.ok:
            self._drop_snapshot("what a failed save left")
            if report.full:
                raise WorkspaceFullError(f"the kernel's variables do not fit in the workspace (its cap is "
                                         f"{self.files.capacity():,} bytes): {report.error}; the session keeps running")
            raise SessionError(f"could not save the kernel's variables: {report.error}; the session keeps running")
        try:
            size = snapshot_size(self.files)
        except FileError as exc:  # e.g. the sandbox made .state a link: the snapshot would go with its container
            self._drop_snapshot("a snapshot that is not a file of the workspace")
            raise SessionError(f"the kernel's variables were saved, but not into the workspace ({exc}): .state "
                               "must be a folder of the workspace; the session keeps running") from None
        if self.files.disk is None or not self.files.disk.quota:  # a plain folder: no filesystem stopped it
            used, cap = self.files.usage(), self.files.capacity()
            if used > cap:
                self._drop_snapshot("a snapshot too large for the workspace")
                raise WorkspaceFullError(f"the kernel's variables ({size:,} bytes) do not fit in the "
                                         f"workspace (its cap is {cap:,} bytes); the session keeps running")
        return paused_state(report, size, self._kernel.lineage)

    def _drop_snapshot(self, what: str) -> str | None:
        """Remove the snapshot files from `.state/`; when they cannot be (`.state` leads out of the workspace, or is
        not a folder: never followed), say so in the log and return why."""
        try:
            remove_snapshot(self.files)
            return None
        except (WorkbenchError, OSError) as exc:
            self.log.warning("could not remove %s: %s", what, exc)
            return str(exc)

    def _stop_kernel(self) -> None:
        """Stop the kernel, its bridge and container; unmount the workspace (a paused session holds nothing)."""
        self._services.bridge.stop(self.session_id)
        self._kernel.shutdown()
        self._services.remove_sandboxes(self.session_id)
        self._kernel.disk.unmount(quiet=True)  # a paused session holds nothing; its next use mounts it again

    def resume(self) -> None:
        """Wake a paused session now rather than on its next use: start a kernel and restore the variables. The
        next result says `state_restored` (or `state_lost`, with the reason). Does nothing to a running session."""
        with self._lock:
            self._check_open()
            with self._held("it was not resumed"):
                self._sync(restore=True)

    def fork(self) -> Session:
        """A new session of the same user with this one's config, metadata, a copy of its workspace and its
        variables (restored on the fork's first use, as for a paused session). Afterwards the two are independent.
        """
        with self._lock:
            self._check_open()
            with self._held("it was not forked"):
                record = self._open_record()
                checkpoint = False
                state: PausedState | None = record.paused
                if state is None and self._attach(record):
                    state, checkpoint = self._save_snapshot(), True
                try:
                    self._kernel.disk.ensure()
                    started = time.perf_counter()
                    fork = self._services.open_fork(record, state, self.workspace)
                    fork._log("fork", "ok", time.perf_counter() - started, {"from": self.session_id})
                    return fork
                finally:
                    if checkpoint:
                        self._drop_snapshot("the fork's snapshot")
                    if record.kernel is None:  # paused, or stopped: mounted for the copy only
                        self._kernel.disk.unmount(quiet=True)

    def notebook(self) -> str:
        """Every execution of the session (code and outputs, oldest first) as a Jupyter notebook: nbformat v4
        JSON text, validated."""
        return notebook_of(self._services.store.logs(self.session_id, LOG_KEEP), self.session_id, self._kernel.spec)

    def export_notebook(self, path: str | Path) -> Path:
        """Write the session's notebook (see `notebook`) at `path` on this host; returns the path."""
        target = Path(path)
        target.write_text(self.notebook(), encoding="utf-8")
        return target

    def _kernel_sandbox(self, timeout: float) -> str:
        """The sandbox id of the session's kernel, for a shell command that found none running (stopped when idle,
        its sandbox gone, or another process's kernel not yet attached): got as an execution gets one, under the
        session's locks, reattached or started anew (which loses variables). Waits at most `timeout` seconds for
        another process's cell."""
        with self._lock:
            self._check_open()
            with self._held("the command found no running kernel to run in", timeout):
                self._sync(restore=True)
                if self._kernel.exit_reason() is not None:  # the store's kernel, but its sandbox is gone
                    self.log.info("starting a new kernel: its sandbox is gone")
                    self._kernel.restart()
                    self._services.store.set_kernel(self.session_id, self._kernel.record())
                    self._state_lost = True
                assert self._kernel.sandbox is not None
                return self._kernel.sandbox.id

    def _new_kernel(self) -> None:
        """Replace the session's kernel, wherever it runs, with a new one of the current limits (a paused
        session's saved variables are dropped: a restart means a fresh kernel). Until the new kernel runs a paused
        session stays paused, its snapshot kept; one that cannot be removed afterwards is told by the next result."""
        paused = self._services.store.get(self.session_id).paused is not None
        self._services.remove_sandboxes(self.session_id)
        self._kernel.restart()
        self._services.store.set_kernel(self.session_id, self._kernel.record())
        self._attached = True
        self._state_lost = True
        if paused:
            self._services.store.set_paused(self.session_id, None)
            left = self._drop_snapshot("the snapshot of a paused session that was restarted")
            if left is not None:
                self._state_lost_reason = (f"the kernel was restarted; the paused session's snapshot could not be "
                                           f"removed from the workspace: {left}")

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(session_id={self.session_id!r}, user_id={self.user_id!r})"

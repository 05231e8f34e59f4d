"""The async twin of the API: `AsyncWorkbench`, `AsyncSession`, `AsyncFiles`.

Each call runs the sync API in a thread pool of the workbench's own (so sessions run in parallel beyond the
event loop's small default pool); streaming callbacks run on the event loop, and may be coroutines.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any, TypeVar

import docker

from .agent import Answer, Format
from .agent.answers import DEFAULT_LIMIT
from .backends import Backend
from .client import GcReport, Workbench
from .commands import Commands
from .config import Limits
from .files import Data, FileInfo, Files
from .kernelspec import KernelSpec
from .results import CommandResult, ExecutionError, ExecutionResult, Output, ToolResult
from .session import Session
from .store import LogEntry, PausedState, SessionRecord, Store
from .tools import Tool

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class _Threads:
    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))


class AsyncWorkbench(_Threads):
    """`Workbench` for asyncio: the same arguments, awaitable methods.

    >>> async with AsyncWorkbench() as wb:
    ...     session = await wb.create(user_id="user_123")
    ...     (await session.execute("1 + 1")).text
    '2'
    """

    def __init__(
        self,
        *,
        max_threads: int = 64,
        home: str | Path | None = None,
        kernel: str | KernelSpec = "python3",
        image: str | None = None,
        limits: Limits | None = None,
        execute_timeout: float = 300.0,
        output_limit: int = 1_000_000,
        idle_timeout: float | None = 900.0,
        offload_threshold: int = 20_000,
        tool_timeout: float = 60.0,
        pool_size: int = 2,
        answer_limit: int = DEFAULT_LIMIT,
        backend: str | Backend = "docker",
        store: Store | str | None = None,
        docker_client: docker.DockerClient | None = None,
        replica: str | None = None,
        idle_save_timeout: float = 60.0,
    ) -> None:
        """`max_threads` run the blocking calls; the rest is `Workbench`'s."""
        super().__init__(ThreadPoolExecutor(max_threads, thread_name_prefix="workbench"))
        self.sync = Workbench(
            home=home, kernel=kernel, image=image, limits=limits, execute_timeout=execute_timeout,
            output_limit=output_limit, idle_timeout=idle_timeout, offload_threshold=offload_threshold,
            tool_timeout=tool_timeout, pool_size=pool_size, answer_limit=answer_limit, backend=backend,
            store=store, docker_client=docker_client, replica=replica, idle_save_timeout=idle_save_timeout)

    async def create(
        self,
        user_id: str,
        *,
        toolkits: list[str] | None = None,
        tools: list[str] | None = None,
        limits: Limits | dict[str, Any] | None = None,
        offload_threshold: int | None = None,
        metadata: dict[str, str] | None = None,
        allow_default_user: bool = False,
        from_session: str | None = None,
    ) -> AsyncSession:
        """Open a new session, or fork one (see `Workbench.create`)."""
        return AsyncSession(await self._run(
            self.sync.create, user_id, toolkits=toolkits, tools=tools, limits=limits,
            offload_threshold=offload_threshold, metadata=metadata, allow_default_user=allow_default_user,
            from_session=from_session,
        ), self._pool)

    async def use(self, session_id: str) -> AsyncSession:
        """The session with this id (see `Workbench.use`)."""
        return AsyncSession(await self._run(self.sync.use, session_id), self._pool)

    async def list(self, user_id: str | None = None, metadata: dict[str, str] | None = None) -> list[SessionRecord]:
        """The open sessions (see `Workbench.list`)."""
        return await self._run(self.sync.list, user_id, metadata)

    async def gc(self) -> GcReport:
        return await self._run(self.sync.gc)

    def tool(self, slug: str | None = None, *, toolkit: str = "default",
             description: str | None = None) -> Callable[[F], F]:
        """Register a tool (see `Workbench.tool`)."""
        return self.sync.tool(slug, toolkit=toolkit, description=description)

    async def build_image(self, progress: Callable[[str], None] = lambda _: None, force: bool = False) -> bool:
        return await self._run(self.sync.build_image, progress, force)

    async def close(self) -> None:
        """Disconnect from the sessions (their kernels keep running) and stop the thread pool."""
        await self._run(self.sync.close)
        self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncWorkbench:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession(_Threads):
    """`Session` for asyncio. Executions on one session still run one at a time, in the order awaited."""

    def __init__(self, session: Session, pool: ThreadPoolExecutor) -> None:
        super().__init__(pool)
        self.sync = session
        self.session_id = session.session_id
        self.user_id = session.user_id
        self.files = AsyncFiles(session.files, pool)
        self.commands = AsyncCommands(session.commands, pool)

    @property
    def config_version(self) -> int:
        return self.sync.config_version

    @property
    def limits(self) -> Limits:
        return self.sync.limits

    async def execute(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Output], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
    ) -> ExecutionResult:
        """Run code (see `Session.execute`); callbacks, plain or async, run on this event loop."""
        loop = asyncio.get_running_loop()
        return await self._run(
            self.sync.execute, code, timeout=timeout, on_stdout=_on_loop(loop, on_stdout),
            on_stderr=_on_loop(loop, on_stderr), on_result=_on_loop(loop, on_result),
            on_error=_on_loop(loop, on_error),
        )

    async def update(
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
        """Change the session's config in place (see `Session.update`)."""
        return await self._run(self.sync.update, toolkits=toolkits, tools=tools, limits=limits,
                               offload_threshold=offload_threshold, metadata=metadata,
                               restart_if_needed=restart_if_needed, config_version=config_version)

    async def execute_tool(
        self, slug: str, arguments: dict[str, Any] | None = None, *, sync_to_workbench: bool = False,
        timeout: float | None = None, inline_limit: int | None = None,
    ) -> ToolResult:
        """Run one of the host's tools (see `Session.execute_tool`)."""
        return await self._run(self.sync.execute_tool, slug, arguments, sync_to_workbench=sync_to_workbench,
                               timeout=timeout, inline_limit=inline_limit)

    async def execute_tools(
        self, calls: list[tuple[str, dict[str, Any]]], *, sync_to_workbench: bool = False, max_workers: int = 8,
        timeout: float | None = None, inline_limit: int | None = None,
    ) -> list[ToolResult]:
        """Run several tool calls concurrently (see `Session.execute_tools`)."""
        return await self._run(self.sync.execute_tools, calls, sync_to_workbench=sync_to_workbench,
                               max_workers=max_workers, timeout=timeout, inline_limit=inline_limit)

    @property
    def metadata(self) -> dict[str, str]:
        return self.sync.metadata

    def tools(self, format: Format = "openai", *, include_tools: bool = False) -> list[Any]:
        """The meta tools as tool definitions for a model (see `Session.tools`)."""
        return self.sync.tools(format, include_tools=include_tools)

    async def available_tools(self) -> list[Tool]:
        """The tools this session may call now (see `Session.available_tools`)."""
        return await self._run(self.sync.available_tools)

    async def handle_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> str:
        """Answer one tool call a model made (see `Session.handle_tool_call`)."""
        return await self._run(self.sync.handle_tool_call, name, arguments)

    async def answer_tool_call(self, name: str, arguments: dict[str, Any] | str | None = None) -> Answer:
        """One tool call's answer with the workspace files it refers to (see `Session.answer_tool_call`)."""
        return await self._run(self.sync.answer_tool_call, name, arguments)

    async def handle_tool_calls(self, response: Any, *, include_tools: bool = False) -> list[dict[str, Any]]:
        """Run the calls in a model's response; the result messages (see `Session.handle_tool_calls`)."""
        return await self._run(self.sync.handle_tool_calls, response, include_tools=include_tools)

    async def logs(self, limit: int = 1000) -> list[LogEntry]:
        return await self._run(self.sync.logs, limit)

    async def restart(self) -> None:
        await self._run(self.sync.restart)

    @property
    def paused(self) -> bool:
        return self.sync.paused

    async def pause(self) -> PausedState:
        """Save the variables and stop the kernel (see `Session.pause`)."""
        return await self._run(self.sync.pause)

    async def resume(self) -> None:
        await self._run(self.sync.resume)

    async def fork(self) -> AsyncSession:
        """A copy of this session, variables included (see `Session.fork`)."""
        return AsyncSession(await self._run(self.sync.fork), self._pool)

    async def notebook(self) -> str:
        return await self._run(self.sync.notebook)

    async def export_notebook(self, path: str | Path) -> Path:
        return await self._run(self.sync.export_notebook, path)

    async def close(self, delete_workspace: bool = False) -> None:
        await self._run(self.sync.close, delete_workspace)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncSession(session_id={self.session_id!r}, user_id={self.user_id!r})"


class AsyncCommands(_Threads):
    """`Commands` for asyncio."""

    def __init__(self, commands: Commands, pool: ThreadPoolExecutor) -> None:
        super().__init__(pool)
        self.sync = commands

    async def run(
        self,
        cmd: str,
        *,
        timeout: float = 60,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
    ) -> CommandResult:
        """Run a shell command in the session's sandbox (see `Commands.run`); callbacks, plain or async, run on
        this event loop."""
        loop = asyncio.get_running_loop()
        return await self._run(self.sync.run, cmd, timeout=timeout, cwd=cwd, env=env,
                               on_stdout=_on_loop(loop, on_stdout), on_stderr=_on_loop(loop, on_stderr))


class AsyncFiles(_Threads):
    """`Files` for asyncio."""

    def __init__(self, files: Files, pool: ThreadPoolExecutor) -> None:
        super().__init__(pool)
        self.sync = files

    async def write(self, path: str | PurePath, data: Data) -> FileInfo:
        return await self._run(self.sync.write, path, data)

    async def read(self, path: str | PurePath) -> bytes:
        return await self._run(self.sync.read, path)

    async def read_text(self, path: str | PurePath, encoding: str = "utf-8") -> str:
        return await self._run(self.sync.read_text, path, encoding)

    async def list(self, path: str | PurePath = ".", recursive: bool = False) -> list[FileInfo]:
        return await self._run(self.sync.list, path, recursive)

    async def exists(self, path: str | PurePath) -> bool:
        return await self._run(self.sync.exists, path)

    async def remove(self, path: str | PurePath) -> None:
        await self._run(self.sync.remove, path)

    async def rename(self, path: str | PurePath, new_name: str) -> FileInfo:
        return await self._run(self.sync.rename, path, new_name)

    async def usage(self) -> int:
        """Bytes held by the workspace's files."""
        return await self._run(self.sync.usage)

    async def capacity(self) -> int:
        """The workspace's size cap in bytes."""
        return await self._run(self.sync.capacity)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], Any] | None) -> Callable[[Any], None] | None:
    """A callback for the worker thread that hands each call to the event loop, in order."""
    if callback is None:
        return None

    def call(value: Any) -> None:
        if inspect.iscoroutinefunction(callback):
            asyncio.run_coroutine_threadsafe(callback(value), loop)
        else:
            loop.call_soon_threadsafe(callback, value)

    return call

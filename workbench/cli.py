"""The `workbench` command line."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from .errors import WorkbenchError

if TYPE_CHECKING:
    from .client import Workbench
    from .store import SessionRecord, Store

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


@contextmanager
def progress_printer() -> Iterator[Callable[[str], None]]:
    """A progress callback: steps are printed, details (indented lines) update a spinner."""
    started = time.monotonic()
    with console.status("working") as status:
        def show(line: str) -> None:
            if line.startswith("  "):
                status.update(f"[dim]{line.strip()[:100]}[/dim]")
            else:
                console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}")
        yield show


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            console.print(f"[red]error:[/red] {exc}")
            sys.exit(1)


@click.group(cls=_Group)
def main() -> None:
    """workbench: sandboxed Jupyter kernels in Docker for AI agents."""
    for stream in (sys.stdout, sys.stderr):  # what a sandbox prints may hold lone surrogates: shown, not fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@main.group()
def image() -> None:
    """The kernel image."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the image is up to date.")
@click.option("--cluster", is_flag=True, help="Also the images of a cluster deployment (deploy/stack.yml): the "
              "server's and Postgres's; their tags are printed last.")
def image_build(force: bool, cluster: bool) -> None:
    """Build the kernel image (and the Debian base image when it is missing)."""
    from .client import Workbench

    wb = Workbench()
    with progress_printer() as progress:
        wb.build_image(progress=progress, force=force)
        if cluster:
            from .backends.docker.cluster_images import ensure_postgres_image, ensure_server_image

            tags = [ensure_server_image(wb.docker, progress), ensure_postgres_image(wb.docker, progress)]
    if cluster:
        click.echo("\n".join(tags))


@image.command("status")
def image_status() -> None:
    """Whether the kernel image is missing, stale or current."""
    from .backends.docker.engine import connect
    from .backends.docker.image import image_status as status
    from .config import DEFAULT_IMAGE

    click.echo(f"{DEFAULT_IMAGE}: {status(connect(), DEFAULT_IMAGE)}")


@main.command()
def demo() -> None:
    """Build the image when needed, open a session, run a few cells and print what they gave."""
    from .demo import open_demo_session, run_demo

    with progress_printer() as progress:
        session = open_demo_session(progress)
    run_demo(session)


def _workbench(reap: bool = False) -> Workbench:
    """The Workbench of one command: nothing kept warm (one session at most), and idle sessions are left to the
    reaper of a long-lived Workbench or `workbench serve` (pausing them would keep a command waiting on their saves),
    but for `workbench gc` (`reap`)."""
    from .client import Workbench

    return Workbench(pool_size=0) if reap else Workbench(pool_size=0, idle_timeout=None)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _kernel_state(record: SessionRecord) -> str:
    if record.status != "open":
        return record.status
    if record.kernel:
        return "running"
    return "paused (resumes on next use)" if record.paused else "stopped (starts on next use)"


@main.group()
def session() -> None:
    """Create, list, show, pause, resume, fork, export and close sessions."""


@session.command("create")
@click.option("--user", "user_id", required=True, help="The user the session belongs to.")
@click.option("--toolkit", "toolkits", multiple=True, help="A toolkit the session may use (repeatable).")
@click.option("--tool", "tools", multiple=True, help="A single tool the session may use (repeatable).")
@click.option("--memory", help="Memory limit, e.g. 512m or 2g.")
@click.option("--cpus", type=float, help="CPU limit in cores.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="Metadata of the session, e.g. x-correlation-id=abc (repeatable).")
@click.option("--allow-default-user", is_flag=True, help='Accept user "default" (local experiments only).')
def session_create(user_id: str, toolkits: tuple[str, ...], tools: tuple[str, ...], memory: str | None,
                   cpus: float | None, metadata: tuple[str, ...], allow_default_user: bool) -> None:
    """Open a session and print its id."""
    limits = {key: value for key, value in (("memory", memory), ("cpus", cpus)) if value is not None}
    wb = _workbench()
    with console.status("starting the kernel"):
        created = wb.create(user_id, toolkits=list(toolkits), tools=list(tools), limits=limits or None,
                            metadata=_pairs(metadata), allow_default_user=allow_default_user)
    out.print(created.session_id)
    wb.close()


def _pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        parsed[key] = value
    return parsed


@session.command("list")
@click.option("--user", "user_id", help="Only this user's sessions.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="Only sessions with this metadata (repeatable: all must match).")
def session_list(user_id: str | None, metadata: tuple[str, ...]) -> None:
    """The open sessions."""
    records = _workbench().list(user_id=user_id, metadata=_pairs(metadata))
    table = Table("session", "user", "kernel", "toolkits", "created", "last used", box=None)
    for record in records:
        table.add_row(record.session_id, record.user_id, _kernel_state(record),
                      ",".join(record.config.toolkits) or "-", _when(record.created_at), _when(record.last_used_at))
    out.print(table if records else "no open sessions")


@session.command("show")
@click.argument("session_id")
@click.option("--logs", "log_count", default=10, show_default=True, help="How many recent log entries to show.")
def session_show(session_id: str, log_count: int) -> None:
    """A session's config, workspace and recent executions."""
    wb = _workbench()
    record = wb.store.get(session_id)
    limits = record.config.limits
    info = Table(box=None, show_header=False)
    for key, value in [
        ("session", record.session_id), ("user", record.user_id), ("status", _kernel_state(record)),
        ("config version", str(record.config_version)),
        ("toolkits", ", ".join(record.config.toolkits) or "-"), ("tools", ", ".join(record.config.tools) or "-"),
        ("limits", f"memory {limits.memory // 2**20} MiB, cpus {limits.cpus:g}, pids {limits.pids}, "
                   f"/tmp {limits.tmp_size // 2**20} MiB, workspace {limits.workspace_size // 2**20} MiB"),
        ("metadata", ", ".join(f"{k}={v}" for k, v in record.config.metadata.items()) or "-"),
        ("workspace", str(wb.home / "workspaces" / record.session_id)),
        ("created", _when(record.created_at)), ("last used", _when(record.last_used_at)),
    ]:
        info.add_row(f"[bold]{key}[/bold]", Text(value))  # (not markup: metadata and code are anyone's text)
    out.print(info)
    entries = wb.store.logs(session_id, limit=log_count)
    if entries:
        logs = Table("when", "kind", "status", "seconds", "detail", box=None)
        for entry in entries:
            detail = entry.detail.get("code") or entry.detail.get("command") or entry.detail.get("slug") or ""
            logs.add_row(_when(entry.created_at), entry.kind, entry.status, f"{entry.duration:.3f}",
                         Text(detail.splitlines()[0][:60] if detail else ""))
        out.print(logs)


@session.command("pause")
@click.argument("session_id")
def session_pause(session_id: str) -> None:
    """Save a session's variables into its workspace and stop its kernel (resumed on next use)."""
    state = _workbench().use(session_id).pause()
    console.print(f"paused {session_id}: {len(state.names) + len(state.modules)} names saved "
                  f"({state.bytes:,} bytes)" + (f", not saved: {', '.join(sorted(state.skipped))}" if state.skipped
                                                else ""), markup=False)


@session.command("resume")
@click.argument("session_id")
def session_resume(session_id: str) -> None:
    """Start a paused session's kernel and restore its variables now."""
    _workbench().use(session_id).resume()
    console.print(f"resumed {session_id}")


@session.command("fork")
@click.argument("session_id")
def session_fork(session_id: str) -> None:
    """A new session with a copy of this one's config, workspace and variables; prints its id."""
    fork = _workbench().use(session_id).fork()
    out.print(fork.session_id)


@session.command("export")
@click.argument("session_id")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
def session_export(session_id: str, path: str) -> None:
    """Write a session's executions and their outputs as a Jupyter notebook."""
    _workbench().use(session_id).export_notebook(path)
    console.print(f"wrote {path}", markup=False)


@session.command("close")
@click.argument("session_id")
@click.option("--delete-workspace", is_flag=True, help="Also delete the session's files.")
def session_close(session_id: str, delete_workspace: bool) -> None:
    """Stop a session's kernel and remove its container."""
    wb = _workbench()
    wb.use(session_id).close(delete_workspace=delete_workspace)
    console.print(f"closed {session_id}" + ("; workspace deleted" if delete_workspace else "; workspace kept"))


@main.command("exec")
@click.argument("session_id")
@click.argument("code", required=False)
@click.option("-f", "--file", "path", type=click.File("r"), help="Run the code in this file ('-' for stdin).")
@click.option("--timeout", type=float, help="Seconds before the cell is interrupted.")
def exec_(session_id: str, code: str | None, path: click.utils.LazyFile | None, timeout: float | None) -> None:
    """Run code in a session; exits with 1 when the code raised, timed out or killed its kernel."""
    if (code is None) == (path is None):
        raise click.UsageError("give CODE or -f FILE (exactly one)")
    source = code if code is not None else path.read()  # type: ignore[union-attr]
    wb = _workbench()
    result = wb.use(session_id).execute(
        source, timeout=timeout,
        on_stdout=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
        on_stderr=lambda text: (sys.stderr.write(text), sys.stderr.flush()),
    )
    for output in result.results:
        if output.type == "display_data":
            out.print(output.describe(), markup=False)
    if result.text is not None:
        out.print(result.text, markup=False)
    if result.error is not None:
        console.print(str(result.error), markup=False)
    for note in result.notes():
        console.print(f"[yellow]{escape(note)}[/yellow]")
    wb.close()
    sys.exit(0 if result.ok else 1)


@main.command("sh")
@click.argument("session_id")
@click.argument("cmd")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds before the command and its children are killed.")
@click.option("--cwd", help="The folder to run in: relative to /workspace, or an absolute path under it.")
def sh(session_id: str, cmd: str, timeout: float, cwd: str | None) -> None:
    """Run a shell command in a session's sandbox; streams its output and exits with its exit code (124 when it
    timed out, 125 when it has none)."""
    wb = _workbench()
    result = wb.use(session_id).commands.run(
        cmd, timeout=timeout, cwd=cwd,
        on_stdout=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
        on_stderr=lambda text: (sys.stderr.write(text), sys.stderr.flush()),
    )
    wb.close()
    if result.timed_out:
        console.print(f"[yellow]timed out after {result.duration:.1f}s: the command and its children were "
                      "killed[/yellow]")
        sys.exit(124)
    if result.exit_code is None:
        console.print(f"[yellow]no exit code: {escape(result.error or 'unknown')}[/yellow]")
        sys.exit(125)
    sys.exit(result.exit_code)


@main.command("mcp")
@click.option("--session", "session_id", required=True, help="The session to serve.")
@click.option("--app", "app", metavar="MODULE:ATTR",
              help="A Workbench to load, e.g. myapp:wb, for the tools registered on it (default: a plain Workbench).")
def mcp(session_id: str, app: str | None) -> None:
    """Serve a session's meta tools and workspace files over MCP on stdin and stdout, for desktop MCP clients."""
    from .server.mcp import serve_stdio

    wb = _load_app(app) if app else _workbench()
    try:
        serve_stdio(wb.use(session_id))
    finally:
        wb.close()


def _load_app(spec: str) -> Workbench:
    """The Workbench an app string names ("module:attr", the module importable from here), as uvicorn loads apps."""
    import importlib
    import os

    from .client import Workbench

    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise click.BadParameter(f"{spec!r} is not MODULE:ATTR", param_hint="--app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: object = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"could not load {spec}: {exc}", param_hint="--app") from None
    if not isinstance(found, Workbench):
        raise click.BadParameter(f"{spec} is a {type(found).__name__}, not a Workbench", param_hint="--app")
    return found


@main.group()
def files() -> None:
    """A session's workspace files."""


@files.command("ls")
@click.argument("session_id")
@click.argument("path", default=".")
@click.option("-r", "--recursive", is_flag=True)
def files_ls(session_id: str, path: str, recursive: bool) -> None:
    """List a workspace folder."""
    entries = _workbench().use(session_id).files.list(path, recursive=recursive)
    table = Table("path", "type", "size", "modified", box=None)
    for entry in entries:
        table.add_row(entry.path + ("/" if entry.type == "dir" else ""), entry.type,
                      f"{entry.size:,}" if entry.type == "file" else "", _when(entry.modified))
    out.print(table if entries else "(empty)")


@files.command("put")
@click.argument("session_id")
@click.argument("local", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("remote", required=False)
def files_put(session_id: str, local: Path, remote: str | None) -> None:
    """Copy a local file into the workspace (streamed)."""
    target = _workbench().use(session_id).files
    with local.open("rb") as source, _transfer(local.stat().st_size, f"put {local.name}") as advance:
        info = target.write(remote or local.name, _counted(source, advance))
    console.print(f"wrote {info.path} ({info.size:,} bytes)")


@files.command("get")
@click.argument("session_id")
@click.argument("remote")
@click.argument("local", required=False, type=click.Path(dir_okay=False, path_type=Path))
def files_get(session_id: str, remote: str, local: Path | None) -> None:
    """Copy a workspace file here (streamed); LOCAL '-' writes it to stdout."""
    source = _workbench().use(session_id).files
    with source.open(remote) as handle:
        if local is not None and str(local) == "-":
            while chunk := handle.read(1 << 20):
                sys.stdout.buffer.write(chunk)
            return
        local = local or Path(Path(remote).name)
        size = handle.seek(0, 2)
        handle.seek(0)
        with local.open("wb") as target, _transfer(size, f"get {remote}") as advance:
            while chunk := handle.read(1 << 20):
                target.write(chunk)
                advance(len(chunk))
    console.print(f"wrote {local} ({size:,} bytes)")


@contextmanager
def _transfer(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar for transfers big enough to watch."""
    if total < 8 << 20:
        yield lambda _: None
        return
    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _counted(source: object, advance: Callable[[int], None]) -> Iterator[bytes]:
    while chunk := source.read(1 << 20):  # type: ignore[attr-defined]
        advance(len(chunk))
        yield chunk


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--quick", is_flag=True, help="Small sizes, under two minutes: a smoke run.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Where to write the JSON figures.")
def bench(quick: bool, out: Path | None) -> None:
    """Run every benchmark, print a table and write benchmarks/results/latest.json."""
    import runpy

    from .assets import assets_root

    root = assets_root()
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise click.ClickException("the benchmarks are in the source tree only: run this from a clone of workbench")
    sys.path.insert(0, str(root))
    sys.argv = ["benchmarks", *(["--quick"] if quick else []), *(["--out", str(out)] if out else [])]
    runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)


@main.command()
@click.option("--app", "app_string", metavar="MODULE:ATTR",
              help="The Workbench to serve (with the tools its module registers): a Workbench, or a function "
                   "without arguments returning one, as uvicorn loads apps. Default: a Workbench with no tools.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; anything but loopback "
              "exposes the API to the network (use TLS).")
@click.option("--port", default=8642, show_default=True, type=click.IntRange(0, 65535))
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM).")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
@click.option("--public-url", help="The base URL clients reach this server by (for the sessions' MCP URLs).")
@click.option("--max-body", type=click.IntRange(1024), default=4 << 20, show_default=True,
              help="Bytes of a JSON request body.")
@click.option("--max-upload", type=click.IntRange(1024), default=4 << 30, show_default=True,
              help="Bytes of one file upload (the session's workspace cap applies too).")
@click.option("--max-executions-per-key", type=click.IntRange(1), default=128, show_default=True,
              help="Executions, commands and tool calls one API key may run at once (429 past it).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(app_string: str | None, host: str, port: int, ssl_certfile: str | None, ssl_keyfile: str | None,
          public_url: str | None, max_body: int, max_upload: int, max_executions_per_key: int, log_level: str) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs) and the sessions' MCP endpoints.

    Every route but /healthz needs an API key (workbench keys create NAME). Stopping the server keeps the
    sessions: their kernels and the store live on, and a server started again serves them.

    With WORKBENCH_REPLICA set, it is one replica of a cluster sharing the store (WORKBENCH_STORE): see
    deploy/README.md for WORKBENCH_CLUSTER_SECRET(_FILE) and WORKBENCH_REPLICA_URL."""
    import uvicorn

    from .server.app import ServerSettings, build_app, is_loopback
    from .server.cluster import ClusterSettings

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together")
    if not is_loopback(host) and not ssl_certfile:
        console.print(f"[yellow]warning:[/yellow] serving on {escape(host)} without TLS: API keys and session "
                      "tokens cross the network in clear text (pass --ssl-certfile and --ssl-keyfile, or put a TLS "
                      "proxy in front)")
    try:
        cluster = ClusterSettings.from_env(port)
    except (WorkbenchError, OSError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    wb = _served_workbench(app_string)
    settings = ServerSettings(max_body=max_body, max_upload=max_upload, public_url=public_url,
                              max_executions_per_key=max_executions_per_key)
    try:
        if not wb.store.api_keys():
            console.print("[yellow]note:[/yellow] no API key exists yet: every request will be refused until one "
                          "is made with `workbench keys create NAME`")
        config = uvicorn.Config(build_app(wb, settings, cluster), host=host, port=port, log_level=log_level,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5,
                                access_log=log_level in ("info", "debug"))
        server = uvicorn.Server(config)
        role = f" as replica {escape(cluster.replica)} (reached at {escape(cluster.url)})" if cluster else ""
        console.print(f"serving {escape(str(wb.home))} on http{'s' if ssl_certfile else ''}://{escape(host)}:{port}"
                      f"{role}")
        server.run()
    finally:
        wb.close()  # disconnects; the kernels and the sessions stay for the next server


def _served_workbench(app_string: str | None) -> Workbench:
    """The Workbench of `--app MODULE:ATTR` (a Workbench, or a zero-argument function returning one)."""
    from .client import Workbench

    if app_string is None:
        return Workbench()
    from uvicorn.importer import ImportFromStringError, import_from_string

    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # as uvicorn does: modules of the current folder
    try:
        found = import_from_string(app_string)
    except ImportFromStringError as exc:
        raise click.UsageError(f"--app {app_string}: {exc}") from None
    if not isinstance(found, Workbench) and callable(found):
        found = found()
    if not isinstance(found, Workbench):
        raise click.UsageError(f"--app {app_string} is a {type(found).__name__}, not a Workbench (or a function "
                               "returning one)")
    return found


@main.group()
def keys() -> None:
    """API keys of `workbench serve`, in the store of WORKBENCH_HOME (or WORKBENCH_STORE): set those as for an
    --app Workbench made with home= or store= of its own."""


@contextmanager
def _store() -> Iterator[Store]:
    from .config import default_home
    from .sandbox import private_dir
    from .store import open_store

    home = default_home()
    private_dir(home)
    store = open_store(None, home)
    try:
        yield store
    finally:
        store.close()


@keys.command("create")
@click.argument("name")
def keys_create(name: str) -> None:
    """Make an API key; it is printed once (only its hash is kept)."""
    from .server.auth import create_key

    with _store() as store:
        record, key = create_key(store, name)
    console.print(f"key {record.key_id} ({escape(record.name)}): shown once, keep it now")
    out.print(key)


@keys.command("list")
def keys_list() -> None:
    """The API keys (never the keys themselves)."""
    table = Table("id", "name", "created", "status")
    with _store() as store:
        records = store.api_keys()
    for record in records:
        table.add_row(record.key_id, Text(record.name), _when(record.created_at),
                      "active" if record.active else f"revoked {_when(record.revoked_at or 0)}")
    out.print(table)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key: the server refuses it from the next request on."""
    with _store() as store:
        revoked = store.revoke_api_key(key_id)
    if not revoked:
        raise click.ClickException(f"no active key {key_id!r} (see workbench keys list)")
    console.print(f"revoked {escape(key_id)}")


@main.command()
def gc() -> None:
    """Remove orphan containers and pause sessions idle past the idle timeout."""
    wb = _workbench(reap=True)
    first, again = wb.startup_gc, wb.gc()  # a workbench cleans up as it starts: report that too
    for line in first.removed + again.removed:
        out.print(f"removed {line}")
    for session_id in first.paused + again.paused:
        out.print(f"paused idle session {session_id} (its variables saved)")
    for session_id in first.stopped + again.stopped:
        out.print(f"stopped idle kernel of {session_id} (its variables could not be saved)")
    for session_id in dict.fromkeys(first.over_cap + again.over_cap):
        out.print(f"stopped the kernel of {session_id}: its workspace is past its size cap")
    for line in dict.fromkeys(again.unknown):  # still running now: the start-up gc saw the same ones
        out.print(f"left alone (running, session unknown to the store) {line}")
    if not (first.removed or first.paused or first.stopped or first.over_cap or again.removed or again.paused
            or again.stopped or again.over_cap or again.unknown):
        out.print("nothing to clean")


if __name__ == "__main__":
    main()

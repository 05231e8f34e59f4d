"""Shell commands in a session's sandbox: `session.commands.run(cmd)`, like E2B's `sandbox.commands.run`.

A command runs in the sandbox of the session's kernel through the backend's `Sandbox.exec` (for Docker, the Engine
API's exec, so the container's limits apply: its cgroup, network none, no capabilities, no-new-privileges, read-only
root), as the sandbox uid, in /workspace, with stdin closed. It does not go through the kernel, so it runs while a
cell runs.

Every process of a command carries a group id of its own: the exec runs with a random gid that no other process
has, and no process in the sandbox can change its gid (no capabilities; no-new-privileges stops setgid programs).
Whatever a command starts keeps it: setsid, a double fork, nohup, a cleared environment. Past the timeout, a killer
started in the sandbox (a second exec, as the sandbox uid with the command's gid, leaving itself out) stops and
kills every process with that gid until none is left; the kernel and its children have the sandbox's gid and are
never touched. When the command's main process exits, the processes it left that still hold its stdout or stderr
(`sleep 1000 &`) are killed the same way, so `run` returns; ones that let go of them (`nohup job > log 2>&1 &`)
keep running in the session's container until it stops.

Limits: the killer runs as the sandbox uid, so a command can fight it (kill or stop it) and escape the kill, or hand
work to the kernel (whose processes do not carry the gid); and when a command holds all of the container's pids,
the killer may not start (it is tried again for a few seconds). Such processes stay bounded by the container's
pids, memory and CPU limits, and end with the container (the idle reaper, `close`).
"""
from __future__ import annotations

import codecs
import grp
import logging
import math
import posixpath
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .backends import Sandbox, SandboxGone, SandboxProcess
from .errors import BackendUnavailableError, PathOutsideWorkspaceError, SessionError
from .execution import Capped
from .files import OUTPUTS
from .results import CommandResult
from .sandbox import SANDBOX_UID, WORKSPACE

if TYPE_CHECKING:
    from .files import Files
    from .store import Store


class LogEntryWriter(Protocol):
    """Writes one log entry of the session (with its metadata)."""

    def __call__(self, kind: str, status: str, duration: float, detail: dict[str, Any], *, touch: bool = ...) -> None:
        ...

log = logging.getLogger(__name__)

MAX_TIMEOUT = 24 * 3600.0  # seconds
MAX_COMMAND = 128 * 1024 - 1  # bytes of UTF-8 in a command, or in one NAME=value: Linux's limit on one argument
MAX_ENV = 256  # variables given to one command
MAX_ENV_BYTES = 512 * 1024  # bytes of them all
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")  # always fullmatch
_COMMAND_IN_LOG = 10_000  # characters of a command kept in its log entry
SHELL = "/bin/bash"
_FIRST_POLL, _MAX_POLL = 0.1, 1.0  # seconds between looks at whether the main process exited (doubling)
_EOF_AFTER_EXIT = 0.2  # seconds the output's end may lag the main process's exit before leftovers are looked for
_CLOSE_GRACE = 3.0  # seconds given to the output's end after a kill (the engine ends it 2 s after the exit anyway)
_KILL_TIMEOUT = 10.0  # seconds for the killer, tries included
_GID_BASE, _GID_RANGE = 1_000_000_000, 1 << 30  # marker gids: above the ids hosts give, below 2**31 (runc)

# Run as the sandbox uid with the command's gid (only then may it read their fds): kills the other processes whose
# real gid is argv[1] ("all"), or those of them holding the write end of a pipe none of them reads ("holders": the
# command's stdout and stderr, read by the engine), stopping each before the kill so that none forks past it, until
# none is left.
_KILLER = r"""
import os, signal, sys, time
gid, mode, me = sys.argv[1], sys.argv[2], str(os.getpid())

def fields(pid):
    try:
        with open("/proc/%s/status" % pid) as f:
            return dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, ValueError):
        return {}

def pids():
    return [p for p in os.listdir("/proc") if p.isdigit()]

def marked():
    found = []
    for pid in pids():
        if pid == me:
            continue
        info = fields(pid)
        if info.get("Gid", "").split()[:1] == [gid] and info.get("State", "").split()[:1] not in (["Z"], ["X"]):
            found.append(pid)
    return found

def pipe_ends(pid):
    ends = []
    try:
        fds = os.listdir("/proc/%s/fd" % pid)
    except OSError:
        return ends
    for fd in fds:
        try:
            target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            if not target.startswith("pipe:"):
                continue
            with open("/proc/%s/fdinfo/%s" % (pid, fd)) as f:
                flags = [int(line.split()[1], 8) for line in f if line.startswith("flags:")][0]
        except (OSError, ValueError, IndexError):
            continue
        ends.append((target, flags & 3))
    return ends

def holders(found):
    read = set()
    for pid in pids():
        read.update(target for target, access in pipe_ends(pid) if access != 1)
    return [pid for pid in found if any(access != 0 and target not in read for target, access in pipe_ends(pid))]

killed, end = 0, time.monotonic() + 5
while True:
    targets = marked()
    if mode == "holders":
        targets = holders(targets)
    if not targets or time.monotonic() > end:
        break
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in targets:
            try:
                os.kill(int(pid), sig)
            except OSError:
                pass
    killed += len(targets)
    time.sleep(0.005)
print("killed %d left %d" % (killed, len(targets)))
"""
_KILLED = re.compile(rb"killed (\d+) left (\d+)")


class Commands:
    """Shell commands in the session's sandbox: `session.commands.run("ls -la")`."""

    def __init__(
        self,
        session_id: str,
        *,
        store: Store,
        files: Files,
        sandbox: Callable[[str], Sandbox],
        start_kernel: Callable[[float], str],
        check_open: Callable[[], None],
        log_entry: LogEntryWriter,
        output_limit: int,
        idle_timeout: float | None,
    ) -> None:
        """What a session gives its commands: its store, files and log, `sandbox(id)` (the backend's handle on a
        sandbox), `start_kernel(timeout)` to get its kernel's sandbox id when the store names none running (started
        as an execution would), and `check_open` (raises SessionClosedError)."""
        self.session_id = session_id
        self._sandbox, self._store, self._files = sandbox, store, files
        self._start_kernel, self._check_open, self._log_entry = start_kernel, check_open, log_entry
        self._output_limit, self._idle_timeout = output_limit, idle_timeout
        self._logger = logging.LoggerAdapter(log, {"session_id": session_id})

    def run(
        self,
        cmd: str,
        *,
        timeout: float = 60,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
    ) -> CommandResult:
        """Run `cmd` with bash in the session's sandbox and return its exit code and output.

        It runs as the sandbox user in /workspace (or `cwd`, relative to it or an absolute path under it), with
        the sandbox's environment plus `env`, and stdin closed; output streams to `on_stdout` / `on_stderr` as
        it comes and is kept up to the workbench's `output_limit` per stream (the whole stream goes to
        `.outputs/` in the workspace past it). Past `timeout` seconds the command and every process it started
        are killed (`timed_out`, no exit code); the kernel is never touched and may run a cell meanwhile. When
        the command's main process exits, processes it left that still hold its output are killed. When the
        session has no running kernel (stopped when idle), one is started first, as an execution would.
        """
        _check_command(cmd)
        timeout = _check_timeout(timeout)
        workdir = _check_cwd(cwd)
        variables = _check_env(env)
        self._check_open()
        started = time.monotonic()
        result: CommandResult | None = None
        failure: BaseException | None = None
        try:
            result = self._run(cmd, timeout, workdir, variables, on_stdout, on_stderr)
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._log(cmd, workdir or WORKSPACE, result, failure, time.monotonic() - started)

    def _run(self, cmd: str, timeout: float, workdir: str | None, variables: list[str] | None,
             on_stdout: Callable[[str], Any] | None, on_stderr: Callable[[str], Any] | None) -> CommandResult:
        record = self._store.get(self.session_id)
        if record.status == "open" and record.kernel is not None:
            sandbox_id = record.kernel.sandbox_id  # running, as far as the store knows: no lock to wait for
        else:
            sandbox_id = self._start_kernel(timeout)  # closed (raises), or no kernel: start one
        gid = _marker_gid()
        argv = [SHELL, "-c", cmd] if workdir is None else [
            SHELL, "-c", 'cd -- "$1" && exec "$0" -c "$2"', SHELL, workdir, cmd]
        self._store.touch(self.session_id)
        try:
            sandbox = self._sandbox(sandbox_id)
            execution = sandbox.exec(argv, uid=SANDBOX_UID, gid=gid, workdir=WORKSPACE, env=variables)
        except SandboxGone:  # the store's kernel is gone (removed, stopped): get one as an execution would
            try:
                sandbox = self._sandbox(self._start_kernel(timeout))
                execution = sandbox.exec(argv, uid=SANDBOX_UID, gid=gid, workdir=WORKSPACE, env=variables)
            except SandboxGone as exc:
                raise SessionError(f"session {self.session_id}: its sandbox is not running: {exc}") from None
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        streams = {name: _Stream(Capped(self._output_limit, _spill_opener(
            self._files, f"{OUTPUTS}/{stamp}.cmd.{name}.txt")), callback)
            for name, callback in (("stdout", on_stdout), ("stderr", on_stderr))}
        result = CommandResult()
        try:
            self._follow(execution, sandbox, gid, timeout, streams, result)
        except BaseException:  # e.g. a callback raised, or this thread was interrupted
            for stream in streams.values():
                stream.callback = None  # (it may be what raised)
            execution.close()  # first: the engine must not wait on output nobody reads (see _follow)
            _kill(sandbox, gid, "all")
            raise
        finally:
            execution.close()
            for name, stream in streams.items():
                stream.add(b"", final=True)
                spilled = stream.capped.finish()
                setattr(result, name, stream.capped.value(spilled))
                if stream.capped.cut:
                    result.truncated[name] = stream.capped.cut
                if spilled:
                    result.spilled[name] = spilled
        result.duration = time.monotonic() - execution.started
        return result

    def _follow(self, execution: SandboxProcess, sandbox: Sandbox, gid: int, timeout: float,
                streams: dict[str, _Stream], result: CommandResult) -> None:
        """Read the command's output until it ends, its timeout, or (once its main process exited) the leftovers
        holding it were killed; set the exit code, or `timed_out`. A kill runs on a thread of its own while the
        output is still read: the engine handles a container's exits one at a time, and one whose output is not
        read holds up the killer's."""
        store = self._store
        idle = self._idle_timeout
        beat = max(0.5, min(10.0, (idle or 30.0) / 3))  # keeps the idle reaper off while the command runs
        sinks = {1: streams["stdout"].add, 2: streams["stderr"].add}
        now = execution.started
        deadline, next_beat = now + timeout, now + beat
        poll, next_poll = _FIRST_POLL, now + _FIRST_POLL
        exited_at: float | None = None
        killing: threading.Thread | None = None
        killed_at: float | None = None  # when the kill ended: the output gets _CLOSE_GRACE more to end
        try:
            while True:
                now = time.monotonic()
                if killing is not None and killed_at is None and not killing.is_alive():
                    killed_at = now
                if execution.eof and (exited_at is not None or result.timed_out) and (
                        killing is None or killed_at is not None):
                    return
                if killed_at is not None and now >= killed_at + _CLOSE_GRACE:
                    log.warning("command's output did not end %.0fs after its processes were killed; closed it",
                                _CLOSE_GRACE, extra={"session_id": self.session_id})
                    return
                if exited_at is None and not result.timed_out:
                    if now >= deadline:
                        result.timed_out = True
                        killing = _killing(sandbox, gid, "all")
                        continue
                    if now >= next_poll or execution.eof:
                        running, code, gone = execution.poll()
                        poll = min(poll * 2, _MAX_POLL) if not execution.eof else 0.01  # its exit is near
                        next_poll = time.monotonic() + poll
                        if gone is not None:
                            result.error = gone
                            return
                        if not running:
                            exited_at, result.exit_code = now, code
                            continue
                elif exited_at is not None and killing is None and now >= exited_at + _EOF_AFTER_EXIT:
                    killing = _killing(sandbox, gid, "holders")  # they still hold its output
                    continue
                if now >= next_beat:
                    store.touch(self.session_id)
                    next_beat = now + beat
                wake = [next_beat, killed_at + _CLOSE_GRACE if killed_at is not None else math.inf]
                if exited_at is None and not result.timed_out:
                    wake += [deadline, next_poll]
                elif exited_at is not None and killing is None:
                    wake.append(exited_at + _EOF_AFTER_EXIT)
                wait = min(max(min(wake) - now, 0.0), 0.05 if killing is not None and killed_at is None else 0.5)
                if execution.eof:
                    time.sleep(wait)
                else:
                    execution.pump(wait, sinks)
        finally:
            if killing is not None:
                killing.join()

    def _log(self, cmd: str, cwd: str, result: CommandResult | None, failure: BaseException | None,
             duration: float) -> None:
        """Log a command, whatever became of it, before its result is returned: ok, error (a non-zero exit, or no
        exit code), timeout, or failed (it raised). A shell command may run beside a cell: its entry is committed
        without clearing the cell's busy mark (see `Store.touch`)."""
        if result is None or failure is not None:
            status = "failed"
        else:
            status = "timeout" if result.timed_out else "ok" if result.exit_code == 0 else "error"
        detail = {
            "command": cmd[:_COMMAND_IN_LOG],
            "exit_code": result.exit_code if result else None,
            "cwd": cwd,
            "error": (f"{type(failure).__name__}: {str(failure)[:2000]}" if failure is not None
                      else result.error if result else None),
        }
        try:
            self._log_entry("command", status, result.duration if result and not failure else duration, detail,
                            touch=False)
            self._store.flush()
            self._store.touch(self.session_id)
        except Exception:
            if failure is None:
                raise  # the result is not returned unlogged
            self._logger.exception("could not log a failed command")
            return
        self._logger.info("command %s in %.3fs", status, duration)


class _Stream:
    """One output stream: decoded as UTF-8 across chunk boundaries, kept within the limit, handed to a callback."""

    def __init__(self, capped: Capped, callback: Callable[[str], Any] | None) -> None:
        self.capped = capped
        self.callback = callback
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        if text:
            self.capped.add(text)
            if self.callback is not None:
                self.callback(text)


def _spill_opener(files: Files, path: str) -> Callable[[], Any]:
    return lambda: files.writer(path)


def _kill(sandbox: Sandbox, gid: int, mode: str) -> None:
    """Kill every process of the command ("all") or those holding its output ("holders"), with a killer started in
    the sandbox; for "all", when that fails (the command fought the killer, or holds every pid the sandbox may have
    so that it cannot start), from outside as well (`Sandbox.kill_processes`). Tried again until _KILL_TIMEOUT; what
    fails is logged."""
    assert gid != SANDBOX_UID  # the kernel's gid: never
    deadline = time.monotonic() + _KILL_TIMEOUT
    pause = 0.05
    while True:
        done, said = _run_killer(sandbox, gid, mode, deadline)
        if done or (mode == "all" and sandbox.kill_processes(gid)):
            return
        if time.monotonic() + pause >= deadline:
            log.warning("could not kill a command's processes (%s): %s", mode, said)
            return
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def _killing(sandbox: Sandbox, gid: int, mode: str) -> threading.Thread:
    """`_kill` started on a thread of its own."""
    def kill() -> None:
        try:
            _kill(sandbox, gid, mode)
        except Exception:  # logged; the command's result is still returned
            log.exception("killing a command's processes failed")

    thread = threading.Thread(target=kill, name="workbench-command-kill", daemon=True)
    thread.start()
    return thread


def _run_killer(sandbox: Sandbox, gid: int, mode: str, deadline: float) -> tuple[bool, str]:
    """Run the killer once: whether it left none of its targets, and what it said."""
    try:
        killer = sandbox.exec(["python3", "-I", "-S", "-c", _KILLER, str(gid), mode], uid=SANDBOX_UID, gid=gid,
                              workdir="/")
    except SandboxGone:
        return True, "the sandbox is gone"  # and the command's processes with it
    except BackendUnavailableError as exc:
        return False, str(exc)
    try:
        said, code = killer.collect(deadline)
    except BackendUnavailableError as exc:
        return False, str(exc)
    finally:
        killer.close()
    match = _KILLED.search(said)
    text = said[:300].decode(errors="replace").strip()
    return code == 0 and match is not None and match.group(2) == b"0", f"exit code {code}: {text}"


def _marker_gid() -> int:
    """A gid for one command's processes: not the sandbox's, and no host group's (files it makes carry it)."""
    for _ in range(100):
        gid = _GID_BASE + secrets.randbelow(_GID_RANGE)
        if gid == SANDBOX_UID:
            continue
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
    raise SessionError("no free group id for a command")  # only a host with groups at all of these ids


def _check_command(cmd: object) -> None:
    if not isinstance(cmd, str):
        raise SessionError(f"a command must be a str, not {type(cmd).__name__}")
    if not cmd.strip():
        raise SessionError("a command must not be empty")
    if "\0" in cmd:
        raise SessionError("a command must not contain NUL characters")
    try:
        size = len(cmd.encode())
    except UnicodeEncodeError:
        raise SessionError("a command must be text that encodes as UTF-8 (it holds a lone surrogate)") from None
    if size > MAX_COMMAND:
        raise SessionError(f"a command is at most {MAX_COMMAND:,} bytes of UTF-8, not {size:,}: put a longer script "
                           "in a workspace file and run that")


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise SessionError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise SessionError(f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds, not {timeout!r}")
    return float(timeout)


def _check_cwd(cwd: object) -> str | None:
    """The folder a command starts in, as an absolute path under /workspace (None: /workspace itself)."""
    if cwd is None:
        return None
    if not isinstance(cwd, str):
        raise SessionError(f"cwd must be a str, not {type(cwd).__name__}")
    if "\0" in cwd or len(cwd) > 4096:
        raise SessionError("cwd must be a path of at most 4096 characters, without NUL")
    try:
        cwd.encode()
    except UnicodeEncodeError:
        raise SessionError("cwd must encode as UTF-8") from None
    path = posixpath.normpath(posixpath.join(WORKSPACE, cwd))
    if path == WORKSPACE:
        return None
    if not path.startswith(WORKSPACE + "/"):
        raise PathOutsideWorkspaceError(f"cwd {cwd[:200]!r} leaves the workspace: give a folder relative to "
                                        f"{WORKSPACE}, or an absolute path under it")
    return path


def _check_env(env: object) -> list[str] | None:
    """`env` as the exec's NAME=value list, each name and value checked."""
    if env is None:
        return None
    if not isinstance(env, dict):
        raise SessionError(f"env must be a dict of str to str, not {type(env).__name__}")
    if len(env) > MAX_ENV:
        raise SessionError(f"env may hold at most {MAX_ENV} variables, not {len(env)}")
    entries, total = [], 0
    for name, value in env.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            shown = repr(name[:100]) if isinstance(name, str) else f"a {type(name).__name__}"
            raise SessionError(f"env: {shown} is not a variable name (letters, digits and _, not starting with a "
                               "digit, at most 256 characters)")
        if not isinstance(value, str):
            raise SessionError(f"env: the value of {name} must be a str, not {type(value).__name__}")
        if "\0" in value:
            raise SessionError(f"env: the value of {name} must not contain NUL characters")
        try:
            size = len(name) + 1 + len(value.encode())
        except UnicodeEncodeError:
            raise SessionError(f"env: the value of {name} must encode as UTF-8") from None
        if size > MAX_COMMAND:
            raise SessionError(f"env: {name}=... is {size:,} bytes, over the {MAX_COMMAND:,} one variable may take")
        total += size
        entries.append(f"{name}={value}")
    if total > MAX_ENV_BYTES:
        raise SessionError(f"env takes {total:,} bytes, over the {MAX_ENV_BYTES:,} allowed")
    return entries

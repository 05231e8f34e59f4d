"""Workbench: the entry point that creates and finds sessions."""
from __future__ import annotations

import builtins
import errno
import hashlib
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any, TypeVar

from docker import DockerClient
from pydantic import BaseModel, Field

from . import fstree
from .agent.answers import DEFAULT_LIMIT, MIN_LIMIT
from .backends import Backend, load_backend
from .backends.docker import DockerBackend
from .config import Limits, default_home, default_runtime_root
from .errors import (
    ReplicaUnavailableError,
    SessionClosedError,
    SessionError,
    SessionNotFoundError,
    WorkbenchError,
    WorkspaceFullError,
)
from .kernel import LABEL_KERNEL, Kernel, runtime_dir_of
from .kernelspec import KernelSpec, kernel_spec
from .pool import LABEL_POOL, WarmPool, discard_kernel, owner_alive
from .sandbox import check_sandbox_uid, hand_over, private_dir
from .session import Session, SessionServices
from .store import PausedState, SessionConfig, SessionRecord, Store, open_store
from .tools import ToolRegistry
from .tools.bridge import BridgeServer
from .tools.pipeline import ToolPipeline
from .workspace import Workspace, mounts_under, quota_support, release_runtime_dir

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

_USER_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")  # always fullmatch: `$` would let a trailing newline in
_START_GRACE = 120.0  # a container younger than this may be a kernel another process is still starting
WATCH_INTERVAL = 10.0  # seconds between passes of the plain-folder watchdog (see _watch_plain_workspaces)
IDLE_WORKERS = 4  # idle sessions paused at once: a slow save holds one of them, never the others
WATCH_SHARE = 0.05  # at most this share of one core for its walks: a workspace is walked again only after
# its last walk's duration divided by this (a walk of 0.5 s: at most every 10 s)


class GcReport(BaseModel):
    """What `Workbench.gc` did."""

    removed: list[str] = Field(default_factory=list, description="containers removed, as 'name: reason'")
    paused: list[str] = Field(default_factory=list, description="idle sessions paused: variables saved in the "
                              "workspace, kernel stopped")
    stopped: list[str] = Field(default_factory=list, description="idle sessions whose kernel was stopped without "
                               "their variables (they could not be saved; the next result says why)")
    over_cap: list[str] = Field(default_factory=list, description="sessions whose kernel was stopped for filling "
                                "its workspace past workspace_size (plain-folder workspaces: no filesystem quota)")
    unknown: list[str] = Field(default_factory=list, description="running containers of sessions the store does "
                               "not know, left alone (a new or restored store), as 'name: session id'")


class Workbench:
    """Sessions on the local Docker engine, with embedded defaults.

    >>> wb = Workbench()
    >>> with wb.create(user_id="user_123") as s:
    ...     s.execute("x = 41\\nx + 1").text
    '42'
    """

    def __init__(
        self,
        *,
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
        docker_client: DockerClient | None = None,
        replica: str | None = None,
        idle_save_timeout: float = 60.0,
    ) -> None:
        """`kernel`: the kernel language, by name or as a `KernelSpec` (Python, "python3", is the only one so far);
        `image`: the image its sandboxes run (default: the kernel spec's).
        `idle_timeout` (seconds; None turns it off): a session unused this long is paused (its variables saved,
        its kernel stopped) and resumed on its next use. Orphan containers are removed at start-up.
        `idle_save_timeout` (seconds, at most `execute_timeout`): how long such a pause may take to save the variables;
        one that takes longer (a huge namespace, an object that stalls its pickling) stops the kernel without them,
        and the session's next result says why. Idle sessions are paused a few at a time: a slow one holds back no
        other.
        `offload_threshold`: a session's default for tool responses (bytes of JSON) kept inline.
        `tool_timeout`: seconds a tool call may take before it is reported as timed out.
        `pool_size`: kernels kept ready per limits tier once a tier was asked for (0 turns the warm pool off).
        `answer_limit`: characters a model reads of one meta-tool answer (`Session.handle_tool_call`); the rest is
        written to the workspace and the answer says where.
        `backend`: where sandboxes run, by name (from the `workbench.backends` entry points) or as a `Backend`;
        `docker_client` is the Docker backend's engine client (default: DOCKER_HOST, or the local socket).
        `store`: where sessions, configs and logs are kept: a Store, or a `postgresql://` DSN (default:
        WORKBENCH_STORE's DSN when set, else SQLite, `workbench.db` under the home); the workbench closes it when it
        closes.
        `replica` (default: WORKBENCH_REPLICA, else none): this workbench's name as one replica of a cluster that
        shares the store; it keeps to the sessions placed on it (each replica runs its sessions on its own host)."""
        if not isinstance(answer_limit, int) or answer_limit < MIN_LIMIT:
            raise WorkbenchError(f"answer_limit must be at least {MIN_LIMIT} characters, not {answer_limit!r}")
        if not idle_save_timeout > 0:
            raise WorkbenchError(f"idle_save_timeout must be a number of seconds above 0, not {idle_save_timeout!r}")
        self.answer_limit = answer_limit
        self.replica = replica if replica is not None else os.environ.get("WORKBENCH_REPLICA") or None
        self.home = Path(home) if home is not None else default_home()
        self.kernel_spec = kernel_spec(kernel)
        self.image = image or self.kernel_spec.image
        self.limits = limits or Limits()
        self.execute_timeout = execute_timeout
        self.output_limit = output_limit
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = load_backend(backend, **({"client": docker_client} if docker_client is not None else {}))
        self.runtime_root = default_runtime_root()
        # Private to the host user: another host uid reaches no workspace, kernel.json (its HMAC key) or bridge.
        check_sandbox_uid()
        for root in (self.home, self.workspaces_root, self.home / "disks", self.runtime_root):
            private_dir(root)
        self.disk_quota = quota_support(self.home / "disks")[0]  # warns once when workspaces are plain folders
        # Containers are labelled with their home so that two workbenches on one engine never touch each other's.
        self.home_label = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:16]
        self.store = open_store(store, self.home)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._image_checked = False
        self._image_pin: tuple[str, dict[str, str]] | None = None  # (image id, its Python trees' mounts)
        self.offload_threshold = offload_threshold
        self.tool_timeout = tool_timeout
        self.tools = ToolRegistry()
        self.pipeline = ToolPipeline(self.tools, lambda: self.tool_timeout)
        """The one tool-call pipeline every session's calls go through."""
        self._bridge = BridgeServer(lambda: self.tool_timeout)
        self.idle_timeout = idle_timeout
        self.idle_save_timeout = idle_save_timeout
        self._idle_queue: queue.SimpleQueue[tuple[SessionRecord, float, Future[PausedState | None]] | None] = (
            queue.SimpleQueue())
        self._idle_workers: list[threading.Thread] = []  # started on first need
        self._pausing: dict[str, Future[PausedState | None]] = {}  # sessions an idle pause is queued or under way for
        self._pausing_lock = threading.Lock()
        self._stop = threading.Event()
        self._next_walk: dict[str, float] = {}  # session id -> when the watchdog may walk its workspace again
        self._services = SessionServices(
            home=self.home, store=self.store, pipeline=self.pipeline, bridge=self._bridge, backend=self.backend,
            execute_timeout=execute_timeout, tool_timeout=tool_timeout, answer_limit=answer_limit,
            output_limit=output_limit, idle_timeout=idle_timeout, limits=self._limits,
            remove_sandboxes=self._remove_containers, release_runtime_dir=self._release_runtime_dir,
            forget=self._forget, open_fork=self._open_fork)
        self.pool = WarmPool(lambda session_id, limits, owner: self._new_kernel_object(
            session_id, limits, user_id=None, pool_owner=owner), pool_size)
        self.startup_gc = self.gc()
        self._reaper: threading.Thread | None = None
        if idle_timeout:
            self._reaper = threading.Thread(target=self._reap, name="workbench-reaper", daemon=True)
            self._reaper.start()
        self._watchdog: threading.Thread | None = None
        if not self.disk_quota:  # plain folders: nothing stops a kernel at its cap but this, idle_timeout or not
            self._watchdog = threading.Thread(target=self._watch, name="workbench-watchdog", daemon=True)
            self._watchdog.start()

    @property
    def docker(self) -> DockerClient:
        """The Docker backend's engine client (raises WorkbenchError with another backend)."""
        return self._docker_backend().client

    @property
    def engine_security(self) -> list[str]:
        """The Docker engine's security options as it reports them (seccomp, AppArmor, user namespaces...)."""
        return self._docker_backend().security

    def _docker_backend(self) -> DockerBackend:
        if not isinstance(self.backend, DockerBackend):
            raise WorkbenchError(f"the workbench runs on the {self.backend.name!r} backend, not on Docker")
        return self.backend

    @property
    def workspaces_root(self) -> Path:
        return self.home / "workspaces"

    def _disk(self, session_id: str, size: int) -> Workspace:
        """A session's workspace: the folder `workspaces/<id>`, and where supported the filesystem image
        `disks/<id>.img` mounted there."""
        return Workspace(self.workspaces_root / session_id, size, image=self.home / "disks" / f"{session_id}.img")

    def build_image(self, progress: Callable[[str], None] = lambda _: None, force: bool = False) -> bool:
        """Build the kernel image when missing or stale. Returns True when it built."""
        built = self.backend.ensure_image(self.image, progress=progress, force=force)
        self._image_checked, self._image_pin = True, None
        return built

    def _check_image(self) -> None:
        if not self._image_checked:
            self.backend.require_image(self.image)
            self._image_checked = True

    def _sandbox_image(self) -> tuple[str, dict[str, str]]:
        """The kernel image's id and its Python trees' mounts, found once (see image.pin)."""
        if self._image_pin is None:
            self._image_pin = self.backend.pin_image(self.image)
        return self._image_pin

    def tool(self, slug: str | None = None, *, toolkit: str = "default",
             description: str | None = None) -> Callable[[F], F]:
        """Register a function as a tool: `@wb.tool(slug="GITHUB_LIST_ISSUES", toolkit="github")`.

        Its arguments are validated with pydantic from its type hints (`Tool.schema` is their JSON Schema); a
        parameter annotated `ToolContext` receives the caller's user and session ids. The function runs on the
        host, so credentials never enter a sandbox.
        """
        def register(fn: F) -> F:
            self.tools.register(fn, slug=slug, toolkit=toolkit, description=description)
            return fn

        return register

    def create(
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
    ) -> Session:
        """Open a new session for one user, with its own kernel and workspace, allowed the tools of `toolkits`
        and the single `tools` named. `metadata` (string keys and values, e.g. a correlation id) is stored with
        the session, given to every tool call (`ToolContext.metadata`) and written into every log entry.

        `from_session` forks that session of the same user instead (see `Session.fork`): config, metadata,
        workspace and variables are copied, so the other settings must be left out."""
        if from_session is not None:
            if any(value is not None for value in (toolkits, tools, limits, offload_threshold, metadata)):
                raise SessionError("a fork copies its source's config and metadata: leave the other settings out and "
                                   "change them with update() afterwards")
            source = self.use(from_session)
            if source.user_id != user_id:
                raise SessionNotFoundError(f"no session {from_session!r} of user {user_id!r}")
            return source.fork()
        if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
            raise SessionError("user_id must be 1 to 128 characters of letters, digits and _ . @ : -")
        if user_id == "default" and not allow_default_user:
            raise SessionError(
                'user_id="default" would share one user\'s data with every other caller; pass a real user id '
                "(or allow_default_user=True for local experiments)"
            )
        self._check_image()
        config = SessionConfig(limits=self._limits(limits), offload_threshold=self.offload_threshold).changed(
            toolkits=toolkits, tools=tools, offload_threshold=offload_threshold, metadata=metadata or {})
        warm = self.pool.take(config.limits)
        now = time.time()
        record = SessionRecord(session_id=warm[0] if warm else secrets.token_hex(6), user_id=user_id, status="open",
                               config=config, config_version=1, created_at=now, last_used_at=now,
                               replica=self.replica)
        try:
            self.store.add(record)
        except BaseException:
            if warm is not None:
                discard_kernel(warm[1])  # its container, runtime dir and (never used) workspace image
            raise
        kernel = warm[1] if warm is not None else self._kernel(record)
        try:
            if warm is None:
                kernel.start()
            self.store.set_kernel(record.session_id, kernel.record())
        except BaseException:
            # nothing of a session that never opened stays: no container, no runtime dir, no mounted image
            discard_kernel(kernel)
            try:
                self.store.set_status(record.session_id, "closed")
            except Exception as exc:
                log.warning("could not mark session %s closed: %s", record.session_id, exc)
            raise
        return self._register(Session(self._services, record, kernel))

    def use(self, session_id: str) -> Session:
        """The session with this id, also one created by another process or before a restart.

        A still-running kernel is reattached with its variables; if it is gone, a new one starts on the same
        workspace and the session's next result says that variables were lost.
        """
        with self._lock:
            if session_id in self._sessions:
                return self._sessions[session_id]
        record = self.store.get(session_id)
        if record.status != "open":
            raise SessionClosedError(f"session {session_id} is closed")
        if record.replica != self.replica:
            raise ReplicaUnavailableError(
                f"session {session_id} runs on replica {record.replica or '(none: a standalone workbench)'}, not on "
                f"{self.replica or 'this standalone workbench'}: reach it through that replica")
        # The kernel is reattached (or started anew) on first need, so files and close() never wait for it.
        return self._register(Session(self._services, record, self._kernel(record)))

    def list(self, user_id: str | None = None, metadata: dict[str, str] | None = None) -> list[SessionRecord]:
        """The open sessions, of one user or of all, and with every `metadata` key at the value given."""
        return self.store.list(user_id=user_id, metadata=metadata)

    def gc(self) -> GcReport:
        """Remove containers the store says are done with (their session closed, or on another kernel now, or the
        kernel stopped), stopped containers of unknown sessions and warm kernels of workbenches that are gone, and
        pause the sessions idle past `idle_timeout` (see `idle_save_timeout`; the next use resumes them). A running
        kernel of a session the store does not know is left alone and listed in `unknown`: an empty or restored
        store must not end kernels it never heard of. A session the idle reaper is pausing already is left to it
        (not in the report)."""
        return self._gc(wait=True)

    def _gc(self, wait: bool) -> GcReport:
        """`gc`; without `wait`, idle sessions' pauses are left under way (the reaper's passes: it never waits for a
        slow one) and are not in the report."""
        report = GcReport()
        for container in self.backend.list_managed({"workbench.home": self.home_label}):
            session_id = container.labels.get("workbench.session", "")
            kernel_id = container.labels.get(LABEL_KERNEL, "")
            try:
                record: SessionRecord | None = self.store.get(session_id)
            except SessionNotFoundError:
                record = None
            if record is None and LABEL_POOL in container.labels:
                if owner_alive(container.labels[LABEL_POOL]):
                    continue  # ready in a live workbench's warm pool
                reason = "warm pool of a workbench that is gone"
            elif record is None:
                if container.live:
                    report.unknown.append(f"{container.name}: {session_id}")
                    continue
                reason = f"session unknown, container {container.status}"
            elif record.status != "open":
                reason = f"session {record.status}"
            elif record.kernel is None or record.kernel.kernel_id != kernel_id:
                if container.age < _START_GRACE:
                    continue  # maybe a kernel being started right now
                reason = "no longer the session's kernel"
            elif container.status not in ("running", "created", "restarting"):
                if not self.store.release_kernel(session_id, kernel_id):
                    continue
                reason = f"kernel {container.status}"
            else:
                continue
            if self.backend.destroy(container.id):
                report.removed.append(f"{container.name}: {reason}")
            source = container.runtime_source
            if source is not None and kernel_id and source == self._runtime_dir(session_id, kernel_id):
                # that kernel's own runtime dir: no other kernel ever uses it, so it goes with its container
                self._release_path(session_id, source)
            elif record is None or record.status != "open" or reason.startswith("kernel "):
                self._release_runtime_dir(session_id, source)  # a runtime dir of an older layout
            self._release_workspace(session_id, record, pooled=LABEL_POOL in container.labels)
        if self.idle_timeout:
            idle_before = time.time() - self.idle_timeout
            pausing = [(record.session_id, self._pause_idle_later(record, idle_before))
                       for record in self._own_sessions()
                       if record.kernel is not None and max(record.last_used_at, record.busy_until) < idle_before]
            for session_id, future in pausing:
                if not wait or future is None:
                    continue
                try:
                    paused = future.result()
                except CancelledError:  # the workbench is closing
                    continue
                if paused is not None:
                    (report.paused if paused.error is None else report.stopped).append(session_id)
        self._unmount_closed_workspaces()
        self._watch_plain_workspaces(report, bounded=False)  # also a plain folder of a host with images (older)
        return report

    def _pause_idle_later(self, record: SessionRecord, idle_before: float) -> Future[PausedState | None] | None:
        """Queue an idle session's pause for the idle workers; None when a pause of it is queued or under way
        already, or the workbench is closing."""
        with self._pausing_lock:
            if record.session_id in self._pausing or self._stop.is_set():
                return None
            if not self._idle_workers:  # daemon threads: a process that ends waits for no idle session's save
                self._idle_workers = [threading.Thread(target=self._idle_worker, name="workbench-idle", daemon=True)
                                      for _ in range(IDLE_WORKERS)]
                for worker in self._idle_workers:
                    worker.start()
            future: Future[PausedState | None] = Future()
            self._pausing[record.session_id] = future
        self._idle_queue.put((record, idle_before, future))
        return future

    def _idle_worker(self) -> None:
        """Pause the idle sessions queued, one at a time, until the workbench closes."""
        while (item := self._idle_queue.get()) is not None:
            record, idle_before, future = item
            try:
                if future.set_running_or_notify_cancel():  # False: cancelled by close()
                    future.set_result(self._pause_idle(record, idle_before))
            finally:
                with self._pausing_lock:
                    self._pausing.pop(record.session_id, None)

    def _pause_idle(self, record: SessionRecord, idle_before: float) -> PausedState | None:
        """Pause one idle session, its save bounded by `idle_save_timeout`; never raises: a failure is logged and
        the next pass tries again."""
        session_id = record.session_id
        try:
            paused = self.use(session_id).pause_if_idle(
                idle_before, save_timeout=min(self.idle_save_timeout, self.execute_timeout))
        except Exception as exc:  # closed meanwhile, Docker gone, the store failing
            log.warning("could not pause idle session %s: %s", session_id, exc, extra={"session_id": session_id},
                        exc_info=not isinstance(exc, WorkbenchError))
            return None
        if paused is not None:
            log.info("paused session %s, idle since %s%s", session_id, time.ctime(record.last_used_at),
                     "" if paused.error is None else f" (without its variables: {paused.error})",
                     extra={"session_id": session_id})
        return paused

    def _own_sessions(self) -> builtins.list[SessionRecord]:
        """The open sessions placed on this workbench (all of them, but for a replica of a cluster)."""
        return [record for record in self.store.list() if record.replica == self.replica]

    def _unmount_closed_workspaces(self) -> None:
        """Unmount the image of every closed session still mounted (its close was cut short: the process ended,
        or its container was already gone). Sessions the store does not know are left alone (a warm kernel's)."""
        for path in mounts_under(self.workspaces_root):
            if path.parent != self.workspaces_root:
                continue
            try:
                record = self.store.get(path.name)
            except SessionNotFoundError:
                continue
            if record.status != "open":
                self._release_workspace(path.name, record, pooled=False)

    def _watch(self) -> None:
        """The plain-folder watchdog's thread: a pass every WATCH_INTERVAL seconds, whatever idle_timeout is."""
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                self._watch_plain_workspaces(GcReport())
            except Exception:  # the watchdog must outlive a Docker or store hiccup
                log.exception("workspace watchdog failed; retrying in %.0fs", WATCH_INTERVAL)

    def _watch_plain_workspaces(self, report: GcReport, bounded: bool = True) -> None:
        """The watchdog where a workspace is a plain folder (no filesystem image, so no quota the kernel meets):
        a running kernel whose workspace holds more than its cap is stopped; the host refuses writes until files
        are removed, and the next use starts a new kernel.

        It runs on a thread of its own (see `_watch`) whenever workspaces are plain folders, and in every `gc`.
        What a kernel writes cannot be known without looking (no inotify here), so each workspace is walked in
        full; to bound what that costs, the thread walks a workspace again only after WATCH_INTERVAL seconds and
        its last walk's duration divided by WATCH_SHARE (a 0.5 s walk: at most every 10 s). A kernel can thus
        overshoot its cap for up to that long before it is stopped; filesystem images have no such gap."""
        now = time.monotonic()
        records = self._own_sessions()
        for gone in self._next_walk.keys() - {record.session_id for record in records}:
            self._next_walk.pop(gone, None)
        for record in records:
            if record.kernel is None:
                continue
            if bounded and self._next_walk.get(record.session_id, 0.0) > now:
                continue
            cap = record.config.limits.workspace_size
            disk = self._disk(record.session_id, cap)
            if disk.quota:
                continue
            try:
                fd = fstree.open_dir(disk.path)
            except OSError:
                continue
            started = time.monotonic()
            try:
                used = fstree.usage(fd)
            except OSError as exc:
                log.warning("could not measure the workspace of session %s: %s", record.session_id, exc)
                continue
            finally:
                os.close(fd)
                took = time.monotonic() - started
                self._next_walk[record.session_id] = time.monotonic() + took / WATCH_SHARE
            if used <= cap:
                continue
            if self.store.release_kernel(record.session_id, record.kernel.kernel_id):
                self._remove_containers(record.session_id, record.kernel.kernel_id)
                self._release_path(record.session_id, self._runtime_dir(record.session_id, record.kernel.kernel_id))
                report.over_cap.append(record.session_id)
                log.warning("stopped the kernel of session %s: its workspace holds %d bytes, past its cap of %d",
                            record.session_id, used, cap, extra={"session_id": record.session_id})

    def _runtime_dir(self, session_id: str, kernel_id: str) -> Path | None:
        """Where the kernel `kernel_id` of a session has its runtime dir (as Kernel makes it); None for ids that
        could not name one."""
        if not _plain_name(session_id) or not _plain_name(kernel_id):
            return None
        return runtime_dir_of(self.runtime_root, session_id, kernel_id)

    def _release_path(self, session_id: str, path: Path | None) -> None:
        """Unmount and remove one kernel's runtime dir (its container is gone: no other kernel uses it). Only a
        folder directly under the runtime root, with a name of ours, is ever touched."""
        if path is None or path.parent != self.runtime_root or not _plain_name(path.name):
            return
        try:
            release_runtime_dir(path)
        except OSError as exc:
            log.warning("could not remove the runtime dir of session %s: %s", session_id, exc)

    def _release_runtime_dir(self, session_id: str, path: Path | None = None) -> None:
        """Unmount and remove a session's runtime dirs once no kernel of it runs (checked just before): `path`,
        or by default every one under the runtime root (`<session id>-<kernel id>`, and `<session id>` of an
        older layout). Releasing one known kernel's dir needs no such check: see `_release_path`."""
        if not _plain_name(session_id):
            return
        try:
            record = self.store.get(session_id)
            if record.status == "open" and record.kernel is not None:
                return
        except SessionNotFoundError:
            pass
        if path is not None:
            paths = [path]
        else:
            try:
                names = os.listdir(self.runtime_root)
            except OSError:
                names = []
            paths = [self.runtime_root / name for name in names
                     if name == session_id or (name.startswith(session_id + "-") and _plain_name(name))]
        for each in paths:
            self._release_path(session_id, each)

    def _release_workspace(self, session_id: str, record: SessionRecord | None, pooled: bool) -> None:
        """A closed session's workspace is unmounted (kept); a dead warm pool's never-used one is removed."""
        if not _plain_name(session_id):
            return
        try:
            if record is not None and record.status != "open":
                self._disk(session_id, record.config.limits.workspace_size).unmount()
            elif record is None and pooled:
                self._disk(session_id, self.limits.workspace_size).destroy()
        except (OSError, WorkbenchError) as exc:
            log.warning("could not release the workspace of session %s: %s", session_id, exc)

    def _reap(self) -> None:
        assert self.idle_timeout
        interval = min(60.0, max(self.idle_timeout / 4, 0.5))
        while not self._stop.wait(interval):
            try:
                self.store.flush()
                self._gc(wait=False)
            except Exception:  # the reaper must outlive a Docker hiccup
                log.exception("idle reaper failed; retrying in %.0fs", interval)

    def close(self) -> None:
        """Disconnect this process from its sessions; their kernels keep running (see Session.close). The store is
        closed last (what is journaled copied into it): this Workbench cannot be used afterwards."""
        self._stop.set()
        with self._pausing_lock:  # no pause is queued from now on
            pausing, workers = list(self._pausing.values()), self._idle_workers
        for future in pausing:
            future.cancel()  # those not started yet
        for _ in workers:
            self._idle_queue.put(None)
        # a pause under way ends within its save's bound, once it holds the session (a cell may run before it)
        wait_for(pausing, timeout=min(self.idle_save_timeout, self.execute_timeout) + 30)
        self.pool.close()
        self._bridge.close()
        self.pipeline.close()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.disconnect()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(timeout=30)  # it may be in the middle of a gc, using the store
        self.store.close()

    def _limits(self, limits: Limits | dict[str, Any] | None) -> Limits:
        if limits is None:
            return self.limits
        given = limits if isinstance(limits, Limits) else Limits.model_validate(limits)
        return self.limits.model_copy(update=given.model_dump(exclude_unset=True))

    def _kernel(self, record: SessionRecord) -> Kernel:
        return self._new_kernel_object(record.session_id, record.config.limits, user_id=record.user_id)

    def _new_kernel_object(self, session_id: str, limits: Limits, *, user_id: str | None,
                           pool_owner: str | None = None) -> Kernel:
        labels = {"workbench.session": session_id, "workbench.home": self.home_label}
        if user_id is not None:
            labels["workbench.user"] = user_id
        if pool_owner is not None:  # a warm kernel: its user is known once a session takes it (see the store)
            labels[LABEL_POOL] = pool_owner
        image_id, mounts = self._sandbox_image()
        return Kernel(
            self.backend,
            image=image_id,
            workspace=self._disk(session_id, limits.workspace_size),
            runtime_root=self.runtime_root,
            runtime_name=session_id,  # each kernel's runtime dir: <runtime root>/<session id>-<kernel id>
            limits=limits,
            labels=labels,
            output_limit=self.output_limit,
            read_only_mounts=mounts,
            spec=self.kernel_spec,
        )

    def _remove_containers(self, session_id: str, kernel_id: str | None = None) -> None:
        labels = {"workbench.session": session_id, "workbench.home": self.home_label}
        if kernel_id is not None:
            labels[LABEL_KERNEL] = kernel_id
        for sandbox in self.backend.list_managed(labels):
            self.backend.destroy(sandbox.id)

    def _open_fork(self, source: SessionRecord, state: PausedState | None, workspace: Path) -> Session:
        """A new session copied from `source`: its workspace (from `workspace`, mounted) and its saved namespace
        (`state`, restored on first use); no kernel runs, and its workspace is not mounted, until then."""
        now = time.time()
        record = SessionRecord(session_id=secrets.token_hex(6), user_id=source.user_id, status="open",
                               config=source.config, config_version=1, created_at=now, last_used_at=now,
                               paused=state, replica=self.replica)
        disk = self._disk(record.session_id, source.config.limits.workspace_size)
        try:
            disk.ensure()
            src, dst = fstree.open_dir(workspace), fstree.open_dir(disk.path)
            try:
                copied = fstree.copy_tree(src, dst, limit=source.config.limits.workspace_size, owner=hand_over)
            finally:
                os.close(src)
                os.close(dst)
            self.store.add(record)
        except BaseException as exc:
            try:
                disk.destroy(quiet=True)
            except Exception as cleanup:
                log.warning("could not remove the workspace of a failed fork: %s", cleanup)
            if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
                raise WorkspaceFullError(f"the workspace holds more than its cap: {exc.strerror}") from None
            if isinstance(exc, OSError):
                raise SessionError(f"could not copy the workspace: {exc}") from exc
            raise
        disk.unmount(quiet=True)  # no kernel uses it before the fork's first use, which mounts it again
        log.info("forked session %s into %s (%d bytes of files)", source.session_id, record.session_id, copied,
                 extra={"session_id": record.session_id})
        return self._register(Session(self._services, record, self._kernel(record)))

    def _register(self, session: Session) -> Session:
        with self._lock:
            return self._sessions.setdefault(session.session_id, session)

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain_name(name: str) -> bool:
    """A name usable as one path component of ours (session and kernel ids are letters, digits, - and _)."""
    return bool(name) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) is not None


"""Workbench: the entry point that creates and finds sessions."""
from __future__ import annotations

import hashlib
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import docker

from . import image as images
from .config import DEFAULT_IMAGE, Limits, default_home, default_runtime_root
from .docker_client import connect
from .errors import SessionError, SessionNotFoundError
from .kernel import Kernel
from .session import Session

_USER_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


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
        image: str = DEFAULT_IMAGE,
        limits: Limits | None = None,
        execute_timeout: float = 300.0,
        output_limit: int = 1_000_000,
        docker_client: docker.DockerClient | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.image = image
        self.limits = limits or Limits()
        self.execute_timeout = execute_timeout
        self.output_limit = output_limit
        self.docker = docker_client or connect()
        self.runtime_root = default_runtime_root()
        # Containers are labelled with their home so that two workbenches on one engine never touch each other's.
        self.home_label = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:16]
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._image_checked = False

    def build_image(self, progress: Callable[[str], None] = lambda _: None, force: bool = False) -> bool:
        """Build the kernel image when missing or stale. Returns True when it built."""
        built = images.ensure_image(self.docker, self.image, progress=progress, force=force)
        self._image_checked = True
        return built

    def create(
        self,
        user_id: str,
        *,
        limits: Limits | dict | None = None,
        allow_default_user: bool = False,
    ) -> Session:
        """Open a new session for one user, with its own kernel and workspace."""
        if not _USER_ID.match(user_id or ""):
            raise SessionError("user_id must be 1 to 128 characters of letters, digits and _ . @ : -")
        if user_id == "default" and not allow_default_user:
            raise SessionError(
                'user_id="default" would share one user\'s data with every other caller; pass a real user id '
                "(or allow_default_user=True for local experiments)"
            )
        if not self._image_checked:
            images.require_image(self.docker, self.image)
            self._image_checked = True
        session_limits = self.limits.model_copy(update=Limits.model_validate(limits).model_dump(exclude_unset=True)) \
            if limits is not None else self.limits
        session_id = secrets.token_hex(6)
        kernel = Kernel(
            self.docker,
            image=self.image,
            workspace=self.home / "workspaces" / session_id,
            runtime_dir=self.runtime_root / session_id,
            limits=session_limits,
            labels={"workbench.session": session_id, "workbench.user": user_id, "workbench.home": self.home_label},
            output_limit=self.output_limit,
        )
        kernel.start()
        session = Session(self, session_id, user_id, session_limits, kernel)
        with self._lock:
            self._sessions[session_id] = session
        return session

    def use(self, session_id: str) -> Session:
        """The open session with this id."""
        with self._lock:
            try:
                return self._sessions[session_id]
            except KeyError:
                raise SessionNotFoundError(f"no open session {session_id!r}") from None

    def list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def close(self) -> None:
        """Close every session this workbench opened."""
        for session in self.list():
            session.close()

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

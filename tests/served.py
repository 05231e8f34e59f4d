"""A real `workbench serve` in a subprocess, on a free port, for the tests of the HTTP API."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(home: Path, *args: str) -> str:
    """A `workbench` command with this home; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WORKBENCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class Server:
    """`workbench serve --app readme_app:make` (the README's tools and a few of the tests') with `home`."""

    def __init__(self, home: Path, *args: str, app: str | None = "readme_app:make",
                 env: dict[str, str] | None = None) -> None:
        self.home, self.args, self.app, self.env = home, args, app, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log = home / f"serve-{self.port}.log"

    def start(self) -> Server:
        command = [sys.executable, "-m", "workbench", "serve", "--port", str(self.port), *self.args]
        if self.app:
            command += ["--app", self.app]
        env = {**os.environ, "WORKBENCH_HOME": str(self.home), **self.env, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, env=env, cwd=TESTS, stdout=log, stderr=subprocess.STDOUT,
                                         text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not come up:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def key(self, name: str = "test") -> str:
        """A new API key, made as a user would (`workbench keys create`)."""
        return cli(self.home, "keys", "create", name).strip()

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

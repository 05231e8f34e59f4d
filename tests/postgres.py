"""A real PostgreSQL server for the tests: Debian's initdb and pg_ctl (installed with apt-get when missing and root),
a throwaway cluster on a free port of 127.0.0.1, stopped and removed at the end.

`initdb` refuses to run as root, so as root the cluster belongs to the `postgres` user (runuser)."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

AUTH_USER = "workbench_auth"  # the one role that must give a password (the others are trusted): for the error tests
AUTH_PASSWORD = "s3cret-pw-of-the-tests"


class Unavailable(Exception):
    """No PostgreSQL server can be had here: not installed, and not root to install it (the reason is the message)."""


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _install() -> None:
    """Debian's postgresql package, without the `main` cluster it would otherwise create (and try to start)."""
    conf = Path("/etc/postgresql-common/createcluster.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    if not conf.exists():
        conf.write_text("create_main_cluster = false\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster; `database()` makes a fresh, empty database and gives its DSN."""

    def __init__(self, durable: bool = False) -> None:
        """`durable`: commits are flushed to disk as in production (the tests leave fsync off: they check behaviour,
        not durability across a power cut)."""
        self.durable = durable
        self.root = os.geteuid() == 0
        bin_dir = _bin_dir()
        if bin_dir is None:
            if not self.root or not shutil.which("apt-get"):
                raise Unavailable("no initdb/pg_ctl found, and apt-get cannot install them (not root)")
            _install()
            bin_dir = _bin_dir()
            if bin_dir is None:
                raise RuntimeError("the postgresql package installed no initdb")
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="wbpg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.started = False
        self._tests_db = False
        if self.root:
            shutil.chown(self.base, "postgres", "postgres")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=self.base)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")
        return done

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust", "--auth-host=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        hba = self.data / "pg_hba.conf"
        rules = hba.read_text()
        hba.write_text(f"host all {AUTH_USER} 127.0.0.1/32 scram-sha-256\n{rules}")  # first match wins
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", "-t", "60", "-o", options,
                  "start")
        self.started = True
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {AUTH_USER} LOGIN SUPERUSER PASSWORD '{AUTH_PASSWORD}'")
        return self

    def restart(self) -> None:
        """Stop the server (ending every connection) and start it again."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-m", "fast", "-w", "-t", "60",
                  "restart")

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{dbname}"

    @contextlib.contextmanager
    def admin(self, dbname: str = "postgres") -> Iterator:
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            yield conn

    def database(self) -> str:
        """The DSN of a fresh, empty schema (its own search_path) in the tests' database: far cheaper than a
        database of its own (0.2 ms, not 200)."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            if not self._tests_db:
                conn.execute("CREATE DATABASE workbench_tests")
                self._tests_db = True
        with self.admin("workbench_tests") as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return self.dsn("workbench_tests") + f"?options=-csearch_path%3D{name}"

    def drop(self, dsn: str) -> None:
        name = dsn.rsplit("%3D", 1)[1]
        with self.admin("workbench_tests") as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

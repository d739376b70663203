"""A real PostgreSQL 15 for the tests: a throwaway cluster on 127.0.0.1, one database per test.

``initdb`` and ``postgres`` refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``) over a directory of that user's own under the system temp dir (pytest's are private
to root).  The server listens on a free loopback port and puts its unix socket in that directory,
so it never meets the system's cluster.  Durability is traded for speed (``fsync=off``): the
cluster dies with the session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import psycopg
import pytest

from tests.support.procs import Proc, free_port
from tests.support.service import Service

BINARIES = Path("/usr/lib/postgresql/15/bin")
INSTALL = "apt-get install -y postgresql"


def require_postgres() -> Path:
    """The directory of PostgreSQL 15's server binaries, or a loud failure saying how to install them."""
    for name in ("initdb", "postgres"):
        if not os.access(BINARIES / name, os.X_OK):
            pytest.fail(f"PostgreSQL 15 not installed (no {BINARIES / name}): {INSTALL}", pytrace=False)
    return BINARIES


class PostgresServer(Service):
    """A PostgreSQL cluster of the test session's own; :meth:`create_database` gives each test a
    fresh database and its DSN."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root: Path | None = None
        self._proc: Proc | None = None
        self._names = itertools.count(1)

    @property
    def _as_postgres(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=10"

    def start(self) -> Self:
        binaries = require_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="mirror-postgres-"))
        data = self.root / "data"
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        subprocess.run([*self._as_postgres, binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
        self._proc = Proc([*self._as_postgres, binaries / "postgres", "-D", data, "-p", str(self.port),
                           "-h", "127.0.0.1", "-k", self.root, "-c", "fsync=off", "-c", "synchronous_commit=off",
                           "-c", "full_page_writes=off", "-c", "max_connections=300"],
                          self.root / "postgres.log", name="postgres")
        self.resume()
        return self

    def halt(self) -> None:
        """Shut the server down (fast: its clients are disconnected), keeping its data and port for :meth:`resume`.
        Only for a cluster of the test's own, never the session's."""
        assert self._proc is not None
        self._proc.signal_group(signal.SIGINT)
        deadline = time.monotonic() + 10
        while self._proc.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self._proc.stop()

    def freeze(self) -> None:
        """Stop every process of the server (``SIGSTOP``): connections stay open and nothing answers, as
        a server that hangs, or a network that drops packets, looks to its clients.  Only for a cluster
        of the test's own; :meth:`thaw` lets it go on."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        """Signal the postmaster and each of its children (a backend leads a process group of its own)."""
        assert self._proc is not None and self.root is not None
        postmaster = int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def resume(self) -> None:
        """Start the server (again, after :meth:`halt`) and wait until it answers queries."""
        assert self._proc is not None
        self._proc.start()
        self._wait_ready(30.0)

    def _wait_ready(self, timeout: float) -> None:
        """Until a real connection runs a query (the server accepts connections only once recovered)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self._proc.running:
                raise RuntimeError(f"postgres exited with {self._proc.returncode}:\n{self._proc.log_tail()}")
            try:
                with psycopg.connect(self.dsn(), autocommit=True) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready in {timeout}s: {exc}\n{self._proc.log_tail()}") from exc
            time.sleep(0.05)

    def create_database(self) -> str:
        """A new empty database; its DSN."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def add_password_login(self, user: str, password: str) -> None:
        """A role *user* that logs in over TCP only with *password* (every other login stays trusted)."""
        assert self.root is not None
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE \"{user}\" LOGIN SUPERUSER PASSWORD '{password}'")  # type: ignore[arg-type]
            hba = self.root / "data" / "pg_hba.conf"
            hba.write_text(f"host all {user} 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server has read the file again
            try:
                psycopg.connect(f"{self.dsn()} user={user} password=not-{password}").close()
            except psycopg.OperationalError:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{user} still logs in without its password")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then whatever is left is killed."""
        if self._proc is not None:
            if self._proc.running:
                self.halt()
            self._proc.stop()
            self._proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def log_tail(self, lines: int = 40) -> str:
        return self._proc.log_tail(lines) if self._proc is not None else "<not started>"

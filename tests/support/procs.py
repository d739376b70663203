"""Subprocess helpers: free ports, HTTP readiness, process-group lifecycle."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

#: Seconds between SIGTERM and SIGKILL in :meth:`Proc.stop`.
DEFAULT_GRACE = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_tool(name: str, apt_package: str) -> str:
    """Return the path of executable *name*, or fail the test loudly.

    Tests never skip silently because a tool is missing: the failure message
    says which Debian package provides it.
    """
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not installed: apt-get install -y {apt_package}", pytrace=False)
    return found


def wait_http(
    url: str,
    timeout: float,
    *,
    alive: Proc | None = None,
    interval: float = 0.05,
    verify: Any = True,
) -> httpx.Response:
    """Poll *url* with GET until any HTTP answer arrives, and return it.

    Connection errors are retried until *timeout* seconds have passed, then
    :class:`TimeoutError` is raised.  If *alive* is given and that process
    exits meanwhile, :class:`RuntimeError` is raised at once with its log tail.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    with httpx.Client(timeout=2.0, trust_env=False, verify=verify) as client:
        while True:
            if alive is not None and not alive.running:
                raise RuntimeError(
                    f"{alive.name} exited with {alive.returncode} before {url} answered;"
                    f" log tail:\n{alive.log_tail()}"
                )
            try:
                return client.get(url)
            except httpx.TransportError as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no HTTP answer from {url} within {timeout}s: {last_error!r}")
            time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    """Return the last *lines* lines of a (text) log file, or a note if absent."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return f"<no log file {path}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class Proc:
    """A subprocess in its own session (process group) with a log file.

    stdout and stderr are appended to *log_path*, so a restarted process keeps
    one continuous log.  :meth:`stop` signals the whole group, which also
    reaps worker processes the leader forked.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.args = [os.fspath(arg) for arg in args]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.args[0]).name
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, running={self.running})"

    @property
    def pid(self) -> int | None:
        """Process id of the leader, or None before :meth:`start`."""
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        """True while the leader process has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the leader once it has exited."""
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> Proc:
        """Start the process (again, if it was stopped); return self."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"--- starting: {' '.join(self.args)}\n".encode())
        self._log.flush()
        env = None
        if self.env is not None:
            env = {**os.environ, **self.env}
        try:
            self._popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except BaseException:
            self._close_log()
            raise
        return self

    def signal_group(self, signum: int) -> bool:
        """Send *signum* to the process group; False if no member was left."""
        if self._popen is None:
            return False
        try:
            os.killpg(self._popen.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def stop(self, grace: float = DEFAULT_GRACE) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after *grace* s.

        Safe to call any number of times, also after the process died on its
        own.  Returns the leader's exit status (None if never started).
        """
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=grace)
        # Also catches members that outlive a leader which exited by itself.
        self.signal_group(signal.SIGKILL)
        code = self._popen.wait()
        self._close_log()
        return code

    def kill9(self) -> int | None:
        """SIGKILL the whole group at once: a crash, not a shutdown."""
        if self._popen is None:
            return None
        self.signal_group(signal.SIGKILL)
        code = self._popen.wait()
        self._close_log()
        return code

    def log_tail(self, lines: int = 40) -> str:
        """The last *lines* lines of this process's log."""
        return tail(self.log_path, lines)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def run_checked(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300.0,
                check: bool = True, context: Callable[[], str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client command; with *check*, a non-zero exit raises with its output (and *context*, e.g.
    the daemon's log tail)."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL, check=False)
    if check and result.returncode != 0:
        extra = f"\n{context()}" if context is not None else ""
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}\n"
                           f"stdout: {result.stdout}\nstderr: {result.stderr}{extra}")
    return result

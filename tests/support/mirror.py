"""Run the mirror under test as a subprocess.

The command line is the contract with the server::

    python -m mirror serve --listen 127.0.0.1:PORT --data DIR --upstream URL
        --workers N [--config FILE]

plus environment variables such as ``MIRROR_CACHE_TAG_TTL=1s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .accesslog import AccessLog, parse_uvicorn_entry
from .procs import Proc, free_port, wait_http
from .service import Service

#: The repository root, so ``python -m mirror`` finds the package uninstalled.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


class MirrorServer(Service):
    """One mirror process on a fixed port; restarts keep the port and data."""

    def __init__(
        self,
        data_dir: Path,
        upstream_url: str,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        config: Path | None = None,
        log_dir: Path | None = None,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        scheme: str = "http",
        verify: Any = True,
        host: str = "127.0.0.1",
        module: str = "mirror",
        wrapper: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.upstream_url = upstream_url
        self.workers = workers
        self.env = dict(env or {})
        self.config = config
        self.port = port or free_port()
        #: ``https`` when the mirror serves TLS (``MIRROR_HTTP_TLS_*``); *verify* is httpx's, for readiness
        #: polls (a CA file, or an ``ssl.SSLContext`` carrying a client certificate for mutual TLS).
        self.scheme = scheme
        self.verify = verify
        #: The address it listens on (dockerd skips certificate checks for 127.0.0.0/8: TLS tests use another).
        self.host = host
        #: What ``python -m`` runs: ``mirror``, or a test's launcher that prepares the process first.
        self.module = module
        self.log_dir = log_dir or data_dir.parent
        self.log_path = self.log_dir / f"mirror-{self.port}.log"
        #: Requests the mirror answered, from its uvicorn access log (``count``, ``requests``, ``clear``).
        self.access = AccessLog(self.log_path, parse=parse_uvicorn_entry)
        #: The full command line (the CLI contract with the server).
        #: *wrapper* runs the server (e.g. ``strace`` injecting a slow disk's ``fsync``).
        self.args: list[str] = [
            *wrapper, sys.executable, "-m", module, "serve",
            "--listen", f"{host}:{self.port}",
            "--data", os.fspath(data_dir),
            "--upstream", upstream_url,
            "--workers", str(workers),
        ]
        if config is not None:
            self.args += ["--config", os.fspath(config)]
        self.args += list(extra_args)
        self._proc = Proc(
            self.args, self.log_path, env={"PYTHONUNBUFFERED": "1", **self.env}, cwd=PROJECT_ROOT, name="mirror"
        )

    def __repr__(self) -> str:
        return f"MirrorServer({self.url}, upstream={self.upstream_url})"

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT`` (``https://`` with TLS)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` (``HOST:PORT``), e.g. for ``--insecure-registry``."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the mirror process is alive."""
        return self._proc.running

    @property
    def pid(self) -> int | None:
        """Process id of the mirror's main process."""
        return self._proc.pid

    def start(self, timeout: float = START_TIMEOUT) -> MirrorServer:
        """Start and wait until ``GET /v2/`` answers, and every worker has started (a test's fault
        must not meet a worker still starting); fail with the log tail."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc.start()
        try:
            wait_http(f"{self.url}/v2/", timeout, alive=self._proc, verify=self.verify)
            deadline = time.monotonic() + timeout
            while self._started_workers(offset) < self.workers:
                if time.monotonic() > deadline or not self._proc.running:
                    raise RuntimeError(f"{self._started_workers(offset)} of {self.workers} workers started")
                time.sleep(0.05)
        except (TimeoutError, RuntimeError) as exc:
            self._proc.stop()
            raise RuntimeError(f"mirror did not come up: {exc}\n--- log tail ---\n{self.log_tail()}") from None
        return self

    def _started_workers(self, offset: int) -> int:
        """Workers whose start-up completed, by the log written since *offset*."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().count(b"Application startup complete")

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM, then SIGKILL); safe to call twice."""
        return self._proc.stop()

    def kill9(self) -> int | None:
        """Crash it: SIGKILL the whole process group at once."""
        return self._proc.kill9()

    def pause(self) -> None:
        """Hang it: SIGSTOP the whole process group (its connections stay open, nothing moves)."""
        self._proc.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """Let it go on after :meth:`pause` (SIGCONT)."""
        self._proc.signal_group(signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT) -> MirrorServer:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        return self.start(timeout)

    def access_entries(self) -> list[dict[str, Any]]:
        """The JSON access-log lines written so far, as dicts (with ``pid``: which worker answered)."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    entries.append(json.loads(line))
        return entries

    def log_tail(self, lines: int = 60) -> str:
        """The last *lines* lines of the mirror's log."""
        return self._proc.log_tail(lines)

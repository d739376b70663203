"""A private ``containerd`` (1.6) driven with ``ctr`` (``ctr images pull --hosts-dir DIR`` for mirrors).

Each instance has its own root, state, sockets and ``opt`` directory under the test's
temporary directory, the CRI plugin disabled and the ``native`` snapshotter (plain
directories: no overlay mounts needed), so it runs beside dockerd's own containerd and any
other test's.  The runc shims it starts are found by its socket path and killed by pid at
:meth:`Containerd.stop`; leftover rootfs mounts are unmounted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from .dockerd import reap
from .procs import Proc, require_tool, run_checked
from .service import Service

START_TIMEOUT = 30.0
STOP_GRACE = 10.0
SNAPSHOTTER = "native"
#: Plugins this test daemon never needs (CRI, and snapshotters that want special filesystems).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
)


class Containerd(Service):
    """containerd with a config of its own; :meth:`ctr` runs the CLI against it."""

    def __init__(self, root_dir: Path) -> None:
        self.root_dir = root_dir
        self._short_dir: Path | None = None
        # The ttrpc socket is the gRPC one plus ".ttrpc": keep both under the 108-byte limit.
        if len(str(root_dir)) + 30 > 100:
            self._short_dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        run_dir = self._short_dir or root_dir
        self.root = root_dir / "root"
        self.state = run_dir / "state"
        self.socket = run_dir / "containerd.sock"
        self.config_path = root_dir / "config.toml"
        self.log_path = root_dir / "containerd.log"
        self._proc: Proc | None = None

    def config(self) -> str:
        """The daemon's ``config.toml`` (version 2, as containerd 1.6 reads it)."""
        disabled = ", ".join(f'"{name}"' for name in DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f"disabled_plugins = [{disabled}]\n\n"
            "[grpc]\n"
            f'  address = "{self.socket}"\n\n'
            "[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n\n'
            "[debug]\n"
            '  address = ""\n'
            '  level = "info"\n\n'
            "[metrics]\n"
            '  address = ""\n\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.root_dir / "opt"}"\n'
        )

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Write the config, start containerd and wait until ``ctr version`` answers."""
        binary = require_tool("containerd", "containerd")
        require_tool("ctr", "containerd")
        require_tool("runc", "runc")
        for folder in (self.root, self.state):
            folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self._proc = Proc([binary, "--config", self.config_path], self.log_path, name="containerd").start()
        deadline = time.monotonic() + timeout
        while True:
            if not self._proc.running:
                log = self._proc.log_tail()
                self.stop()
                raise RuntimeError(f"containerd exited with {self._proc.returncode}:\n{log}")
            if self.socket.exists() and self.ctr("version", check=False, timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                log = self._proc.log_tail()
                self.stop()
                raise TimeoutError(f"containerd not ready within {timeout}s:\n{log}")
            time.sleep(0.1)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCKET ARGS...``; with *check*, fail on a non-zero exit."""
        return run_checked([require_tool("ctr", "containerd"), "--address", str(self.socket), *args],
                           env={**os.environ, "CONTAINERD_SNAPSHOTTER": SNAPSHOTTER, **(env or {})},
                           timeout=timeout, check=check,
                           context=lambda: f"--- containerd log ---\n{self.log_tail(20)}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of containerd's log."""
        return self._proc.log_tail(lines) if self._proc is not None else ""

    def stop(self) -> None:
        """Stop containerd and its shims by pid, unmount leftovers; idempotent."""
        if self._proc is not None:
            self._proc.stop(grace=STOP_GRACE)
        # Shims run in sessions of their own and name our socket on their command line.
        reap(str(self.socket), self.root, self.state)
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

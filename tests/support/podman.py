"""A private ``podman`` (4.x, rootful) whose registries come from a ``registries.conf`` the test gives it.

Its state is under the test's directory: the image store (``--root``, vfs driver: plain
directories), the run root, libpod's temporary directory, and the configuration files
(``CONTAINERS_REGISTRIES_CONF``, ``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``), so the host's
``/etc/containers`` plays no part.  Two exceptions: podman refuses a run root path over 50
characters, so a longer one is replaced by a short directory in ``/tmp`` (removed by
:meth:`Podman.cleanup`); and containers/image keeps its blob-info cache (which blobs it has
seen where, locked per use) in ``/var/lib/containers/cache``, as skopeo does, with no option to
move it in podman 4.3.  Podman has no daemon: every call is one process, and a container run
with ``--rm`` is gone when the call returns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .procs import require_tool, run_checked

#: Limits of every container (containers.conf ``default_ulimits``): podman's own defaults
#: (nofile 1048576, nproc 32768) can be above what a process without CAP_SYS_RESOURCE may
#: set, and runc then refuses to start the container.
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")


class Podman:
    """``podman`` with its own storage and configuration; :meth:`__call__` runs it."""

    def __init__(self, root_dir: Path, registries: str) -> None:
        self.root_dir = root_dir
        self.graph_root = root_dir / "root"
        # Podman refuses a run root longer than 50 characters: fall back to a short one in /tmp.
        self._short_dir: Path | None = None
        if len(str(root_dir / "runroot")) > 50:
            self._short_dir = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
        self.run_root = (self._short_dir or root_dir) / "runroot"
        self.tmp_dir = root_dir / "tmp"
        self.registries_conf = root_dir / "registries.conf"
        self.containers_conf = root_dir / "containers.conf"
        self.storage_conf = root_dir / "storage.conf"
        for folder in (self.graph_root, self.run_root, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.registries_conf.write_text(registries)
        self.containers_conf.write_text(
            "[containers]\n"
            f"default_ulimits = {json.dumps(list(ULIMITS))}\n\n"
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{self.graph_root}"\n'
            f'runroot = "{self.run_root}"\n'
        )

    def args(self) -> list[str]:
        """The global options of every call."""
        return [
            require_tool("podman", "podman"),
            "--root", str(self.graph_root), "--runroot", str(self.run_root), "--tmpdir", str(self.tmp_dir),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
        ]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS...``; with *check*, fail on a non-zero exit."""
        env = {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
        }
        return run_checked([*self.args(), *args], env=env, timeout=timeout, check=check)

    def run(self, image: str, *command: str) -> str:
        """``podman run --rm --network none IMAGE COMMAND...``; its standard output."""
        return self("run", "--rm", "--network", "none", image, *command).stdout

    def cleanup(self) -> None:
        """Remove every container and image (unmounts what podman mounted); errors ignored."""
        self("rm", "--all", "--force", check=False, timeout=120)
        self("rmi", "--all", "--force", check=False, timeout=120)
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

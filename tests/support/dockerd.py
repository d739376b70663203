"""A private ``dockerd`` that pulls Docker Hub images through a mirror.

Each instance has its own data root, exec root, socket and managed
containerd, uses the vfs storage driver and no networking setup, so several
can run beside each other and beside a system Docker.  dockerd only consults
``--registry-mirror`` for Docker Hub images: ``docker pull busybox-test:1``
asks the mirror for ``/v2/library/busybox-test/manifests/1``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .procs import Proc, require_tool, run_checked
from .service import Service

START_TIMEOUT = 60.0
STOP_GRACE = 20.0
#: Room left under the 108-byte unix socket limit for names containerd adds.
SOCKET_ROOM = 60


def docker_client() -> str:
    """The docker CLI: ``/usr/bin/docker`` (Debian's, matching dockerd) if present."""
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return require_tool("docker", "docker.io")


def _unescape_mount(path: str) -> str:
    """Undo the octal escapes (``\\040`` for space...) of /proc mountinfo."""
    return path.encode().decode("unicode_escape")


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below any of *roots*, deepest first (dockerd may mount its data root on itself)."""
    prefixes = tuple(f"{root}/" for root in roots)
    exact = {str(root) for root in roots}
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = _unescape_mount(line.split()[4])
            if point in exact or point.startswith(prefixes):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains *text* (other than this one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def reap(mentioning: str, *roots: Path) -> None:
    """Kill (by pid) what a daemon left running that names *mentioning*, and unmount under *roots*."""
    for pid in pids_mentioning(mentioning):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in mounts_under(*roots):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


class Dockerd(Service):
    """dockerd with a registry mirror; :meth:`docker` runs the CLI against it."""

    def __init__(
        self,
        root_dir: Path,
        registry_mirror: str | None = None,
        insecure_registries: Sequence[str] = (),
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.root_dir = root_dir
        self.registry_mirror = registry_mirror
        self.insecure_registries = tuple(insecure_registries)
        self.extra_args = tuple(extra_args)
        self._short_dir: Path | None = None
        if len(str(root_dir)) + SOCKET_ROOM > 108:
            self._short_dir = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        run_dir = self._short_dir or root_dir
        self.data_root = root_dir / "data"
        self.exec_root = run_dir / "exec"
        self.socket = run_dir / "docker.sock"
        self.pidfile = run_dir / "docker.pid"
        self.config_dir = root_dir / "client-config"
        self.log_path = root_dir / "dockerd.log"
        self._proc: Proc | None = None

    @property
    def host(self) -> str:
        """The ``-H`` value for clients: ``unix:///.../docker.sock``."""
        return f"unix://{self.socket}"

    def args(self) -> list[str]:
        """The dockerd command line."""
        args = [
            require_tool("dockerd", "docker.io"),
            "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
            f"--data-root={self.data_root}", f"--exec-root={self.exec_root}",
            f"-H={self.host}", f"--pidfile={self.pidfile}",
        ]
        if self.registry_mirror:
            args.append(f"--registry-mirror={self.registry_mirror}")
        args += [f"--insecure-registry={registry}" for registry in self.insecure_registries]
        return args + list(self.extra_args)

    def start(self, timeout: float = START_TIMEOUT) -> Dockerd:
        """Start dockerd and wait until ``docker info`` succeeds."""
        for folder in (self.data_root, self.exec_root, self.config_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._proc = Proc(self.args(), self.log_path, name="dockerd").start()
        deadline = time.monotonic() + timeout
        while True:
            if not self._proc.running:
                log = self._proc.log_tail()
                self.stop()
                raise RuntimeError(f"dockerd exited with {self._proc.returncode}:\n{log}")
            if self.socket.exists() and self.docker("info", check=False, timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                log = self._proc.log_tail()
                self.stop()
                raise TimeoutError(f"dockerd not ready within {timeout}s:\n{log}")
            time.sleep(0.2)

    def docker(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H SOCKET ARGS...``; with *check*, fail on non-zero exit."""
        env = {**os.environ, "DOCKER_CONFIG": str(self.config_dir)}
        env.pop("DOCKER_HOST", None)
        return run_checked([docker_client(), "-H", self.host, *args], env=env, timeout=timeout, check=check,
                           context=lambda: f"--- dockerd log ---\n{self.log_tail(20)}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of dockerd's log."""
        return self._proc.log_tail(lines) if self._proc is not None else ""

    def stop(self) -> None:
        """Stop dockerd, its containerd and shims, unmount leftovers; idempotent."""
        if self._proc is not None:
            self._proc.stop(grace=STOP_GRACE)
        # containerd and its shims run in sessions of their own; find ours
        # by the exec root in their command lines and kill them by pid.
        reap(str(self.exec_root), self.data_root, self.exec_root)
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)


def pull(daemon: Dockerd, ref: str) -> None:
    """``docker pull`` that must have downloaded the image (not found it locally)."""
    out = daemon.docker("pull", ref).stdout
    assert f"Status: Downloaded newer image for {ref}" in out, out


def run(daemon: Dockerd, ref: str, *command: str) -> str:
    return daemon.docker("run", "--rm", "--network", "none", ref, *command).stdout


def forget_all(daemon: Dockerd) -> None:
    """Remove every image, so the next pull has to download all of its blobs again."""
    ids = daemon.docker("images", "-aq").stdout.split()
    if ids:
        daemon.docker("rmi", "-f", *set(ids))
    assert daemon.docker("images", "-aq").stdout.strip() == ""

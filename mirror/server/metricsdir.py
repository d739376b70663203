"""``mirror serve``'s directory of metric samples (``PROMETHEUS_MULTIPROC_DIR``): every process of one
server (the supervisor, each worker) keeps its samples there, so whichever answers a scrape reports
them all; its workers share what else they share there too (the inline secrets handed to them, the
client hosts they saw: ``server/clienthosts.py``).  One directory per server, removed when it stops;
those of servers that were killed are removed by the next one to start."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def metrics_directory(parent: Path) -> tuple[Path, int]:
    """A fresh ``mirror-metrics-*`` directory in *parent* (the system's temp directory), flock'ed
    while this server runs; those of servers that are gone (killed) are removed."""
    for old in parent.glob("mirror-metrics-*"):
        try:
            fd = os.open(old / "lock", os.O_RDONLY)
        except OSError:
            continue  # being created, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix="mirror-metrics-", dir=parent))
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd

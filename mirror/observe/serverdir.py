"""The directory of the ``mirror serve`` this process belongs to: made fresh for each start by the
supervisor (``server/metricsdir.py``) and handed to its workers in ``PROMETHEUS_MULTIPROC_DIR``.
Every process of one server keeps its metric samples there, and whatever else its workers share (the
warnings one of them said, ``said.py``; the client hosts they saw, ``server/clienthosts.py``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["handed_over", "server_directory"]


def server_directory() -> Path | None:
    """The directory of the ``mirror serve`` this process belongs to; None outside one."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(directory) if directory else None


def handed_over(path: Path | None) -> bool:
    """Whether *path* is a file the supervisor wrote a secret given inline into, to hand it to its
    workers (``config.load.to_environ``: ``secrets/`` in this directory): not a file the user named."""
    directory = server_directory()
    return path is not None and directory is not None and path.parent == directory / "secrets"

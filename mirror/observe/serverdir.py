"""The directory of the ``mirror serve`` this process belongs to: made fresh for each start by the
supervisor (``server/metricsdir.py``) and handed to its workers in ``PROMETHEUS_MULTIPROC_DIR``.
Every process of one server keeps its metric samples there, and whatever else its workers share (the
warnings one of them said, ``said.py``; the client hosts they saw, ``server/clienthosts.py``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["server_directory"]


def server_directory() -> Path | None:
    """The directory of the ``mirror serve`` this process belongs to; None outside one."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(directory) if directory else None

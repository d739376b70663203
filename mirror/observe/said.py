"""Warnings said once by a server, not once by each of its worker processes (``http.workers``).

A condition every worker sees alike (another mirror beside this one on its database, say) would be
logged by each of them.  The first worker to say it leaves a file named by the warning's key in the
server's own directory (``PROMETHEUS_MULTIPROC_DIR``, which ``mirror serve`` makes for each start and
removes when it stops); the others find it there and say nothing.
"""

from __future__ import annotations

import hashlib
import os

from .serverdir import server_directory

__all__ = ["first_to_say"]


def first_to_say(key: str) -> bool:
    """Whether this process is the first of its server to say the warning *key* (any string naming
    it and what it is about); True outside ``mirror serve``, or when the directory cannot be written
    (said twice rather than not at all)."""
    directory = server_directory()
    if directory is None:
        return True
    path = directory / f"said-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True

"""Which running mirror an upload record's local file is with, as far as this host can tell.

One mirror without ``cluster`` settings keeps a push upload's unsent bytes in a file of its own data
directory, and its record in the index.  Several such mirrors may share one PostgreSQL index and
bucket for a while (a rollout's new pod beside the one it replaces while that drains; ``mirror fsck``
run from another host), and each finds the others' records without a file of its own.  A record
names the instance that holds its file (:func:`new_instance`: host, pid of ``mirror serve``, a random
part): its file may be lost only when that instance is this one, or ran on this host and has ended.

May import: the standard library, and the driver interface (for UploadRecord).
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from .driver import UploadRecord


def new_instance() -> str:
    """A new instance name for this process: ``"<host> pid <pid> <8 hex digits>"``."""
    return f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"


def kept_elsewhere(holder: str | None, this: str | None = None) -> bool:
    """Whether the instance *holder* (:func:`new_instance`; None: a record made before records named
    one) may still hold its upload's file somewhere this process cannot see: it is not *this* (the
    caller's own instance, if it has one), and it runs on another host, or on this one as a process
    still running that is not *this* under an earlier name (a container restarted with the same pid)."""
    if holder is None or holder == this:
        return False
    host, word, pid, *_ = [*holder.split(" "), "", "", ""]
    if host != socket.gethostname():
        return True
    if word != "pid" or not pid.isdigit():
        return False
    if this is not None and this.split(" ")[:3] == [host, word, pid]:
        return False  # this very process, named again since: the holder has ended
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def held_elsewhere(record: UploadRecord, upload_ttl: float, this: str | None = None) -> bool:
    """Whether the one-host upload *record*, started less than *upload_ttl* seconds ago, may have its
    file with another running mirror (:func:`kept_elsewhere`): not one to drop for want of a local file."""
    return record.started_at >= time.time() - upload_ttl and kept_elsewhere(record.holder, this)

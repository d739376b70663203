"""Which running mirror an upload record's local file is with, as far as this host can tell.

One mirror without ``cluster`` settings keeps a push upload's unsent bytes in a file of its own data
directory, and its record in the index.  Several such mirrors may share one PostgreSQL index and
bucket for a while (a rollout's new pod beside the one it replaces while that drains; ``mirror fsck``
run from another host), and each finds the others' records without a file of its own.  A record
names the instance that holds its file (:func:`new_instance`: host, pid of ``mirror serve``, a random
part): its file may be lost only when that instance is this one, or ran on this host and has ended,
or (mirrors on an object store and a shared index) no longer holds its :func:`running_lease`.

May import: the standard library, and the driver interface (for UploadRecord and leases).
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from .driver import Metadata, UploadRecord

#: How many ``cluster.lease_ttl`` a mirror's :func:`running_lease` lasts unrenewed: it is renewed every
#: third of one, so a mirror cut off from the index for a minute (by default) is not taken for ended.
RUNNING_TTLS = 4


def new_instance() -> str:
    """A new instance name for this process: ``"<host> pid <pid> <8 hex digits>"``."""
    return f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"


def running_lease(instance: str) -> str:
    """The lease a running mirror without ``cluster`` settings holds under its instance name while it runs on an
    object store and a shared index (``registry/sharedsecret.keep_alone``): what another host reads as alive."""
    return f"running {instance}"


def leases_of(metadata: Metadata, store_local: bool) -> Metadata | None:
    """*metadata* where the mirrors on it hold a :func:`running_lease` each (a shared index, and an
    object store: ``server/app.py`` starts ``keep_alone`` so), for :func:`held_elsewhere`; else None."""
    return metadata if metadata.shared_by_hosts and not store_local else None


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


def held_elsewhere(record: UploadRecord, upload_ttl: float, this: str | None = None,
                   leases: Metadata | None = None) -> bool:
    """Whether the one-host upload *record*, started less than *upload_ttl* seconds ago, may have its
    file with another running mirror (:func:`kept_elsewhere`): not one to drop for want of a local file.
    With *leases* (the index of mirrors on an object store, which hold a :func:`running_lease` each), a
    holder whose lease has lapsed has ended wherever it ran (a pod of a rollout stopped or killed on
    another host): its record goes at once, not after *upload_ttl*.  Blocking (one index read)."""
    if record.started_at < time.time() - upload_ttl or not kept_elsewhere(record.holder, this):
        return False
    return leases is None or record.holder is None or leases.current_lease(running_lease(record.holder)) is not None

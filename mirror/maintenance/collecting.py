"""One collector at a time across every host that shares the index.

Processes on one host take turns on ``DATA/gc.lock`` (``maintenance/gc.py``).  Replicas on other
hosts (one PostgreSQL database, one bucket: ``Metadata.shared_by_hosts``) do not share that file,
so there the collector also holds the index's lease :data:`LEASE` (``metadata/driver.py``,
:class:`~mirror.metadata.driver.Leases`: it expires by the database's clock), renewed by a
heartbeat while it runs.  One that loses it (paused past the expiry, cut off from the database)
stops deleting: another collector may be running by then.  What it already withdrew from the index
and did not delete is unreferenced, and the next collection removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

from ..metadata.driver import Lease, Metadata, MetadataUnavailable
from ..storage.driver import BlobStore

log = logging.getLogger("mirror.maintenance.gc")


@contextlib.contextmanager
def reference_lock(store: BlobStore) -> Iterator[None]:
    """``DATA/gc.lock``, held (shared) while making stored objects reachable; the collector holds it
    exclusively (``maintenance/gc.py``).  A data directory that takes no writes (read-only, out of
    inodes) holds it as it is, or not at all when it has none and cannot make one: then no collector
    can run there either, and the writes go on (an object store takes them; a local one refuses them)."""
    try:
        fd = os.open(store.layout.gc_lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(store.layout.gc_lock, os.O_RDONLY)  # (flock needs no write access)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


#: The name of the collector's lease in the index.
LEASE = "collector"
#: Seconds a lease lasts without a heartbeat (one crashed collector holds the next one back that long).
TTL = 30.0
#: Seconds between heartbeats, and between tries of a collector that waits for the lease.
BEAT = TTL / 6
#: Seconds a lease that was released or expired is kept before a collection forgets it.
KEEP_LEASES = 3600.0


class CollectorLease:
    """The lease a running collector holds, renewed every :data:`BEAT` seconds in a thread.

    :attr:`lost` is set once a renewal fails: the lease expired or went to another holder, or the
    database did not answer (then it may expire before the next try)."""

    def __init__(self, metadata: Metadata, lease: Lease) -> None:
        self.metadata, self.lease = metadata, lease
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="collector-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(BEAT):
            try:
                renewed = self.metadata.renew_lease(self.lease, TTL)
            except MetadataUnavailable as exc:
                log.warning("collector: could not renew its lease: %s", exc)
                renewed = None
            if renewed is None:
                log.warning("collector: lost its lease (token %d); it deletes nothing more", self.lease.token)
                self.lost.set()
                return
            self.lease = renewed

    def close(self) -> None:
        """Stop the heartbeat and give the lease up."""
        self._done.set()
        self._thread.join()
        if not self.lost.is_set():
            with contextlib.suppress(MetadataUnavailable):
                self.metadata.release_lease(self.lease)


@contextlib.contextmanager
def collector_lease(metadata: Metadata, *, wait: bool) -> Iterator[CollectorLease | None]:
    """The cluster's collector lease for the block, or None when the index is not shared by hosts
    (the lock file is enough).  While another host's collector holds it: :class:`CollectorBusy`,
    or with *wait* a try every :data:`BEAT` seconds until it is free.  ``MetadataUnavailable``
    while the database is down."""
    if not metadata.shared_by_hosts:
        yield None
        return
    holder = f"{socket.gethostname()}:{os.getpid()}"
    while (lease := metadata.take_lease(LEASE, holder, TTL)) is None:
        if not wait:
            raise CollectorBusy(metadata.current_lease(LEASE))
        time.sleep(BEAT)
    held = CollectorLease(metadata, lease)
    try:
        yield held
        _prune_leases(metadata)
    finally:
        held.close()


def _prune_leases(metadata: Metadata) -> None:
    """Forget the leases released or expired :data:`KEEP_LEASES` ago (one row is left per blob
    ever filled and per upload), once per collection; a failure is only logged."""
    try:
        pruned = metadata.prune_leases(KEEP_LEASES)
    except MetadataUnavailable as exc:
        log.warning("could not prune expired leases: %s", exc)
        return
    if pruned:
        log.info("pruned %d expired leases", pruned)


class CollectorBusy(Exception):
    """Another host's collector holds the lease (its :class:`Lease`, or None if it just ended)."""

    def __init__(self, lease: Lease | None) -> None:
        super().__init__(f"another collector is running ({lease.holder})" if lease else "another collector ran")
        self.lease = lease

"""What the processes of one server have seen of each client host, for the warning of a TLS handshake
on the plain-HTTP port (``server/protocol.py``): when each host last sent a plain-HTTP request, and
when it was last warned of.

A client told the registry is plain HTTP (dockerd, skopeo, podman) begins with a TLS handshake and
comes back in plain HTTP on a new connection; with several worker processes (``http.workers``) that
connection may be accepted by another worker than the handshake's, so the worker deciding whether to
warn must see the requests of the others.  The table is a fixed-size file mapped into every worker
(in ``mirror serve``'s own directory, removed when it stops); with one process, anonymous memory.

Each host hashes to one of :data:`SLOTS` slots.  A plain-HTTP request writes one 8-byte time into
its slot (no lock, no system call).  Two hosts sharing a slot share that time: one's requests may
spare the other a warning, never cause one (the warning comes again at its next handshake).  A
warning's slot also keeps its host's hash: a host warned of does not silence another.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import zlib
from pathlib import Path

__all__ = ["ClientHosts", "FILENAME", "SLOTS", "STATE"]

log = logging.getLogger("mirror.server")

#: Slots of the table: its file is ``SLOTS * 24`` bytes (96 KiB).
SLOTS = 4096
#: The table's file in the server's directory shared by its workers.
FILENAME = "client-hosts"
#: The table's key in the application's lifespan state (uvicorn's ``app_state``).
STATE = "client_hosts"
_PLAIN = struct.Struct("d")  # time.monotonic() of the host's latest plain-HTTP request
_WARNED = struct.Struct("Qd")  # (host hash, time.monotonic() of its latest warning)
_WARNED_AT = SLOTS * _PLAIN.size
_SIZE = _WARNED_AT + SLOTS * _WARNED.size


class ClientHosts:
    """A bounded table of times per client host (``time.monotonic()`` seconds, one clock for every
    process of the machine), shared with the processes that open the same *path*; this process's
    own when *path* is None, or when the file cannot be opened (logged)."""

    def __init__(self, path: Path | None = None) -> None:
        shared = None
        if path is not None:
            try:
                shared = _mapped(path)
            except OSError as exc:
                log.warning("cannot share what this worker sees of client hosts through %s: %s: a client that "
                            "begins a TLS handshake here and comes back in plain HTTP to another worker may be "
                            "warned of", path, exc.strerror)
        self._map = shared if shared is not None else mmap.mmap(-1, _SIZE)

    def saw_plain(self, host: str, when: float) -> None:
        """Note that *host* sent a plain-HTTP request at *when*."""
        _PLAIN.pack_into(self._map, _hash(host) % SLOTS * _PLAIN.size, when)

    def plain_since(self, host: str, since: float) -> bool:
        """Whether *host* (or a host sharing its slot) sent a plain-HTTP request at or after *since*."""
        (when,) = _PLAIN.unpack_from(self._map, _hash(host) % SLOTS * _PLAIN.size)
        return bool(when >= since)  # 0.0 (never) is before any time.monotonic() of this machine

    def warn(self, host: str, now: float, interval: float) -> bool:
        """Whether *host* is due a warning at *now*: not warned of in the last *interval* seconds by
        any process sharing the table.  If so, *now* is noted as its latest warning."""
        key = _hash(host)
        offset = _WARNED_AT + key % SLOTS * _WARNED.size
        last_key, last = _WARNED.unpack_from(self._map, offset)
        if last_key == key and last and now - last < interval:
            return False
        _WARNED.pack_into(self._map, offset, key, now)
        return True


def _hash(host: str) -> int:
    return zlib.crc32(host.encode())  # the same in every process (hash() is salted per process)


def _mapped(path: Path) -> mmap.mmap:
    """*path* mapped shared, created (zero-filled: nothing seen) by the first process to open it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < _SIZE:
            os.ftruncate(fd, _SIZE)  # the same size from every process: what one wrote is kept
        return mmap.mmap(fd, _SIZE)
    finally:
        os.close(fd)

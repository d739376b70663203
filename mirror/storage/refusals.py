"""Writes the store's filesystem refuses (full, over quota, read-only), and the record of the last
one that every process of a mirror shares.

:func:`refusal` recognises such an error.  :class:`RefusalRecord` keeps the last refusal in
``DATA/refused``, a file of :data:`RECORD_SIZE` bytes allocated when the store is created and only
ever overwritten in place (a full filesystem still takes that), so that ``/readyz`` answers the
same whichever worker it reaches.  Where the file cannot be made or written, the record lives in
this process's memory only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

#: errno values of a filesystem that cannot take a write: full, over quota, read-only.
REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
SQLITE_FULL = 13
#: at (Unix time), needed (-1: unknown), free, errno; then a CRC-32 of those.
_FORMAT = struct.Struct("<dqqi")
_CRC = struct.Struct("<I")
RECORD_SIZE = _FORMAT.size + _CRC.size


def probe_writes(probe: Path) -> str | None:
    """Why a small file cannot be written at *probe* (and removed again), or None: the reason of a
    refusal (:func:`refusal`), else "not writable: ..." with the error and the path."""
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ready")
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # a starting worker's sweep may have taken it
                os.unlink(probe)
    except OSError as exc:
        return refusal(exc) or f"not writable: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return None


def refusal_errno(exc: BaseException) -> int | None:
    """The errno of a refused write (``ENOSPC``, ``EDQUOT``, ``EROFS``), or None for any other error.

    The index's SQLite database lives on the same filesystem: its ``SQLITE_FULL`` is ``ENOSPC``.
    """
    if isinstance(exc, OSError) and exc.errno in REFUSALS:
        return exc.errno
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
        return errno.ENOSPC
    return None


def refusal(exc: BaseException) -> str | None:
    """Why the filesystem refused a write (``"no space left on device"``), if *exc* is such a refusal;
    an error with a ``reason`` of its own (``storage/s3objects.py``'s ``WritesRefused``: what the
    bucket refused and what to check) says that instead."""
    code = refusal_errno(exc)
    if code is None:
        return None
    own = getattr(exc, "reason", None)
    return own if isinstance(own, str) else reason_of(code)


def reason_of(code: int) -> str:
    return os.strerror(code).lower()


@dataclass(frozen=True)
class Refusal:
    """A refused write: when (Unix time), the bytes it needed (if known), the bytes free then, its errno
    (0 in a record that the store takes writes again)."""

    at: float
    needed: int | None
    free: int
    errno: int

    @property
    def reason(self) -> str:
        return reason_of(self.errno)


class RefusalRecord:
    """The last refusal, shared through ``DATA/refused`` when possible (blocking file I/O).

    Each process also keeps the last record it wrote itself, for when the file cannot be written;
    the newer of the two counts.  Clearing writes a record too (errno 0), so that a clearance in one
    process outdates a refusal another one remembers.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._memory: Refusal | None = None

    def open(self) -> None:
        """Make the file, allocated, if it is missing or short (at start-up, in every process)."""
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, RECORD_SIZE)  # allocated now: rewriting it needs no free space
            finally:
                os.close(fd)

    def read(self) -> Refusal | None:
        """The last refusal, unless a clearance came after it."""
        newest = self._memory
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                data = os.pread(fd, RECORD_SIZE, 0)
            finally:
                os.close(fd)
            payload, crc = data[:_FORMAT.size], data[_FORMAT.size:]
            if len(data) == RECORD_SIZE and zlib.crc32(payload) == _CRC.unpack(crc)[0]:  # else: never written
                at, needed, free, code = _FORMAT.unpack(payload)
                if newest is None or at >= newest.at:
                    newest = Refusal(at, None if needed < 0 else needed, free, code)
        return newest if newest is not None and newest.errno else None

    def wrote(self) -> None:
        """A write went through: a refusal of unknown size (a push chunk) recorded before it is over."""
        last = self.read()
        if last is not None and last.needed is None and last.at < time.time():
            self.write(None)

    def write(self, refused: Refusal | None) -> None:
        """Record *refused* (None: the store takes writes again)."""
        record = refused if refused is not None else Refusal(time.time(), None, 0, 0)
        self._memory = record
        payload = _FORMAT.pack(record.at, -1 if record.needed is None else record.needed, record.free, record.errno)
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY)  # never created here: only a file allocated by open()
            try:
                if os.fstat(fd).st_size >= RECORD_SIZE:
                    os.pwrite(fd, payload + _CRC.pack(zlib.crc32(payload)), 0)
            finally:
                os.close(fd)

"""The hash of a fill's file, taken beside its writes: a large body's bytes are hashed by a thread of
their own, read back from the file, while the writer receives and writes the next ones.

A cold fill's writer (``upstream/drain.py``'s thread) received, hashed and wrote every byte in turn,
so a client following the fill (``storage/growing.py``) got each byte only after it was hashed: one
core's pace for the three, where a relaying proxy only receives and sends.  The client's last byte
waits for the verdict anyway (the fill's readers hold it back), so the hash need not be ahead of the
writes: :class:`FileHash` hashes the first :data:`INLINE_BYTES` as they are written (a manifest, a
small layer: no thread), then hands the rest to a thread that reads the file back (``pread``, into
one reused buffer of :data:`READ_BYTES`) through a descriptor of its own, and :meth:`FileHash.hexdigest`
waits for it to catch up.  ``pread`` and ``hashlib`` let go of the GIL, so on a second core the
hash runs beside the receiving; what is hashed is what the file holds, the bytes readers are sent.

The thread ends once the hash is asked for, once the fill is given up (:meth:`FileHash.close`), or
when nothing new was written for :data:`IDLE` seconds (a stalled upstream: the next write starts
another), closing its descriptor.

May import: the standard library.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

#: Bytes hashed by the writer itself before the thread takes over.
INLINE_BYTES = 8 << 20
#: Bytes the thread reads back per ``pread``.
READ_BYTES = 1 << 20
#: Seconds the thread waits for new bytes before it ends.
IDLE = 5.0


class FileHash:
    """The hash (a ``hashlib`` object, *hasher*) of the bytes written to *fd* from its offset 0, in
    order: :meth:`update` after each write, :meth:`hexdigest` at the end.  ``OSError`` if the file
    cannot be read back (raised by :meth:`hexdigest`)."""

    def __init__(self, hasher: Any, fd: int) -> None:
        self._hasher, self._fd = hasher, fd
        self._written = 0  # bytes written to the file, told by update()
        self._hashed = 0  # bytes hashed
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._final = False
        self._closed = False
        self._error: OSError | None = None

    def update(self, data: bytes | memoryview) -> None:
        """Count *data*, just written at the file's end (hashed here while the file is short)."""
        with self._cond:
            if self._thread is None and self._hashed == self._written and self._written + len(data) <= INLINE_BYTES:
                self._hasher.update(data)
                self._hashed += len(data)
            elif self._thread is None and not self._closed:
                self._start()
            else:
                self._cond.notify_all()
            self._written += len(data)

    def hexdigest(self) -> str:
        """The hash of every byte counted, once the thread hashed them all."""
        with self._cond:
            self._final = True
            if self._closed:
                raise OSError(errno.EIO, "fill given up")
            while self._error is None and (self._thread is not None or self._hashed < self._written):
                if self._thread is None:
                    self._start()
                self._cond.notify_all()
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return str(self._hasher.hexdigest())

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, args=(os.dup(self._fd),), name="fill-hash", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop hashing: the fill is given up (the thread ends after its current read)."""
        with self._cond:
            self._closed = self._final = True
            self._cond.notify_all()

    def _run(self, fd: int) -> None:
        buffer = memoryview(bytearray(READ_BYTES))
        try:
            while True:
                with self._cond:
                    if self._hashed >= self._written and not self._final:
                        self._cond.wait(IDLE)
                    if self._closed or self._hashed >= self._written:  # given up, asked for the hash, or idle
                        self._thread = None
                        self._cond.notify_all()
                        return
                    offset, end = self._hashed, min(self._written, self._hashed + READ_BYTES)
                got = os.preadv(fd, [buffer[:end - offset]], offset)
                if not got:
                    raise OSError(errno.EIO, f"fill file ended at {offset} bytes, {self._written} written")
                self._hasher.update(buffer[:got])
                with self._cond:
                    self._hashed = offset + got
        except BaseException as exc:  # noqa: BLE001 (raised by hexdigest)
            with self._cond:
                self._error = exc if isinstance(exc, OSError) else OSError(errno.EIO, repr(exc))
                self._thread = None
                self._cond.notify_all()
        finally:
            os.close(fd)

"""Marks of objects being read, seen by every process on the host: a shared ``flock`` on a file.

A reader holds ``tmp/<alg>-<hex>.reading`` (:func:`mark_reading`) while it reads an object the
collector could delete (the S3 driver's readers); the filesystem driver's readers hold the stored
file itself.  :func:`being_read` tells the collector, :func:`unread` lets a delete wait out
readers that are starting.  The last reader to let go removes the mark.

Collectors of other hosts (replicas sharing the bucket and the index) do not see these files: readers of
the bucket, and of a fill's file (until their client's last byte, after the fill ended too), mark objects
in the index too, through :class:`SharedMarks` (``maintenance/inuse.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from ..spec.reference import Digest

log = logging.getLogger("mirror.storage.marks")


class SharedMarks(Protocol):
    """Marks of objects in use that collectors on every host see (the index's in-use marks).

    :meth:`hold` blocks (call it from a worker thread) and comes before the object is looked up, so that
    a collector deleting it then either sees the mark or has deleted it before the look-up; it raises
    what the index raises when it cannot be reached.  Every :meth:`hold` is matched by one :meth:`release`."""

    def hold(self, digest: Digest) -> None: ...

    def release(self, digest: Digest) -> None: ...


class SharedHold:
    """One reader's hold of *digest* in *marks*, taken from a worker thread (:meth:`taken`) and let go
    once (:meth:`release`), even when the reader lets go while the hold is being taken."""

    def __init__(self, marks: SharedMarks, digest: Digest) -> None:
        self.marks, self.digest = marks, digest
        self._lock = threading.Lock()
        self._held = self._released = False

    @classmethod
    async def taken(cls, marks: SharedMarks, digest: Digest, close: Callable[[], object]) -> SharedHold:
        """The hold, taken; if it cannot be (cancelled, or what :meth:`SharedMarks.hold` raises), *close*
        is called (the reader's) before that is raised."""
        hold = cls(marks, digest)
        try:
            await anyio.to_thread.run_sync(hold._take)
        except BaseException:
            hold.release()  # (a thread still taking it lets go at once)
            close()
            raise
        return hold

    def _take(self) -> None:
        self.marks.hold(self.digest)
        with self._lock:
            if not self._released:
                self._held = True
                return
        self.marks.release(self.digest)  # let go of while it was taken

    def release(self) -> None:
        with self._lock:
            held, self._held, self._released = self._held, False, True
        if held:
            self.marks.release(self.digest)


def mark_reading(path: Path) -> int | None:
    """A descriptor of *path* holding a shared ``flock`` on it (created if need be), or None if the
    data directory refuses (the reader is then seen by its own process only)."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            log.debug("cannot mark %s as being read: %s", path, exc)
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _names(path, fd):
            return fd
        os.close(fd)  # removed by a last reader meanwhile: take the new one
    return None


def unmark_reading(path: Path, fd: int) -> None:
    """Let go of a :func:`mark_reading` descriptor; the last reader removes *path*."""
    try:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(path, fd):
                os.unlink(path)
    finally:
        os.close(fd)


def being_read(path: Path, *, remove: bool = False) -> bool:
    """Whether a reader in any process holds *path* (:func:`mark_reading`); if not and *remove*, it
    is removed (a reader that died left it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        if remove and _names(path, fd):
            os.unlink(path)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def unread(path: Path) -> Iterator[bool]:
    """Whether no reader in any process holds *path* (:func:`mark_reading`); while True, none can begin
    (its :func:`mark_reading` waits, then looks the object up again) until the block ends, which removes
    *path*.  True as well if the data directory refuses the file (readers are then unmarked too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("cannot hold %s: %s", path, exc)
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        yield free
    finally:
        if free and _names(path, fd):
            os.unlink(path)
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False

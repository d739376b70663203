"""Staging: private temp files on the store's filesystem, for content not yet verified as a whole.

A preload copies every blob it will store into ``DATA/tmp/stage-<id>.d/`` first (hashing on the
way) and moves them into ``blobs/`` only once the whole archive has been checked, so bad input
leaves the store unchanged.  The directory is kept alive by the flock held on
``DATA/tmp/stage-<id>.partial``: the store's start-up sweep (and ``mirror fsck``) removes that
lock file once its writer is gone, and :meth:`Staging.sweep` then removes the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from .filesystem import write_all
from .layout import Layout

CHUNK = 1 << 20
PIPELINE_DEPTH = 8


class Staging:
    """A private directory ``DATA/tmp/stage-<id>.d`` kept alive by a flock'ed ``stage-<id>.partial``.

    The store's start-up sweep removes the lock file once its writer is gone; :meth:`sweep`
    then removes the directory.  Files staged here are moved into the store by rename.
    """

    def __init__(self, layout: Layout) -> None:
        """Make the lock file and the directory; :class:`OSError` (and neither left) if either cannot be."""
        layout.tmp.mkdir(parents=True, exist_ok=True)
        self.lock_path, self.dir = layout.stage()
        self._lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            self.dir.mkdir()  # ENOSPC when the inodes are out, though the lock file took one
        except OSError:
            with contextlib.suppress(FileNotFoundError):  # swept before it was locked
                os.unlink(self.lock_path)
            os.close(self._lock)
            raise
        self._count = 0

    def new_file(self) -> tuple[Path, int]:
        """A new empty file (path, write descriptor)."""
        self._count += 1
        path = self.dir / str(self._count)
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def free_bytes(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        os.close(self._lock)

    @staticmethod
    def sweep(layout: Layout) -> int:
        """Remove staging directories whose writer is gone; return how many."""
        removed = 0
        for lock, entry in layout.stages():
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                finally:
                    os.close(fd)
                try:
                    os.unlink(lock)
                except FileNotFoundError:
                    pass
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed


def copy_hashing(read: Callable[[int], bytes], fd: int, size: int, algorithm: str,
                 progress: Callable[[int], None] | None = None) -> str:
    """Copy exactly *size* bytes from *read* to *fd*, hashing them; return the hex digest.

    Large copies write in a second thread while this one reads and hashes (both release the
    GIL), so hashing costs no wall time; at most ``PIPELINE_DEPTH`` chunks are in flight.
    """
    hasher = hashlib.new(algorithm)
    if size <= 4 * CHUNK:
        left = size
        while left:
            data = read(min(CHUNK, left))
            if not data:
                raise EOFError
            hasher.update(data)
            write_all(fd, data)
            left -= len(data)
            if progress is not None:
                progress(len(data))
        return hasher.hexdigest()
    chunks: queue.Queue[bytes | None] = queue.Queue(PIPELINE_DEPTH)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            while (data := chunks.get()) is not None:
                write_all(fd, data)
        except BaseException as exc:
            failure.append(exc)
            while chunks.get() is not None:  # keep the reader from blocking
                pass

    thread = threading.Thread(target=writer, name="stage-writer", daemon=True)
    thread.start()
    try:
        left = size
        while left and not failure:
            data = read(min(CHUNK, left))
            if not data:
                raise EOFError
            hasher.update(data)
            chunks.put(data)
            left -= len(data)
            if progress is not None:
                progress(len(data))
    finally:
        chunks.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return hasher.hexdigest()


"""Notes of the S3 driver's open multipart uploads, so that the uploads of a writer killed meanwhile
(``kill -9``, a crash) are aborted by the next start-up sweep (``S3Store.sweep_tmp``) rather than
left in the bucket, billed, until they are a day old.

A note ``tmp/<name>.meta-upload`` names the key and the upload id (:func:`write_note`); it lies
beside its writer's ``tmp/<name>.partial``, which the writer holds a ``flock`` on while the upload
is open: a fill's own file (``storage/s3fill.py``), or for any other object written
(``S3Ingest``: uploads completed by a client's ``PUT``, preloads, migrations) a lock file of its own
(:class:`IngestNote`).  A note beside an unlocked or missing file is a dead writer's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .layout import PARTIAL, Layout

log = logging.getLogger("mirror.storage.s3")
NOTE = ".meta-upload"


def write_note(path: Path, key: str, upload: str) -> None:
    """Record in *path* that the multipart upload *upload* of *key* is open (written whole, then renamed)."""
    partial = path.with_name(f"{path.name}.{secrets.token_hex(6)}")
    partial.write_text(json.dumps({"key": key, "upload": upload}))
    os.replace(partial, path)


def abort_left(path: Path, abort: Callable[[str, str], bool]) -> None:
    """Abort (with *abort(key, upload_id)*) the upload the note at *path* names, if any: an earlier
    writer's of the same object, whose abort failed.  The note goes once it is aborted, else it is
    kept under a name of its own: beside no file, the start-up sweep aborts it."""
    found = read_note(path)
    if found is not None and abort(*found):
        path.unlink(missing_ok=True)
    elif found is not None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, path.with_name(f"{path.name.removesuffix(NOTE)}-left-{secrets.token_hex(6)}{NOTE}"))


def abort_again(layout: Layout, unaborted: list[tuple[str, str]], abort: Callable[[str, str], bool]) -> None:
    """Abort (with *abort(key, upload_id)*) the *unaborted* ``(upload_id, key)`` again, whose abort
    failed before, and remove the notes of those it aborts now."""
    aborted = {upload for upload, key in unaborted if abort(key, upload)}
    for note, _ in layout.upload_notes() if aborted else ():
        if (found := read_note(note)) is not None and found[1] in aborted:
            note.unlink(missing_ok=True)


def read_note(path: Path) -> tuple[str, str] | None:
    """``(key, upload)`` of a note :func:`write_note` wrote, or None if it is gone or unreadable."""
    try:
        note = json.loads(path.read_text())
        return str(note["key"]), str(note["upload"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


class IngestNote:
    """The note of one ingest's multipart upload, with the lock file that says its writer lives."""

    def __init__(self, layout: Layout, key: str, upload: str) -> None:
        """Lock ``tmp/ingest-upload-<random>.partial``, then note *upload* beside it.  If the data
        directory refuses, there is no note (the upload is aborted a day old, as before)."""
        self._lock: Path | None = layout.temp("ingest-upload")
        self._note: Path | None = Path(str(self._lock).removesuffix(PARTIAL) + NOTE)
        self._fd: int | None = None
        try:
            self._fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if os.stat(self._lock).st_ino != os.fstat(self._fd).st_ino:  # a sweep took it before the lock
                raise FileNotFoundError(f"{self._lock} was removed")
            write_note(self._note, key, upload)
        except OSError as exc:
            log.warning("could not note the upload of %s in %s: %s", key, layout.tmp, exc)
            self.close()

    def release(self) -> None:
        """Let go of the lock but leave the note: the upload could not be aborted, the next
        start-up sweep will."""
        self._lock = self._note = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """The upload is completed or aborted: remove the note, then the lock file."""
        if self._note is not None:
            with contextlib.suppress(FileNotFoundError):
                self._note.unlink()
            self._note = None
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock.unlink()
            self._lock = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sweep_notes(layout: Layout, own: set[str], abort: Callable[[str, str], object]) -> int:
    """Abort (with *abort(key, upload_id)*) the uploads of writers that are gone: their note is
    beside a file they no longer lock; never one of *own* (this process's).  Returns how many."""
    removed = 0
    for note, fill in layout.upload_notes():
        try:
            fd: int | None = os.open(fill, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
            found = read_note(note)
            if found is not None and found[1] in own:
                continue  # this process's own (its lock would have said so)
            if found is not None:
                abort(*found)
                removed += 1
            note.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def abort_left_behind(client: Any, bucket: str, key: str, before: float,
                      abort: Callable[[str, str], object]) -> list[str]:
    """Abort (with *abort(key, upload_id)*) the unfinished multipart uploads of exactly *key* started
    before *before* (Unix time; when each started is the bucket's ``Initiated``); return their ids.

    For a replica that took over another's fill of *key* (``registry/cluster.py``) and stored the
    object: the upload of the replica that died or hung is its note's, in that replica's data
    directory, which no sweep here can read.  Called once the object is stored, so no writer of
    *key* loses anything but a redundant upload.
    """
    answer = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    aborted = []
    for upload in answer.get("Uploads", []):
        if upload["Key"] == key and upload["Initiated"].timestamp() < before:
            abort(key, upload["UploadId"])
            aborted.append(str(upload["UploadId"]))
    return aborted

"""Writes the S3 driver cannot take: the data directory's (fills and uploads are spooled there first)
and the bucket's.

A bucket may refuse writes while it serves what it holds: a policy that lets the key read only, an
account or bucket over its quota (``s3objects.WritesRefused``, ``EROFS`` to the callers, as a
read-only filesystem).  Fills are then served through unstored (``BYPASS``) and pushes answered
``507``, as on a full disk.  The refusal is recorded in ``DATA/refused`` (``refusals.RefusalRecord``,
shared by the worker processes), and ``/readyz`` reports it until the bucket takes a write again: an
object stored by anyone, or the probe :func:`write_problem` makes meanwhile (an upload started and
aborted, which leaves no object), so that a mirror taken out of a load balancer's rotation comes back
by itself.  Every function blocks: call them from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from .filesystem import ROOM_MARGIN
from .refusals import Refusal, probe_writes, refusal_errno
from .s3client import answer_skew, settings_problem, unreachable
from .s3objects import WritesRefused, backend_error

if TYPE_CHECKING:
    from .s3 import S3Store

#: The key of the probe's upload (under ``rootdirectory``): never completed, so never an object.
PROBE_KEY = "readyz-probe"

log = logging.getLogger("mirror.storage.s3")


def room_error(store: S3Store, size: int | None) -> OSError | None:
    """``ENOSPC`` when the data directory's filesystem cannot hold a fill's local file of *size*
    bytes (and :data:`~mirror.storage.filesystem.ROOM_MARGIN`): the bucket needs no room."""
    if size is None:
        return None
    try:
        fs = os.statvfs(store.layout.root)
    except FileNotFoundError:
        return None
    if size + ROOM_MARGIN <= fs.f_bavail * fs.f_frsize:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} for a local copy of {size} bytes")


def refused(store: S3Store, exc: BaseException, needed: int | None) -> None:
    """A refused write (*exc*, a ``refusals.refusal``): the bucket's is recorded, the data directory's
    logged.  Room is never asked for (``on_refused``): what a full disk or a quota refuses here is
    the data directory's (fills, uploads), which evicting objects from the bucket would not free."""
    code = refusal_errno(exc)
    if code is None:
        return
    if isinstance(exc, WritesRefused):  # logged by the caller, with what it was storing
        store.refusals.write(Refusal(time.time(), None, 0, code))
        return
    wanted = "" if needed is None else f" ({needed} bytes needed)"
    log.warning("the data directory refused a write%s: %s", wanted, exc)


def write_problem(store: S3Store, *, probe: bool = False) -> str | None:
    """Why the store cannot take writes now, or None: the data directory refuses a small file in
    ``tmp/``, the bucket does not answer, or it refused a write (or, with *probe*, none yet: a bucket
    read-only from the start is found before a client's fill or push) and refuses the probe's."""
    problem = probe_writes(store.layout.temp("readyz"))
    if problem is not None:
        return f"data directory {store.layout.root}: {problem}"
    try:
        store.probe.head_bucket(Bucket=store.bucket)
    except (BotoCoreError, ClientError) as exc:  # a refusal of the settings says what to check
        return settings_problem(exc, store.options, "HEAD of the bucket") \
            or f"bucket {store.bucket!r} does not answer: {unreachable(exc, store.options) or exc}"
    if store.refusals.read() is None and not probe:
        return None
    key = store.root + PROBE_KEY
    try:
        upload = store.probe.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    except (BotoCoreError, ClientError) as exc:
        error = backend_error(exc, f"an upload to {key}", store.options)
        refused(store, error, None)  # recorded, if the bucket refused it: /readyz probes again until it takes one
        return str(error)
    with contextlib.suppress(BotoCoreError, ClientError):  # else swept as a stale upload (S3Store.sweep_tmp)
        store.probe.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload)
    store.refusals.write(None)
    return None


def store_clock(store: S3Store) -> float:
    """Now by the object store's clock, which dates its objects (``LastModified``): this host's, less
    how far it is off the ``Date`` of a HEAD of the bucket (this host's alone if the answer has none).
    Raises ``StoreUnavailable``."""
    try:
        answer = store.quick.head_bucket(Bucket=store.bucket)
    except (BotoCoreError, ClientError) as exc:
        raise backend_error(exc, f"access to bucket {store.bucket!r}", store.options) from exc
    return time.time() - (answer_skew(answer) or 0.0)

"""What ended push uploads left in an object store: a tail a failed delete left behind (a replica
keeps an upload's unsent tail in the bucket between its requests: ``registry/roaming.py``), and a
completed object (``uploads/<uuid>/data``) whose delete failed after its commit copied it to the
digest's key, or whose process was killed between the two.  ``mirror fsck`` reports them, and the
server's upload sweep removes them (``registry/uploads.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..metadata.driver import Metadata
from ..storage.driver import BlobStore, UploadTails
from ..storage.layout import ORPHAN_GRACE
from ..storage.opening import upload_tails

log = logging.getLogger("mirror.uploads")


@dataclass(frozen=True, slots=True)
class LeftBehind:
    """One object of an ended upload: its ``uuid``, ``what`` it is (``tail`` or ``object``), and how to
    ``remove`` it (``OSError`` if the store does not answer)."""

    uuid: str
    what: str
    remove: Callable[[], None]


def bucket_uploads(store: BlobStore) -> UploadTails | None:
    """Where *store* keeps push uploads' objects: the bucket of a store that takes an upload's bytes in
    parts (S3); None for one that keeps an upload in its local file (the filesystem driver, whose module
    is all that is imported then)."""
    return upload_tails(store) if store.upload_part_size() is not None else None


def left_behind(tails: UploadTails, metadata: Metadata) -> list[LeftBehind]:
    """The tails and completed objects of uploads that have no record, from one listing: a tail at once
    (it is written after its record, so none is coming for it), an object once older than
    :data:`ORPHAN_GRACE` (one listed while its commit runs is looked up after the commit deleted the
    record).  Blocking; ``OSError`` if the store does not answer."""
    listed, old = tails.listed(), time.time() - ORPHAN_GRACE
    found = [LeftBehind(uuid, "tail", partial(tails.remove, uuid)) for uuid in sorted(listed.tails)
             if metadata.get_upload(uuid) is None]
    found += [LeftBehind(uuid, "object", partial(tails.remove_object, uuid)) for uuid, written
              in sorted(listed.objects.items()) if written < old and metadata.get_upload(uuid) is None]
    return found


def remove_left_behind(tails: UploadTails, metadata: Metadata) -> int:
    """Remove what :func:`left_behind` finds; return how many objects.  A store that does not answer is
    logged (a warning) and tried again at the next sweep."""
    removed = 0
    try:
        for each in left_behind(tails, metadata):
            each.remove()
            log.info("removed the %s of the ended upload %s from the store", each.what, each.uuid)
            removed += 1
    except OSError as exc:
        log.warning("could not remove what ended uploads left in the store: %s", exc)
    return removed

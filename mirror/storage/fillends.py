"""How a fill that failed ends (``storage/fill.py``): its mark for the readers following it, and
whether the store refused it (full, read-only, or an object store that does not answer).
"""

from __future__ import annotations

import contextlib
import os

from .driver import BlobStore, FillWriter, StoreUnavailable
from .growing import REFUSED_MODE
from .refusals import refusal


def settle_failed(store: BlobStore, ingest: FillWriter, *, refused: bool) -> None:
    """Mark a failed fill for its readers (refused by the store, or just failed) and remove it
    (blocking: what was sent to an object store is taken back too).

    A fill can fail after its commit marked it verified (fsync, rename or the upload refused): the
    mark is taken back (bytes never stored must not count as done) unless the writer ``serves_unstored``.
    """
    with contextlib.suppress(OSError):
        if not ingest.serves_unstored and not store.fill_placed(ingest.digest, ingest.fd):
            os.fchmod(ingest.fd, REFUSED_MODE if refused else 0o644)
    ingest.discard()


def fill_refusal(exc: BaseException) -> str | None:
    """Why the store cannot take the fill, if it cannot (a refused write, or an object store that
    stopped answering: :class:`StoreUnavailable`, whose message names the request): its readers
    then fetch the rest from the upstream."""
    if isinstance(exc, StoreUnavailable):
        return exc.strerror or str(exc)
    return refusal(exc)

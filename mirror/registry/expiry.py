"""The sweep of expired uploads while the server runs (:meth:`~mirror.registry.uploads.Uploads.sweep`)."""

from __future__ import annotations

import asyncio
import logging

from .reads import in_mixed_thread
from .uploads import Uploads

log = logging.getLogger("mirror.uploads")

#: Most seconds between two looks for expired uploads while the server runs.
SWEEP_EVERY = 600.0


async def expire_uploads(uploads: Uploads) -> None:
    """Sweep expired uploads (:meth:`Uploads.sweep`) every ``push.upload_ttl / 2`` seconds (at most
    :data:`SWEEP_EVERY`) while the server runs, so an upload abandoned meanwhile does not keep its
    file, record and parts until the next start.  Runs until cancelled; a failure is logged."""
    interval = min(max(uploads.upload_ttl / 2, 1.0), SWEEP_EVERY)
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await in_mixed_thread(uploads.sweep)
        except Exception as exc:  # noqa: BLE001 (the index is down, say: next time)
            log.warning("could not look for expired uploads: %s", exc)
            continue
        if removed:
            log.info("removed %d abandoned uploads", removed)

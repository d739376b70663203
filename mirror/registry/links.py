"""Links of fetched blobs to their repositories, written to the index beside the answer.

A blob fetched for a repository (or found there by the upstream's consent) is recorded as part of
it; the first byte of the answer does not wait for that write.  Until it is written, the pair is
*pending*: a request of the same repository joining the same fetch needs no consent of its own.
"""

from __future__ import annotations

import asyncio
import logging

from ..metadata.driver import Metadata
from .reads import in_index_thread

log = logging.getLogger("mirror.registry.pullthrough")


class BackgroundLinks:
    """Index writes of (repository, digest) links, in the background of the event loop."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: set[tuple[str, str]] = set()

    def add(self, repo: str, digest: str) -> None:
        """Link *digest* to *repo* soon (a failure is logged: the next request links it)."""
        task = asyncio.create_task(self._link(repo, digest))
        self._tasks.add(task)
        self._pending.add((repo, digest))

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._pending.discard((repo, digest))

        task.add_done_callback(done)

    def pending(self, repo: str, digest: str) -> bool:
        """True while a link of *digest* to *repo* is being written."""
        return (repo, digest) in self._pending

    async def _link(self, repo: str, digest: str) -> None:
        try:
            await in_index_thread(self.metadata.link, repo, [digest])
        except Exception as exc:  # noqa: BLE001 (served all the same; the next request links it)
            log.warning("could not record %s as part of %s: %s", digest, repo, exc)

    async def settled(self) -> None:
        """Wait until every link written in the background is done (shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

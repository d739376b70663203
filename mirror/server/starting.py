"""A worker's start-up when the object store or the index's database is down at that moment.

``mirror serve`` checks both before it starts its workers, and refuses to start (with one line) when
either is missing or misconfigured.  A worker starts again later too: uvicorn's supervisor replaces one
that died (killed for its memory, say).  If that start failed on an outage, the supervisor stops the whole
mirror (uvicorn >= 0.30: a worker that fails its start-up stops the parent), and every other worker with it.

So a worker's start-up outlives an outage: the bucket not answering is logged and left to the requests
that need it (``503``, ``/readyz``; they recover by themselves), and a database that does not answer is
waited for, while the other workers serve, until it answers or the worker is told to stop.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections.abc import Callable

import anyio
import anyio.to_thread

from ..metadata.driver import Metadata
from ..metadata.opening import CannotOpenIndex
from ..observe.said import first_to_say
from ..storage.driver import BlobStore, StoreUnavailable

__all__ = ["create_store", "open_index"]

log = logging.getLogger("mirror")

#: Seconds between a waiting worker's attempts to open the index; and between its log lines.
RETRY, REPORT = 2.0, 30.0


async def create_store(store: BlobStore) -> None:
    """``store.create()``; an object store that does not answer is logged, not raised
    (:class:`~mirror.storage.driver.StoreUnavailable`): what needs it answers ``503`` until it does."""
    try:
        await anyio.to_thread.run_sync(store.create)
    except StoreUnavailable as exc:
        log.warning("object store not reached at this worker's start: %s: requests that need it answer 503"
                    " until it answers", exc.strerror)
        return
    problem = await anyio.to_thread.run_sync(functools.partial(store.write_problem, probe=True))
    if problem is not None and first_to_say(f"no writes at start: {problem}"):
        log.warning("the store takes no writes at this start: %s: what it holds is served, what it has not is"
                    " streamed from the upstream unstored, and pushes answer 507 until it takes writes", problem)


async def open_index(opening: Callable[[], Metadata]) -> Metadata:
    """``opening()`` in a thread, called again every :data:`RETRY` seconds while it raises a
    :class:`~mirror.metadata.opening.CannotOpenIndex` whose database did not answer (``transient``).

    Raises the last error when it is not transient, or when the process is told to stop (``SIGTERM``
    or ``SIGINT`` seen by uvicorn's server) while waiting."""
    reported = 0.0
    while True:
        try:
            return await anyio.to_thread.run_sync(opening)
        except CannotOpenIndex as exc:
            if not exc.transient or _stopping():
                raise
            if time.monotonic() - reported >= REPORT:
                log.warning("%s: this worker waits for it before it serves (the others serve meanwhile)", exc)
                reported = time.monotonic()
        await anyio.sleep(RETRY)


def _stopping() -> bool:
    """Whether uvicorn's server has been told to exit: its handler of ``SIGTERM`` is a bound method
    of the server (``Server.handle_exit``), whose ``should_exit`` it sets."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))

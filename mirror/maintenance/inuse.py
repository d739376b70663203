"""This process's in-use marks in the index, for the collectors of every host (``metadata/marks.py``).

A replica reading an object from the bucket, or filling one, holds a mark on its digest in the index
(:class:`IndexMarks`, the :class:`~mirror.storage.marks.SharedMarks` of the S3 driver and of a cluster's
fills), so that a collector on another replica spares it and the images it belongs to.  The marks are
cheap on the hot path: one mark per digest and process, counted in memory by every transfer that holds
it, written to the index only when it is not there yet (or about to expire), then renewed for every
digest still held in one statement per :attr:`~IndexMarks.beat` (a third of the mark's TTL) by a thread.
A mark no transfer held for :data:`LINGER` seconds is withdrawn, with those idle about as long, in one
statement: a transfer of its blob starting meanwhile costs no round-trip either, and the collector
soon sees the blob free again.  The marks of a process that died expire by the database's clock after
their TTL.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from ..metadata.driver import Metadata, MetadataUnavailable
from ..spec.reference import Digest

log = logging.getLogger("mirror.maintenance.gc")

#: Seconds a mark lasts in the index without being renewed, unless given (``cluster.lease_ttl``).
TTL = 15.0
#: Seconds a mark no transfer holds stays in the index (half as much more, to withdraw several at once).
LINGER = 1.0


@dataclass
class _Mark:
    count: int = 0          # transfers holding it now
    deadline: float = 0.0   # time.monotonic() by which the index's mark expires, at the latest
    idle_since: float = 0.0  # time.monotonic() when the last transfer let go


class IndexMarks:
    """The marks of one process, as *holder* (unique per process) in *metadata*, each lasting *ttl* seconds.

    :meth:`hold` and :meth:`release` may be called from any thread; :meth:`hold` blocks when it writes to
    the index (:class:`~mirror.metadata.driver.MetadataUnavailable` if it cannot: the transfer then does
    not start).  :meth:`close` stops the renewals and withdraws the marks."""

    def __init__(self, metadata: Metadata, holder: str, ttl: float = TTL) -> None:
        self.metadata, self.holder, self.ttl = metadata, holder, ttl
        self.beat = ttl / 3
        self._marks: dict[str, _Mark] = {}
        self._state = threading.Lock()   # guards _marks
        self._writing = threading.Lock()  # orders this process's writes of marks: a withdrawal, then a new mark
        self._done = False
        self._wake = threading.Condition(self._state)  # notified when a mark becomes idle, and on close
        self._thread = threading.Thread(target=self._run, name="in-use-marks", daemon=True)
        self._thread.start()

    def hold(self, digest: Digest) -> None:
        key = str(digest)
        if self._held_fresh(key, time.monotonic()):
            return
        with self._writing:
            started = time.monotonic()
            if self._held_fresh(key, started):  # marked by another thread meanwhile
                return
            self.metadata.mark_in_use(self.holder, [key], self.ttl)
            with self._state:
                mark = self._marks.setdefault(key, _Mark())
                mark.count += 1
                mark.deadline = started + self.ttl

    def _held_fresh(self, key: str, now: float) -> bool:
        """Count one more transfer of *key* if its mark lasts at least a beat more (no write needed)."""
        with self._state:
            mark = self._marks.get(key)
            if mark is None or mark.deadline - now <= self.beat:
                return False
            mark.count += 1
            return True

    def release(self, digest: Digest) -> None:
        with self._state:
            mark = self._marks.get(str(digest))
            if mark is not None and mark.count > 0:
                mark.count -= 1
                if mark.count == 0:
                    mark.idle_since = time.monotonic()
                    self._wake.notify()

    def _run(self) -> None:
        next_beat = time.monotonic() + self.beat
        while True:
            with self._state:
                while not self._done and (now := time.monotonic()) < min(next_beat, self._withdrawal_due()):
                    self._wake.wait(min(next_beat, self._withdrawal_due()) - now)
                if self._done:
                    return
            beat = now >= next_beat
            if beat:
                next_beat = now + self.beat
            try:
                self.renew(beat=beat)
            except MetadataUnavailable as exc:  # the marks expire if this goes on; transfers go on
                log.warning("could not renew the marks of objects in use: %s", exc)
            except Exception:  # the thread must outlive any one failure
                log.exception("could not renew the marks of objects in use")

    def _withdrawal_due(self) -> float:
        """When the first idle mark is to be withdrawn (``inf``: none is idle); with the state lock held."""
        return min((mark.idle_since + LINGER for mark in self._marks.values() if mark.count == 0),
                   default=float("inf"))

    def renew(self, *, beat: bool = True) -> None:
        """Withdraw the marks idle for :data:`LINGER` (or half as long: one statement for several), and on
        a *beat* mark again every digest held."""
        with self._writing:
            now = time.monotonic()
            with self._state:
                idle = [key for key, mark in self._marks.items()
                        if mark.count == 0 and (now - mark.idle_since >= LINGER / 2 or mark.deadline <= now)]
                for key in idle:
                    del self._marks[key]
                busy = [key for key, mark in self._marks.items() if mark.count] if beat else []
            try:
                if busy:
                    self.metadata.mark_in_use(self.holder, busy, self.ttl)
                    with self._state:
                        for key in busy:
                            if (mark := self._marks.get(key)) is not None:
                                mark.deadline = now + self.ttl
            finally:
                if idle:
                    self.metadata.unmark_in_use(self.holder, idle)

    def close(self) -> None:
        with self._state:
            self._done = True
            self._wake.notify()
        self._thread.join()
        with self._state:
            keys, self._marks = list(self._marks), {}
        with contextlib.suppress(MetadataUnavailable):
            self.metadata.unmark_in_use(self.holder, keys)

"""Objects handed out by a presigned URL (``storage.s3.redirect``) stay marked as being read a while.

A client answered ``307`` fetches the object from the bucket itself, after the answer: a collector
deleting it in between (an eviction over the budget) would turn its download into a ``404`` from the
bucket.  So the reader that looked the object up lets go of its bytes but not of its marks (the
``tmp/`` one every process on the host sees, and the index's one other hosts see, ``storage/marks.py``):
they are kept for :data:`HOLD` seconds after the latest hand-out of the object, so a collector counts
the object (and its image) in use.  At most :data:`MOST` objects are held; beyond, the longest held
lets go first.  A download under way when the marks go is the bucket's affair: S3 finishes a GET
begun before a ``DELETE``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..spec.reference import Digest

#: Seconds an object stays marked after it was last handed out: a client follows a ``307`` at once,
#: and retries a failed download (from the registry again) within this.
HOLD = 60.0
#: Most objects held at once (each holds a descriptor, and a mark in a shared index).
MOST = 256


class HandedOut:
    """The marks of objects handed out, each let go (its *release* called, from a thread of this
    class) :attr:`hold` seconds after its latest :meth:`keep`."""

    def __init__(self, hold: float = HOLD, most: int = MOST) -> None:
        self.hold, self.most = hold, most
        self._held: OrderedDict[Digest, tuple[float, Callable[[], None]]] = OrderedDict()  # by deadline
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def keep(self, digest: Digest, release: Callable[[], None]) -> None:
        """Hold *release* (the object's marks) for :attr:`hold` seconds, in place of an earlier one."""
        done: list[Callable[[], None]] = []
        with self._changed:
            if (earlier := self._held.pop(digest, None)) is not None:
                done.append(earlier[1])
            self._held[digest] = (time.monotonic() + self.hold, release)
            while len(self._held) > self.most:
                done.append(self._held.popitem(last=False)[1][1])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="handed-out", daemon=True)
                self._thread.start()
            self._changed.notify()
        for release_ in done:
            release_()

    def held(self) -> int:
        """How many objects are held now."""
        with self._changed:
            return len(self._held)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._held:
                    self._changed.wait()
                digest, (deadline, release) = next(iter(self._held.items()))
                if (wait := deadline - time.monotonic()) > 0:
                    self._changed.wait(wait)
                    continue
                del self._held[digest]
            release()

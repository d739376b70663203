"""A circuit breaker for the S3 driver's clients (``storage/s3client.py``): while the store answers
nothing, requests fail at once instead of each waiting out its timeouts.

A hung store (its connections accepted, nothing answered: a stopped process, a network that drops
packets) makes a request wait out its client's timeouts: about 6 s for a HEAD, 40 s for a part.
Every request of a pull asked it in turn (a 3-layer pull took 30 s to be served from the upstream),
although ``/readyz`` already knew.

The breaker *opens* when a request timed out (botocore's connect or read timeout, its retries spent),
no request of this process got an answer from the store since that one was sent, and the bucket's
``HEAD`` (``/readyz``'s probe, made then by the request that timed out: 2 s more) gets none either:
a store that answers other requests, or the probe, is slow on one object, not hung.  While it is
open, one request every :data:`TRIAL_EVERY` seconds is let through to find out whether the store is
back; the others fail at once with :class:`StoreNotAnswering` (the driver's ``object store does not
answer``, a ``503`` at the HTTP edge).  Any answer closes it (an error answer is an answer: the store
is up).  ``/readyz``'s probe is never held, and its timeout opens the breaker as its answer closes
it, so a store that comes back is used again from the next probe or trial that finds it.

A refused connection or a TLS failure does not open it: those fail at once already.  One breaker
per store (each process and worker learns for itself), shared by the driver's four clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ConnectTimeoutError, ReadTimeoutError

#: Seconds between two requests let through to an open breaker's store.
TRIAL_EVERY = 5.0
#: The key of a request's botocore context that holds when it was sent (``time.monotonic()``).
_SENT = "mirror_s3_sent"

#: Its own logger: a one-shot command (``mirror gc``, ``fsck``) says in its last line what failed.
log = logging.getLogger("mirror.storage.s3.breaker")


class StoreNotAnswering(BotoCoreError):  # type: ignore[misc]
    """Raised instead of sending a request while the breaker is open (never retried by botocore)."""

    fmt = ("no request to {endpoint} got an answer for {seconds:.0f} s (one timed out): requests fail at once"
           " while it does not answer, one every {every:g} s (and /readyz's probe) still asking it")


class Breaker:
    """The state of one store, fed by the events of the clients given to :meth:`attach`.  Thread-safe.
    *confirm* is the probe's request (a ``HEAD`` of the bucket); what it raises is ignored."""

    def __init__(self, endpoint: str, confirm: Callable[[], object]) -> None:
        self._endpoint, self._confirm = endpoint, confirm
        self._lock = threading.Lock()
        self._answered = float("-inf")  # when the store last answered a request (monotonic)
        self._down_since: float | None = None  # open since (monotonic); None: closed
        self._next_trial = 0.0
        self._confirming: float | None = None  # when the request whose timeout the probe confirms was sent

    def attach(self, client: Any, *, probe: bool = False) -> None:
        """Feed this breaker with *client*'s answers and timeouts and hold its requests while it is
        open, unless *client* is the *probe*'s (never held; its timeout opens the breaker)."""
        events = client.meta.events
        events.register("before-call.s3", self._before if probe else self._before_held)
        events.register("after-call.s3", self._after)
        events.register("after-call-error.s3", self._after_probe_error if probe else self._after_error)

    def _before(self, context: dict[str, Any], **_: Any) -> None:
        context[_SENT] = time.monotonic()

    def _before_held(self, context: dict[str, Any], **_: Any) -> None:
        now = context[_SENT] = time.monotonic()
        with self._lock:
            if self._down_since is None or now >= self._next_trial:
                self._next_trial = now + TRIAL_EVERY
                return
            seconds = now - self._down_since
        raise StoreNotAnswering(endpoint=self._endpoint, seconds=seconds, every=TRIAL_EVERY)

    def _after(self, **_: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._answered, since, self._down_since = now, self._down_since, None
        if since is not None:
            log.warning("object store at %s answers again, after %.0f s: requests are sent to it again",
                        self._endpoint, now - since)

    def _unanswered(self, exception: Exception, context: dict[str, Any]) -> bool:
        """Whether *exception* is a timeout of a request no other answer came after, the breaker closed."""
        return isinstance(exception, (ConnectTimeoutError, ReadTimeoutError)) and self._down_since is None \
            and self._answered < context.get(_SENT, float("inf"))

    def _after_error(self, exception: Exception, context: dict[str, Any], **_: Any) -> None:
        with self._lock:
            if self._confirming is not None or not self._unanswered(exception, context):
                return
            self._confirming = context.get(_SENT, time.monotonic())
        try:
            self._confirm()  # the probe's own events open the breaker, or find the store up
        except Exception:  # noqa: BLE001 (its outcome is in its events)
            pass
        finally:
            with self._lock:
                self._confirming = None

    def _after_probe_error(self, exception: Exception, context: dict[str, Any], **_: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._unanswered(exception, context):
                return
            # Unanswered since the request whose timeout the probe confirms was sent (or the probe itself).
            sent = context.get(_SENT, now)
            self._down_since = sent if self._confirming is None else min(sent, self._confirming)
            self._next_trial = now + TRIAL_EVERY
        log.warning("object store at %s does not answer (a request timed out, and neither another one nor a HEAD of the"
                    " bucket got an answer since it was sent): requests to it fail at once until it answers, one"
                    " every %g s still asking it", self._endpoint, TRIAL_EVERY)

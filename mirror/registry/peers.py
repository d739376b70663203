"""Requests between the replicas of one mirror, signed with the secret they share (``cluster.secret_file``).

A request from a replica carries three headers:

* ``X-Mirror-Replica``: who sends it (its ``cluster.advertise`` URL: a replica's id);
* ``X-Mirror-Time``: when, in whole seconds since the epoch; refused if more than :data:`MAX_SKEW`
  seconds away from the receiver's clock, so a captured request cannot be replayed later;
* ``X-Mirror-Signature``: ``v1=`` and the hex HMAC-SHA256 (RFC 2104) under the shared secret of
  :func:`message`, the method, path, time and replica joined by newlines.

The receiver recomputes the HMAC and compares in constant time (:func:`hmac.compare_digest`).  A
request without the headers is answered ``401 UNAUTHORIZED``; one whose signature or time is wrong
``403 DENIED``, in the spec's JSON error format (:class:`~mirror.spec.errors.APIError`), the time's
with ``X-Mirror-Refused: clock`` (the secret is right: the two hosts' clocks are apart).  The
secret itself never leaves the process: not in a header, a log line or a metric.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping

from ..spec.errors import APIError

REPLICA_HEADER = "X-Mirror-Replica"
TIME_HEADER = "X-Mirror-Time"
SIGNATURE_HEADER = "X-Mirror-Signature"
#: On a refusal of a rightly signed request whose time is too far off: ``clock``.
REFUSED_HEADER = "X-Mirror-Refused"
#: Seconds a signed request's time may differ from the receiver's clock, either way.
MAX_SKEW = 30
_SCHEME = "v1="
_TIME_RE = re.compile(r"\d{1,12}")
_REPLICA_RE = re.compile(r"[\x21-\x7e]{1,300}")


def message(method: str, path: str, timestamp: str, replica: str) -> bytes:
    """What is signed: ``METHOD\\nPATH\\nTIME\\nREPLICA`` (PATH with its query string, if any)."""
    return f"{method.upper()}\n{path}\n{timestamp}\n{replica}".encode()


def _mac(secret: str, data: bytes) -> str:
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path: str, replica: str, now: float | None = None) -> dict[str, str]:
    """The headers that make a request of *replica* for ``METHOD PATH`` acceptable to the others."""
    timestamp = str(int(time.time() if now is None else now))
    signature = _mac(secret, message(method, path, timestamp, replica))
    return {REPLICA_HEADER: replica, TIME_HEADER: timestamp, SIGNATURE_HEADER: _SCHEME + signature}


def verify(secret: str, method: str, path: str, headers: Mapping[str, str], now: float | None = None) -> str:
    """The replica that signed the request; :class:`APIError` ``UNAUTHORIZED`` (401) without a
    signature, ``DENIED`` (403) with a wrong one or a time more than :data:`MAX_SKEW` seconds off."""
    replica = headers.get(REPLICA_HEADER.lower()) or headers.get(REPLICA_HEADER)
    timestamp = headers.get(TIME_HEADER.lower()) or headers.get(TIME_HEADER)
    signature = headers.get(SIGNATURE_HEADER.lower()) or headers.get(SIGNATURE_HEADER)
    if not replica or not timestamp or not signature:
        raise APIError("UNAUTHORIZED", "a request between replicas must be signed with the cluster's secret",
                       detail={"headers": [REPLICA_HEADER, TIME_HEADER, SIGNATURE_HEADER]})
    if not _REPLICA_RE.fullmatch(replica) or not _TIME_RE.fullmatch(timestamp):
        raise APIError("DENIED", "malformed replica signature")
    expected = _SCHEME + _mac(secret, message(method, path, timestamp, replica))
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise APIError("DENIED", "bad replica signature")
    skew = abs((time.time() if now is None else now) - int(timestamp))
    if skew > MAX_SKEW:
        raise APIError("DENIED", f"replica signature's time is {skew:.0f}s off (at most {MAX_SKEW}s)",
                       headers={REFUSED_HEADER: "clock"})
    return replica

"""Upstream failures as the client's API errors, when nothing cached can answer instead.

The one place the pull-through policy (``registry/pullthrough.py``) maps the upstream client's error tree
(``upstream/client.py``) onto the spec's error codes (``spec/errors.py``).
"""

from __future__ import annotations

from ..spec.errors import APIError
from ..upstream.errors import UpstreamDenied, UpstreamError, UpstreamInvalid, UpstreamNotFound, UpstreamRateLimited

#: Seconds a client is told to wait (``Retry-After``, RFC 9110 section 10.2.3) before it asks again
#: for something the upstream could not give and nothing cached answers, when the upstream named no
#: time of its own: the retries are spent, asking again at once would only fail again.
UPSTREAM_RETRY_AFTER = 10
#: After a 429, an upstream's cached copies answer without asking it for its Retry-After (seconds; else
#: :data:`UPSTREAM_RETRY_AFTER`), at most this long: each request would spend a HEAD and a refused GET.
RATE_LIMITED_QUIET = 60.0


def api_error(exc: UpstreamError, not_found: str, *, unconfirmed: bool = False) -> APIError:
    """The client-facing error for an upstream failure with nothing cached to fall back on; with
    *unconfirmed*, a blob stored for another repository only, which the upstream could not confirm
    this repository has (it is not served here without that: ``PullThrough._consent``)."""
    error = _api_error(exc, not_found)
    if unconfirmed:  # "... and no cached copy" would say the blob is not stored
        error.message = error.message.replace("no cached copy", "the blob is cached for other repositories only:"
                                              " the upstream must confirm this one has it")
    return error


def _api_error(exc: UpstreamError, not_found: str) -> APIError:
    if isinstance(exc, UpstreamNotFound):
        code = exc.code if exc.code in {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"} else not_found
        return APIError(code)
    if isinstance(exc, UpstreamRateLimited):
        return APIError("TOOMANYREQUESTS", "upstream rate limit reached and no cached copy",
                        headers={"Retry-After": exc.retry_after or str(UPSTREAM_RETRY_AFTER)})
    if isinstance(exc, UpstreamDenied):
        return APIError("NAME_UNKNOWN", detail="upstream refused access: the repository does not exist "
                                               "or needs credentials")
    if isinstance(exc, UpstreamInvalid):
        return APIError("UNAVAILABLE", "upstream sent an invalid answer", detail=str(exc), status=502)
    return APIError("UNAVAILABLE", detail=str(exc),
                    headers={"Retry-After": exc.retry_after or str(UPSTREAM_RETRY_AFTER)})

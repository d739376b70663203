"""The upstream client's exception tree: what a request to an upstream registry can fail with.

Each carries the upstream's status and spec error code when it sent one::

    UpstreamError
     +-- UpstreamUnavailable    connection refused or reset, timeout, 5xx
     |    +-- UpstreamCredentialsRejected   the token server refused the configured credentials
     +-- UpstreamRateLimited    429 (Docker Hub's pull limit)
     +-- UpstreamNotFound       404 from the registry (see :func:`upstream.answers.registry_not_found`)
     +-- UpstreamDenied         401 / 403 after authenticating
     +-- UpstreamInvalid        an answer that breaks the protocol: wrong digest, oversize manifest,
                                a manifest answer that is not a manifest (a login page), an HTML 404

Raised by the upstream client (``upstream/client.py``, ``upstream/auth.py``, ``upstream/paging.py``); only
the policy layer (``registry/pullthrough.py``, ``registry/referrers.py``) translates them into API errors.  This module
imports nothing of the mirror.
"""

from __future__ import annotations


class UpstreamError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamCredentialsRejected(UpstreamUnavailable):
    """The token server refused the mirror's own credentials (``upstream.username``/``password``)."""


class UpstreamRateLimited(UpstreamError):
    pass


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamDenied(UpstreamError):
    pass


class UpstreamInvalid(UpstreamError):
    pass

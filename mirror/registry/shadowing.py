"""Whether a push would stand in for a repository the upstream serves under the same name.

A pushed repository is answered from the store only (``registry/local.py``), so a push of a name the
upstream serves would replace the upstream's image for every client of the mirror (dockerd's
``--registry-mirror``, containerd's ``?ns=docker.io``), for good.  A push to a name the mirror has
cached is refused for that reason; so is the first push to a name it has not cached yet, when the
upstream lists a tag of that repository (``GET /v2/<name>/tags/list?n=1``, OCI distribution spec,
"Listing Tags").  ``push.over_cache: true`` allows both.

The upstream's answer decides:

* ``404`` (no such repository), ``401`` or ``403`` (not served to the mirror: nothing to stand in
  for), or an empty list: the push goes on;
* an answer that cannot tell (``5xx``, ``429``, one that is not a tag list), after ``upstream.retries``:
  the push is refused ``503 UNAVAILABLE`` with ``Retry-After`` (else a blip would let a push shadow
  the upstream's image for good);
* no answer at all within :data:`ASK_SECONDS` (unreachable, hung, or absent on an air-gapped site):
  the push goes on, with a warning, so that pushes do not depend on an upstream that is not there.

Imports ``upstream/errors.py`` and ``registry/failures.py`` only; the client is passed in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..spec.errors import APIError
from ..upstream.errors import UpstreamDenied, UpstreamError, UpstreamNotFound
from .failures import UPSTREAM_RETRY_AFTER

log = logging.getLogger("mirror.registry.local")

#: Most seconds the upstream is waited for (its connect and read timeouts, if shorter).
ASK_SECONDS = 10.0


async def upstream_serves(upstream: Any, name: str) -> bool:
    """Whether *upstream* (an :class:`~mirror.upstream.client.Upstream`) lists a tag of repository
    *name* (as a client names it: the library namespace is added as for a pull); :class:`APIError`
    ``UNAVAILABLE`` when its answer cannot tell."""
    config = upstream.config
    try:
        async with asyncio.timeout(min(ASK_SECONDS, config.connect_timeout + config.read_timeout)):
            return bool(await upstream.tags(upstream.canonical_name(name), limit=1))
    except (UpstreamNotFound, UpstreamDenied):
        return False
    except UpstreamError as exc:
        if exc.status is None:  # not answered: unreachable
            return _unanswered(config.registry, name, str(exc))
        raise APIError("UNAVAILABLE", f"cannot tell whether the upstream serves {name}, which a push would stand "
                                      "in for: try again", detail=str(exc),
                       headers={"Retry-After": exc.retry_after or str(UPSTREAM_RETRY_AFTER)}) from exc
    except TimeoutError:
        return _unanswered(config.registry, name, "no answer in time")


def _unanswered(registry: str, name: str, why: str) -> bool:
    log.warning("push to %s: the upstream %s did not say whether it serves that repository (%s); the push goes on",
                name, registry, why)
    return False

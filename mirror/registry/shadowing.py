"""Whether a push would stand in for a repository the upstream serves under the same name.

A pushed repository is answered from the store only (``registry/local.py``), so a push of a name the
upstream serves would replace the upstream's image for every client of the mirror (dockerd's
``--registry-mirror``, containerd's ``?ns=docker.io``), for good.  A push to a name the mirror has
cached is refused for that reason; so is the first push to a name it has not cached yet, when the
upstream lists a tag of that repository (``GET /v2/<name>/tags/list?n=1``, OCI distribution spec,
"Listing Tags").  ``push.over_cache: true`` allows both.

The upstream's answer decides only when it gives one: a ``404`` (no such repository), ``401`` or
``403`` (not served to the mirror: nothing to stand in for) or an empty list lets the push go on;
so does an upstream that does not answer within :data:`ASK_SECONDS` (down, rate-limited, or absent on
an air-gapped site), with a warning, so that pushes do not depend on the upstream.

Imports ``upstream/errors.py`` only; the client is passed in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..upstream.errors import UpstreamDenied, UpstreamError, UpstreamNotFound

log = logging.getLogger("mirror.registry.local")

#: Most seconds the upstream is waited for (its connect and read timeouts, if shorter).
ASK_SECONDS = 10.0


async def upstream_serves(upstream: Any, name: str) -> bool:
    """Whether *upstream* (an :class:`~mirror.upstream.client.Upstream`) lists a tag of repository
    *name* (as a client names it: the library namespace is added as for a pull)."""
    config = upstream.config
    try:
        async with asyncio.timeout(min(ASK_SECONDS, config.connect_timeout + config.read_timeout)):
            return bool(await upstream.tags(upstream.canonical_name(name), retries=0, limit=1))
    except (UpstreamNotFound, UpstreamDenied):
        return False
    except (UpstreamError, TimeoutError) as exc:
        log.warning("push to %s: the upstream %s did not say whether it serves that repository (%s); "
                    "the push goes on", name, config.registry, exc or "no answer in time")
        return False

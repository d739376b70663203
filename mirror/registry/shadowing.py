"""Whether a push would stand in for a repository the upstream serves under the same name.

A pushed repository is answered from the store only (``registry/local.py``), so a push of a name the
upstream serves would replace the upstream's image for every client of the mirror (dockerd's
``--registry-mirror``, containerd's ``?ns=docker.io``), for good.  A push to a name the mirror has
cached is refused for that reason; so is the first push to a name it has not cached yet, when the
upstream lists a tag of that repository (``GET /v2/<name>/tags/list?n=1``, OCI distribution spec,
"Listing Tags").  ``push.over_cache: true`` allows both.  With ``push.prefixes`` set, the names
under them are the site's own: none is asked about upstream (the question names the repository to
the upstream, which a site keeping its names private may not want).

The upstream's answer decides:

* ``404`` (no such repository), ``401`` or ``403`` (not served to the mirror: nothing to stand in
  for), or an empty list: the push goes on;
* an answer that cannot tell (``5xx``, ``429``, one that is not a tag list) is asked again
  (``upstream.retries``, so a blip does not let a push through), and so is a connection that failed;
* then, or with no answer at all within :data:`ASK_SECONDS` (down, hung, or absent on an air-gapped
  site), the push goes on, with a warning naming it: pushes beside the cache do not depend on the
  upstream being up.

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
    *name* (as a client names it: the library namespace is added as for a pull); False when it
    cannot tell."""
    config = upstream.config
    try:
        async with asyncio.timeout(min(ASK_SECONDS, config.connect_timeout + config.read_timeout)):
            return bool(await upstream.tags(upstream.canonical_name(name), limit=1))
    except (UpstreamNotFound, UpstreamDenied):
        return False
    except UpstreamError as exc:
        return _unanswered(config.registry, name, str(exc))
    except TimeoutError:
        return _unanswered(config.registry, name, "no answer in time")


def _unanswered(registry: str, name: str, why: str) -> bool:
    log.warning("push to %s: the upstream %s did not say whether it serves that repository (%s); the push goes on",
                name, registry, why)
    return False


class UpstreamQuestions:
    """:func:`upstream_serves` of one upstream, one question per name at a time: the first writes of a
    push come together (dockerd uploads its layers in parallel), and share one answer.  An answer is
    kept :data:`ANSWER_KEPT` seconds: a write that comes just after it, before the first one made the
    repository local in the index (skopeo's mounts and uploads), takes it rather than asking again."""

    #: Seconds an answer is kept for the push's later first writes.
    ANSWER_KEPT = 10.0

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self._asking: dict[str, tuple[asyncio.Future[bool], float]] = {}  # name -> (question, when asked)

    async def __call__(self, name: str) -> bool:
        now = asyncio.get_running_loop().time()
        found = self._asking.get(name)
        if found is None or (found[0].done() and (found[0].cancelled() or found[0].exception() is not None
                                                  or now - found[1] > self.ANSWER_KEPT)):
            for old in [n for n, (q, at) in self._asking.items() if q.done() and now - at > self.ANSWER_KEPT]:
                del self._asking[old]
            asking = asyncio.ensure_future(upstream_serves(self.upstream, name))
            asking.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved
            found = self._asking[name] = (asking, now)
        return await asyncio.shield(found[0])

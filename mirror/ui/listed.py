"""The tags an upstream lists for a cached repository, shown on its page beside the cached ones.

Asked of the repository's upstream as ``GET /v2/<name>/tags/list`` asks it (the whole list,
following the upstream's own paging: :meth:`~mirror.upstream.client.Upstream.tags`), within
:data:`WAIT` seconds, so that an upstream that hangs does not hang the page; names that are not
tags by the spec's grammar (OCI distribution spec, "Pulling manifests") are left out.  Each
answer, and each failure, is kept :data:`KEEP` seconds for the repository (paging through a long
list, or many views while the upstream is down, ask it once), for at most :data:`MEMO_SIZE`
repositories at once.
A failure is a :class:`Listed` without tags and with the reason, for the page to say why only
the cached tags are shown.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import anyio

from ..registry.namespaces import Namespaces
from ..spec.errors import APIError
from ..spec.reference import TAG_RE
from ..upstream.errors import (
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
)

#: Seconds the upstream has to list a repository's tags for its page.
WAIT = 3.0
#: Seconds an answer (or a failure) is kept for the next views of the same repository.
KEEP = 10.0
#: Repositories whose upstream list is kept at once.
MEMO_SIZE = 64


@dataclass(frozen=True)
class Listed:
    """The upstream's tags of one repository (None when it could not be asked), and why not."""

    registry: str
    tags: frozenset[str] | None
    problem: str = ""


def _reason(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {WAIT:g} s"
    if isinstance(exc, UpstreamNotFound):
        return "it does not know this repository"
    if isinstance(exc, UpstreamRateLimited):
        return "it is rate-limiting the mirror"
    if isinstance(exc, UpstreamDenied):
        return "it refused the mirror's credentials"
    if isinstance(exc, UpstreamInvalid):
        return "its answer was not a tag list"
    if isinstance(exc, UpstreamError) and exc.status:
        return f"it answered {exc.status}"
    return "it could not be reached"


class UpstreamTags:
    """The upstream lists of cached repositories' tags, each kept :data:`KEEP` seconds."""

    def __init__(self) -> None:
        self._memo: OrderedDict[str, tuple[float, Listed]] = OrderedDict()

    async def listed(self, namespaces: Namespaces, name: str, key: str) -> Listed:
        """What the upstream of the cached repository *name* (index key *key*) lists now."""
        registry = key.partition("/")[0]
        now = time.monotonic()
        kept = self._memo.get(key)
        if kept is not None and now - kept[0] < KEEP:
            return kept[1]
        try:
            pull, upstream_name = namespaces.upstream_for(name)
            with anyio.fail_after(WAIT):
                # One try: a page is not held back by retries; the next view in KEEP seconds asks again.
                tags = await pull.upstream.tags(pull.upstream.canonical_name(upstream_name), retries=0)
            found = Listed(registry, frozenset(t for t in tags if TAG_RE.fullmatch(t)))
        except (UpstreamError, TimeoutError, APIError) as exc:
            found = Listed(registry, None, _reason(exc))
        now = time.monotonic()
        self._memo[key] = (now, found)
        self._memo.move_to_end(key)
        # Oldest first: drop what expired, and beyond MEMO_SIZE.
        while self._memo and (len(self._memo) > MEMO_SIZE or now - next(iter(self._memo.values()))[0] >= KEEP):
            self._memo.popitem(last=False)
        return found

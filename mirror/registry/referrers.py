"""Referrers of cached repositories (distribution-spec v1.1, "Listing Referrers").

The mirror never answers "no referrers" for what it cannot know:

* The upstream has the Referrers API: its list, every page, filtered by ``artifactType`` here when
  it did not filter.  The list is kept, so that when the upstream is down, rate-limits or answers
  nonsense, the last list plus the referrers pulled through since is served (``STALE``).
* The upstream has no Referrers API (a registry's 404, as docker-registry 2.8 answers, or an
  answer that is not an image index): ``404 UNSUPPORTED``.  A 404 web page (``text/html``: an
  ingress or proxy that does not route the request) is not the registry's answer and records
  nothing: it is an invalid answer, as below.  That is the spec's signal for "read the referrers tag
  schema" (``<alg>-<hex>``): oras-go and notation fall back on any 404 but ``NAME_UNKNOWN`` (which
  they read as "no such repository"), go-containerregistry (cosign) on any 404.  The fallback tag
  then comes through the manifest path like any tag: cached, revalidated after ``cache.tag_ttl``,
  served stale when the upstream is down.  An index the mirror built from that tag would need the
  same revalidation a second time, and would claim an API the upstream does not have.
* The upstream is unreachable and never listed this digest: the referrers pulled through that
  match, if there are any, else 503.  An empty 200 would say "not signed".

Pulled-through manifests with a ``subject`` are recorded as referrers of it (:func:`referrer_of`),
in the same index entries as pushed ones, so what is known survives the upstream going away.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..metadata.driver import Metadata
from ..spec.errors import APIError
from ..spec.pushed import referrer_descriptor
from ..spec.reference import Digest, ParseError, parse_digest
from ..upstream.client import Upstream
from ..upstream.errors import (
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
)
from .reads import IndexReads, in_index_thread

log = logging.getLogger("mirror.registry.referrers")


@dataclass(frozen=True)
class ReferrersAnswer:
    """Descriptors of the referrers (already filtered), and whether they come from what was kept."""

    manifests: list[dict[str, Any]]
    stale: bool


def referrer_of(body: bytes, media_type: str, digest: str) -> tuple[str, dict[str, Any]] | None:
    """``(subject digest, referrer descriptor)`` of a manifest with a valid ``subject``, else None."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
        return None
    try:
        subject_digest = str(parse_digest(subject["digest"]))
    except ParseError:
        return None
    return subject_digest, referrer_descriptor(doc, media_type, digest, len(body))


class UpstreamReferrers:
    """The referrers policy of one upstream (see the module's docstring)."""

    def __init__(self, metadata: Metadata, upstream: Upstream, registry: str) -> None:
        self.metadata = metadata
        self.reads = IndexReads(metadata)
        self.upstream = upstream
        self.registry = registry
        self._stale_logged: set[str] = set()

    async def list(self, repo: str, name: str, digest: Digest, artifact_type: str | None) -> ReferrersAnswer:
        """Referrers of *digest* in *repo* (the upstream's *name*).

        Raises :class:`APIError`: ``UNSUPPORTED`` (404) when the upstream has no Referrers API,
        ``NAME_UNKNOWN`` when it has no such repository or refuses access, ``UNAVAILABLE`` (503, or
        502 for an invalid answer) or ``TOOMANYREQUESTS`` when it cannot answer and nothing is known.
        """
        try:
            answer = await self.upstream.referrers(name, digest, artifact_type)
        except UpstreamNotFound as exc:
            if exc.code == "NAME_UNKNOWN":
                raise APIError("NAME_UNKNOWN", detail={"name": name}) from exc
            await in_index_thread(self.metadata.set_referrers_api, self.registry, False)
            raise _no_api(digest) from exc
        except UpstreamDenied as exc:
            raise APIError("NAME_UNKNOWN", detail="upstream refused access: the repository does not exist "
                                                  "or needs credentials") from exc
        except UpstreamError as exc:
            return await self.reads.ask(self._known, repo, digest, artifact_type, exc)  # three reads
        manifests = answer.manifests
        if manifests is None:
            await in_index_thread(self.metadata.set_referrers_api, self.registry, False)
            raise _no_api(digest)

        def keep() -> None:
            self.metadata.set_referrers_api(self.registry, True)
            self.metadata.put_upstream_referrers(repo, str(digest), artifact_type if answer.filtered else None,
                                                 manifests, time.time())

        await in_index_thread(keep)
        return ReferrersAnswer(_of_type(manifests, artifact_type), stale=False)

    def _known(self, repo: str, digest: Digest, artifact_type: str | None, exc: UpstreamError) -> ReferrersAnswer:
        """The answer when the upstream cannot give one: what was kept, if it is enough to say anything."""
        if self.metadata.referrers_api(self.registry) is False:
            raise _no_api(digest) from exc
        listed = self.metadata.upstream_referrers(repo, str(digest), artifact_type)
        pulled = self.metadata.referrers(repo, str(digest))
        seen = {d["digest"] for d in listed or ()}
        known = _of_type([*(listed or ()), *(d for d in pulled if d["digest"] not in seen)], artifact_type)
        if listed is None and not known:
            if isinstance(exc, UpstreamRateLimited):
                headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
                raise APIError("TOOMANYREQUESTS", "upstream rate limit reached and its referrers of this digest "
                                                  "are not known", headers=headers) from exc
            if isinstance(exc, UpstreamInvalid):  # as for manifests and blobs: a bad gateway
                raise APIError("UNAVAILABLE", f"upstream sent an invalid answer and its referrers of {digest} "
                                              "are not known", detail=str(exc), status=502) from exc
            raise APIError("UNAVAILABLE", f"upstream unavailable and its referrers of {digest} are not known",
                           detail=str(exc)) from exc
        key = f"{repo}@{digest}"
        if key not in self._stale_logged:
            self._stale_logged.add(key)
            log.warning("upstream failed for the referrers of %s, answering what is known: %s", key, exc)
        return ReferrersAnswer(known, stale=True)


def _of_type(descriptors: list[dict[str, Any]], artifact_type: str | None) -> list[dict[str, Any]]:
    return [dict(d) for d in descriptors if artifact_type is None or d.get("artifactType") == artifact_type]


def _no_api(digest: Digest) -> APIError:
    return APIError("UNSUPPORTED", "the upstream registry has no Referrers API: read the referrers tag schema",
                    detail={"tag": f"{digest.algorithm}-{digest.hex}"}, status=404)

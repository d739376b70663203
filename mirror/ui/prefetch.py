"""Pull an image into the cache without a client: what the web UI's "Prefetch" does.

The tag (or digest) is resolved through the pull-through repository, as a client's pull would be
(:class:`~mirror.registry.cached.CachedRepository`): its manifest, every platform's manifest of an
index (as ``skopeo copy --all`` would), and each image's config and layers, each read to its end so
that a fill completes and is verified as for a client.  Blobs already stored are not read again;
non-distributable layers (OCI image spec, "Image Layer Filesystem Changeset": their ``urls`` name
another host) are left out, as clients fetch them elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry.repository import Repository
from ..spec.manifest import DOCKER_FOREIGN_LAYER, INDEX_TYPES, MANIFEST_MEDIA_TYPES, NONDISTRIBUTABLE_PREFIX, references
from ..spec.reference import Digest, parse_digest
from ..storage.bypass import BypassBlob
from ..storage.growing import GrowingBlob

#: Manifests fetched for one prefetch at most (an index's platforms included).
MAX_MANIFESTS = 64


@dataclass
class Fetched:
    """What a prefetch did: its manifest's digest, manifests read, blobs fetched and already stored."""

    digest: str = ""
    manifests: int = 0
    fetched: int = 0
    present: int = 0


async def prefetch(repository: Repository, reference: str | Digest) -> Fetched:
    """Fetch *reference* of *repository* and what it references into the cache.

    Errors are the repository's (:class:`~mirror.spec.errors.APIError`: ``MANIFEST_UNKNOWN``, an
    upstream that cannot be reached...), raised as they come; what was stored by then stays.
    """
    done = Fetched()
    accept = set(MANIFEST_MEDIA_TYPES)
    pending: list[str | Digest] = [reference]
    seen: set[str] = set()
    while pending and done.manifests < MAX_MANIFESTS:
        result = await repository.manifest(pending.pop(0), accept)
        done.manifests += 1
        done.digest = done.digest or result.digest
        for descriptor in references(result.body):
            if descriptor.digest in seen:
                continue
            seen.add(descriptor.digest)
            if result.media_type in INDEX_TYPES:
                if descriptor.media_type in MANIFEST_MEDIA_TYPES:
                    pending.append(parse_digest(descriptor.digest))
            elif descriptor.media_type not in MANIFEST_MEDIA_TYPES and not _foreign(descriptor.media_type,
                                                                                       descriptor.urls):
                await _blob(repository, parse_digest(descriptor.digest), done)
    return done


def _foreign(media_type: str, urls: tuple[str, ...]) -> bool:
    return media_type.startswith(NONDISTRIBUTABLE_PREFIX) or media_type == DOCKER_FOREIGN_LAYER or bool(urls)


async def _blob(repository: Repository, digest: Digest, done: Fetched) -> None:
    source = (await repository.blob(digest)).source
    try:
        if not isinstance(source, (GrowingBlob, BypassBlob)):  # stored already
            done.present += 1
            return
        async for _ in source.chunks(0, None):
            pass
        done.fetched += 1
    finally:
        source.close()

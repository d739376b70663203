"""Which repository a request's name is: a pushed one, or the cache of which upstream.

Built once at start-up (``server/app.py``) and reached as ``request.state.namespaces``; the routes ask
it for a :class:`~mirror.registry.repository.Repository` bound to the name and never look further.

* The upstream a name is for: the registry containerd names in ``?ns=`` (Docker Hub by any of its host
  names), else the registry a prefix of the name names when one is configured
  (``/v2/ghcr.io/org/app/...`` is ``org/app`` there), else the default upstream.
* A name with the default registry's prefix is the name without it (``docker.io/team/x`` is ``team/x``).
* A name of the default upstream's that was pushed to is local (``registry/local.py``): pushed
  repositories share the default registry's names (what ``dockerd --registry-mirror`` and a
  containerd mirror of it ask for).  Any other name is that upstream's cache (``registry/cached.py``).
  Names under ``push.prefixes`` take pushes; the first one makes them local.
* A name that begins with the host of a registry no upstream is configured for (``quay.io/org/app``),
  while the default upstream is Docker Hub, whose names never do, is not asked of Docker Hub: its
  reads answer ``NAME_UNKNOWN`` saying no upstream is configured for it (it takes pushes as any name).
* A name of another upstream's (by ``?ns=`` or by its prefix) is always that registry's: it is never
  answered with a pushed repository, and takes no pushes (``DENIED``), so a push cannot stand in for
  another registry's image.
"""

from __future__ import annotations

import logging
import re
import time

from ..spec.errors import APIError
from ..spec.names import DOCKER_HUB, DOCKER_HUB_ALIASES, without_registry
from .cached import CachedRepository, UnmirroredRegistryRepository
from .local import LocalRegistry
from .pullthrough import PullThrough
from .pushes import LocalRepository
from .repository import Repository

log = logging.getLogger("mirror.registry")

#: Seconds between two warnings of requests for one registry that is not configured.
UNCONFIGURED_WARN_INTERVAL = 600.0
#: At most this many such warnings per interval, whatever the registries (anyone may send any ?ns=).
UNCONFIGURED_WARN_LIMIT = 20
_REGISTRY_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?")
_warned: dict[str, float] = {}
_window = [0.0, 0]  # start of the current interval, warnings in it


def unconfigured(ns: str) -> None:
    """Warn (once per :data:`UNCONFIGURED_WARN_INTERVAL` per registry, at most
    :data:`UNCONFIGURED_WARN_LIMIT` in all) of a request whose ``?ns=`` names a registry without an
    upstream here: containerd, which asks with HEAD and never sees the error's text, then pulls from
    that registry directly, and a fleet bypasses the cache unnoticed.  A value that is no host name
    is not written to the log."""
    key, now = ns.lower(), time.monotonic()
    if not _REGISTRY_HOST.fullmatch(key) or now - _warned.get(key, -UNCONFIGURED_WARN_INTERVAL) < \
            UNCONFIGURED_WARN_INTERVAL:
        return
    if now - _window[0] >= UNCONFIGURED_WARN_INTERVAL:
        _window[:] = [now, 0]
        _warned.clear()
    _window[1] += 1
    if _window[1] > UNCONFIGURED_WARN_LIMIT:
        return
    _warned[key] = now
    log.warning("requests for registry %s are answered 404: no upstream is configured for it (add it to "
                "upstreams: to cache it; clients such as containerd then go to it directly)%s", key,
                "; no more such warnings for 10 minutes" if _window[1] == UNCONFIGURED_WARN_LIMIT else "")


class Namespaces:
    """The repositories of this registry, by name; one per app, shared by its requests."""

    def __init__(self, local: LocalRegistry, pulls: dict[str, PullThrough], default: str) -> None:
        """*pulls*: the pull-through policy of each configured upstream, by registry host (Docker
        Hub as ``docker.io``); *default*: the registry of names that do not say."""
        self.local = local
        self.pulls = pulls
        self.default = pulls[default]

    async def repository(self, name: str, ns: str | None = None) -> Repository:
        """The repository *name* (already validated) is, for a request with ``?ns=`` *ns*.

        Raises ``NAME_UNKNOWN`` when *ns* names a registry that is not configured (checked first,
        for pushed repositories too).
        """
        pull, upstream_name = self.upstream_for(name, ns)
        if pull is self.default:
            name = upstream_name  # the default registry's own prefix (docker.io/team/x): the name without it
        if pull is self.default and await self.local.reads.is_local(name):
            # (One named for another upstream was pushed before such names were refused: only a
            # ``?ns=`` of the default registry reaches it, to pull or delete it.)
            return LocalRepository(self.local, name)
        foreign = pull is not self.default or self.local.foreign(name)
        first, _, rest = name.partition("/")
        if (pull is self.default and rest and pull.upstream.config.adds_library_namespace
                and ("." in first or ":" in first or first == "localhost")):
            return UnmirroredRegistryRepository(pull, upstream_name, name, self.local, foreign=foreign)
        return CachedRepository(pull, upstream_name, name, self.local, foreign=foreign)

    async def catalog(self) -> list[str]:
        """Every repository's name as clients write it, sorted (pushed and cached alike), that a request
        reaches by that name: not one no request reaches (``LocalRegistry.served``), nor one of a
        registry with a port (``reg.local:5000/org/app``: reached with ``?ns=`` only, and outside the
        spec's name grammar, which clients walking the catalog would fail on; the web UI lists it)."""
        local = self.local
        names = {local.catalog_name(repo) for repo in await local.reads.ask(local.metadata.repositories)
                 if local.served(repo)}
        return sorted(name for name in names if ":" not in name.partition("/")[0])

    def upstream_for(self, name: str, ns: str | None = None) -> tuple[PullThrough, str]:
        """The upstream a name is for, and the name to ask it for.

        containerd names the registry in ``?ns=``; other clients can prefix the repository with it
        (``/v2/ghcr.io/org/app/...``); anything else goes to the default upstream.
        """
        if ns:
            registry = DOCKER_HUB if ns.lower() in DOCKER_HUB_ALIASES else ns.lower()
            if registry in self.pulls:  # (team/x with the registry's own prefix too: the same repository)
                return self.pulls[registry], without_registry(name, registry)
            unconfigured(ns)
            raise APIError("NAME_UNKNOWN", f"no upstream is configured for {ns}", detail={"ns": ns})
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):  # as spec/names.py tells a registry
            registry = DOCKER_HUB if first in DOCKER_HUB_ALIASES else first
            if registry in self.pulls:
                return self.pulls[registry], rest
        return self.default, name

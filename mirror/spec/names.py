"""Image names as people and archives write them, normalised the way Docker does.

``ubuntu:18.04`` is ``docker.io/library/ubuntu:18.04``; ``ghcr.io/x/y:1`` keeps its registry.
The registry part is the first path component when it looks like a host (has a ``.`` or a
``:``, or is ``localhost``); Docker Hub's other host names are folded into ``docker.io``.
The index files a repository under ``<registry>/<name>`` (see ``metadata/diskcache.py``), which is
what :attr:`ImageName.repo` gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .reference import ParseError, parse_digest, parse_name, parse_tag

DOCKER_HUB = "docker.io"
#: The host names under which Docker Hub is written; all mean :data:`DOCKER_HUB`.
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})
_HOST_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::[0-9]{1,5})?")


def without_registry(name: str, registry: str) -> str:
    """A repository path *name* without *registry*'s own prefix, as a request without ``?ns=`` for the
    default registry *registry* takes it: ``docker.io/team/x`` (or ``index.docker.io/team/x``) is
    ``team/x`` for Docker Hub; any other *name* as it is."""
    first, _, rest = name.partition("/")
    return rest if rest and (DOCKER_HUB if first in DOCKER_HUB_ALIASES else first) == registry else name


class InvalidImageName(ValueError):
    """Not an image reference (``[registry/]name[:tag][@digest]``)."""


@dataclass(frozen=True, slots=True)
class ImageName:
    registry: str
    name: str
    tag: str | None
    digest: str | None
    #: The repository path as written, when no registry was named (``alpine`` for ``alpine:3``).
    written: str | None = None
    #: The repository path as written, its registry too if named (``docker.io/team/x`` for ``docker.io/team/x:1``).
    as_written: str = ""

    @property
    def repo(self) -> str:
        """The index key of the repository: ``docker.io/library/alpine``."""
        return f"{self.registry}/{self.name}"

    def __str__(self) -> str:
        text = self.repo
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_name(text: str, *, default_tag: str | None = "latest") -> ImageName:
    """Parse and normalise ``[registry/]name[:tag][@digest]``.

    Without a tag or a digest the tag is *default_tag*.  Raises :class:`InvalidImageName`.
    """
    raw = text.strip()
    rest, at, digest = raw.partition("@")
    try:
        parsed_digest = str(parse_digest(digest)) if at else None
    except ParseError as exc:
        raise InvalidImageName(f"{text!r}: {exc}") from None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = None
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        try:
            parse_tag(tag)
        except ParseError as exc:
            raise InvalidImageName(f"{text!r}: {exc}") from None
    as_written = rest
    first, sep, remainder = rest.partition("/")
    written: str | None = rest
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first.lower(), remainder
        written = None
        if not _HOST_RE.fullmatch(registry):
            raise InvalidImageName(f"{text!r}: invalid registry host {first!r}")
    else:
        registry, path = DOCKER_HUB, rest
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    try:
        parse_name(path)
    except ParseError:
        raise InvalidImageName(f"{text!r}: invalid repository name {path!r}") from None
    if tag is None and parsed_digest is None:
        tag = default_tag
    return ImageName(registry, path, tag, parsed_digest, written, as_written)

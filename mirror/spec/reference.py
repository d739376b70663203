"""The spec's grammars for repository names, tags, digests and byte ranges.

Everything that reaches the store or the upstream passes through these parsers first;
no path or URL is built from a string that has not been validated here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
MAX_NAME_LENGTH = 255

# algorithm -> (hex length, hashlib constructor name)
ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX_RE = {alg: re.compile(f"[a-f0-9]{{{n}}}") for alg, n in ALGORITHMS.items()}


class ParseError(ValueError):
    """Base for parse failures; ``kind`` says which grammar rejected the input."""

    kind = "reference"


class InvalidName(ParseError):
    kind = "name"


class InvalidTag(ParseError):
    kind = "tag"


class InvalidDigest(ParseError):
    kind = "digest"


class UnsupportedDigest(ParseError):
    """Well-formed digest whose algorithm this registry does not implement."""

    kind = "digest"


class InvalidRange(ParseError):
    kind = "range"


class InvalidMediaType(ParseError):
    kind = "media type"


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid repository name {name!r}")
    return name


#: A repository as the catalog lists it: a name, or one of an upstream whose registry has a port
#: (``reg.local:5000/org/app``: not a name, so only ``?ns=reg.local:5000`` reaches it).
LISTED_NAME_RE = re.compile(rf"(?:{NAME_COMPONENT}(?:\.{NAME_COMPONENT})*:[0-9]{{1,5}}/)?{NAME_RE.pattern}")


def parse_listed_name(name: str) -> str:
    """A repository name, or a name as the catalog lists one of a registry with a port (see
    :data:`LISTED_NAME_RE`): a catalog's ``last`` marker, a web UI page."""
    if len(name) > MAX_NAME_LENGTH + 6 or not LISTED_NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid repository name {name!r}")
    return name


def parse_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidTag(f"invalid tag {tag!r}")
    return tag


def parse_digest(value: str) -> Digest:
    if not DIGEST_RE.fullmatch(value):
        raise InvalidDigest(f"invalid digest {value!r}")
    algorithm, _, encoded = value.partition(":")
    pattern = _HEX_RE.get(algorithm)
    if pattern is None:
        raise UnsupportedDigest(f"unsupported digest algorithm {algorithm!r}")
    if not pattern.fullmatch(encoded):
        raise InvalidDigest(f"invalid {algorithm} digest {value!r}")
    return Digest(algorithm, encoded)


MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def parse_media_type(value: str) -> str:
    """A media type without parameters (RFC 6838), e.g. an ``artifactType`` filter."""
    if not MEDIA_TYPE_RE.fullmatch(value):
        raise InvalidMediaType(f"invalid media type {value!r}")
    return value


def is_digest(reference: str) -> bool:
    return ":" in reference


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference: a tag or a digest."""
    if is_digest(reference):
        return parse_digest(reference)
    return parse_tag(reference)


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


_RANGE_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")
#: What a position or a length of more digits than a 64-bit number has stands for: past any blob's end.
_HUGE = 1 << 64


def _position(digits: str) -> int:
    """A ``first-pos``, ``last-pos`` or ``suffix-length`` (``1*DIGIT``: RFC 9110 section 14.1.2 sets
    no bound); one past 64 bits is :data:`_HUGE`, which compares as any larger number would."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else _HUGE


def parse_range(header: str, size: int) -> ByteRange | None:
    """The byte range a ``Range`` header asks of a resource of ``size`` bytes, or None: serve it whole.

    RFC 9110 section 14.2: a range unit other than ``bytes`` is ignored (the server MUST), and so is a
    set of several ranges (the server MAY: answered ``200`` with the whole body, as no client of a
    registry asks for ``multipart/byteranges``), unless none of them is satisfiable (``416``, 15.5.17).
    Raises :class:`InvalidRange` for a malformed ``bytes`` ranges-specifier, or none satisfiable.
    """
    unit, equals, ranges = header.strip().partition("=")
    if not equals or not unit.strip():
        raise InvalidRange(f"invalid range {header!r}")
    if unit.strip().lower() != "bytes":
        return None
    asked = [_byte_range(part.strip(), size, header) for part in ranges.split(",") if part.strip()]
    if not asked:
        raise InvalidRange(f"invalid range {header!r}")
    satisfiable = [each for each in asked if each is not None]
    if not satisfiable:
        raise InvalidRange(f"unsatisfiable range {header!r}")
    return satisfiable[0] if len(asked) == 1 else None


def _byte_range(spec: str, size: int, header: str) -> ByteRange | None:
    """One ``first-last``, ``first-`` or ``-suffix`` of *header*; None if it is unsatisfiable."""
    m = _RANGE_SPEC_RE.fullmatch(spec)
    if not m or (not m.group(1) and not m.group(2)):
        raise InvalidRange(f"invalid range {header!r}")
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        suffix = _position(last)
        if suffix == 0 or size == 0:
            return None
        return ByteRange(max(0, size - suffix), size - 1)
    start = _position(first)
    end = _position(last) if last else size - 1
    if last and end < start:
        raise InvalidRange(f"invalid range {header!r}")
    if start >= size:
        return None
    return ByteRange(start, min(end, size - 1))

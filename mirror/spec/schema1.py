"""The registry digest of a signed Docker schema 1 manifest (``...manifest.v1+prettyjws``).

A signed schema 1 manifest is libtrust's "pretty" JWS: the manifest JSON with a ``signatures``
list added as its last member.  Its registry digest is not the hash of the bytes served but of
the *payload*, the manifest as it was before the signatures were added.  Each signature's
``protected`` header (base64url JSON) says how to cut it back out::

    payload = body[:formatLength] + base64url_decode(formatTail)

(libtrust ``ParsePrettySignature``, which distribution uses for ``Docker-Content-Digest``; every
signature must agree on both values.)  The signatures themselves are not checked here: the
digest, announced by the upstream or asked for by the client, is what vouches for the content.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .reference import Digest

SIGNATURES = "signatures"


class Schema1Error(ValueError):
    """The body is not a well-formed signed schema 1 manifest; the message says why."""


def _b64url(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise Schema1Error(f"{what} is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise Schema1Error(f"{what} is not base64url: {exc}") from None


def payload(body: bytes) -> bytes:
    """The signed payload of a pretty-JWS *body*; raises :class:`Schema1Error`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Schema1Error(f"not JSON: {exc}") from None
    signatures = doc.get(SIGNATURES) if isinstance(doc, dict) else None
    if not isinstance(signatures, list) or not signatures:
        raise Schema1Error("no signatures")
    cut: tuple[int, bytes] | None = None
    for n, signature in enumerate(signatures):
        if not isinstance(signature, dict):
            raise Schema1Error(f"signature {n} is not an object")
        try:
            header = json.loads(_b64url(signature.get("protected"), f"signature {n}'s protected header"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Schema1Error(f"signature {n}'s protected header is not JSON") from None
        length = header.get("formatLength") if isinstance(header, dict) else None
        if not isinstance(length, int) or isinstance(length, bool) or not 0 < length <= len(body):
            raise Schema1Error(f"signature {n} has no valid formatLength")
        tail = _b64url(header.get("formatTail"), f"signature {n}'s formatTail")
        if cut is not None and cut != (length, tail):
            raise Schema1Error("signatures disagree on formatLength or formatTail")
        cut = (length, tail)
    assert cut is not None
    signed = body[:cut[0]] + cut[1]
    try:
        unsigned = json.loads(signed)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Schema1Error("the payload cut out by formatLength and formatTail is not JSON") from None
    if not isinstance(unsigned, dict) or SIGNATURES in unsigned:
        raise Schema1Error("the payload cut out by formatLength and formatTail is not the unsigned manifest")
    return signed


def digest(body: bytes, algorithm: str = "sha256") -> Digest:
    """The registry digest of a signed schema 1 manifest: the hash of its :func:`payload`."""
    return Digest.of(payload(body), algorithm)


def looks_signed(body: bytes) -> bool:
    """Cheap test for a body that may be a pretty-JWS manifest (worth calling :func:`digest` on)."""
    return body[:1] == b"{" and b'"signatures"' in body

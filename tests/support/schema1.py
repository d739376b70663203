"""Signed Docker schema 1 manifests, built and signed the way libtrust (docker < 1.10) did.

:func:`signed_schema1` lays out the manifest as Go's ``json.MarshalIndent(manifest, "", "   ")``,
signs it with a fresh EC P-256 key (ES256, the JWK in the signature's header, libtrust's key ID),
and appends the ``signatures`` block as libtrust's ``PrettySignature`` does: the payload without its
closing ``"\\n}"`` (``formatLength``/``formatTail`` in the protected header), then the signatures.
The registry digest of the result is the sha256 of the payload, not of the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .images import EPOCH_ISO, Layer, sha256_digest

SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
INDENT = "   "


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Schema1:
    body: bytes      # what a registry serves
    payload: bytes   # what was signed
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        """The registry digest (``Docker-Content-Digest``): of the payload."""
        return sha256_digest(self.payload)

    @property
    def bytes_digest(self) -> str:
        """The hash of the bytes served (not this manifest's name)."""
        return sha256_digest(self.body)


def _key_id(key: ec.EllipticCurvePublicKey) -> str:
    """libtrust's key ID: base32 of the first 240 bits of sha256(DER SubjectPublicKeyInfo), in groups of 4."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def _v1_history(layers: Sequence[Layer], architecture: str) -> list[dict[str, str]]:
    """``history`` entries, top layer first, chained by ``id``/``parent`` as docker wrote them."""
    ids = [hashlib.sha256(f"v1-{layer.digest}-{n}".encode()).hexdigest() for n, layer in enumerate(layers)]
    history = []
    for n in reversed(range(len(layers))):
        entry: dict[str, Any] = {"id": ids[n], "created": EPOCH_ISO,
                                 "container_config": {"Cmd": [f"/bin/sh -c #(nop) ADD layer {n}"]}}
        if n > 0:
            entry["parent"] = ids[n - 1]
        if n == len(layers) - 1:
            entry.update({"architecture": architecture, "os": "linux",
                          "config": {"Cmd": ["sh"], "Env": ["PATH=/usr/bin:/bin"]}})
        history.append({"v1Compatibility": json.dumps(entry, separators=(",", ":"))})
    return history


def signed_schema1(name: str, tag: str, layers: Sequence[Layer], architecture: str = "amd64") -> Schema1:
    """A libtrust-signed schema 1 manifest of *layers* (bottom first, as in schema 2)."""
    manifest = {
        "schemaVersion": 1,
        "name": name,
        "tag": tag,
        "architecture": architecture,
        "fsLayers": [{"blobSum": layer.digest} for layer in reversed(layers)],
        "history": _v1_history(layers, architecture),
    }
    payload = json.dumps(manifest, indent=INDENT).encode()
    format_length = len(payload) - 2  # without the closing "\n}"
    protected = b64url(json.dumps({
        "formatLength": format_length,
        "formatTail": b64url(payload[format_length:]),
        "time": EPOCH_ISO,
    }).encode())
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.sign(f"{protected}.{b64url(payload)}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    numbers = key.public_key().public_numbers()
    signature = {
        "header": {
            "jwk": {"crv": "P-256", "kid": _key_id(key.public_key()), "kty": "EC",
                    "x": b64url(numbers.x.to_bytes(32, "big")), "y": b64url(numbers.y.to_bytes(32, "big"))},
            "alg": "ES256",
        },
        "signature": b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")),
        "protected": protected,
    }
    signatures = json.dumps([signature], indent=INDENT).replace("\n", "\n" + INDENT)
    body = payload[:format_length] + f',\n{INDENT}"signatures": {signatures}\n}}'.encode()
    return Schema1(body=body, payload=payload, layers=tuple(layers))

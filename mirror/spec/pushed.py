"""What a pushed manifest must be before it is stored, and the referrers index built from them.

A manifest PUT is checked here: JSON object, a media type the Content-Type and the body agree
on, schema version 2, well-formed descriptors, an optional subject.  Errors are the spec's
``MANIFEST_INVALID``; whether the referenced blobs are present is the registry's business
(``registry/local.py``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from .errors import APIError
from .manifest import INDEX_TYPES, MANIFEST_MEDIA_TYPES, OCI_INDEX, SCHEMA1, SCHEMA1_SIGNED, is_nondistributable
from .reference import ParseError, parse_digest


def referrers_index(descriptors: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors},
                      separators=(",", ":")).encode()


def manifest_document(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise APIError("MANIFEST_INVALID", detail=f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise APIError("MANIFEST_INVALID", detail="a manifest must be a JSON object")
    return doc


def manifest_media_type(content_type: str, doc: dict[str, Any]) -> str:
    announced = content_type.split(";")[0].strip()
    if announced in (SCHEMA1, SCHEMA1_SIGNED) or doc.get("schemaVersion") == 1:
        # Deprecated by Docker (and refused by distribution by default); pulled-through ones are served.
        raise APIError("MANIFEST_INVALID", detail="schema 1 manifests cannot be pushed: push the image as Docker "
                                                  "schema 2 or OCI (e.g. skopeo copy --format v2s2)")
    in_body = doc.get("mediaType")
    if in_body is not None and not isinstance(in_body, str):
        raise APIError("MANIFEST_INVALID", detail="mediaType must be a string")
    if announced in MANIFEST_MEDIA_TYPES:
        if in_body and in_body != announced:
            raise APIError("MANIFEST_INVALID", detail=f"Content-Type {announced} but mediaType {in_body}")
        return announced
    if not announced and in_body in MANIFEST_MEDIA_TYPES:
        return str(in_body)
    raise APIError("MANIFEST_INVALID", detail=f"unsupported manifest media type {announced or in_body!r}")


def descriptor_ok(d: Any) -> bool:
    if not isinstance(d, dict) or not isinstance(d.get("mediaType"), str):
        return False
    if not isinstance(d.get("size"), int) or isinstance(d.get("size"), bool) or d["size"] < 0:
        return False
    try:
        parse_digest(d.get("digest", ""))
    except (ParseError, TypeError):
        return False
    urls = d.get("urls")
    if urls is not None and not (isinstance(urls, list) and all(_download_url(u) for u in urls)):
        return False
    return True


def _download_url(value: Any) -> bool:
    """A descriptor's ``urls`` entry: an absolute http(s) URL (OCI image-spec, "Descriptor")."""
    if not isinstance(value, str) or len(value) > 2048:
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment


def check_manifest(doc: dict[str, Any], media_type: str) -> str | None:
    """Schema checks; return the subject digest if there is one."""
    if doc.get("schemaVersion") != 2:
        raise APIError("MANIFEST_INVALID", detail="schemaVersion must be 2")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list) or not all(descriptor_ok(d) for d in entries):
            raise APIError("MANIFEST_INVALID", detail="manifests must be a list of descriptors")
    else:
        if not descriptor_ok(doc.get("config")):
            raise APIError("MANIFEST_INVALID", detail="config must be a descriptor")
        layers = doc.get("layers", [])
        if not isinstance(layers, list) or not all(descriptor_ok(d) for d in layers):
            raise APIError("MANIFEST_INVALID", detail="layers must be a list of descriptors")
    subject = doc.get("subject")
    if subject is None:
        return None
    if not descriptor_ok(subject):
        raise APIError("MANIFEST_INVALID", detail="subject must be a descriptor")
    return str(subject["digest"])


def required_digests(doc: dict[str, Any], media_type: str) -> list[str]:
    """Digests that must be in the repository before this manifest may be stored.

    Non-distributable (and Docker's foreign) layers are not: clients fetch them from their
    ``urls`` (image-spec, "Non-distributable layers"), and a registry only MAY reject a manifest
    whose references it lacks (distribution-spec, "Pushing manifests"); as distribution and zot
    do, they are accepted without their blobs.
    """
    if media_type in INDEX_TYPES:
        return [d["digest"] for d in doc["manifests"]]
    layers = [d["digest"] for d in doc.get("layers", []) if not is_nondistributable(d["mediaType"])]
    return [doc["config"]["digest"], *layers]


def subject_digest(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    return subject.get("digest") if isinstance(subject, dict) else None


def referrer_descriptor(doc: dict[str, Any], media_type: str, digest: str, size: int) -> dict[str, Any]:
    descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str):
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
    if isinstance(artifact_type, str):
        descriptor["artifactType"] = artifact_type
    if isinstance(doc.get("annotations"), dict):
        descriptor["annotations"] = doc["annotations"]
    return descriptor

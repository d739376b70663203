"""What a key the mirror does not take is, for the message that refuses it (``config/load.py``).

A key is named as the user wrote it: the dotted key of the file (``storage.filesystem.rootdirectory``),
or the ``MIRROR_*`` variable that set it.  The message says what to write instead when the key is one
of distribution's configuration (a ``registry:2`` ``config.yml`` carries over but for these:
:data:`DISTRIBUTION_KEYS`, :data:`DISTRIBUTION_S3_KEYS`), else the closest known key when one is close
(a typo).  Values of distribution's ``s3`` keys that describe what this mirror does anyway are taken
and dropped (:func:`drop_harmless_s3`).

Imports nothing of the package.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, MutableMapping
from typing import Any

ENV_PREFIX = "MIRROR_"
#: The nested groups of keys (``http.tls.key`` is the field ``tls_key``), as users write them in the file.
NESTED = ("tls", "s3", "postgres", "htpasswd")
#: ``MIRROR_*`` names that are not settings: the image the compose files run (``${MIRROR_IMAGE}``).
NOT_SETTINGS = frozenset({f"{ENV_PREFIX}IMAGE", f"{ENV_PREFIX}SERVE_INSTANCE"})

_REMOVE = "remove it"
_DRIVERS = "the storage drivers are filesystem and s3 (storage.driver)"
_NO_PREFIX = "the mirror is served at the root of its host (a reverse proxy may add a prefix): remove it"
#: Keys of distribution's configuration (dotted as in its ``config.yml``; a group stands for every key
#: under it) -> this mirror's key to use instead, or what to do.
DISTRIBUTION_KEYS: dict[str, str] = {
    "version": "the configuration has no version: remove it",
    "loglevel": "log.level",
    "log.formatter": "the access log is JSON lines (log.access), the rest text: remove it",
    "log.accesslog.disabled": "log.access (false to turn it off)",
    "log.fields": _REMOVE,
    "log.hooks": _REMOVE,
    "http.addr": "http.listen",
    "http.net": "the mirror listens on TCP, at http.listen: remove it",
    "http.host": "the token realm and Locations follow the request's host (and X-Forwarded-* from "
                 "http.trusted_proxies): remove it",
    "http.prefix": _NO_PREFIX,
    "http.secret": "an upload's state is kept in the index, no secret signs it: remove it",
    "http.relativeurls": "Locations are relative already: remove it",
    "http.headers": "the mirror sets its own response headers: remove it",
    "http.http2": _REMOVE,
    "http.h2c": _REMOVE,
    "http.debug": "metrics.listen (/metrics on a listener of its own)",
    "http.tls.letsencrypt": "give the certificate and key as files (http.tls.certificate, http.tls.key)",
    "http.tls.clientcas": "http.tls.client_ca (one PEM file of CA certificates)",
    "http.tls.clientauth": "http.tls.client_ca (a client certificate is then required)",
    "http.tls.minimumtls": "TLS 1.2 or later is required: remove it",
    "http.tls.ciphersuites": "TLS 1.3 and TLS 1.2's forward-secret AEAD suites are offered: remove it",
    "storage.filesystem.rootdirectory": "storage.path",
    "storage.filesystem.maxthreads": _REMOVE,
    "storage.filesystem": "storage.path",
    "storage.inmemory": "storage.driver (filesystem, the default, or s3)",
    "storage.azure": _DRIVERS,
    "storage.gcs": _DRIVERS,
    "storage.swift": _DRIVERS,
    "storage.oss": _DRIVERS,
    "storage.delete.enabled": "delete.enabled",
    "storage.redirect.disable": "storage.s3.redirect (true to answer blob GETs with presigned URLs)",
    "storage.cache": "the index is the cache (metadata.driver): remove it",
    "storage.maintenance.uploadpurging": "push.upload_ttl (unfinished uploads older than it are removed)",
    "storage.maintenance.readonly": "push.enabled (false, and delete.enabled false)",
    "storage.tag.concurrencylimit": _REMOVE,
    "proxy.remoteurl": "upstream.url",
    "proxy.username": "upstream.username",
    "proxy.password": "upstream.password",
    "proxy.ttl": "cached content is evicted by size (cache.max_size), not by age: remove it",
    "proxy": "upstream (or upstreams: for several registries)",
    "auth.token": "the mirror issues tokens to its own auth.htpasswd users: use auth.htpasswd",
    "auth.silly": "auth.htpasswd",
    "health": "/healthz and /readyz need no setting: remove it",
    "notifications": "the mirror sends no notifications: remove it",
    "redis": "the index is the cache (metadata.driver): remove it",
    "middleware": "storage.s3.redirect (true: presigned URLs of the bucket)",
    "validation": _REMOVE,
    "compatibility": _REMOVE,
    "reporting": _REMOVE,
}

#: Keys of distribution's ``s3`` storage driver that this one does not take, and what to do instead.
DISTRIBUTION_S3_KEYS = {
    "secure": "write the scheme in storage.s3.regionendpoint instead (http://... for secure: false)",
    "v4auth": "requests are always signed with signature version 4: remove it",
    "skipverify": "certificates are always verified: point the AWS_CA_BUNDLE environment variable at the "
                  "store's CA certificate",
    "encrypt": "objects get the bucket's default encryption: remove it, and set that on the bucket",
    "keyid": "objects get the bucket's default encryption: remove it, and set that on the bucket",
    "storageclass": "objects get the bucket's default storage class: remove it",
    "objectacl": "objects are written without an ACL (the bucket's policy applies): remove it",
    "multipartcopychunksize": "copies inside the bucket are sized by the mirror: remove it",
    "multipartcopymaxconcurrency": "copies inside the bucket are sized by the mirror: remove it",
    "multipartcopythresholdsize": "copies inside the bucket are sized by the mirror: remove it",
    "accelerate": "set storage.s3.regionendpoint to the endpoint to use instead",
    "usedualstack": "set storage.s3.regionendpoint to the endpoint to use instead",
    "loglevel": "use log.level",
    "useragent": "remove it",
    "sessiontoken": "give it as AWS_SESSION_TOKEN, with the keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}
#: A key of ours at the start of a table entry: ``upstream.url``, ``upstream (...)``.
_KEY = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+|upstream")
#: distribution's ``s3`` values that say what the mirror does anyway: taken, and dropped.
_HARMLESS_S3 = {"v4auth": "true", "encrypt": "false", "skipverify": "false"}


def user_key(attr: str) -> str:
    """A key as users write it: ``postgres.dsn_file`` for the field ``postgres_dsn_file`` (which the
    environment spells ``MIRROR_METADATA_POSTGRES_DSN_FILE``)."""
    group, _, rest = attr.partition("_")
    return f"{group}.{rest}" if group in NESTED and rest else attr


def as_variable(dotted: str) -> str:
    """``upstream.url`` as the environment spells it: ``MIRROR_UPSTREAM_URL``."""
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def drop_harmless_s3(storage: MutableMapping[str, Any]) -> None:
    """Drop ``storage.s3.v4auth: true``, ``encrypt: false``, ``skipverify: false`` and ``secure`` (but
    ``false`` without ``regionendpoint``: plain HTTP to AWS) from *storage* (field names:
    ``s3_v4auth``...): a registry:2 configuration's usual values, which describe this mirror too
    (with ``regionendpoint``, its scheme decides, as it does for distribution's SDK)."""
    for key, harmless in _HARMLESS_S3.items():
        if str(storage.get(f"s3_{key}", "")).strip().lower() == harmless:
            del storage[f"s3_{key}"]
    endpoint = str(storage.get("s3_regionendpoint") or "").strip()
    secure = str(storage.get("s3_secure", "")).strip().lower()
    if secure in ("true", "false") and (endpoint or secure == "true"):  # anything else is refused as it is
        del storage["s3_secure"]  # the endpoint's scheme decides, as for distribution's SDK; AWS's: HTTPS


def _instead(written: str) -> str | None:
    """What to do instead of distribution's key *written* (dotted, or as a variable spells it), or None."""
    parts = written.lower().replace("_", ".").split(".")
    for end in range(len(parts), 0, -1):
        if (found := DISTRIBUTION_KEYS.get(".".join(parts[:end]))) is not None:
            return found
    return None


def _said(instead: str, env: bool) -> str:
    """*instead* as the end of a message: a key of ours to use (spelt as a variable for the
    environment), with its remark; or what to do."""
    key, _, remark = instead.partition(" ")
    if not _KEY.fullmatch(key):
        return instead
    return f"use {as_variable(key) if env else key}" + (f" {remark}" if remark else "")


def unknown_key(section: str, written: str, known: Iterable[str], variable: str | None) -> str:
    """Why the key *written* (dotted, after its *section*) is refused: a key of distribution's, what to
    write instead; else the closest of *known* (field names), if one is close."""
    dotted = f"{section}.{written}"
    if section == "storage" and written.startswith("s3.") and (s3 := DISTRIBUTION_S3_KEYS.get(written[3:])):
        return f"{variable or dotted} is a setting of distribution's s3 driver that this mirror does not take: {s3}"
    if (instead := _instead(dotted)) is not None:
        return (f"{variable or dotted} is a setting of distribution's that this mirror does not take: "
                f"{_said(instead, variable is not None)}")
    close = difflib.get_close_matches(written.replace(".", "_"), list(known), n=1, cutoff=0.75)
    if variable is not None:
        hint = f": did you mean {as_variable(f'{section}.{close[0]}')}?" if close else ""
        return f"unknown environment variable {variable} (unknown configuration key {dotted}){hint}"
    return f"unknown configuration key {dotted}" + (f" (did you mean {section}.{user_key(close[0])}?)" if close else "")


def unknown_section(section: str, keys: Any, sections: Collection[str], where: str) -> str:
    """Why the file's section *section* (holding *keys*) is refused."""
    if (instead := _instead(section)) is not None and not isinstance(keys, dict):
        return (f"{section} in {where} is a setting of distribution's that this mirror does not take: "
                f"{_said(instead, False)}")
    if isinstance(keys, dict) and (told := [f"{section}.{key}: {_said(_instead(f'{section}.{key}') or '', False)}"
                                            for key in keys if _instead(f"{section}.{key}")]):
        return (f"unknown configuration section '{section}' in {where}, a section of distribution's that this "
                f"mirror does not take: " + "; ".join(told))
    close = difflib.get_close_matches(section, list(sections), n=1, cutoff=0.7)
    return f"unknown configuration section '{section}' in {where}" + (f" (did you mean {close[0]}?)" if close else "")


def unknown_variable(name: str, sections: Collection[str]) -> str:
    """Why ``MIRROR_<WORD>_...`` is refused when ``<WORD>`` is no section."""
    rest = name[len(ENV_PREFIX):].lower()
    for key in sorted(DISTRIBUTION_KEYS, key=len, reverse=True):
        spelt = key.replace(".", "_")
        if rest == spelt or rest.startswith(spelt + "_"):
            return (f"{name} (distribution's {key}) is a setting this mirror does not take: "
                    f"{_said(DISTRIBUTION_KEYS[key], True)}")
    word = rest.partition("_")[0]
    close = difflib.get_close_matches(word, list(sections), n=1, cutoff=0.7)
    hint = f": did you mean {ENV_PREFIX}{close[0].upper()}_{rest.partition('_')[2].upper()}?" if close else ""
    return f"unknown environment variable {name} (no configuration section {word}){hint}"


#: distribution's top-level sections: ``REGISTRY_<SECTION>_...`` variables configure registry:2.
DISTRIBUTION_SECTIONS = ("version", "log", "loglevel", "storage", "auth", "middleware", "reporting", "http",
                         "notifications", "redis", "health", "proxy", "compatibility", "validation", "policy",
                         "catalog")


def distribution_variable(name: str) -> str | None:
    """Why registry:2's variable *name* (``REGISTRY_PROXY_REMOTEURL``) is refused, or None when it sets
    none of distribution's settings (a Kubernetes Service named ``registry`` makes ``REGISTRY_PORT``)."""
    rest = name.removeprefix("REGISTRY_").lower()
    if not any(rest == section or rest.startswith(section + "_") for section in DISTRIBUTION_SECTIONS):
        return None
    instead = _instead(rest)
    told = _said(instead, True) if instead else f"set {ENV_PREFIX}{rest.upper()} if it is one of the mirror's too"
    return f"{name} is a variable of registry:2's, which the mirror does not read: {told}"

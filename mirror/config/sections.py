"""Typed configuration: the frozen dataclasses of each section, their defaults and checks.

Each key is a :func:`values.setting` with its parser; a section checks what involves several
keys in ``__post_init__``.  A bad value raises :class:`ConfigError` with one line that names the
key.  The YAML file, the environment and CLI flags are read and merged in ``config/load.py``.

Imports ``values`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..spec.names import DOCKER_HUB, DOCKER_HUB_ALIASES
from .addresses import parse_listen, parse_upstream_url, parse_url
from .values import (
    SecretFile,
    parse_bool,
    parse_bucket,
    parse_ca_file,
    parse_choice,
    parse_credential,
    parse_duration,
    parse_fraction,
    parse_int,
    parse_key_prefix,
    parse_networks,
    parse_optional_duration,
    parse_optional_file,
    parse_path,
    parse_prefixes,
    parse_push_users,
    parse_realm,
    parse_region,
    parse_registry,
    parse_secret,
    parse_secret_file,
    parse_size,
    parse_token_file,
    parse_user_names,
    render_size,
    setting,
)

DOCKER_HUB_URL = "https://registry-1.docker.io"


class ConfigError(Exception):
    """A configuration key is unknown or has a bad value."""


def read_secret_files(section: Any, *keys: str) -> None:
    """Each of *keys* given as its ``_file`` twin takes the file's secret (``config/load.py`` keeps
    only one of the two: the higher source's, and refuses both from one source)."""
    for key in keys:
        found: SecretFile | None = getattr(section, f"{key}_file")
        if found is not None:
            object.__setattr__(section, key, found.value)


# -- the typed configuration --


@dataclass(frozen=True)
class HttpConfig:
    listen: str = setting(parse_listen, "0.0.0.0:5000")
    workers: int = setting(parse_int(1, 64), 1)
    # HTTPS: certificate chain and private key, PEM (http.tls.certificate, http.tls.key); both or neither.
    tls_certificate: Path | None = setting(parse_optional_file, None)
    tls_key: Path | None = setting(parse_optional_file, None)
    # Mutual TLS: clients must present a certificate signed by a CA of this PEM file (http.tls.client_ca).
    tls_client_ca: Path | None = setting(parse_optional_file, None)
    # A client that sends nothing for this long while a request (head or body) is due is disconnected;
    # also how long an idle keep-alive connection is kept.
    idle_timeout: float = setting(parse_duration, 75.0)
    # After SIGTERM: how long requests under way may take to finish before they are cut off (new
    # connections are refused at once); distribution's http.draintimeout.  Below the orchestrator's
    # grace period (30 s in the shipped units), so the process ends by itself, its records saved.
    draintimeout: float = setting(parse_duration, 25.0)
    # Reverse proxies whose X-Forwarded-For/-Proto are believed (the client's address, and https for
    # the token realm when the proxy terminates TLS); empty: none.
    trusted_proxies: tuple[str, ...] = setting(parse_networks, ("127.0.0.1", "::1"))

    def __post_init__(self) -> None:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ConfigError("http.tls.certificate and http.tls.key must be set together")
        if self.tls_client_ca is not None and self.tls_certificate is None:
            raise ConfigError("http.tls.client_ca needs http.tls.certificate and http.tls.key")
        if self.idle_timeout < 1:
            raise ConfigError(f"bad value for http.idle_timeout: {self.idle_timeout:g}s: must be at least 1s")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


#: S3's smallest multipart part but the last: storage.s3.chunksize may not be less.
S3_MIN_CHUNK = 5 << 20
#: S3's largest part: storage.s3.chunksize may not be more (every upload of a blob would fail).
S3_MAX_CHUNK = 5 << 30


def parse_chunksize(value: Any) -> int:
    """Bytes (``16MiB``, ``16777216``) of each part of an S3 multipart upload, from 5 MiB to 5 GiB."""
    try:
        size = parse_size(value)
    except ValueError:  # its examples are of a disk budget: shares of the disk too
        size = None
    if not isinstance(size, int):
        raise ValueError("expected a number of bytes such as 16MiB or 5242880")
    if size < S3_MIN_CHUNK:
        raise ValueError(f"must be at least {S3_MIN_CHUNK} bytes (5MiB), the smallest part S3 takes")
    if size > S3_MAX_CHUNK:
        raise ValueError(f"must be at most {S3_MAX_CHUNK} bytes (5GiB), the largest part S3 takes")
    return size


def parse_endpoint(credentials: str) -> Callable[[Any], str | None]:
    """An http(s) URL, or None when empty; *credentials* says where they go instead of in the URL."""
    return lambda value: None if value is None or value == "" else parse_url(value, credentials)


@dataclass(frozen=True)
class StorageConfig:
    path: Path = setting(parse_path, Path("./mirror-data"))
    # Where blobs and manifests are kept: "filesystem" (under path) or "s3" (storage.s3.*; path still
    # holds the index, uploads and temp files).  Keys of s3 as in distribution's s3 driver.
    driver: str = setting(parse_choice("filesystem", "s3"), "filesystem")
    s3_bucket: str | None = setting(parse_bucket, None)
    s3_region: str = setting(parse_region, "us-east-1")
    # The endpoint for S3-compatible stores (MinIO, SeaweedFS, Ceph); none: AWS's for the region.
    s3_regionendpoint: str | None = setting(parse_endpoint(
        "set storage.s3.accesskey and storage.s3.secretkey (or their _file keys)"), None)
    # Key prefix of everything stored (as a directory: "registry" -> registry/blobs/...).
    s3_rootdirectory: str = setting(parse_key_prefix, "")
    # Credentials; none: the SDK's usual sources (environment, instance role).
    s3_accesskey: str | None = setting(parse_credential, None)
    s3_secretkey: str | None = setting(parse_secret, None, secret=True)
    # Either read from a file at start-up instead (Docker / Kubernetes secrets); not both.
    s3_accesskey_file: SecretFile | None = setting(parse_secret_file, None)
    s3_secretkey_file: SecretFile | None = setting(parse_secret_file, None)
    s3_forcepathstyle: bool = setting(parse_bool, False)
    s3_chunksize: int = setting(parse_chunksize, 16 << 20)
    # Blob GETs are answered with a redirect to a presigned URL of the object.
    s3_redirect: bool = setting(parse_bool, False)

    def __post_init__(self) -> None:
        read_secret_files(self, "s3_accesskey", "s3_secretkey")
        if self.driver == "s3" and not self.s3_bucket:
            raise ConfigError("storage.driver s3 needs storage.s3.bucket")
        if (self.s3_accesskey is None) != (self.s3_secretkey is None):
            raise ConfigError("storage.s3.accesskey and storage.s3.secretkey must be set together")


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = setting(parse_upstream_url, DOCKER_HUB_URL)
    # Name the upstream's content is filed under in the index (Docker Hub is "docker.io").
    registry: str = setting(parse_registry, DOCKER_HUB)
    username: str | None = setting(parse_credential, None)
    password: str | None = setting(parse_secret, None, secret=True)
    # The password (access token) read from a file at start-up instead; not both.
    password_file: SecretFile | None = setting(parse_secret_file, None)
    # "auto": one-component names get Docker Hub's implicit "library/" when the upstream is Docker Hub.
    library_namespace: str = setting(parse_choice("auto", "true", "false"), "auto")
    # CA certificates (PEM) trusted for this upstream's TLS besides the usual roots (a private CA).
    tls_ca: Path | None = setting(parse_ca_file, None)
    connect_timeout: float = setting(parse_duration, 5.0)
    read_timeout: float = setting(parse_duration, 60.0)
    retries: int = setting(parse_int(0, 10), 2)
    # This upstream's own tag TTL (default: cache.tag_ttl).
    tag_ttl: float | None = setting(parse_optional_duration, None)
    # Non-distributable (foreign) layers of its images: "skip" leaves them to clients that fetch them
    # from the layer's urls (containerd; not dockerd on Linux); "fetch" makes the mirror fetch (and cache) them.
    foreign_layers: str = setting(parse_choice("skip", "fetch"), "skip")
    # With "fetch", also from hosts whose addresses are not public (loopback, private, link-local): an
    # internal copy of the layers.  Off, a published image cannot make the mirror reach those.
    foreign_layers_private: bool = setting(parse_bool, False)

    def __post_init__(self) -> None:
        read_secret_files(self, "password")

    @property
    def adds_library_namespace(self) -> bool:
        if self.library_namespace == "auto":
            return (urlsplit(self.url).hostname or "") in DOCKER_HUB_ALIASES
        return self.library_namespace == "true"


@dataclass(frozen=True)
class MetadataConfig:
    # Where the index lives: "diskcache" (DATA/index/, one host) or "postgres" (a database, shared by hosts).
    driver: str = setting(parse_choice("diskcache", "postgres"), "diskcache")
    # libpq connection string or postgresql:// URL (metadata.postgres.dsn); it may hold a password: never shown.
    postgres_dsn: str | None = setting(parse_secret, None, secret=True)
    # The DSN read from a file at start-up instead (Docker / Kubernetes secrets); one or the other, not both.
    postgres_dsn_file: SecretFile | None = setting(parse_secret_file, None)
    # Most connections each process (worker, CLI) holds at once, besides its LISTEN connection
    # (metadata.postgres.pool_size; Harbor's database.max_open_conns, per process).
    postgres_pool_size: int = setting(parse_int(1, 1000), 4)

    def __post_init__(self) -> None:
        read_secret_files(self, "postgres_dsn")
        if self.driver == "postgres" and not self.postgres_dsn:
            raise ConfigError("metadata.driver: postgres needs metadata.postgres.dsn or metadata.postgres.dsn_file")


@dataclass(frozen=True)
class CacheConfig:
    tag_ttl: float = setting(parse_duration, 300.0)
    # Disk budget of the store: bytes, or a fraction of the filesystem (from "80%"; not with storage.driver s3);
    # 0 = no limit.
    max_size: int | float = setting(parse_size, 0.8, render=render_size)
    # Eviction starts above high_watermark * max_size and stops below low_watermark * max_size.
    high_watermark: float = setting(parse_fraction, 0.95)
    low_watermark: float = setting(parse_fraction, 0.85)
    # Evict cached images not pulled for this long (0 = only when over the budget).
    unused_for: float = setting(parse_duration, 0.0)
    # Images used this recently are never evicted to make room: they may be being pulled right now.
    keep_recent: float = setting(parse_duration, 10.0)

    def __post_init__(self) -> None:
        if self.low_watermark >= self.high_watermark:
            raise ConfigError(f"bad value for cache.low_watermark: {self.low_watermark:.0%}: must be below "
                              f"cache.high_watermark ({self.high_watermark:.0%})")


@dataclass(frozen=True)
class GcConfig:
    # How often the online collector runs (0 = never; `mirror gc` still works).
    interval: float = setting(parse_duration, 3600.0)
    # Nothing younger than this is collected (uploads waiting for their manifest, fetches in flight).
    grace: float = setting(parse_duration, 3600.0)


@dataclass(frozen=True)
class PushConfig:
    enabled: bool = setting(parse_bool, True)
    # Empty: any repository; otherwise only names equal to or under one of these prefixes.
    prefixes: tuple[str, ...] = setting(parse_prefixes, ())
    # Allow pushing into a repository that is a cache of the upstream (it then becomes local).
    over_cache: bool = setting(parse_bool, False)
    # Unfinished uploads older than this are removed.
    upload_ttl: float = setting(parse_duration, 86400.0)

    def allows(self, name: str) -> bool:
        return not self.prefixes or any(name == p or name.startswith(p + "/") for p in self.prefixes)


@dataclass(frozen=True)
class DeleteConfig:
    enabled: bool = setting(parse_bool, True)


@dataclass(frozen=True)
class AuthConfig:
    # Users who may log in: an htpasswd file of bcrypt entries (htpasswd -B); unset: no authentication.
    htpasswd_path: Path | None = setting(parse_optional_file, None)
    htpasswd_realm: str = setting(parse_realm, "mirror")
    # Pulls without logging in (push and delete always need a user).
    anonymous_pull: bool = setting(parse_bool, True)
    # Who may push and delete: USER (any repository) or USER:PREFIX entries; empty: every user.
    push_users: tuple[str, ...] = setting(parse_push_users, ())
    # Operators: users who may call the operator endpoints (/_mirror/...), with Basic or a Bearer token.
    admins: tuple[str, ...] = setting(parse_user_names, ())

    def __post_init__(self) -> None:
        if self.htpasswd_path is None and not self.anonymous_pull:
            raise ConfigError("auth.anonymous_pull: false needs users: set auth.htpasswd.path")
        if self.htpasswd_path is None and self.push_users:
            raise ConfigError("auth.push_users needs users: set auth.htpasswd.path")
        if self.htpasswd_path is None and self.admins:
            raise ConfigError("auth.admins needs users: set auth.htpasswd.path")

    @property
    def enabled(self) -> bool:
        return self.htpasswd_path is not None

    def may_pull(self, user: str | None, name: str | None) -> bool:
        """May *user* (None: an anonymous client) pull from repository *name* (and see it in the web UI)?

        Any user may, anonymous clients when ``auth.anonymous_pull`` is true; *name* is where a rule per
        repository would apply.
        """
        return user is not None or self.anonymous_pull

    def may_write(self, user: str, name: str | None) -> bool:
        """May *user* push to (and delete from) repository *name*?

        *name* is None when the request names no valid repository: only a user without a
        prefix may write there (and the routes then refuse the request for what it is).
        """
        if not self.push_users:
            return True
        for entry in self.push_users:
            who, sep, prefix = entry.partition(":")
            if who != user:
                continue
            if not sep or (name is not None and (name == prefix or name.startswith(prefix + "/"))):
                return True
        return False


@dataclass(frozen=True)
class AdminConfig:
    # Operator endpoints (/_mirror/...) accept "Authorization: Bearer <the token in this file>";
    # `mirror preload --url` reads it from here too.  Without it and without auth.admins they are off.
    token_file: SecretFile | None = setting(parse_token_file, None)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting(parse_choice("debug", "info", "warning", "error"), "info")
    # One JSON line per request on stdout (logger mirror.access); replaces uvicorn's access log.
    access: bool = setting(parse_bool, True)


def parse_optional_listen(value: Any) -> str | None:
    return None if value is None or value == "" else parse_listen(value)


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT of a listener of its own for /metrics (then not on http.listen); empty: http.listen.
    listen: str | None = setting(parse_optional_listen, None)


@dataclass(frozen=True)
class UiConfig:
    # The web UI under /ui/ (repositories, tags, images, the cache's figures), for the users who may pull.
    enabled: bool = setting(parse_bool, True)


#: The shortest fill lease (cluster.lease_ttl): its holder renews it every third of it.
MIN_LEASE_TTL = 0.5


@dataclass(frozen=True)
class ClusterConfig:
    # This replica's base URL as the other replicas reach it (cluster.advertise); set with secret_file,
    # it makes the mirror one replica of several sharing storage.s3 and metadata.postgres.
    advertise: str | None = setting(parse_endpoint("replicas sign their requests with cluster.secret_file"), None)
    # The secret every replica shares, from a file (cluster.secret_file): requests between them are signed with it.
    secret_file: SecretFile | None = setting(parse_token_file, None)
    # How long a replica's claim on a fill, and its marks of blobs in use, last without its heartbeat (a dead
    # replica's fill is taken over then, and its marks expire).
    lease_ttl: float = setting(parse_duration, 15.0)

    def __post_init__(self) -> None:
        if (self.advertise is None) != (self.secret_file is None):
            raise ConfigError("cluster.advertise and cluster.secret_file must be set together")
        if self.lease_ttl < MIN_LEASE_TTL:
            raise ConfigError(f"bad value for cluster.lease_ttl: {self.lease_ttl:g}s: "
                              f"must be at least {MIN_LEASE_TTL:g}s")

    @property
    def enabled(self) -> bool:
        return self.advertise is not None


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    gc: GcConfig = field(default_factory=GcConfig)
    push: PushConfig = field(default_factory=PushConfig)
    delete: DeleteConfig = field(default_factory=DeleteConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    #: Every upstream, the default one (``upstream``) first; more come from the ``upstreams:`` list.
    upstreams: tuple[UpstreamConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.upstreams:
            object.__setattr__(self, "upstreams", (self.upstream,))
        if self.storage.driver == "s3" and isinstance(self.cache.max_size, float):
            raise ConfigError(f"bad value for cache.max_size: {self.cache.max_size:.0%} of the disk has no meaning "
                              "with storage.driver s3 (a bucket has no fixed size): give bytes (e.g. 500GiB), or 0 "
                              "for no limit")
        if self.cluster.enabled and (self.storage.driver != "s3" or self.metadata.driver != "postgres"):
            raise ConfigError("cluster.advertise needs storage.driver: s3 and metadata.driver: postgres "
                              f"(the replicas share both; now {self.storage.driver} and {self.metadata.driver})")

"""Typed configuration: one YAML file, ``MIRROR_<SECTION>_<KEY>`` environment overrides, CLI flags.

Precedence: defaults < YAML file < environment < command-line flags.  Everything is
validated once, at start-up; a bad value raises :class:`ConfigError` with one line that
names the key.  The environment is read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = {"registry-1.docker.io", "index.docker.io", "docker.io"}
ENV_PREFIX = "MIRROR_"


class ConfigError(Exception):
    """A configuration key is unknown or has a bad value."""


# -- value parsers: each takes the raw value and returns the typed one or raises ValueError --

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """``30``, ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION_RE.fullmatch(str(value).strip())
    if not m:
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_optional_duration(value: Any) -> float | None:
    return None if value is None or value == "" or value == "None" else parse_duration(value)


def parse_registry(value: Any) -> str:
    """A registry host name as images name it: ``docker.io``, ``ghcr.io``, ``registry.local:5000``."""
    text = str(value).strip().lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?", text):
        raise ValueError("expected a registry host name such as ghcr.io or registry.local:5000")
    return text


def parse_int(minimum: int, maximum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if not minimum <= number <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}")
        return number

    return parse


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def parse_listen(value: Any) -> str:
    host, sep, port = str(value).strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:5000")
    return f"{host.strip('[]') or '0.0.0.0'}:{int(port)}"


def parse_url(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("credentials do not belong in the URL; set upstream.username and upstream.password")
    return text


def parse_str(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError("expected a string")
    return str(value)


def parse_optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else parse_str(value)


def parse_path(value: Any) -> Path:
    return Path(parse_str(value)).expanduser()


def parse_optional_file(value: Any) -> Path | None:
    """A file that must exist and be readable (a certificate, a key, an htpasswd file)."""
    if value is None or value == "":
        return None
    path = parse_path(value)
    if not path.is_file():
        raise ValueError("no such file")
    if not os.access(path, os.R_OK):
        raise ValueError("file not readable")
    return path


@dataclass(frozen=True)
class SecretFile:
    """A secret read from a file at start-up (Docker and Kubernetes secrets); shown as its path only."""

    path: Path
    value: str = field(repr=False, compare=False)

    def __str__(self) -> str:
        return str(self.path)


def parse_secret_file(value: Any) -> SecretFile | None:
    if value is None or value == "":
        return None
    if isinstance(value, SecretFile):
        return value
    path = parse_path(value)
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the file: {getattr(exc, 'strerror', None) or exc}") from None
    if not secret:
        raise ValueError("the file is empty")
    return SecretFile(path, secret)


def parse_realm(value: Any) -> str:
    text = parse_str(value).strip()
    if not re.fullmatch(r"[\x20-\x7e]{1,100}", text) or '"' in text or "\\" in text:
        raise ValueError("expected 1 to 100 printable ASCII characters, without quotes or backslashes")
    return text


def parse_push_users(value: Any) -> tuple[str, ...]:
    """``USER`` (may push anywhere) or ``USER:PREFIX`` entries (YAML list, or comma-separated)."""
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    entries = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ValueError("expected a list of USER or USER:PREFIX entries")
        user, sep, prefix = str(item).strip().partition(":")
        if not user or any(c.isspace() or c == "," for c in user):
            raise ValueError(f"{item!r} is not a USER or USER:PREFIX entry")
        if sep:
            prefix = prefix.strip().strip("/")
            if not re.fullmatch(r"[a-z0-9._/-]+", prefix):
                raise ValueError(f"{item!r}: {prefix!r} is not a repository name prefix")
            entries.append(f"{user}:{prefix}")
        else:
            entries.append(user)
    return tuple(entries)


def _redact(text: str) -> str:
    """Hide the user-info part of URLs in a message (``https://user:token@host`` -> ``https://***@host``)."""
    return re.sub(r"//[^/@\s]*@", "//***@", text)


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def parse_prefixes(value: Any) -> tuple[str, ...]:
    """A list of repository-name prefixes (YAML list, or comma-separated in the environment)."""
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    prefixes = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ValueError("expected a list of repository name prefixes")
        text = str(item).strip().strip("/")
        if not text or not re.fullmatch(r"[a-z0-9._/-]+", text):
            raise ValueError(f"{item!r} is not a repository name prefix")
        prefixes.append(text)
    return tuple(prefixes)


def parse_networks(value: Any) -> tuple[str, ...]:
    """Addresses and networks (``10.0.0.0/8``, ``::1``; ``*`` for any): YAML list or comma-separated."""
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    networks = []
    for item in items:
        text = str(item).strip()
        if text != "*":
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        networks.append(text)
    return tuple(networks)


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "p": 1000**5}


def parse_size(value: Any) -> int | float:
    """``0`` (no limit), ``500MiB``, ``50GB``, ``1073741824`` -> bytes; ``80%`` -> 0.8 (of the filesystem)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GiB or 80%")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return int(value)
    text = str(value).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError("expected a percentage such as 80%") from None
        if not 0 < percent <= 100:
            raise ValueError("a percentage must be above 0 and at most 100")
        return percent / 100
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError("expected a size such as 50GiB, 500MB or 80%")
    unit = (m.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgtp".index(unit[0]) if unit else 0
    return int(float(m.group(1)) * base**power)


def parse_fraction(value: Any) -> float:
    """``0.9`` or ``90%`` -> 0.9."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("expected a fraction such as 0.9 or 90%") from None
    if not 0 < number <= 1:
        raise ValueError("must be above 0 and at most 1 (100%)")
    return number


def render_size(value: int | float) -> str:
    return f"{value * 100:g}%" if isinstance(value, float) else str(value)


def _key(parser: Callable[[Any], Any], default: Any, *, secret: bool = False,
         render: Callable[[Any], str] = str) -> Any:
    return field(default=default, repr=not secret, metadata={"parse": parser, "render": render})


# -- the typed configuration --


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _key(parse_listen, "0.0.0.0:5000")
    workers: int = _key(parse_int(1, 64), 1)
    # HTTPS: certificate chain and private key, PEM (http.tls.certificate, http.tls.key); both or neither.
    tls_certificate: Path | None = _key(parse_optional_file, None)
    tls_key: Path | None = _key(parse_optional_file, None)
    # Mutual TLS: clients must present a certificate signed by a CA of this PEM file (http.tls.client_ca).
    tls_client_ca: Path | None = _key(parse_optional_file, None)
    # A client that sends nothing for this long while a request (head or body) is due is disconnected;
    # also how long an idle keep-alive connection is kept.
    idle_timeout: float = _key(parse_duration, 75.0)
    # Reverse proxies whose X-Forwarded-For/-Proto are believed (the client's address, and https for
    # the token realm when the proxy terminates TLS); empty: none.
    trusted_proxies: tuple[str, ...] = _key(parse_networks, ("127.0.0.1", "::1"))

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


@dataclass(frozen=True)
class StorageConfig:
    path: Path = _key(parse_path, Path("./mirror-data"))


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = _key(parse_url, DOCKER_HUB_URL)
    # Name the upstream's content is filed under in the index (Docker Hub is "docker.io").
    registry: str = _key(parse_registry, "docker.io")
    username: str | None = _key(parse_optional_str, None)
    password: str | None = _key(parse_optional_str, None, secret=True)
    # The password (access token) read from a file at start-up instead; takes precedence over password.
    password_file: SecretFile | None = _key(parse_secret_file, None)
    # "auto": one-component names get Docker Hub's implicit "library/" when the upstream is Docker Hub.
    library_namespace: str = _key(parse_choice("auto", "true", "false"), "auto")
    connect_timeout: float = _key(parse_duration, 5.0)
    read_timeout: float = _key(parse_duration, 60.0)
    retries: int = _key(parse_int(0, 10), 2)
    # This upstream's own tag TTL (default: cache.tag_ttl).
    tag_ttl: float | None = _key(parse_optional_duration, None)

    def __post_init__(self) -> None:
        if self.password_file is not None:
            object.__setattr__(self, "password", self.password_file.value)

    @property
    def adds_library_namespace(self) -> bool:
        if self.library_namespace == "auto":
            return (urlsplit(self.url).hostname or "") in DOCKER_HUB_HOSTS
        return self.library_namespace == "true"


@dataclass(frozen=True)
class CacheConfig:
    tag_ttl: float = _key(parse_duration, 300.0)
    # Disk budget of the store: bytes, or a fraction of the filesystem (from "80%"); 0 = no limit.
    max_size: int | float = _key(parse_size, 0.8, render=render_size)
    # Eviction starts above high_watermark * max_size and stops below low_watermark * max_size.
    high_watermark: float = _key(parse_fraction, 0.95)
    low_watermark: float = _key(parse_fraction, 0.85)
    # Evict cached images not pulled for this long (0 = only when over the budget).
    unused_for: float = _key(parse_duration, 0.0)
    # Images used this recently are never evicted to make room: they may be being pulled right now.
    keep_recent: float = _key(parse_duration, 10.0)


@dataclass(frozen=True)
class GcConfig:
    # How often the online collector runs (0 = never; `mirror gc` still works).
    interval: float = _key(parse_duration, 3600.0)
    # Nothing younger than this is collected (uploads waiting for their manifest, fetches in flight).
    grace: float = _key(parse_duration, 3600.0)


@dataclass(frozen=True)
class PushConfig:
    enabled: bool = _key(parse_bool, True)
    # Empty: any repository; otherwise only names equal to or under one of these prefixes.
    prefixes: tuple[str, ...] = _key(parse_prefixes, ())
    # Allow pushing into a repository that is a cache of the upstream (it then becomes local).
    over_cache: bool = _key(parse_bool, False)
    # Unfinished uploads older than this are removed.
    upload_ttl: float = _key(parse_duration, 86400.0)

    def allows(self, name: str) -> bool:
        return not self.prefixes or any(name == p or name.startswith(p + "/") for p in self.prefixes)


@dataclass(frozen=True)
class DeleteConfig:
    enabled: bool = _key(parse_bool, True)


@dataclass(frozen=True)
class AuthConfig:
    # Users who may log in: an htpasswd file of bcrypt entries (htpasswd -B); unset: no authentication.
    htpasswd_path: Path | None = _key(parse_optional_file, None)
    htpasswd_realm: str = _key(parse_realm, "mirror")
    # Pulls without logging in (push and delete always need a user).
    anonymous_pull: bool = _key(parse_bool, True)
    # Who may push and delete: USER (any repository) or USER:PREFIX entries; empty: every user.
    push_users: tuple[str, ...] = _key(parse_push_users, ())

    def __post_init__(self) -> None:
        if self.htpasswd_path is None and not self.anonymous_pull:
            raise ConfigError("auth.anonymous_pull: false needs users: set auth.htpasswd.path")
        if self.htpasswd_path is None and self.push_users:
            raise ConfigError("auth.push_users needs users: set auth.htpasswd.path")

    @property
    def enabled(self) -> bool:
        return self.htpasswd_path is not None

    def may_write(self, user: str, name: str | None) -> bool:
        """May *user* push to (and delete from) repository *name* (None: a name not parsed yet)?"""
        if not self.push_users:
            return True
        for entry in self.push_users:
            who, sep, prefix = entry.partition(":")
            if who != user:
                continue
            if not sep or name is None or name == prefix or name.startswith(prefix + "/"):
                return True
        return False


@dataclass(frozen=True)
class LogConfig:
    level: str = _key(parse_choice("debug", "info", "warning", "error"), "info")
    # One JSON line per request on stdout (logger mirror.access); replaces uvicorn's access log.
    access: bool = _key(parse_bool, True)


def parse_optional_listen(value: Any) -> str | None:
    return None if value is None or value == "" else parse_listen(value)


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT of a listener of its own for /metrics (then not on http.listen); empty: http.listen.
    listen: str | None = _key(parse_optional_listen, None)


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    gc: GcConfig = field(default_factory=GcConfig)
    push: PushConfig = field(default_factory=PushConfig)
    delete: DeleteConfig = field(default_factory=DeleteConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: Every upstream, the default one (``upstream``) first; more come from the ``upstreams:`` list.
    upstreams: tuple[UpstreamConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.upstreams:
            object.__setattr__(self, "upstreams", (self.upstream,))


SECTIONS: dict[str, type] = {
    "http": HttpConfig,
    "storage": StorageConfig,
    "upstream": UpstreamConfig,
    "cache": CacheConfig,
    "gc": GcConfig,
    "push": PushConfig,
    "delete": DeleteConfig,
    "auth": AuthConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
}


def _section_keys(section: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(section)}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from a YAML file, the environment and ``"section.key"`` overrides."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    extra: list[Any] = []
    if path is not None:
        extra = _merge_yaml(raw, path)
    environ = os.environ if env is None else env
    if f"{ENV_PREFIX}UPSTREAMS" in environ:
        try:
            extra = json.loads(environ[f"{ENV_PREFIX}UPSTREAMS"])
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}UPSTREAMS must be a JSON list of upstream mappings") from None
    _merge_env(raw, environ)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            raw[section][key] = value
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        keys = _section_keys(cls)
        values: dict[str, Any] = {}
        for key, value in raw[name].items():
            attr = key.replace(".", "_")  # nested YAML mappings: http.tls.certificate -> tls_certificate
            if attr not in keys:
                raise ConfigError(f"unknown configuration key {name}.{key}")
            try:
                values[attr] = keys[attr].metadata["parse"](value)
            except ValueError as exc:
                shown = "***" if not keys[attr].repr else _redact(repr(value))
                raise ConfigError(f"bad value for {name}.{key}: {shown}: {exc}") from None
        sections[name] = cls(**values)
    default = sections["upstream"]
    upstreams = [default]
    for n, entry in enumerate(_upstream_list(extra)):
        parsed = _parse_section(UpstreamConfig, entry, f"upstreams[{n}]")
        if parsed.registry == default.registry:
            # The default registry's entry: the `upstream` section, env and flags refine it.
            merged = {**entry, **raw["upstream"]}
            default = upstreams[0] = _parse_section(UpstreamConfig, merged, "upstream")
        elif any(u.registry == parsed.registry for u in upstreams):
            raise ConfigError(f"upstreams[{n}].registry: {parsed.registry} is configured twice")
        else:
            upstreams.append(parsed)
    sections["upstream"] = default
    return Config(**sections, upstreams=tuple(upstreams))


def _upstream_list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ConfigError("upstreams must be a list of mappings (registry, url, username, ...)")
    return [{str(k): v for k, v in e.items()} for e in value]


def _parse_section(cls: type, values: Mapping[str, Any], label: str) -> Any:
    keys = _section_keys(cls)
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        attr = key.replace(".", "_")
        if attr not in keys:
            raise ConfigError(f"unknown configuration key {label}.{key}")
        try:
            parsed[attr] = keys[attr].metadata["parse"](value)
        except ValueError as exc:
            shown = "***" if not keys[attr].repr else _redact(repr(value))
            raise ConfigError(f"bad value for {label}.{key}: {shown}: {exc}") from None
    return cls(**parsed)


def _merge_yaml(raw: dict[str, dict[str, Any]], path: Path) -> list[Any]:
    """Merge the file's sections into *raw*; return its ``upstreams:`` list (if any)."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    extra = document.pop("upstreams", None) or []
    for section, keys in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown configuration section {section!r} in {path}")
        if keys is None:
            continue
        if not isinstance(keys, dict):
            raise ConfigError(f"configuration section {section} must be a mapping")
        raw[section].update(_flatten(keys))
    return extra  # type: ignore[no-any-return]


def _flatten(mapping: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"tls": {"key": k}}`` -> ``{"tls.key": k}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# What Kubernetes puts in a pod's environment for each Service (service links): for a Service
# named "mirror-metrics", MIRROR_METRICS_SERVICE_HOST=10.0.0.7, MIRROR_METRICS_PORT=tcp://10.0.0.7:9090,
# MIRROR_METRICS_PORT_9090_TCP_ADDR=10.0.0.7 ...  Name and value must both match to be skipped, so a
# mistyped key such as MIRROR_HTTP_PORT=8080 is still refused.
_IP = r"[0-9a-fA-F:.]+"
_SERVICE_LINKS = [
    (re.compile(r"[A-Z0-9_]+_SERVICE_HOST"), re.compile(_IP)),
    (re.compile(r"[A-Z0-9_]+_SERVICE_PORT(_[A-Z0-9_]+)?"), re.compile(r"\d{1,5}")),
    (re.compile(r"[A-Z0-9_]+_PORT(_\d{1,5}_(TCP|UDP|SCTP))?"), re.compile(rf"(tcp|udp|sctp)://\[?{_IP}\]?:\d{{1,5}}")),
    (re.compile(r"[A-Z0-9_]+_PORT_\d{1,5}_(TCP|UDP|SCTP)_PROTO"), re.compile(r"tcp|udp|sctp")),
    (re.compile(r"[A-Z0-9_]+_PORT_\d{1,5}_(TCP|UDP|SCTP)_PORT"), re.compile(r"\d{1,5}")),
    (re.compile(r"[A-Z0-9_]+_PORT_\d{1,5}_(TCP|UDP|SCTP)_ADDR"), re.compile(_IP)),
]


def is_service_link(name: str, value: str) -> bool:
    """True for a variable Kubernetes made for a Service (see ``_SERVICE_LINKS``)."""
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SERVICE_LINKS)


def _merge_env(raw: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or is_service_link(name, value):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                raw[section][rest[len(section) + 1:]] = value
                break


def to_environ(config: Config) -> dict[str, str]:
    """The environment that reproduces ``config`` (handed to worker processes)."""
    out: dict[str, str] = {}
    for name in SECTIONS:
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            if value is not None and _exported(section, f.name):
                out[f"{ENV_PREFIX}{name.upper()}_{f.name.upper()}"] = f.metadata["render"](value)
    if len(config.upstreams) > 1:
        out[f"{ENV_PREFIX}UPSTREAMS"] = json.dumps([
            {f.name: f.metadata["render"](getattr(u, f.name)) for f in dataclasses.fields(u)
             if getattr(u, f.name) is not None and _exported(u, f.name)}
            for u in config.upstreams[1:]
        ])
    return out


def _exported(section: Any, name: str) -> bool:
    """A password read from ``password_file`` stays out of the environment: workers read the file again."""
    return not (name == "password" and getattr(section, "password_file", None) is not None)

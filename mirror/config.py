"""Typed configuration: one YAML file, ``MIRROR_<SECTION>_<KEY>`` environment overrides, CLI flags.

Precedence: defaults < YAML file < environment < command-line flags.  Everything is
validated once, at start-up; a bad value raises :class:`ConfigError` with one line that
names the key.  The environment is read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
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
    return text


def parse_str(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError("expected a string")
    return str(value)


def parse_optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else parse_str(value)


def parse_path(value: Any) -> Path:
    return Path(parse_str(value)).expanduser()


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


def _key(parser: Callable[[Any], Any], default: Any, *, secret: bool = False) -> Any:
    return field(default=default, repr=not secret, metadata={"parse": parser})


# -- the typed configuration --


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _key(parse_listen, "0.0.0.0:5000")
    workers: int = _key(parse_int(1, 64), 1)

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
    registry: str = _key(parse_str, "docker.io")
    username: str | None = _key(parse_optional_str, None)
    password: str | None = _key(parse_optional_str, None, secret=True)
    # "auto": one-component names get Docker Hub's implicit "library/" when the upstream is Docker Hub.
    library_namespace: str = _key(parse_choice("auto", "true", "false"), "auto")
    connect_timeout: float = _key(parse_duration, 5.0)
    read_timeout: float = _key(parse_duration, 60.0)
    retries: int = _key(parse_int(0, 10), 2)

    @property
    def adds_library_namespace(self) -> bool:
        if self.library_namespace == "auto":
            return (urlsplit(self.url).hostname or "") in DOCKER_HUB_HOSTS
        return self.library_namespace == "true"


@dataclass(frozen=True)
class CacheConfig:
    tag_ttl: float = _key(parse_duration, 300.0)


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
class LogConfig:
    level: str = _key(parse_choice("debug", "info", "warning", "error"), "info")
    access: bool = _key(parse_bool, True)


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    push: PushConfig = field(default_factory=PushConfig)
    delete: DeleteConfig = field(default_factory=DeleteConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = {
    "http": HttpConfig,
    "storage": StorageConfig,
    "upstream": UpstreamConfig,
    "cache": CacheConfig,
    "push": PushConfig,
    "delete": DeleteConfig,
    "log": LogConfig,
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
    if path is not None:
        _merge_yaml(raw, path)
    _merge_env(raw, os.environ if env is None else env)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            raw[section][key] = value
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        keys = _section_keys(cls)
        values: dict[str, Any] = {}
        for key, value in raw[name].items():
            if key not in keys:
                raise ConfigError(f"unknown configuration key {name}.{key}")
            try:
                values[key] = keys[key].metadata["parse"](value)
            except ValueError as exc:
                shown = "***" if not keys[key].repr else repr(value)
                raise ConfigError(f"bad value for {name}.{key}: {shown}: {exc}") from None
        sections[name] = cls(**values)
    return Config(**sections)


def _merge_yaml(raw: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if document is None:
        return
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    for section, keys in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown configuration section {section!r} in {path}")
        if keys is None:
            continue
        if not isinstance(keys, dict):
            raise ConfigError(f"configuration section {section} must be a mapping")
        raw[section].update({str(k): v for k, v in keys.items()})


def _merge_env(raw: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
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
            if value is not None:
                out[f"{ENV_PREFIX}{name.upper()}_{f.name.upper()}"] = str(value)
    return out

"""Configuration values: parsers from what YAML or the environment gives to typed values.

Each parser takes the raw value (a YAML scalar or list, or an environment string) and returns
the typed value or raises ``ValueError`` with a short reason; ``config/sections.py`` adds the key's name.
:func:`setting` declares a configuration field with its parser, default and rendering.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    """A registry host name as images name it: ``docker.io``, ``ghcr.io``, ``registry.local:5000``;
    Docker Hub's other names (``index.docker.io``, ``registry-1.docker.io``) are ``docker.io``, as
    clients and the routes take them."""
    from ..spec.names import DOCKER_HUB, DOCKER_HUB_ALIASES

    text = str(value).strip().lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?", text):
        raise ValueError("expected a registry host name such as ghcr.io or registry.local:5000")
    return DOCKER_HUB if text in DOCKER_HUB_ALIASES else text


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


#: The region names botocore takes (``botocore.utils.validate_region_name``).
_REGION_RE = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?")


def parse_region(value: Any) -> str:
    """A region name, or "" (left blank: the AWS SDK's own, ``AWS_REGION``)."""
    text = parse_str(value).strip()
    if not text:
        return ""
    if not _REGION_RE.fullmatch(text):
        raise ValueError("expected a region name such as us-east-1: letters, digits and inner hyphens")
    return text


def parse_key_prefix(value: Any) -> str:
    """A prefix of object keys, as a directory (``registry``, ``/team/registry/``): no ``.`` or ``..``
    segment, which S3 keeps as written but S3-compatible stores refuse or resolve."""
    text = parse_str(value)
    if any(segment in (".", "..") for segment in text.split("/")):
        raise ValueError("'.' and '..' segments are not allowed (it is a key prefix, not a path)")
    return text


def parse_str(value: Any) -> str:
    """A string; "" for a key left blank in YAML (``key:``), never "None"."""
    if isinstance(value, (dict, list)):
        raise ValueError("expected a string")
    return "" if value is None else str(value)


def parse_secret(value: Any) -> str | None:
    """A password, key or DSN given inline, without the whitespace around it (as read from a file:
    a Kubernetes secret's trailing newline), or None when empty.  Text only (:func:`parse_credential`)."""
    text = parse_credential(value)
    return text.strip() or None if text is not None else None


def parse_credential(value: Any) -> str | None:
    """A user name, key or password as written, or None when empty.  A YAML scalar read as another
    type is refused: YAML 1.1 turns an unquoted ``0755`` into 493, ``12:30`` into 750 and ``0x1F``
    into 31, and such a credential would be refused by the registry or store without a word of why
    (the value is not quoted back: it may be a secret)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("YAML read it as a number, a date or a boolean, not as it is written (an unquoted 0755 "
                         "is the number 493): write it in quotes")
    return value


def parse_optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else parse_str(value)


def parse_bucket(value: Any) -> str | None:
    """An S3 bucket's name, as botocore takes it (it refuses any other before sending a request)."""
    text = parse_optional_str(value)
    if text is not None and not re.fullmatch(r"[a-zA-Z0-9.\-_]{1,255}", text):
        raise ValueError("expected a bucket name: letters, digits, '.', '-' and '_' (S3's own rule: 3 to 63"
                         " lowercase letters, digits, '.' and '-')")
    return text


def parse_path(value: Any) -> Path:
    return Path(parse_str(value)).expanduser()


def parse_ca_file(value: Any) -> Path | None:
    """A PEM file of CA certificates (:func:`parse_optional_file`) that OpenSSL can load."""
    import ssl

    path = parse_optional_file(value)
    if path is not None:
        try:
            ssl.create_default_context().load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            raise ValueError(f"not a PEM file of CA certificates ({exc.reason or exc})") from None
    return path


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


def list_items(value: Any) -> list[Any]:
    """The entries of a list value: a YAML list, or from the environment either comma-separated
    (``team, ci``) or written as in the YAML file (``[team, ci]``; a JSON list is one too)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if not text.startswith("["):
        return text.split(",")
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list):
        raise ValueError("expected a list: comma-separated, or [a, b] as in YAML or JSON")
    return items


def parse_push_users(value: Any) -> tuple[str, ...]:
    """``USER`` (may push anywhere) or ``USER:PREFIX`` entries (YAML list, or comma-separated)."""
    if value is None or value == "":
        return ()
    items = list_items(value)
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


def parse_user_names(value: Any) -> tuple[str, ...]:
    """htpasswd user names (YAML list, or comma-separated)."""
    if value is None or value == "":
        return ()
    items = list_items(value)
    names = []
    for item in items:
        user = str(item).strip() if not isinstance(item, (dict, list)) else ""
        if not user or ":" in user or any(c.isspace() or c == "," for c in user):
            raise ValueError(f"{item!r} is not a user name")
        names.append(user)
    return tuple(names)


#: Shortest operator token accepted (``admin.token_file``): 128 bits in hex.
MIN_TOKEN_LENGTH = 32


def parse_token_file(value: Any) -> SecretFile | None:
    """A file holding a bearer token of printable ASCII, at least :data:`MIN_TOKEN_LENGTH` long."""
    secret = parse_secret_file(value)
    if secret is None:
        return None
    if not re.fullmatch(r"[\x21-\x7e]+", secret.value):
        raise ValueError("the token must be one word of printable ASCII")
    if len(secret.value) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the token must be at least {MIN_TOKEN_LENGTH} characters "
                         "(e.g. openssl rand -hex 32)")
    return secret


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
    items = list_items(value)
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
    items = list_items(value)
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


def parse_size(value: Any) -> int | float:
    """A disk budget: bytes (``int``), or a share of the filesystem (``float`` in ``(0, 1]``).

    ``0`` (no limit), ``1073741824``, ``500MB``, ``50GiB`` -> bytes; ``80%`` and ``0.8`` -> 0.8.
    A number with a decimal point and no unit is a share when it is at most 1 (``1.0`` is 100%)
    and bytes when it is a larger whole number (YAML's ``1.0e+9``); ``1.5`` could mean 1.5 bytes
    or 150% and is refused, as is any size below one byte but not 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a size such as 50GiB, 500MB, 80% or 0.8")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    text = str(value).strip()
    if text.startswith("-"):
        raise ValueError("must not be negative")
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise ValueError("expected a percentage such as 80%") from None
        if not 0 < share <= 1:
            raise ValueError("a percentage must be above 0 and at most 100")
        return share
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError("expected a size such as 50GiB, 500MB, 80% or 0.8")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if not unit and "." in m.group(1) or isinstance(value, float):
        if number == 0:
            return 0
        if number > 1 and not number.is_integer():
            raise ValueError("ambiguous: a share of the disk is at most 1 (0.8 is 80%), and a size in bytes "
                             "is a whole number or has a unit (1.5GB)")
        if number <= 1:
            return number
    base = 1024 if "i" in unit else 1000
    power = "bkmgtp".index(unit[0]) if unit else 0
    size = int(number * base**power)
    if size == 0 and number != 0:
        raise ValueError("less than one byte (0 means no limit)")
    return size


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


def human(n: float) -> str:
    """A size in bytes for people, in binary units: ``512`` -> ``512 B``, ``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def setting(parser: Callable[[Any], Any], default: Any, *, secret: bool = False,
         render: Callable[[Any], str] = str) -> Any:
    return field(default=default, repr=not secret, metadata={"parse": parser, "render": render})

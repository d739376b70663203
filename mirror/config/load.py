"""Loading the configuration: the YAML file, ``MIRROR_<SECTION>_<KEY>`` environment overrides and
``"section.key"`` overrides from CLI flags, parsed into the typed sections of ``config/sections.py``.

Precedence: defaults < YAML file < environment < command-line flags.  Everything is
validated once, at start-up; a bad value raises :class:`~mirror.config.sections.ConfigError` with one line
that names the key.  The environment is read here and nowhere else; :func:`to_environ` writes it
back for worker processes.

Imports ``config`` (the sections), ``values`` (the parsers' helpers) and ``yamlfile`` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..spec.names import DOCKER_HUB
from .dsn import dsn_problem
from .hints import (
    ENV_PREFIX,
    NESTED,
    NOT_SETTINGS,
    distribution_variable,
    drop_harmless_s3,
    unknown_key,
    unknown_section,
    unknown_variable,
    user_key,
)
from .quoting import shown
from .sections import (
    DOCKER_HUB_URL,
    AdminConfig,
    AuthConfig,
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DeleteConfig,
    GcConfig,
    HttpConfig,
    LogConfig,
    MetadataConfig,
    MetricsConfig,
    PushConfig,
    StorageConfig,
    UiConfig,
    UpstreamConfig,
)
from .yamlfile import load_yaml

#: Where a command's data directory is when ``--data`` is not given: the precedence above, for ``storage.path``.
DATA_DEFAULT = f"{ENV_PREFIX}STORAGE_PATH if set, else storage.path of the --config file, else ./mirror-data"


SECTIONS: dict[str, type] = {
    "http": HttpConfig, "storage": StorageConfig, "upstream": UpstreamConfig, "metadata": MetadataConfig,
    "cache": CacheConfig, "gc": GcConfig, "push": PushConfig, "delete": DeleteConfig, "auth": AuthConfig,
    "admin": AdminConfig, "log": LogConfig, "metrics": MetricsConfig, "ui": UiConfig, "cluster": ClusterConfig,
}


def _section_keys(section: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(section)}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from a YAML file, the environment and ``"section.key"`` overrides."""
    # Each source's keys by section, as field names (``http.tls.key`` is ``tls_key``), lowest first.
    file: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    extra: list[Any] = []
    problems: list[str] = []  # every unknown key and section, told at once
    written: dict[tuple[str, str], str] = {}  # the file's keys as written: ("storage", "s3_bucket") -> "s3.bucket"
    if path is not None:
        extra = _merge_yaml(file, path, problems, written)
    in_file = dict(file["upstream"])  # the file's `upstream` section, before the environment refines it
    environ = os.environ if env is None else env
    listed = f"{ENV_PREFIX}UPSTREAMS" if environ.get(f"{ENV_PREFIX}UPSTREAMS", "").strip() else None
    if listed:  # replaces the file's list; empty is not set, as for every other variable
        try:
            extra = yaml.safe_load(environ[listed])  # JSON, or YAML flow as in the file
        except yaml.YAMLError as exc:
            raise ConfigError(f"{listed} is not a list of upstream mappings in JSON or YAML{_where(exc)}") from None
    from_env: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    flags: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    variables = _merge_env(from_env, environ, problems)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            flags[section][key.replace(".", "_")] = value
            variables.pop((section, key.replace(".", "_")), None)
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for layer, where in ((file, f"in {path}"), (from_env, "in the environment"), (flags, "given as flags")):
        for name, cls in SECTIONS.items():
            _overlay(raw[name], layer[name], _section_keys(cls), name, where)
    drop_harmless_s3(raw["storage"])
    for name, cls in SECTIONS.items():
        keys = _section_keys(cls)
        problems += [unknown_key(name, written.get((name, key), user_key(key)), keys, variables.get((name, key)))
                     for key in raw[name] if key not in keys]
    if problems:
        raise ConfigError("\n".join(problems))
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        keys = _section_keys(cls)
        values: dict[str, Any] = {}
        for key, value in raw[name].items():
            attr = key.replace(".", "_")  # nested YAML mappings: http.tls.certificate -> tls_certificate
            try:
                values[attr] = keys[attr].metadata["parse"](value)
            except ValueError as exc:
                quoted = shown(value, secret=not keys[attr].repr, names_file=attr.endswith("_file"))
                source = f" (set by {variables[name, key]})" if (name, key) in variables else ""
                raise ConfigError(f"bad value for {name}.{user_key(attr)}: {quoted}: {exc}{source}") from None
        try:
            sections[name] = cls(**values)
        except ConfigError as exc:  # a rule between keys: an empty variable may have cleared one of them
            blank = sorted(v for (n, key), v in variables.items() if n == name and str(raw[name].get(key)) == "")
            if blank:
                raise ConfigError(f"{exc} ({', '.join(blank)} set and empty: it clears the file's value)") from None
            raise
    default = sections["upstream"]
    upstreams, labels = [default], ["upstream"]
    default_entry: int | None = None
    upstream_keys = _section_keys(UpstreamConfig)
    for n, entry in enumerate(_upstream_list(extra, listed)):
        label = f"{listed or 'upstreams'}[{n}]"
        _overlay({}, entry, upstream_keys, label)  # refuses a key and its _file both set
        if "registry" not in entry:  # (it would have been docker.io's, its content filed as Docker Hub's)
            raise ConfigError(f"{label}.registry is not set: name the registry it serves (docker.io, ghcr.io...)")
        registry = _parse_section(UpstreamConfig, {k: v for k, v in entry.items() if k == "registry"}, label).registry
        if registry == default.registry and default_entry is None:
            # The default registry's entry: env and flags refine it. The file's `upstream` section may
            # add keys but not contradict it (one of the two would silently be ignored); an entry of
            # MIRROR_UPSTREAMS overrides it, as the environment overrides the file.
            default_entry = n
            if listed:
                below = _overlay(dict(in_file), entry, upstream_keys, label)
                above = _overlay(dict(from_env["upstream"]), flags["upstream"], upstream_keys, "upstream")
            else:
                _check_no_conflict(in_file, entry, registry, n)
                below, above = dict(entry), raw["upstream"]
            merged = _overlay(dict(below), above, upstream_keys, "upstream")
            _parse_section(UpstreamConfig, {k: v for k, v in entry.items() if k in merged and k not in above}, label)
            default = upstreams[0] = _parse_section(UpstreamConfig, merged, "upstream")
            labels[0] = label
        elif any(u.registry == registry for u in upstreams):
            raise ConfigError(f"{label}.registry: {registry} is configured twice")
        else:  # served by its own host when no url says otherwise, as containerd takes it
            url = DOCKER_HUB_URL if registry == DOCKER_HUB else f"https://{registry}"
            upstreams.append(_parse_section(UpstreamConfig, {"url": url, **entry}, label))
            labels.append(label)
    for upstream, label in zip(upstreams, labels, strict=True):
        if upstream.password is not None and not upstream.username:  # (it would be sent with no user: never)
            raise ConfigError(f"{label}.password is set without {label}.username: set both")
    sections["upstream"] = default
    metadata = sections["metadata"]
    if metadata.driver == "postgres" and (problem := dsn_problem(metadata.postgres_dsn or "")) is not None:
        # Here, not in MetadataConfig: the index's own check (metadata/opening.py) takes any DSN it is given.
        which = f"dsn_file: the DSN in {metadata.postgres_dsn_file}" if metadata.postgres_dsn_file else "dsn"
        raise ConfigError(f"metadata.postgres.{which}: {problem}")
    if sections["storage"].driver == "s3" and "max_size" not in raw["cache"]:
        # Config would call the default "bad value for cache.max_size: 80% ...", a value nobody wrote.
        raise ConfigError("cache.max_size is not set, and its default, 80% of the disk, has no meaning with "
                          "storage.driver s3 (a bucket has no fixed size): set cache.max_size in bytes "
                          "(e.g. 500GiB), or 0 for no limit")
    config = Config(**sections, upstreams=tuple(upstreams))
    _check_driver_keys(config.storage, variables)
    return config


def _overlay(lower: dict[str, Any], layer: Mapping[str, Any], keys: Mapping[str, Any], label: str,
             where: str = "") -> dict[str, Any]:
    """Lay one source's keys of a section (*layer*) over the lower sources' (*lower*, updated and
    returned).  A key and its ``_file`` twin (``s3.secretkey``, ``s3.secretkey_file``) are one setting:
    either set here replaces both below; both set here (*where*) are refused.  Empty is not set."""
    for attr, value in layer.items():
        twin = _twin(attr)
        if twin not in keys or value is None or value == "":
            continue
        if layer.get(twin) not in (None, ""):
            key, file = sorted((attr, twin), key=len)
            raise ConfigError(f"{label}.{user_key(key)} and {label}.{user_key(file)} are both set: keep one"
                              + (f" (both {where})" if where else ""))
        lower.pop(twin, None)
    lower.update(layer)
    return lower


def _twin(key: str) -> str:
    """The other member of a key and its ``_file`` twin (``password`` <-> ``password_file``)."""
    return key.removesuffix("_file") if key.endswith("_file") else f"{key}_file"


def _check_driver_keys(storage: StorageConfig, variables: Mapping[tuple[str, str], str]) -> None:
    """Refuse storage.s3 keys set while storage.driver is filesystem: the bucket named would be silently
    left unused (a forgotten ``driver: s3`` storing into a pod's own disk)."""
    if storage.driver != "filesystem":
        return
    for f in dataclasses.fields(storage):
        if f.name.startswith("s3_") and getattr(storage, f.name) != f.default:
            named = variables.get(("storage", f.name)) or f"storage.{user_key(f.name)}"
            raise ConfigError(f"{named} is set, but storage.driver is filesystem: set storage.driver to s3 to "
                              "store in the bucket, or remove the storage.s3 keys")


def _check_no_conflict(section: Mapping[str, Any], entry: Mapping[str, Any], registry: str, n: int) -> None:
    """Refuse a key the file sets both in ``upstream:`` and in the default registry's ``upstreams[n]``,
    or one there and its ``_file`` twin here (or the other way round)."""
    keys = _section_keys(UpstreamConfig)
    for key in entry.keys() & section.keys():
        attr = key.replace(".", "_")
        ours, theirs = (getattr(_parse_section(UpstreamConfig, {key: values[key]}, label), attr)
                        for values, label in ((section, "upstream"), (entry, f"upstreams[{n}]")))
        if ours != theirs:
            raise ConfigError(f"upstream.{key} and upstreams[{n}].{key} both configure {registry} "
                              "differently: keep one")
    for key, value in section.items():
        twin = _twin(key)
        if twin in keys and value not in (None, "") and entry.get(twin) not in (None, ""):
            raise ConfigError(f"upstream.{key} and upstreams[{n}].{twin} are both set: keep one")


def _upstream_list(value: Any, variable: str | None) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ConfigError(f"{variable or 'upstreams'} must be a list of mappings (registry, url, username, ...)")
    return [{str(k).replace(".", "_"): v for k, v in _flatten(e).items()} for e in value]


def _parse_section(cls: type, values: Mapping[str, Any], label: str) -> Any:
    keys = _section_keys(cls)
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        attr = key.replace(".", "_")
        if attr not in keys:
            raise ConfigError(unknown_key(label, key, keys, None))
        try:
            parsed[attr] = keys[attr].metadata["parse"](value)
        except ValueError as exc:
            quoted = shown(value, secret=not keys[attr].repr, names_file=attr.endswith("_file"))
            raise ConfigError(f"bad value for {label}.{user_key(attr)}: {quoted}: {exc}") from None
    return cls(**parsed)


def _where(exc: yaml.YAMLError) -> str:
    """Where the parser stopped and why, on one line: never its excerpt of the file, which may
    hold a password."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ""
    mark = exc.problem_mark or exc.context_mark
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # Without what the parser quotes of the text: an unquoted password (``*x``, ``!x``) would show; the
    # tokens it expected or found (``','``, ``']'``, ``'<stream end>'``) are kept.
    kept = re.compile(r"[\[\]{},:?-]|<[a-z ]+>")
    why = "; ".join(re.sub(r"'([^']*)'", lambda q: q[0] if kept.fullmatch(q[1]) else "'...'", part)
                    for part in (exc.problem, exc.context) if part)
    return f"{at}: {why}" if why else at


def _merge_yaml(raw: dict[str, dict[str, Any]], path: Path, problems: list[str],
                written: dict[tuple[str, str], str]) -> list[Any]:
    """Merge the file's sections into *raw*; return its ``upstreams:`` list (if any).  Unknown
    sections go to *problems*; each key as written (dotted) to *written*, by section and field name."""
    try:
        document = load_yaml(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML{_where(exc)}") from None
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    extra = document.pop("upstreams", None) or []
    for section, keys in document.items():
        if section not in SECTIONS:
            problems.append(unknown_section(str(section), keys, SECTIONS, str(path)))
            continue
        if keys is None:
            continue
        if not isinstance(keys, dict):
            raise ConfigError(f"configuration section {section} must be a mapping")
        for key, value in _flatten(keys).items():
            raw[section][key.replace(".", "_")] = value
            written[section, key.replace(".", "_")] = key
    return extra


def _flatten(mapping: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"tls": {"key": k}}`` -> ``{"tls.key": k}``.  A group left
    empty (``postgres:`` with nothing under it, which YAML reads as null) is an empty mapping, as an
    empty section is: the keys it lacks then get their own message (``... needs metadata.postgres.dsn``)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if value is None and not prefix and key in NESTED:
            continue
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


def _merge_env(raw: dict[str, dict[str, Any]], env: Mapping[str, str],
               problems: list[str]) -> dict[tuple[str, str], str]:
    """Merge the ``MIRROR_<SECTION>_<KEY>`` variables of *env* into *raw*; return the variable that
    set each ``(section, key)`` (``key`` as a field name: ``s3_bucket``), for a message about an
    unknown key to name what the user wrote.  One of no section goes to *problems* (a typo there would
    leave, say, authentication off without a word)."""
    variables: dict[tuple[str, str], str] = {}
    for name, value in env.items():
        if name.startswith("REGISTRY_") and not is_service_link(name, value):
            if (said := distribution_variable(name)) is not None:  # registry:2's: silently unread, misleading
                problems.append(said)
            continue
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS or is_service_link(name, value):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                raw[section][key] = value
                variables[(section, key)] = name
                break
        else:
            if rest != "upstreams":
                problems.append(unknown_variable(name, SECTIONS))
    return variables


def to_environ(config: Config, secrets: Path | None = None) -> dict[str, str]:
    """The environment that reproduces ``config`` (handed to worker processes).  With *secrets* (a
    directory only this user may read), a secret given inline (``storage.s3.secretkey``, a password, the
    DSN) is written to a file there (mode 0600) and handed over as its ``_file`` twin, so that no
    process's environment carries it; without, it is handed over as it is."""
    out: dict[str, str] = {}

    def exported(section: Any, label: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            if value is None or not _exported(section, f.name):
                continue
            if secrets is not None and not f.repr and hasattr(section, f"{f.name}_file"):
                path = secrets / f"{label}.{f.name}"
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                    handle.write(str(value))
                found[f"{f.name}_file"] = str(path)
            else:
                found[f.name] = f.metadata["render"](value)
        return found

    for name in SECTIONS:
        for key, value in exported(getattr(config, name), name).items():
            out[f"{ENV_PREFIX}{name.upper()}_{key.upper()}"] = value
    if len(config.upstreams) > 1 or secrets is not None:  # (replacing one the user set, its secrets too)
        out[f"{ENV_PREFIX}UPSTREAMS"] = json.dumps(
            [exported(u, f"upstreams{n}") for n, u in enumerate(config.upstreams[1:], 1)])
    return out


def _exported(section: Any, name: str) -> bool:
    """A password (or DSN) read from a file stays out of the environment: workers read the file again."""
    return getattr(section, f"{name}_file", None) is None

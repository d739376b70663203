"""Configuration: YAML, MIRROR_* environment overrides, flags, and one clear line per bad key."""

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.config.load import load_config, to_environ
from mirror.config.sections import DOCKER_HUB_URL, ConfigError
from mirror.config.yamlfile import load_yaml
from mirror.storage.s3 import S3Options


def test_defaults() -> None:
    config = load_config(env={})
    assert config.http.listen == "0.0.0.0:5000"
    assert config.storage.path == Path("mirror-data")
    assert config.upstream.url == DOCKER_HUB_URL
    assert config.upstream.adds_library_namespace


def test_precedence_yaml_env_flags(tmp_path: Path) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text("http:\n  listen: 127.0.0.1:6000\n  workers: 3\ncache:\n  tag_ttl: 10m\n")
    config = load_config(file, env={"MIRROR_HTTP_WORKERS": "4", "MIRROR_CACHE_TAG_TTL": "90s"},
                         overrides={"http.workers": "5", "storage.path": None})
    assert config.http.listen == "127.0.0.1:6000"
    assert config.http.workers == 5
    assert config.cache.tag_ttl == 90
    assert config.http.port == 6000


@pytest.mark.parametrize("yaml_text,message", [
    ("http:\n  lisen: 1\n", "unknown configuration key http.lisen"),
    ("cache:\n  tag_ttl: soon\n", "bad value for cache.tag_ttl"),
    ("http:\n  workers: 0\n", "bad value for http.workers"),
    ("http:\n  trusted_proxies: [10.0.0.0/8, proxy.local]\n", "bad value for http.trusted_proxies"),
    ("upstream:\n  url: ftp://x\n", "bad value for upstream.url"),
    ("upstream:\n  foreign_layers: always\n", "bad value for upstream.foreign_layers"),
    ("auth:\n  admins: [ops]\n", "auth.admins needs users: set auth.htpasswd.path"),
    ("auth:\n  admins: ['ops team']\n", "bad value for auth.admins"),
    ("admin:\n  token_file: /nonexistent/token\n", "bad value for admin.token_file"),
    ("storage:\n  driver: s4\n", "bad value for storage.driver"),
    ("storage:\n  driver: s3\n", "storage.driver s3 needs storage.s3.bucket"),
    ("storage:\n  s3: {bucket: b, chunksize: 4MiB}\n", "bad value for storage.s3.chunksize: '4MiB': must be at least"),
    ("storage:\n  s3: {bucket: b, chunksize: 50%}\n", "bad value for storage.s3.chunksize"),
    ("storage:\n  s3: {regionendpoint: 'minio:9000'}\n", "bad value for storage.s3.regionendpoint"),
    ("storage:\n  s3: {accesskey: AK}\n", "accesskey and storage.s3.secretkey must be set together"),
    ("nope:\n  a: 1\n", "unknown configuration section 'nope'"),
    ("http: [1, 2]\n", "section http must be a mapping"),
    ("http: {listen: 1\n", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(file, env={})


def test_a_yaml_error_shows_the_tokens_the_parser_expected_but_none_of_the_files_text(tmp_path: Path) -> None:
    """What the parser quotes of the file is left out (an unquoted password ``*hunter2`` reads as an
    alias), but not the tokens it expected: before, "expected '...' or '...', but got '...'"."""
    file = tmp_path / "mirror.yml"
    file.write_text("storage:\n  s3:\n    bucket: [b\n")
    with pytest.raises(ConfigError, match=r"line 4, column 1: expected ',' or '\]', but got '<stream end>'"):
        load_config(file, env={})
    file.write_text("upstream:\n  password: *hunter2\n")
    with pytest.raises(ConfigError, match=r"line 2, column 13: found undefined alias '\.\.\.'$"):
        load_config(file, env={})


def test_a_section_or_key_written_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    """YAML's mappings have unique keys; PyYAML kept the last one: a second ``storage:`` block holding only
    ``path:`` dropped the first block's S3 settings, and the mirror stored on its local disk, unsaid."""
    file = tmp_path / "mirror.yml"
    file.write_text("storage:\n  driver: s3\n  s3: {bucket: b, regionendpoint: 'http://127.0.0.1:9'}\n"
                    "cache:\n  max_size: 1GiB\nstorage:\n  path: /srv/mirror\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 6, column 1: the key storage is written twice "
                                          r"\(first at line 1\)"):
        load_config(file, env={})
    file.write_text("http:\n  listen: 127.0.0.1:5000\n  workers: 2\n  listen: 127.0.0.1:5001\n")
    with pytest.raises(ConfigError, match="line 4, column 3: the key listen is written twice"):
        load_config(file, env={})
    # A merge's keys may be written again: that is what a merge is for.
    merged = load_yaml("base: &base {listen: '127.0.0.1:5000', workers: 2}\nhttp:\n  <<: *base\n  workers: 3\n")
    assert merged["http"] == {"listen": "127.0.0.1:5000", "workers": 3}, merged


def test_operator_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef" * 4 + "\n")
    config = load_config(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})
    assert config.admin.token_file is not None and config.admin.token_file.value == "0123456789abcdef" * 4
    assert "0123456789abcdef" not in repr(config)
    assert to_environ(config)["MIRROR_ADMIN_TOKEN_FILE"] == str(token)  # workers read the file themselves
    for bad, message in (("short\n", "at least 32 characters"), ("two words" * 5, "one word"), ("", "empty")):
        token.write_text(bad)
        with pytest.raises(ConfigError, match=f"bad value for admin.token_file: .*{message}"):
            load_config(env={"MIRROR_ADMIN_TOKEN_FILE": str(token)})


def test_bad_env_value_and_unknown_env_key() -> None:
    with pytest.raises(ConfigError, match="http.listen"):
        load_config(env={"MIRROR_HTTP_LISTEN": "nowhere"})
    with pytest.raises(ConfigError, match="unknown configuration key cache.tag_tll"):
        load_config(env={"MIRROR_CACHE_TAG_TLL": "1s"})


def test_kubernetes_service_links_are_not_configuration() -> None:
    # What a pod gets for Services named mirror, mirror-metrics and mirror-http (enableServiceLinks).
    links = {
        "MIRROR_SERVICE_HOST": "10.96.0.12", "MIRROR_SERVICE_PORT": "5000", "MIRROR_SERVICE_PORT_HTTP": "5000",
        "MIRROR_PORT": "tcp://10.96.0.12:5000", "MIRROR_PORT_5000_TCP": "tcp://10.96.0.12:5000",
        "MIRROR_PORT_5000_TCP_PROTO": "tcp", "MIRROR_PORT_5000_TCP_PORT": "5000",
        "MIRROR_PORT_5000_TCP_ADDR": "10.96.0.12",
        "MIRROR_METRICS_SERVICE_HOST": "fd00::7", "MIRROR_METRICS_SERVICE_PORT": "9090",
        "MIRROR_METRICS_PORT": "tcp://[fd00::7]:9090", "MIRROR_METRICS_PORT_9090_TCP_ADDR": "fd00::7",
        "MIRROR_HTTP_PORT": "tcp://10.96.0.13:80", "MIRROR_HTTP_PORT_80_TCP_PORT": "80",
    }
    config = load_config(env={**links, "MIRROR_METRICS_LISTEN": "0.0.0.0:9090"})
    assert config.metrics.listen == "0.0.0.0:9090"
    assert config == load_config(env={"MIRROR_METRICS_LISTEN": "0.0.0.0:9090"})
    # Only a service link's name *and* value are skipped: a mistyped key is still refused.
    for name, value in (("MIRROR_HTTP_PORT", "8080"), ("MIRROR_METRICS_SERVICE_HOST", "metrics.local")):
        with pytest.raises(ConfigError, match="unknown configuration key"):
            load_config(env={name: value})


def test_password_never_echoed() -> None:
    config = load_config(env={"MIRROR_UPSTREAM_USERNAME": "u", "MIRROR_UPSTREAM_PASSWORD": "s3cr3t-token"})
    assert "s3cr3t-token" not in repr(config)


S3_KEYS = "storage:\n  driver: s3\n  s3:\n    bucket: b\n    {keys}\ncache:\n  max_size: 1GiB\n"


@pytest.mark.parametrize(("key", "written", "template", "read"), [
    ("upstream.password", "0644", "upstream:\n  username: u\n  password: {v}\n", lambda c: c.upstream.password),
    ("upstream.username", "12:30", "upstream:\n  username: {v}\n", lambda c: c.upstream.username),
    ("storage.s3.secretkey", "01234567", S3_KEYS.format(keys="accesskey: AKID\n    secretkey: {v}"),
     lambda c: c.storage.s3_secretkey),
    ("storage.s3.accesskey", "0x1F", S3_KEYS.format(keys="accesskey: {v}\n    secretkey: x"),
     lambda c: c.storage.s3_accesskey),
    ("upstreams[0].password", "3.10", "upstreams:\n  - registry: ghcr.io\n    username: u\n    password: {v}\n",
     lambda c: c.upstreams[1].password),
])
def test_a_credential_yaml_reads_as_another_type_is_refused_not_changed(
        tmp_path: Path, key: str, written: str, template: str, read: Callable[[Any], str]) -> None:
    """YAML 1.1 reads an unquoted 0644 as 420, 12:30 as 750, 0x1F as 31, 3.10 as 3.1: a credential changed without a
    word (then refused by the registry or the store) is refused at start-up, asking for quotes, and a
    secret is not quoted back; quoted, it is taken as written."""
    path = tmp_path / "mirror.yml"
    path.write_text(template.format(v=written))
    with pytest.raises(ConfigError, match=rf"bad value for {re.escape(key)}: .*write it in quotes") as refused:
        load_config(path, env={})
    if "password" in key or "secretkey" in key:
        assert written not in str(refused.value)
    path.write_text(template.format(v=f"'{written}'"))
    assert read(load_config(path, env={})) == written


def test_s3_storage_from_the_environment_secret_never_echoed() -> None:
    env = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "images", "MIRROR_STORAGE_S3_REGION": "eu-west-3",
           "MIRROR_STORAGE_S3_REGIONENDPOINT": "http://127.0.0.1:8333", "MIRROR_STORAGE_S3_ROOTDIRECTORY": "/registry",
           "MIRROR_STORAGE_S3_ACCESSKEY": "AKID", "MIRROR_STORAGE_S3_SECRETKEY": "s3cr3t-key",
           "MIRROR_STORAGE_S3_FORCEPATHSTYLE": "true", "MIRROR_STORAGE_S3_CHUNKSIZE": "32MiB",
           "MIRROR_STORAGE_S3_REDIRECT": "true", "MIRROR_CACHE_MAX_SIZE": "500GiB"}
    config = load_config(env=env)
    options = S3Options.from_config(config.storage)
    assert options == S3Options("images", "eu-west-3", "http://127.0.0.1:8333", "/registry", "AKID", "s3cr3t-key",
                                forcepathstyle=True, chunksize=32 << 20, redirect=True)
    assert "s3cr3t-key" not in repr(config) and "s3cr3t-key" not in repr(options)
    assert load_config(env=to_environ(config)) == config  # what workers get
    defaults = load_config(env={}).storage
    assert defaults.driver == "filesystem" and defaults.s3_chunksize == 16 << 20 and not defaults.s3_redirect


def test_s3_storage_needs_a_budget_in_bytes(tmp_path: Path) -> None:
    s3 = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "b"}
    with pytest.raises(ConfigError) as refused:
        load_config(env=s3)  # the default is a fraction of the disk: said to be the default, not a bad value
    assert str(refused.value).startswith("cache.max_size is not set, and its default, 80% of the disk, has no "
                                         "meaning with storage.driver s3"), refused.value
    assert "set cache.max_size in bytes (e.g. 500GiB), or 0 for no limit" in str(refused.value)
    with pytest.raises(ConfigError, match=r"bad value for cache.max_size: 50% .*storage.driver s3.*give bytes"):
        load_config(env={**s3, "MIRROR_CACHE_MAX_SIZE": "50%"})
    assert load_config(env={**s3, "MIRROR_CACHE_MAX_SIZE": "0"}).cache.max_size == 0
    assert load_config(env={**s3, "MIRROR_CACHE_MAX_SIZE": "2GiB"}).cache.max_size == 2 << 30
    done = subprocess.run([sys.executable, "-m", "mirror", "serve", "--data", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **s3})
    assert done.returncode == 2 and "cache.max_size" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_environ_round_trip() -> None:
    config = load_config(env={"MIRROR_UPSTREAM_URL": "http://127.0.0.1:1", "MIRROR_CACHE_TAG_TTL": "5s",
                              "MIRROR_UPSTREAM_PASSWORD": "p", "MIRROR_UPSTREAM_USERNAME": "u"})
    assert load_config(env=to_environ(config)) == config


def test_cli_reports_bad_value_and_exits_nonzero(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mirror", "serve", "--listen", "x", "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["mirror: bad value for http.listen: 'x': expected HOST:PORT, "
                                                "e.g. 0.0.0.0:5000"]


def test_every_data_flag_says_where_the_data_directory_is_without_it(tmp_path: Path) -> None:
    """``--data``'s help tells the precedence the commands follow (flag, MIRROR_STORAGE_PATH, the
    config file's storage.path, ./mirror-data), never a bare ./mirror-data the config file overrides."""
    default = "default: MIRROR_STORAGE_PATH if set, else storage.path of the --config file, else ./mirror-data"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    root = str(Path(__file__).resolve().parents[1])

    def mirror(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, env={**clean, "PYTHONPATH": root, "COLUMNS": "70", **env})

    for command in ("serve", "gc", "fsck", "preload", "export"):
        text = mirror(command, "--help").stdout
        assert default in " ".join(text.split()), (command, text)
        assert "(default ./mirror-data)" not in text and "mirror- " not in " ".join(text.split()), (command, text)
    config = tmp_path / "mirror.yaml"
    config.write_text(f"storage:\n  path: {tmp_path / 'from-file'}\n")
    for command in ("gc", "fsck"):  # which directory each one opens, by what it says of it
        for args, env, used in (([], {}, "mirror-data"), (["--config", str(config)], {}, tmp_path / "from-file"),
                                (["--config", str(config)], {"MIRROR_STORAGE_PATH": "from-env"}, "from-env"),
                                (["--config", str(config), "--data", "from-flag"],
                                 {"MIRROR_STORAGE_PATH": "from-env"}, "from-flag")):
            done = mirror(command, *args, **env)
            assert done.returncode == 2, (command, args, env, done.stderr)
            assert done.stderr == f"mirror: {used} is not a mirror data directory (no index/ or blobs/)\n", \
                (command, args, env, done.stderr)
    s3 = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "b", "MIRROR_CACHE_MAX_SIZE": "1GiB",
          "MIRROR_STORAGE_S3_REGIONENDPOINT": "http://127.0.0.1:9", "MIRROR_METADATA_DRIVER": "postgres",
          "MIRROR_METADATA_POSTGRES_DSN": "postgresql://mirror@127.0.0.1:9/mirror"}
    for command in ("gc", "fsck"):  # on S3 too: the server's own directory, which says what it holds
        done = mirror(command, "--data", "elsewhere", **s3)
        assert done.returncode == 2 and done.stderr.startswith(
            "mirror: elsewhere is not a mirror data directory (no index/ or uploads/): with storage.driver s3 it is "
            "still the server's own"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror.yaml"]  # nothing was created


@pytest.mark.parametrize(("raw", "expected"), [
    ("0", 0), ("1000", 1000), ("500MB", 500_000_000), ("100MiB", 100 * 1024**2), ("50GiB", 50 * 1024**3),
    ("1.5 GB", 1_500_000_000), ("80%", 0.8), ("100%", 1.0), (4096, 4096),
])
def test_sizes(raw: object, expected: float) -> None:
    assert load_config(env={}, overrides={"cache.max_size": raw}).cache.max_size == expected


@pytest.mark.parametrize("raw", ["lots", "-5", "0%", "150%", "12 apples", "%", "1.5", "-0.5", "0.3B", "-1GB"])
def test_bad_sizes_name_the_key(raw: str) -> None:
    with pytest.raises(ConfigError, match="cache.max_size"):
        load_config(env={"MIRROR_CACHE_MAX_SIZE": raw})


@pytest.mark.parametrize(("yaml_value", "expected"), [
    ("0.8", 0.8), ("'0.8'", 0.8), ("80%", 0.8), ("1.0", 1.0), ("0", 0), ("0.0", 0), ("104857600", 100 * 1024**2),
    ("1.048576e+8", 104_857_600), ("100MiB", 100 * 1024**2), ("0.8GB", 800_000_000),
])
def test_max_size_in_yaml_a_share_or_bytes(tmp_path: Path, yaml_value: str, expected: float) -> None:
    """A YAML float of at most 1 is a share of the disk, like a percentage (0.8 once meant no limit)."""
    file = tmp_path / "mirror.yml"
    file.write_text(f"cache:\n  max_size: {yaml_value}\n")
    config = load_config(file, env={})
    assert config.cache.max_size == expected and type(config.cache.max_size) is type(expected)
    # ...and worker processes, which get it through the environment, read the same.
    assert load_config(env=to_environ(config)).cache.max_size == expected


@pytest.mark.parametrize("yaml_value", ["1.5", "-0.8", "-100", "1.5e+0", "true", "[1]", "0.1B", "150%"])
def test_ambiguous_or_bad_max_size_in_yaml_stops_start_up(tmp_path: Path, yaml_value: str) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text(f"cache:\n  max_size: {yaml_value}\n")
    with pytest.raises(ConfigError, match="bad value for cache.max_size"):
        load_config(file, env={})


def test_push_prefixes_and_round_trip_of_lists_and_shares() -> None:
    config = load_config(env={"MIRROR_PUSH_PREFIXES": "team, ci/builds/", "MIRROR_CACHE_MAX_SIZE": "75%",
                              "MIRROR_CACHE_LOW_WATERMARK": "70%", "MIRROR_GC_GRACE": "30m"})
    assert config.push.prefixes == ("team", "ci/builds")
    assert config.push.allows("team") and config.push.allows("team/app") and config.push.allows("ci/builds/x")
    assert not config.push.allows("teams/app") and not config.push.allows("ci/other")
    assert config.cache.low_watermark == 0.7 and config.gc.grace == 1800
    # Worker processes get the configuration through the environment: nothing may change on the way.
    assert load_config(env=to_environ(config)) == config
    with pytest.raises(ConfigError, match="push.prefixes"):
        load_config(env={"MIRROR_PUSH_PREFIXES": "Team/../x"})


def test_two_upstreams_entries_for_one_registry_stop_start_up(tmp_path: Path) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text("upstreams:\n  - {registry: docker.io, url: 'http://a.example'}\n"
                    "  - {registry: docker.io, url: 'http://b.example'}\n")
    with pytest.raises(ConfigError, match=r"upstreams\[1\].registry: docker.io is configured twice"):
        load_config(file, env={})
    file.write_text("upstreams:\n  - {registry: ghcr.io, url: 'http://a.example'}\n"
                    "  - {registry: GHCR.io, url: 'http://b.example'}\n")
    with pytest.raises(ConfigError, match=r"upstreams\[1\].registry: ghcr.io is configured twice"):
        load_config(file, env={})


def test_upstream_section_may_refine_but_not_contradict_the_default_entry(tmp_path: Path) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text("upstream: {url: 'http://a.example', retries: 1}\n"
                    "upstreams:\n  - {registry: docker.io, url: 'http://b.example'}\n")
    with pytest.raises(ConfigError, match=r"upstream.url and upstreams\[0\].url both configure docker.io"):
        load_config(file, env={})
    # Keys of their own, or the same value, combine; the environment and flags still override.
    file.write_text("upstream: {url: 'http://a.example', retries: 1}\n"
                    "upstreams:\n  - {registry: docker.io, url: 'http://a.example/', read_timeout: 9s}\n")
    config = load_config(file, env={"MIRROR_UPSTREAM_URL": "http://c.example"})
    assert len(config.upstreams) == 1
    assert (config.upstream.url, config.upstream.retries, config.upstream.read_timeout) == ("http://c.example", 1, 9)
    config = load_config(file, env={}, overrides={"upstream.url": "http://d.example"})
    assert config.upstream.url == "http://d.example"


@pytest.mark.parametrize("env", [{"MIRROR_CACHE_LOW_WATERMARK": "99%"},
                                 {"MIRROR_CACHE_LOW_WATERMARK": "90%", "MIRROR_CACHE_HIGH_WATERMARK": "90%"}])
def test_low_watermark_not_below_high_watermark_stops_start_up(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"cache.low_watermark: \d+%: must be below cache.high_watermark"):
        load_config(env=env)


@pytest.mark.parametrize(("name", "raw", "expected"), [
    ("MIRROR_AUTH_ADMINS", "[ops]", ("ops",)),
    ("MIRROR_AUTH_ADMINS", '["ops", "sre"]', ("ops", "sre")),
    ("MIRROR_AUTH_ADMINS", "ops, sre", ("ops", "sre")),
    ("MIRROR_AUTH_PUSH_USERS", "[alice, 'ci:team/builds']", ("alice", "ci:team/builds")),
    ("MIRROR_PUSH_PREFIXES", "[team]", ("team",)),
    ("MIRROR_PUSH_PREFIXES", "[]", ()),
    ("MIRROR_HTTP_TRUSTED_PROXIES", '["10.0.0.0/8", "::1"]', ("10.0.0.0/8", "::1")),
    ("MIRROR_HTTP_TRUSTED_PROXIES", "10.0.0.0/8,::1", ("10.0.0.0/8", "::1")),
])
def test_every_list_key_reads_the_environment_the_same_way(tmp_path: Path, name: str, raw: str,
                                                           expected: tuple[str, ...]) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ops:$2y$05$abcdefghijklmnopqrstuv\n")
    config = load_config(env={"MIRROR_AUTH_HTPASSWD_PATH": str(htpasswd), name: raw})
    section, _, key = name[len("MIRROR_"):].lower().partition("_")
    assert getattr(getattr(config, section), key) == expected
    assert load_config(env=to_environ(config)) == config


@pytest.mark.parametrize("name", ["MIRROR_AUTH_ADMINS", "MIRROR_AUTH_PUSH_USERS", "MIRROR_PUSH_PREFIXES",
                                  "MIRROR_HTTP_TRUSTED_PROXIES"])
def test_a_broken_list_in_the_environment_names_the_key(tmp_path: Path, name: str) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ops:$2y$05$abcdefghijklmnopqrstuv\n")
    key = name[len("MIRROR_"):].lower().replace("_", ".", 1)
    with pytest.raises(ConfigError, match=rf"bad value for {key}: .*expected a list"):
        load_config(env={"MIRROR_AUTH_HTPASSWD_PATH": str(htpasswd), name: "[ops, [x"})


def test_metadata_driver_and_its_dsn_which_is_never_shown(tmp_path: Path) -> None:
    assert load_config(env={}).metadata.driver == "diskcache"
    with pytest.raises(ConfigError, match="metadata.driver: postgres needs metadata.postgres.dsn"):
        load_config(env={"MIRROR_METADATA_DRIVER": "postgres"})
    with pytest.raises(ConfigError, match="bad value for metadata.driver: 'mysql'"):
        load_config(env={"MIRROR_METADATA_DRIVER": "mysql"})

    path = tmp_path / "mirror.yaml"
    path.write_text("metadata:\n  driver: postgres\n  postgres:\n    dsn: postgresql://m:file-pw@db/mirror\n")
    in_file = load_config(path, env={})
    assert (in_file.metadata.driver, in_file.metadata.postgres_dsn) == ("postgres", "postgresql://m:file-pw@db/mirror")
    dsn = "host=db2 dbname=mirror user=m password=env-s3cr3t"
    from_env = load_config(path, env={"MIRROR_METADATA_POSTGRES_DSN": dsn})
    assert from_env.metadata.postgres_dsn == dsn and "env-s3cr3t" not in repr(from_env)
    assert load_config(env=to_environ(from_env)) == from_env

    secret = tmp_path / "dsn"
    secret.write_text("host=db3 dbname=mirror user=m password=file-s3cr3t\n")
    path.write_text("metadata:\n  driver: postgres\n")
    from_file = load_config(path, env={"MIRROR_METADATA_POSTGRES_DSN_FILE": str(secret)})
    assert from_file.metadata.postgres_dsn == "host=db3 dbname=mirror user=m password=file-s3cr3t"
    assert "file-s3cr3t" not in repr(from_file)
    environ = to_environ(from_file)  # workers read the file again
    assert "file-s3cr3t" not in str(environ) and environ["MIRROR_METADATA_POSTGRES_DSN_FILE"] == str(secret)
    assert load_config(env=environ) == from_file
    with pytest.raises(ConfigError, match="bad value for metadata.postgres.dsn_file: .*: the file is empty"):
        secret.write_text("")
        load_config(path, env={"MIRROR_METADATA_POSTGRES_DSN_FILE": str(secret)})


def test_s3_keys_from_files_which_are_never_shown(tmp_path: Path) -> None:
    (tmp_path / "ak").write_text("AKFROMFILE\n")
    (tmp_path / "sk").write_text("sk-file-s3cr3t\n")
    env = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "mirror", "MIRROR_CACHE_MAX_SIZE": "1GiB",
           "MIRROR_STORAGE_S3_ACCESSKEY_FILE": str(tmp_path / "ak"),
           "MIRROR_STORAGE_S3_SECRETKEY_FILE": str(tmp_path / "sk")}
    config = load_config(env=env)
    assert (config.storage.s3_accesskey, config.storage.s3_secretkey) == ("AKFROMFILE", "sk-file-s3cr3t")
    assert "sk-file-s3cr3t" not in repr(config)
    environ = to_environ(config)  # workers read the files again
    assert "sk-file-s3cr3t" not in str(environ) and "AKFROMFILE" not in str(environ)
    assert load_config(env=environ) == config
    with pytest.raises(ConfigError, match="storage.s3.accesskey and storage.s3.secretkey must be set together"):
        load_config(env={key: value for key, value in env.items() if "SECRETKEY" not in key})
    with pytest.raises(ConfigError, match="bad value for storage.s3.secretkey_file: .*: the file is empty"):
        (tmp_path / "sk").write_text("")
        load_config(env=env)


@pytest.mark.parametrize(("name", "value", "key"), [
    ("MIRROR_METADATA_POSTGRES_DSN_FILE", "{missing}", "metadata.postgres.dsn_file"),
    ("MIRROR_METADATA_POSTGRES_DSN_FILE", "{empty}", "metadata.postgres.dsn_file"),
    ("MIRROR_HTTP_TLS_CERTIFICATE", "{missing}", "http.tls.certificate"),
    ("MIRROR_STORAGE_S3_CHUNKSIZE", "1MiB", "storage.s3.chunksize"),
    ("MIRROR_UPSTREAM_PASSWORD_FILE", "{missing}", "upstream.password_file"),
])
def test_a_bad_value_from_the_environment_names_its_key_as_the_file_writes_it(
    tmp_path: Path, name: str, value: str, key: str,
) -> None:
    """``MIRROR_METADATA_POSTGRES_DSN_FILE`` is ``metadata.postgres.dsn_file`` in the file and in the
    message, not ``metadata.postgres_dsn_file``; a key that is not nested keeps its underscore."""
    (tmp_path / "empty").write_text("")
    env = {name: value.format(missing=tmp_path / "missing", empty=tmp_path / "empty")}
    with pytest.raises(ConfigError) as refused:
        load_config(env=env)
    assert str(refused.value).startswith(f"bad value for {key}: "), refused.value


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("metadata:\n  driver: postgres\n  postgres:\n", "metadata.driver: postgres needs metadata.postgres.dsn or"),
    ("storage:\n  driver: s3\n  s3:\n", "storage.driver s3 needs storage.s3.bucket"),
])
def test_an_empty_nested_section_is_an_empty_mapping(tmp_path: Path, yaml_text: str, message: str) -> None:
    """``postgres:`` with nothing under it is null in YAML: read as no keys, not as an unknown key."""
    file = tmp_path / "mirror.yml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError) as refused:
        load_config(file, env={})
    assert str(refused.value).startswith(message), refused.value
    file.write_text("http:\n  tls:\n  listen: 127.0.0.1:6000\nauth:\n  htpasswd:\n")
    config = load_config(file, env={})
    assert (config.http.tls_certificate, config.auth.htpasswd_path) == (None, None)
    assert config.http.listen == "127.0.0.1:6000"


def test_an_unknown_environment_variable_is_named_with_the_closest_key() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env={"MIRROR_STORAGE_S3_FORCEPATHSTLYE": "true"})
    assert str(refused.value) == ("unknown environment variable MIRROR_STORAGE_S3_FORCEPATHSTLYE (unknown configuration"
                                  " key storage.s3.forcepathstlye): did you mean MIRROR_STORAGE_S3_FORCEPATHSTYLE?")
    with pytest.raises(ConfigError) as refused:
        load_config(env={"MIRROR_METADATA_POSTGRES_DNS": "x"})
    assert str(refused.value).startswith("unknown environment variable MIRROR_METADATA_POSTGRES_DNS ("), refused.value
    assert str(refused.value).endswith("did you mean MIRROR_METADATA_POSTGRES_DSN?"), refused.value
    with pytest.raises(ConfigError) as refused:
        load_config(env={"MIRROR_GC_WHENEVER": "1"})  # nothing close: no guess
    assert str(refused.value) == ("unknown environment variable MIRROR_GC_WHENEVER"
                                  " (unknown configuration key gc.whenever)")


def test_registry_2s_variables_are_refused_saying_what_to_set_instead() -> None:
    """registry:2 containers are configured with ``REGISTRY_<SECTION>_<KEY>``; the mirror started with
    them as if they were not there (Docker Hub as upstream, 0.0.0.0:5000).  A Kubernetes Service named
    ``registry`` makes ``REGISTRY_PORT`` and the like, and other ``REGISTRY_*`` names are none of
    distribution's settings: both are left alone."""
    for name, value, told in (
        ("REGISTRY_PROXY_REMOTEURL", "https://registry-1.docker.io", "use MIRROR_UPSTREAM_URL"),
        ("REGISTRY_HTTP_ADDR", ":5000", "use MIRROR_HTTP_LISTEN"),
        ("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", "/var/lib/registry", "use MIRROR_STORAGE_PATH"),
        ("REGISTRY_AUTH_HTPASSWD_PATH", "/auth/htpasswd", "set MIRROR_AUTH_HTPASSWD_PATH if it is one of the mirror's"),
    ):
        with pytest.raises(ConfigError) as refused:
            load_config(env={name: value})
        assert str(refused.value).startswith(f"{name} is a variable of registry:2's, which the mirror does not "
                                             f"read: {told}"), refused.value
    config = load_config(env={"REGISTRY_PORT": "tcp://10.96.0.9:5000", "REGISTRY_SERVICE_HOST": "10.96.0.9",
                              "REGISTRY_HTTP_SERVICE_PORT": "5000", "REGISTRY_USER": "ci", "REGISTRY_TOKEN": "x"})
    assert config.http.listen == "0.0.0.0:5000"


def test_dsn_and_dsn_file_together_in_one_place_are_refused(tmp_path: Path) -> None:
    """Both in the file, or both in the environment: which was meant cannot be told.  (One in the file
    and the other in the environment: the environment's wins, ``test_config_s3_values.py``.)"""
    secret = tmp_path / "dsn"
    secret.write_text("host=db dbname=mirror user=m password=file-s3cr3t\n")
    path = tmp_path / "mirror.yaml"
    path.write_text("metadata:\n  driver: postgres\n  postgres:\n    dsn: postgresql://m:yaml-s3cr3t@db/mirror\n"
                    f"    dsn_file: {secret}\n")
    for env in ({}, {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": "host=db",
                     "MIRROR_METADATA_POSTGRES_DSN_FILE": str(secret)}):
        with pytest.raises(ConfigError) as refused:
            load_config(None if env else path, env=env)
        assert str(refused.value).startswith("metadata.postgres.dsn and metadata.postgres.dsn_file are both set:"
                                             " keep one"), refused.value
        assert "s3cr3t" not in str(refused.value)


def test_an_s3_part_is_at_most_5_gib(tmp_path: Path) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text("storage:\n  s3: {bucket: b, chunksize: 1PiB}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(file, env={})
    assert str(refused.value) == ("bad value for storage.s3.chunksize: '1PiB': must be at most 5368709120 bytes (5GiB),"
                                  " the largest part S3 takes")
    file.write_text("storage:\n  driver: s3\n  s3: {bucket: b, chunksize: 5GiB}\ncache:\n  max_size: 1GiB\n")
    assert load_config(file, env={}).storage.s3_chunksize == 5 << 30


def test_a_key_of_distributions_s3_driver_says_what_to_do_instead(tmp_path: Path) -> None:
    """A registry:2 configuration's s3 section carries over but for a few keys: each is named as
    distribution's, with what this mirror does instead (``secure: false`` is no typo of ``secretkey``)."""
    file = tmp_path / "config.yaml"
    file.write_text("storage:\n  driver: s3\n  s3:\n    bucket: b\n    secure: false\ncache:\n  max_size: 1GiB\n")
    with pytest.raises(ConfigError) as refused:
        load_config(file, env={})
    assert str(refused.value) == ("storage.s3.secure is a setting of distribution's s3 driver that this mirror does "
                                  "not take: write the scheme in storage.s3.regionendpoint instead (http://... for "
                                  "secure: false)")
    with pytest.raises(ConfigError) as refused:
        load_config(env={"MIRROR_STORAGE_S3_V4AUTH": "false"})
    assert str(refused.value).startswith("MIRROR_STORAGE_S3_V4AUTH is a setting of distribution's s3 driver"), \
        refused.value
    assert "signature version 4" in str(refused.value)
    # Values that say what the mirror does anyway, as registry:2 configurations often carry them, are taken.
    file.write_text("storage:\n  driver: s3\n  s3:\n    bucket: b\n    v4auth: true\n    secure: true\n"
                    "    encrypt: false\n    skipverify: false\ncache:\n  max_size: 1GiB\n")
    assert load_config(file, env={}).storage.s3_bucket == "b"
    for endpoint, secure in (("http://127.0.0.1:8333", "true"), ("https://s3.example", "false")):  # the scheme decides
        file.write_text(f"storage:\n  driver: s3\n  s3:\n    bucket: b\n    regionendpoint: {endpoint}\n"
                        f"    secure: {secure}\ncache:\n  max_size: 1GiB\n")
        assert load_config(file, env={}).storage.s3_regionendpoint == endpoint


def test_mirror_upstreams_overrides_the_files_upstream_section_and_empty_is_not_set(tmp_path: Path) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text("upstream: {url: 'http://a.example', retries: 1, username: me}\n"
                    "upstreams:\n  - {registry: ghcr.io, url: 'http://g.example'}\n")
    listed = '[{"registry": "docker.io", "url": "http://b.example", "password": "pw"}, {"registry": "quay.io"}]'
    config = load_config(file, env={"MIRROR_UPSTREAMS": listed})
    # The environment's entry overrides the file's section, whose other keys stay; the list replaces the file's.
    assert (config.upstream.url, config.upstream.retries) == ("http://b.example", 1)
    assert (config.upstream.username, config.upstream.password) == ("me", "pw")
    assert [u.registry for u in config.upstreams] == ["docker.io", "quay.io"]
    # MIRROR_UPSTREAM_* and flags still override the entry.
    config = load_config(file, env={"MIRROR_UPSTREAMS": listed, "MIRROR_UPSTREAM_URL": "http://c.example"})
    assert config.upstream.url == "http://c.example"
    config = load_config(file, env={"MIRROR_UPSTREAMS": listed}, overrides={"upstream.url": "http://d.example"})
    assert config.upstream.url == "http://d.example"
    # Empty (a chart's unset value) is not set: the file's list stands.
    for empty in ("", "  "):
        config = load_config(file, env={"MIRROR_UPSTREAMS": empty})
        assert [u.registry for u in config.upstreams] == ["docker.io", "ghcr.io"]
        assert config.upstream.url == "http://a.example"
    with pytest.raises(ConfigError, match=r"^MIRROR_UPSTREAMS must be a list of mappings"):
        load_config(file, env={"MIRROR_UPSTREAMS": '{"registry": "docker.io"}'})
    with pytest.raises(ConfigError, match=r"^bad value for MIRROR_UPSTREAMS\[1\]\.url"):
        load_config(file, env={"MIRROR_UPSTREAMS": '[{"registry": "quay.io"}, {"registry": "x.io", "url": "ftp://x"}]'})


def test_a_bad_value_from_the_environment_names_its_variable(tmp_path: Path) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text("cache:\n  tag_ttl: soon\n")
    with pytest.raises(ConfigError, match=r"^bad value for cache.tag_ttl: 'soon'"):
        load_config(file, env={})
    with pytest.raises(ConfigError, match=r"^bad value for cache.tag_ttl: 'later': .*\(set by MIRROR_CACHE_TAG_TTL\)$"):
        load_config(file, env={"MIRROR_CACHE_TAG_TTL": "later"})
    with pytest.raises(ConfigError, match=r"^bad value for storage.s3.region: .*\(set by MIRROR_STORAGE_S3_REGION\)$"):
        load_config(env={"MIRROR_STORAGE_S3_REGION": "us east"})
    # A flag that replaces the variable is what is named (no variable).
    with pytest.raises(ConfigError, match=r"^bad value for cache.tag_ttl: 'never': [^(]*$"):
        load_config(file, env={"MIRROR_CACHE_TAG_TTL": "later"}, overrides={"cache.tag_ttl": "never"})


def test_an_upstream_entry_without_a_url_is_served_by_its_own_registry_host() -> None:
    listed = '[{"registry": "quay.io"}, {"registry": "reg.local:5000"}, {"registry": "ghcr.io", "url": "http://g:1"}]'
    config = load_config(env={"MIRROR_UPSTREAMS": listed})
    assert [(u.registry, u.url) for u in config.upstreams] == [
        ("docker.io", DOCKER_HUB_URL), ("quay.io", "https://quay.io"), ("reg.local:5000", "https://reg.local:5000"),
        ("ghcr.io", "http://g:1")]
    assert not config.upstreams[1].adds_library_namespace


def test_mirror_upstreams_is_written_in_json_or_as_in_the_file() -> None:
    for listed in ('[{"registry": "quay.io", "tag_ttl": "1m"}]', "[{registry: quay.io, tag_ttl: 1m}]"):
        config = load_config(env={"MIRROR_UPSTREAMS": listed})
        assert [(u.registry, u.tag_ttl) for u in config.upstreams] == [("docker.io", None), ("quay.io", 60.0)]
    with pytest.raises(ConfigError, match=r"^MIRROR_UPSTREAMS is not a list of upstream mappings in JSON or YAML"):
        load_config(env={"MIRROR_UPSTREAMS": "[{registry: quay.io"})



@pytest.mark.parametrize(("written", "taken"), [
    ("https://fd00:10:244::7:5000", "https://[fd00:10:244::7]:5000"),
    ("http://::1:5001/", "http://[::1]:5001"),
    ("https://[fd00::7]:5000", "https://[fd00::7]:5000"),
])
def test_an_ipv6_address_before_a_port_is_taken_with_or_without_brackets(written: str, taken: str) -> None:
    """Kubernetes' $(POD_IP) and ``hostname -i`` give an IPv6 address bare, and the Helm chart and the
    cluster compose file put a port after it (RFC 3986 3.2.2 wants brackets)."""
    assert load_config(env={"MIRROR_UPSTREAM_URL": written}).upstream.url == taken


@pytest.mark.parametrize("written", ["http://fd00::7", "https://fd00::7:5000:x", "http://fd00::zz:5000"])
def test_an_ipv6_address_without_brackets_or_port_is_refused_saying_how_to_write_it(written: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream.url.*brackets.*\[fd00::7\]:5000"):
        load_config(env={"MIRROR_UPSTREAM_URL": written})


@pytest.mark.parametrize("written", ["http://host:5000:6000", "http://127.0.0.1:5102:"])
def test_a_url_with_a_second_port_is_refused_as_a_bad_port_not_taken_for_an_ipv6_address(written: str) -> None:
    with pytest.raises(ConfigError, match="the port is not a number from 0 to 65535"):
        load_config(env={"MIRROR_UPSTREAM_URL": written})


def test_an_upstreams_entry_names_its_registry_once_and_its_credentials_whole(tmp_path: Path) -> None:
    """What a list of upstreams got wrong silently: an entry without ``registry`` was Docker Hub's (its
    content filed as docker.io's), Docker Hub's other names were entries no request could reach, a
    password without a user was never sent, and a URL ending in the API's ``/v2`` was asked ``/v2/v2/``."""
    file = tmp_path / "mirror.yml"

    def refused(text: str) -> str:
        file.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(file, env={})
        return str(caught.value)

    assert refused("upstreams:\n  - {url: 'http://quay.example'}\n") == \
        "upstreams[0].registry is not set: name the registry it serves (docker.io, ghcr.io...)"
    assert refused("upstreams:\n  - {registry: docker.io, url: 'http://a.example'}\n"
                   "  - {registry: index.docker.io, url: 'http://b.example'}\n") == \
        "upstreams[1].registry: docker.io is configured twice"
    file.write_text("upstreams:\n  - {registry: Registry-1.Docker.io, url: 'http://b.example'}\n")
    assert [(u.registry, u.url) for u in load_config(file, env={}).upstreams] == [("docker.io", "http://b.example")]
    assert refused("upstreams:\n  - {registry: ghcr.io, url: 'http://g.example', password: pw}\n") == \
        "upstreams[0].password is set without upstreams[0].username: set both"
    assert refused("upstream: {password: pw}\n") == "upstream.password is set without upstream.username: set both"
    file.write_text("upstreams:\n  - {registry: registry.k8s.io, url: 'http://k.example/k8s/v2/'}\n"
                    "  - {registry: quay.io, url: 'http://q.example/v2'}\n  - {registry: a.io, url: 'http://a/v2x'}\n")
    assert [u.url for u in load_config(file, env={}).upstreams] == \
        [DOCKER_HUB_URL, "http://k.example/k8s", "http://q.example", "http://a/v2x"]

"""Configuration of the S3 store and of the keys read from files: a region, a root directory or a DSN
that cannot work stops start-up with one line naming the key; a key and its ``_file`` twin are one setting,
which a higher source (environment over file, flags over both) overrides whole."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config.load import load_config, to_environ
from mirror.config.sections import ConfigError

S3 = {"MIRROR_STORAGE_DRIVER": "s3", "MIRROR_STORAGE_S3_BUCKET": "images", "MIRROR_CACHE_MAX_SIZE": "1GiB"}


def refused(path: Path | None = None, env: dict[str, str] | None = None, **overrides: str) -> str:
    """The one line a configuration is refused with."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env or {}, overrides={k.replace("__", "."): v for k, v in overrides.items()})
    message = str(caught.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "mirror.yml"
    file.write_text(text)
    return file


# -- storage.s3.region --


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-3", "cn-north-1", "garage", "us-gov-west-1"])
def test_a_region_name_botocore_takes_is_accepted(tmp_path: Path, region: str) -> None:
    in_file = write(tmp_path, f"storage:\n  driver: s3\n  s3: {{bucket: b, region: {region}}}\n"
                              "cache:\n  max_size: 1GiB\n")
    assert load_config(in_file, env={}).storage.s3_region == region
    assert load_config(env={**S3, "MIRROR_STORAGE_S3_REGION": region}).storage.s3_region == region


@pytest.mark.parametrize("region", ["not a region!", "-us-east-1", "us_east_1", "eu-west-3-", "a" * 64])
def test_a_region_botocore_would_refuse_stops_start_up_naming_the_key(tmp_path: Path, region: str) -> None:
    in_file = refused(write(tmp_path, f"storage:\n  s3: {{region: '{region}'}}\n"))
    assert in_file.startswith(f"bad value for storage.s3.region: {region!r}: "), in_file
    assert "us-east-1" in in_file, in_file  # what a region looks like
    assert refused(env={"MIRROR_STORAGE_S3_REGION": region}) == f"{in_file} (set by MIRROR_STORAGE_S3_REGION)"


def test_mirror_serve_with_a_bad_region_exits_2_with_one_line(tmp_path: Path) -> None:
    """Not botocore's InvalidRegionError traceback from the store's start-up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    done = subprocess.run([sys.executable, "-m", "mirror", "serve", "--data", str(tmp_path / "data"),
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60,
                          env={**env, **S3, "MIRROR_STORAGE_S3_REGIONENDPOINT": "http://127.0.0.1:9",
                               "MIRROR_STORAGE_S3_REGION": "not a region!"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("mirror: bad value for storage.s3.region: 'not a region!': "), done.stderr


# -- a key and its _file twin --


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    for name, value in (("ak", "AK-FROM-FILE"), ("sk", "sk-from-file"), ("pw", "pw-from-file"),
                        ("dsn", "host=db-from-file dbname=m user=m password=dsn-from-file")):
        (tmp_path / name).write_text(value + "\n")
    return tmp_path


def test_the_environment_overrides_an_s3_key_the_file_reads_from_a_file(secrets: Path) -> None:
    """The file's ``secretkey_file`` no longer wins over ``MIRROR_STORAGE_S3_SECRETKEY``; a file that is
    not used is not read (here it does not exist where the mirror runs)."""
    file = write(secrets, "storage:\n  driver: s3\n  s3:\n    bucket: images\n"
                          "    accesskey_file: /run/secrets/missing-ak\n    secretkey_file: /run/secrets/missing-sk\n"
                          "cache:\n  max_size: 1GiB\n")
    env = {"MIRROR_STORAGE_S3_ACCESSKEY": "AK-FROM-ENV", "MIRROR_STORAGE_S3_SECRETKEY": "sk-from-env"}
    config = load_config(file, env=env)
    storage = config.storage
    assert (storage.s3_accesskey, storage.s3_secretkey) == ("AK-FROM-ENV", "sk-from-env")
    assert (storage.s3_accesskey_file, storage.s3_secretkey_file) == (None, None)
    assert "sk-from-env" not in repr(config)
    assert load_config(env=to_environ(config)) == config  # what workers get
    # One of the pair from the environment, the other from the file: each overrides its own twin only.
    file.write_text(f"storage:\n  driver: s3\n  s3:\n    bucket: b\n    accesskey_file: {secrets / 'ak'}\n"
                    "    secretkey: sk-in-yaml\ncache:\n  max_size: 1GiB\n")
    mixed = load_config(file, env={"MIRROR_STORAGE_S3_SECRETKEY_FILE": str(secrets / "sk")}).storage
    assert (mixed.s3_accesskey, mixed.s3_secretkey) == ("AK-FROM-FILE", "sk-from-file")
    mixed = load_config(file, env={"MIRROR_STORAGE_S3_ACCESSKEY": "AK-FROM-ENV"}).storage
    assert (mixed.s3_accesskey, mixed.s3_secretkey, mixed.s3_accesskey_file) == ("AK-FROM-ENV", "sk-in-yaml", None)


@pytest.mark.parametrize("key", ["accesskey", "secretkey"])
def test_an_s3_key_and_its_file_both_set_in_one_place_are_refused(secrets: Path, key: str) -> None:
    file = write(secrets, f"storage:\n  s3:\n    {key}: in-yaml\n    {key}_file: {secrets / 'sk'}\n")
    message = refused(file)
    assert message.startswith(f"storage.s3.{key} and storage.s3.{key}_file are both set: keep one"), message
    name = f"MIRROR_STORAGE_S3_{key.upper()}"
    message = refused(env={name: "in-env", f"{name}_FILE": str(secrets / "sk")})
    assert message.startswith(f"storage.s3.{key} and storage.s3.{key}_file are both set: keep one"), message
    assert "in-env" not in message and "sk-from-file" not in message
    # An empty value is no value: the file is used.
    both = {"MIRROR_STORAGE_S3_ACCESSKEY": "AK", "MIRROR_STORAGE_S3_SECRETKEY": "SK"}
    storage = load_config(env={**S3, **both, name: "", f"{name}_FILE": str(secrets / "sk")}).storage
    assert getattr(storage, f"s3_{key}") == "sk-from-file"


def test_the_dsn_and_its_file_follow_the_same_precedence(secrets: Path) -> None:
    file = write(secrets, "metadata:\n  driver: postgres\n  postgres:\n    dsn: postgresql://m:yaml-pw@db/mirror\n")
    by_file = load_config(file, env={"MIRROR_METADATA_POSTGRES_DSN_FILE": str(secrets / "dsn")}).metadata
    assert by_file.postgres_dsn == "host=db-from-file dbname=m user=m password=dsn-from-file"
    by_flag = load_config(file, env={}, overrides={"metadata.postgres.dsn_file": str(secrets / "dsn")}).metadata
    assert by_flag == by_file
    file.write_text(f"metadata:\n  driver: postgres\n  postgres:\n    dsn_file: {secrets / 'missing'}\n")
    by_env = load_config(file, env={"MIRROR_METADATA_POSTGRES_DSN": "host=db-from-env"}).metadata
    assert (by_env.postgres_dsn, by_env.postgres_dsn_file) == ("host=db-from-env", None)
    # ...and a flag over the environment.
    by_flag = load_config(env={"MIRROR_METADATA_POSTGRES_DSN": "host=db-from-env"},
                          overrides={"metadata.postgres.dsn_file": str(secrets / "dsn")}).metadata
    assert by_flag.postgres_dsn == "host=db-from-file dbname=m user=m password=dsn-from-file"
    message = refused(env={"MIRROR_METADATA_POSTGRES_DSN": "postgresql://m:env-pw@db/m",
                           "MIRROR_METADATA_POSTGRES_DSN_FILE": str(secrets / "dsn")})
    assert message.startswith("metadata.postgres.dsn and metadata.postgres.dsn_file are both set: keep one"), message
    assert "env-pw" not in message


def test_the_upstream_password_and_its_file_follow_the_same_precedence(secrets: Path) -> None:
    file = write(secrets, f"upstream:\n  username: u\n  password_file: {secrets / 'pw'}\n")
    assert load_config(file, env={}).upstream.password == "pw-from-file"
    overridden = load_config(file, env={"MIRROR_UPSTREAM_PASSWORD": "pw-from-env"})
    assert (overridden.upstream.password, overridden.upstream.password_file) == ("pw-from-env", None)
    assert load_config(env=to_environ(overridden)) == overridden
    file.write_text(f"upstream:\n  password: in-yaml\n  password_file: {secrets / 'pw'}\n")
    message = refused(file)
    assert message.startswith("upstream.password and upstream.password_file are both set: keep one"), message
    assert "in-yaml" not in message and "pw-from-file" not in message
    # The default registry's entry of `upstreams:` is overridden the same way...
    file.write_text(f"upstreams:\n  - {{registry: docker.io, username: u, password_file: {secrets / 'missing'}}}\n")
    assert load_config(file, env={"MIRROR_UPSTREAM_PASSWORD": "pw-from-env"}).upstream.password == "pw-from-env"
    # ...may not say otherwise than the `upstream:` section...
    file.write_text(f"upstream:\n  password: in-yaml\nupstreams:\n  - {{registry: docker.io, password_file: "
                    f"{secrets / 'pw'}}}\n")
    message = refused(file)
    assert message.startswith("upstream.password and upstreams[0].password_file are both set: keep one"), message
    # ...and any entry that sets both is refused, named as written.
    file.write_text(f"upstreams:\n  - {{registry: ghcr.io, url: 'https://ghcr.io', password: x, "
                    f"password_file: {secrets / 'pw'}}}\n")
    message = refused(file)
    assert message.startswith("upstreams[0].password and upstreams[0].password_file are both set: keep one"), message


# -- messages that say what is wrong --


def test_credentials_in_the_s3_endpoint_name_the_s3_keys(tmp_path: Path) -> None:
    message = refused(write(tmp_path, "storage:\n  s3: {regionendpoint: 'http://user:s3cr3t@127.0.0.1:39339'}\n"))
    assert message.startswith("bad value for storage.s3.regionendpoint: 'http://***@127.0.0.1:39339': "), message
    assert "storage.s3.accesskey and storage.s3.secretkey" in message and "upstream" not in message, message
    assert "s3cr3t" not in message
    assert "upstream.username and upstream.password" in refused(env={"MIRROR_UPSTREAM_URL": "https://u:p@r.example"})
    message = refused(env={"MIRROR_CLUSTER_ADVERTISE": "http://u:p@10.0.0.7:5000"})  # nor the upstream's keys
    assert "cluster.secret_file" in message and "upstream" not in message, message


@pytest.mark.parametrize(("dsn", "reason"), [
    ("postgresql://mirror:s3cr3t@127.0.0.1:notaport/db", "port 'notaport' is not a number"),
    ("postgresql://mirror:s3cr3t@db1:5432,db2:x5432/db", "port 'x5432' is not a number"),
    ("host=db port=notaport user=mirror password=s3cr3t", "port 'notaport' is not a number"),
    ("postgresql://mirror:s3cr3t/db", "the port after the host is not a number"),  # no @: the 'port' may be
    ("postgresql://mirror:s3cr@t@127.0.0.1/db", "percent-encode the password"),
    ("postgresql://mirror:s3c/r3t@127.0.0.1/db", "percent-encode the password"),
    ("postgresql://mirror:s3cr@t:x@127.0.0.1:5432/db", "percent-encode the password"),
    ("host='s3cr3t", "not a libpq connection string or postgresql:// URL"),
])
def test_a_dsn_that_cannot_connect_says_why_never_showing_the_password(tmp_path: Path, dsn: str, reason: str) -> None:
    env = {"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn}
    message = refused(env=env)
    assert message.startswith(f"metadata.postgres.dsn: {reason}"), message
    assert "s3cr" not in message and "r3t" not in message, message
    assert ("percent-encode" in message) == (reason == "percent-encode the password"), message
    (tmp_path / "dsn").write_text(dsn)
    message = refused(env={"MIRROR_METADATA_DRIVER": "postgres",
                           "MIRROR_METADATA_POSTGRES_DSN_FILE": str(tmp_path / "dsn")})
    assert message.startswith(f"metadata.postgres.dsn_file: the DSN in {tmp_path / 'dsn'}: {reason}"), message
    assert "s3cr" not in message.replace(str(tmp_path), "") and "r3t" not in message, message


def test_good_dsns_are_accepted() -> None:
    for dsn in ("postgresql://mirror:p%40ss@127.0.0.1:5432/db", "postgresql://mirror@db1:5432,db2:5433/db",
                "postgresql:///db?host=/run/postgresql", "host=db port=5432 dbname=mirror", "postgresql://h:/db"):
        assert load_config(env={"MIRROR_METADATA_DRIVER": "postgres",
                                "MIRROR_METADATA_POSTGRES_DSN": dsn}).metadata.postgres_dsn == dsn


@pytest.mark.parametrize("value", ["lots", "50%", "0.8", "1.5"])
def test_a_bad_chunksize_gives_examples_of_bytes_only(tmp_path: Path, value: str) -> None:
    message = refused(write(tmp_path, f"storage:\n  s3: {{chunksize: '{value}'}}\n"))
    assert message.startswith(f"bad value for storage.s3.chunksize: '{value}': "), message
    assert "16MiB" in message and "%" not in message.removeprefix(f"bad value for storage.s3.chunksize: '{value}'")
    assert "0.8" not in message.replace(f"'{value}'", ""), message


# -- storage.s3.rootdirectory --


@pytest.mark.parametrize("root", ["mirror/../x", "./mirror", "..", ".", "a/./b", "/mirror/..", "a//../b"])
def test_a_dot_segment_in_the_root_directory_is_refused(tmp_path: Path, root: str) -> None:
    message = refused(write(tmp_path, f"storage:\n  s3: {{rootdirectory: '{root}'}}\n"))
    assert message.startswith(f"bad value for storage.s3.rootdirectory: {root!r}: "), message
    in_env = refused(env={"MIRROR_STORAGE_S3_ROOTDIRECTORY": root})
    assert in_env == f"{message} (set by MIRROR_STORAGE_S3_ROOTDIRECTORY)"


@pytest.mark.parametrize("root", ["", "/", "registry", "/registry/", "team/registry", "a..b", ".hidden/x", "v1.2"])
def test_a_root_directory_without_dot_segments_is_kept_as_written(root: str) -> None:
    assert load_config(env={**S3, "MIRROR_STORAGE_S3_ROOTDIRECTORY": root}).storage.s3_rootdirectory == root


def test_inline_secrets_go_to_the_workers_as_files(tmp_path: Path) -> None:
    """``to_environ`` with a directory for secrets: the passwords and the DSN given inline are written
    there (0600) and handed over as their ``_file`` twins; the workers' configuration is the same."""
    file = write(tmp_path, "upstream:\n  url: http://127.0.0.1:1\n  username: u\n  password: top-secret-1\n"
                 "upstreams:\n  - {registry: ghcr.io, url: 'http://127.0.0.1:2', username: g, password: top-secret-2}\n"
                 "metadata:\n  driver: postgres\n  postgres:\n    dsn: postgresql://m:top-secret-3@127.0.0.1/db\n")
    config = load_config(file, env={})
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    handed = to_environ(config, secrets)
    assert not any("top-secret" in value for value in handed.values()), handed
    again = load_config(env=handed)
    assert [u.password for u in again.upstreams] == ["top-secret-1", "top-secret-2"]
    assert again.metadata.postgres_dsn == "postgresql://m:top-secret-3@127.0.0.1/db"
    assert {path.stat().st_mode & 0o777 for path in secrets.iterdir()} == {0o600} and len(list(secrets.iterdir())) == 3


def test_keys_left_blank_are_empty_not_the_string_none(tmp_path: Path) -> None:
    """``region:`` and ``rootdirectory:`` left blank, as in the README's template: the SDK's own region
    and no prefix (they became the text "None": every key under ``None/``); the Helm chart's empty
    ``MIRROR_STORAGE_S3_REGION`` too."""
    config = load_config(write(tmp_path, "storage:\n  driver: s3\n  s3:\n    bucket: b\n    region:\n"
                               "    rootdirectory:\ncache:\n  max_size: 1GiB\n"), env={})
    assert (config.storage.s3_region, config.storage.s3_rootdirectory) == ("", "")
    assert load_config(env={**S3, "MIRROR_STORAGE_S3_REGION": ""}).storage.s3_region == ""


@pytest.mark.parametrize("url", ["http://AKID:in/line@127.0.0.1:9000", "https://me:pass/word@registry.example:443",
                                 "https://me@host/path"])
def test_credentials_in_a_url_are_refused_and_never_shown_even_with_a_slash_in_them(url: str) -> None:
    for env in ({**S3, "MIRROR_STORAGE_S3_REGIONENDPOINT": url}, {"MIRROR_UPSTREAM_URL": url}):
        message = refused(env=env)
        assert "credentials do not belong in the URL" in message, message
        assert "in/line" not in message and "pass/word" not in message and "me@" not in message, message


def test_a_port_that_is_not_a_number_is_refused() -> None:
    message = refused(env={"MIRROR_UPSTREAM_URL": "https://registry.example.com:abc"})
    assert message.endswith(": the port is not a number from 0 to 65535 (set by MIRROR_UPSTREAM_URL)"), message


@pytest.mark.parametrize("variable", ["MIRROR_UPSTREAM_PASSWORD_FILE", "MIRROR_STORAGE_S3_SECRETKEY_FILE",
                                      "MIRROR_METADATA_POSTGRES_DSN_FILE", "MIRROR_ADMIN_TOKEN_FILE"])
def test_a_secret_given_where_its_file_goes_is_not_quoted(variable: str) -> None:
    """The likeliest mix-up of a key and its ``_file`` twin: the secret itself in the file's key."""
    env = {**S3, variable: "dckr_pat_INLINE-S3CRET"}
    message = refused(env=env)
    assert "INLINE" not in message and "not shown: not a path" in message, message
    path = refused(env={**env, variable: "/run/secrets/absent"})
    assert "'/run/secrets/absent': cannot read the file" in path, path
    # An S3 secret key may hold "/" and even start with one: under no directory there is, it is not shown.
    slashed = refused(env={**env, variable: "/wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"})
    assert "K7MDENG" not in slashed and "not shown: no such directory" in slashed, slashed
    slashed = refused(env={**env, variable: "/K7MDENGbPxRfiCYEXAMPLEKEY"})
    assert "K7MDENG" not in slashed and "not shown: no such directory" in slashed, slashed


def test_an_inline_secret_is_read_as_its_file_would_be_in_every_process(tmp_path: Path) -> None:
    """A Kubernetes secret in a variable ends in a newline: the server and its workers (which read it
    from a file, stripped) use the same password."""
    env = {"MIRROR_UPSTREAM_USERNAME": "u", "MIRROR_UPSTREAM_PASSWORD": " top-secret\n",
           "MIRROR_UPSTREAMS": '[{"registry": "docker.io", "url": "https://registry-1.docker.io", "username": "u",'
                               ' "password": "json-secret"}]'}
    env.pop("MIRROR_UPSTREAM_PASSWORD")
    config = load_config(env=env)
    assert config.upstream.password == "json-secret"
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    handed = to_environ(config, secrets)
    # The user's MIRROR_UPSTREAMS is replaced: its password is in no worker's environment.
    assert not any("json-secret" in value for value in handed.values()), handed
    assert load_config(env=handed).upstream.password == "json-secret"
    padded = load_config(env={"MIRROR_UPSTREAM_USERNAME": "u", "MIRROR_UPSTREAM_PASSWORD": " top-secret\n"})
    assert padded.upstream.password == "top-secret"
    assert load_config(env=to_environ(padded, secrets)).upstream.password == "top-secret"


@pytest.mark.parametrize("value", ["*INLINE-S3CRET", "!INLINE-S3CRET"])
def test_a_yaml_error_in_an_unquoted_password_does_not_quote_it(tmp_path: Path, value: str) -> None:
    message = refused(write(tmp_path, f"upstream:\n  username: u\n  password: {value}\n"))
    assert "is not valid YAML at line 3" in message and "INLINE" not in message, message


def test_settings_the_sdk_would_refuse_before_any_request_are_named_not_taken_for_an_outage(tmp_path: Path) -> None:
    """botocore refuses a bucket name it does not take and an endpoint with a query before sending
    anything; the mirror reported "object store does not answer", quoting the endpoint's query."""
    message = refused(env={**S3, "MIRROR_STORAGE_S3_BUCKET": "Bad_Bucket!"})
    assert message.startswith("bad value for storage.s3.bucket: 'Bad_Bucket!': expected a bucket name"), message
    for endpoint in ("http://127.0.0.1:9000/?token=s3cr3t", "http://127.0.0.1:9000#s3cr3t"):
        message = refused(env={**S3, "MIRROR_STORAGE_S3_REGIONENDPOINT": endpoint})
        assert "a query (?...) or fragment (#...) does not belong in the URL" in message, message
        assert "s3cr3t" not in message, message
    assert load_config(env={**S3, "MIRROR_STORAGE_S3_BUCKET": "my.bucket-1_a"}).storage.s3_bucket == "my.bucket-1_a"


def test_secure_takes_a_boolean_whatever_the_endpoint(tmp_path: Path) -> None:
    """distribution's ``secure`` is dropped when the endpoint's scheme decides, but only as a boolean: any
    other value is refused, as distribution refuses it (it was taken silently)."""
    for value in ("maybe", "42", "''"):
        message = refused(write(tmp_path, "storage:\n  driver: s3\n  s3:\n    bucket: b\n    regionendpoint:"
                                          f" http://127.0.0.1:9000\n    secure: {value}\ncache:\n  max_size: 1GiB\n"))
        assert message.startswith("storage.s3.secure is a setting of distribution's s3 driver"), message


def test_an_empty_variable_that_clears_a_file_setting_is_named(tmp_path: Path) -> None:
    """A compose file's ``${VAR}`` left unset gives an empty variable, which overrides the file's value:
    the rule between keys it then breaks names the variable."""
    file = write(tmp_path, "storage:\n  driver: s3\n  s3:\n    bucket: b\n    accesskey: AK\n    secretkey: sk\n"
                           "cache:\n  max_size: 1GiB\n")
    message = refused(file, env={"MIRROR_STORAGE_S3_SECRETKEY": ""})
    assert message == ("storage.s3.accesskey and storage.s3.secretkey must be set together"
                       " (MIRROR_STORAGE_S3_SECRETKEY set and empty: it clears the file's value)"), message
    message = refused(file, env={"MIRROR_STORAGE_S3_BUCKET": ""})
    assert message.endswith("(MIRROR_STORAGE_S3_BUCKET set and empty: it clears the file's value)"), message
    assert "set and empty" not in refused(write(tmp_path, "storage:\n  driver: s3\n"), env={})


def test_an_unknown_dsn_option_is_named(tmp_path: Path) -> None:
    for dsn in ("postgresql://mirror@127.0.0.1/db?sslmod=require", "host=127.0.0.1 dbname=db sslmod=require"):
        message = refused(env={"MIRROR_METADATA_DRIVER": "postgres", "MIRROR_METADATA_POSTGRES_DSN": dsn})
        assert message.startswith("metadata.postgres.dsn: libpq has no connection option 'sslmod'"), message


def test_a_hint_naming_one_of_our_s3_keys_says_use_it() -> None:
    message = refused(env={"MIRROR_STORAGE_REDIRECT_DISABLE": "true"})
    assert message.endswith("does not take: use MIRROR_STORAGE_S3_REDIRECT (true to answer blob GETs with presigned"
                            " URLs)"), message

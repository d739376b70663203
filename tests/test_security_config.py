"""Security settings: how they are read (YAML, environment, workers), and start-up refusing bad ones
(unknown or weak htpasswd hashes, unusable certificates) with a message naming the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config.load import load_config, to_environ
from mirror.config.sections import ConfigError
from tests.support.mirror import PROJECT_ROOT
from tests.support.security import (
    ALICE,
    Pki,
)


def test_nested_yaml_keys_env_names_and_worker_round_trip(tmp_path: Path, pki: Pki) -> None:
    secret = tmp_path / "hub-token"
    secret.write_text("dckr_pat_from_a_file\n")
    users = tmp_path / "htpasswd"
    users.write_text(ALICE + "\n")
    file = tmp_path / "mirror.yml"
    file.write_text(
        f"http:\n  tls:\n    certificate: {pki.server_cert}\n    key: {pki.server_key}\n    client_ca: {pki.ca}\n"
        f"auth:\n  htpasswd:\n    path: {users}\n    realm: Corp\n  anonymous_pull: false\n"
        f"  push_users: [alice, 'bob:team/']\n"
        f"upstream:\n  username: bot\n  password_file: {secret}\n")
    config = load_config(file, env={})
    assert config.http.tls_certificate == pki.server_cert and config.http.tls_client_ca == pki.ca
    assert (config.auth.htpasswd_path, config.auth.htpasswd_realm) == (users, "Corp")
    assert config.auth.push_users == ("alice", "bob:team")
    assert config.upstream.password == "dckr_pat_from_a_file"
    assert "dckr_pat" not in repr(config)
    environ = to_environ(config)
    assert environ["MIRROR_HTTP_TLS_CERTIFICATE"] == str(pki.server_cert)
    assert environ["MIRROR_AUTH_HTPASSWD_PATH"] == str(users)
    # The file's secret is not handed to worker processes: they read the file again.
    assert "MIRROR_UPSTREAM_PASSWORD" not in environ and environ["MIRROR_UPSTREAM_PASSWORD_FILE"] == str(secret)
    assert load_config(env=environ) == config
    assert load_config(env={"MIRROR_AUTH_HTPASSWD_PATH": str(users), "MIRROR_AUTH_PUSH_USERS": "alice,bob:team"},
                       ).auth.may_write("bob", "team/app")


@pytest.mark.parametrize("yaml_text,message", [
    ("http:\n  tls:\n    bogus: 1\n", "unknown configuration key http.tls.bogus"),
    ("http:\n  tls:\n    certificate: /nonexistent.pem\n", "bad value for http.tls.certificate: '/nonexistent.pem'"),
    ("auth:\n  htpasswd:\n    pth: x\n", "unknown configuration key auth.htpasswd.pth"),
    ("auth:\n  anonymous_pull: false\n", "auth.anonymous_pull: false needs users"),
    ("auth:\n  push_users: [alice]\n", "auth.push_users needs users"),
    ("auth:\n  htpasswd:\n    realm: 'a\"b'\n", "bad value for auth.htpasswd.realm"),
    ("upstream:\n  password_file: /nonexistent-secret\n", "bad value for upstream.password_file"),
    ("upstream:\n  url: https://bot:dckr_pat_in_url@registry.example\n", "credentials do not belong in the URL"),
])
def test_bad_security_settings_name_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    file = tmp_path / "mirror.yml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(file, env={})
    assert "dckr_pat_in_url" not in str(caught.value)


def serve_fails(tmp_path: Path, env: dict[str, str]) -> str:
    """Run ``mirror serve`` that must refuse to start; return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"),
         "--upstream", "http://127.0.0.1:9"], env={**os.environ, **env}, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("flag,kind", [("apr1", "MD5 ($apr1$)"), ("sha1", "SHA-1 ({SHA})"), ("plain", "plain-text")])
def test_weak_htpasswd_hashes_are_refused_at_start_up(tmp_path: Path, flag: str, kind: str) -> None:
    weak = {"apr1": "$apr1$wrhcOesX$X6n45KO1L6nQ7HHWV3vIc.", "sha1": "{SHA}GpHWL3ymc5liWkNopqtdSjuqYHM=",
            "plain": "hunter2"}[flag]
    users = tmp_path / "htpasswd"
    users.write_text(f"{ALICE}\ndave:{weak}\n")
    message = serve_fails(tmp_path, {"MIRROR_AUTH_HTPASSWD_PATH": str(users)})
    assert "auth.htpasswd.path" in message and "line 2" in message and "'dave'" in message, message
    assert kind in message and "htpasswd -B" in message, message


def test_unusable_certificate_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    message = serve_fails(tmp_path, {"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.server_cert),
                                     "MIRROR_HTTP_TLS_KEY": str(not_a_key)})
    assert "http.tls.certificate" in message and "http.tls.key" in message, message
    message = serve_fails(tmp_path, {"MIRROR_HTTP_TLS_CERTIFICATE": str(pki.server_cert)})
    assert "http.tls.certificate and http.tls.key must be set together" in message, message
    # A chain with the intermediate (here the CA) first: said so, not that the key does not match.
    reversed_chain = tmp_path / "chain.pem"
    reversed_chain.write_text(pki.ca.read_text() + pki.server_cert.read_text())
    message = serve_fails(tmp_path, {"MIRROR_HTTP_TLS_CERTIFICATE": str(reversed_chain),
                                     "MIRROR_HTTP_TLS_KEY": str(pki.server_key)})
    assert "its certificate 2 of the file, not its first, is the one http.tls.key belongs to" in message, message
    assert "list the server's own certificate first" in message, message

"""Configuration carried over from distribution's ``registry:2``, and variables of no section: every key
the mirror does not take stops start-up, all of them named at once with what to write instead; nothing
is silently left unused (a mistyped ``MIRROR_AUHT_*`` would leave authentication off, ``storage: s3:``
without ``driver: s3`` would keep the store on the local disk)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config.load import load_config
from mirror.config.sections import ConfigError
from tests.support.images import build_image, random_layer, write_oci_layout

#: A registry:2 proxy's config.yml as its guides write it.
REGISTRY2 = """\
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: :5000
  secret: asecretforlocaldevelopment
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
proxy:
  remoteurl: https://registry-1.docker.io
  username: someone
  password: hunter2-proxy
"""


def refusal(path: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        load_config(path, env=env or {})
    return str(refused.value).splitlines()


def test_a_registry2_configuration_is_refused_with_every_key_named_and_what_to_write_instead(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(REGISTRY2)
    lines = refusal(path)
    told = {line.split(" ")[0]: line for line in lines}
    expected = {
        "version": "remove it", "http.addr": "use http.listen", "http.secret": "remove it",
        "http.headers.X-Content-Type-Options": "remove it", "storage.filesystem.rootdirectory": "use storage.path",
        "storage.delete.enabled": "use delete.enabled", "storage.cache.blobdescriptor": "remove it",
        "log.formatter": "remove it", "log.fields.service": "remove it",
    }
    for key, instead in expected.items():
        assert key in told and told[key].endswith(instead), (key, lines)
    sections = [line for line in lines if line.startswith("unknown configuration section")]
    assert len(sections) == 2 and "'health'" in sections[0] and "'proxy'" in sections[1], lines
    assert "proxy.remoteurl: use upstream.url; proxy.username: use upstream.username" in sections[1], sections
    assert len(lines) == len(expected) + 2, lines
    assert "hunter2" not in "\n".join(lines)


@pytest.mark.parametrize(("env", "message"), [
    ({"MIRROR_AUHT_HTPASSWD_PATH": "/etc/mirror/htpasswd"},
     "unknown environment variable MIRROR_AUHT_HTPASSWD_PATH (no configuration section auht): "
     "did you mean MIRROR_AUTH_HTPASSWD_PATH?"),
    ({"MIRROR_UPSTRAEM_URL": "http://127.0.0.1:1"}, "did you mean MIRROR_UPSTREAM_URL?"),
    ({"MIRROR_PROXY_REMOTEURL": "http://127.0.0.1:1"},
     "MIRROR_PROXY_REMOTEURL (distribution's proxy.remoteurl) is a setting this mirror does not take: "
     "use MIRROR_UPSTREAM_URL"),
    ({"MIRROR_VERSION": "0.1"}, "remove it"),
    ({"MIRROR_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/data"}, "use MIRROR_STORAGE_PATH"),
    ({"MIRROR_SOMETHING": "x"}, "unknown environment variable MIRROR_SOMETHING (no configuration section something)"),
])
def test_a_variable_of_no_section_stops_start_up(env: dict[str, str], message: str) -> None:
    lines = refusal(env=env)
    assert len(lines) == 1 and message in lines[0], lines


def test_the_compose_files_image_variable_and_service_links_are_no_settings() -> None:
    assert load_config(env={"MIRROR_IMAGE": "registry.example.internal:5000/mirror:1",
                            "MIRROR_PORT": "tcp://10.0.0.7:5000"}).http.listen == "0.0.0.0:5000"


@pytest.mark.parametrize("text", [
    "storage:\n  s3:\n    bucket: images\n",  # distribution's way: the section names the driver
    "storage:\n  s3:\n    rootdirectory: /srv/registry\n",
    "storage:\n  s3:\n    redirect: true\n",  # blobs served by the mirror all the same, without a word
])
def test_s3_keys_without_the_s3_driver_stop_start_up(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mirror.yml"
    path.write_text(text)
    lines = refusal(path)
    assert len(lines) == 1 and lines[0].startswith("storage.s3."), lines
    assert lines[0].endswith("is set, but storage.driver is filesystem: set storage.driver to s3 to store in the "
                             "bucket, or remove the storage.s3 keys"), lines
    assert refusal(env={"MIRROR_STORAGE_S3_BUCKET": "images"})[0].startswith("MIRROR_STORAGE_S3_BUCKET is set, but")
    assert refusal(env={"MIRROR_STORAGE_S3_REDIRECT": "true"})[0].startswith("MIRROR_STORAGE_S3_REDIRECT is set, but")


def test_mirror_serve_with_a_mistyped_section_exits_2_naming_it(tmp_path: Path) -> None:
    """The server does not start (before, it served with no authentication at all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    done = subprocess.run([sys.executable, "-m", "mirror", "serve", "--data", str(tmp_path / "data"),
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60,
                          env={**env, "MIRROR_AUHT_HTPASSWD_PATH": str(tmp_path / "htpasswd")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mirror: unknown environment variable MIRROR_AUHT_HTPASSWD_PATH"), done.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("below", ["", "docker", "docker/registry", "docker/registry/v2"])
def test_a_start_on_a_registry2_storage_directory_is_refused_saying_what_to_do(tmp_path: Path, below: str) -> None:
    """``--data`` naming registry:2's ``rootdirectory``, or a directory of it down to ``v2``: before, the
    mirror started empty beside it and served none of its images without a word (on ``v2`` itself it
    took the registry's blob directories for blobs, answered one 200 and cut it short)."""
    root = tmp_path / "registry"
    (root / "docker" / "registry" / "v2" / "repositories" / "team").mkdir(parents=True)
    (root / "docker" / "registry" / "v2" / "blobs" / "sha256" / "49").mkdir(parents=True)
    data = root / below if below else root
    before = sorted(p.name for p in data.iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    archive = tmp_path / "layout"
    write_oci_layout(archive, build_image(tmp_path / "built", [random_layer(tmp_path / "built", 1024, 7)]), "x:1")
    for command, args in COMMANDS_ON_A_DATA_DIRECTORY.items():  # preload and export too: they would write there
        done = subprocess.run([sys.executable, "-m", "mirror", command, "--data", str(data), *args(archive)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith(f"mirror: {data} holds a distribution registry's storage ("), done.stderr
        assert "skopeo sync" in done.stderr
        assert sorted(p.name for p in data.iterdir()) == before  # nothing of the mirror's written there


COMMANDS_ON_A_DATA_DIRECTORY = {
    "serve": lambda archive: ["--listen", "127.0.0.1:0"],
    "gc": lambda archive: [],
    "fsck": lambda archive: [],
    "preload": lambda archive: [str(archive)],
    "export": lambda archive: ["--upstream", "http://127.0.0.1:1", "x:1", "-o", str(archive.parent / "out.tar")],
}


def test_an_oci_layout_named_as_the_data_directory_is_refused_saying_where_it_goes(tmp_path: Path) -> None:
    """``mirror preload --data LAYOUT ARCHIVE`` (arguments swapped): before, the store's directories were
    made inside the layout, then its index.json was read as the store's own record ("the index in None")."""
    layout = tmp_path / "layout"
    write_oci_layout(layout, build_image(tmp_path / "built", [random_layer(tmp_path / "built", 1024, 8)]), "x:1")
    before = sorted(p.relative_to(layout) for p in layout.rglob("*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    for command, args in COMMANDS_ON_A_DATA_DIRECTORY.items():
        done = subprocess.run([sys.executable, "-m", "mirror", command, "--data", str(layout), *args(tmp_path / "a")],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr == (f"mirror: {layout} is an OCI image layout, not a mirror's data directory: to load its "
                               "images, name it after --data DIR (mirror preload --data DIR LAYOUT)\n"), done.stderr
        assert sorted(p.relative_to(layout) for p in layout.rglob("*")) == before

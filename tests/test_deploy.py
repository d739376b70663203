"""deploy/: every file is valid, and the settings it hands the mirror are ones the mirror accepts.

- YAML, JSON and TOML files parse; the compose files pass ``docker-compose config``; the services
  they wire together agree (Prometheus's targets, Grafana's data source and dashboard paths).
- The Helm chart passes ``helm lint --strict`` and renders with ``helm template`` for several value
  sets; every rendered object is checked against the Kubernetes API's strict JSON schema (unknown
  fields are errors) and for internal consistency (selectors, ports, volumes, Secret keys).
- The systemd unit passes ``systemd-analyze verify`` and its offline security rating.
- Wherever a file hands the mirror settings (environment, config file, mounted secrets), they are
  loaded with the mirror's own :func:`mirror.config.load.load_config`.
- The image (slow): deploy/Dockerfile builds with a test dockerd's classic builder on a base image
  made offline from this machine's Python (tests/support/baseimage.py), runs as its non-root user,
  answers ``/v2/`` and pulls through to an upstream, and its HEALTHCHECK turns healthy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import version as version_of
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from referencing import Registry, Resource

from mirror.config.load import load_config
from mirror.spec.reference import parse_digest
from mirror.storage.layout import object_key
from tests.support.baseimage import import_args, rootfs_tar
from tests.support.catalog import StandardImages
from tests.support.dockerd import Dockerd, docker_client, pull
from tests.support.helm import CACHE, KUBE_VERSION, helm_binary, kubernetes_definitions
from tests.support.mirror import PROJECT_ROOT
from tests.support.procs import free_port, require_tool
from tests.support.registry import UpstreamRegistry
from tests.support.security import Pki, tls_env
from tests.support.standins import build_standins
from tests.support.tls import ServerCertificate, server_certificate
from tests.test_push_clients import docker_push

DEPLOY = PROJECT_ROOT / "deploy"
CHART = DEPLOY / "helm" / "mirror"
#: Helm's own cache, configuration and data directories (none of the user's).
HELM_HOME = CACHE / "helm-home"
PLACEHOLDER = "mirror.example.internal:5000"
#: A bcrypt htpasswd line (``htpasswd -nbB alice 'correct horse'``).
HTPASSWD = "alice:$2y$05$iv3q1bSDnUvkJaSfPzYGaeGOKILlDQ2XG14Qk.140R4SY84qHQkNK\n"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    """For 127.0.0.1, localhost, and the stack's names of the mirror service."""
    return server_certificate(tmp_path_factory.mktemp("pki"), names=("mirror", "tasks.mirror"))


def files(*patterns: str) -> list[Path]:
    found = sorted({path for pattern in patterns for path in DEPLOY.rglob(pattern)})
    return [path for path in found if "templates" not in path.parts]


# -- every file parses ---------------------------------------------------------------------


def test_every_yaml_json_and_toml_file_parses() -> None:
    yamls, jsons, tomls = files("*.yaml", "*.yml"), files("*.json"), files("*.toml", "*.conf")
    assert len(yamls) >= 8 and len(jsons) >= 2 and len(tomls) >= 7
    for path in yamls:
        assert list(yaml.safe_load_all(path.read_text())), path
    for path in jsons:
        json.loads(path.read_text())
    for path in tomls:
        tomllib.loads(path.read_text())


# -- compose / swarm stack -----------------------------------------------------------------


def compose(*names: str) -> dict[str, Any]:
    """The compose files merged as compose and `docker stack deploy` do for these keys."""
    merged: dict[str, Any] = {}
    for name in names:
        document = yaml.safe_load((DEPLOY / name).read_text())
        for key, value in document.items():
            if key == "services":
                services = merged.setdefault("services", {})
                for service, spec in value.items():
                    target = services.setdefault(service, {})
                    for field, item in spec.items():
                        if field == "environment":
                            target.setdefault(field, {}).update(item)
                        elif field in ("configs", "secrets"):
                            by_source = {entry["source"]: entry for entry in target.get(field, [])}
                            by_source.update({entry["source"]: entry for entry in item})
                            target[field] = list(by_source.values())
                        else:
                            target[field] = item
            elif isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


def listen_port(value: str) -> int:
    return int(value.rpartition(":")[2])


def test_the_cluster_secrets_made_as_the_header_says_are_readable_by_the_mirror_and_by_no_one_else(
    tmp_path: Path,
) -> None:
    """Compose mounts file secrets as they are, and the image runs as uid 10001: the files the header's
    commands make are the ones the stack names, the mirror's readable by its uid, none by others."""
    document = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    secrets_as_the_header_says(DEPLOY / "compose.cluster.yaml", tmp_path)
    made = tmp_path / "deploy" / "secrets"
    assert {p.name for p in made.iterdir()} == {Path(spec["file"]).name for spec in document["secrets"].values()}
    for path in made.iterdir():
        info = path.stat()
        assert info.st_mode & 0o077 == 0, f"{path.name} is readable by others"
        if path.name in document["services"]["mirror"]["secrets"]:
            assert info.st_uid == 10001 and info.st_mode & 0o400, f"{path.name}: uid 10001 cannot read it"


def test_the_cluster_compose_file_is_valid_and_its_parts_agree(tmp_path: Path) -> None:
    """deploy/compose.cluster.yaml: replicas of the mirror on SeaweedFS and PostgreSQL behind the
    shipped HAProxy configuration; every address, port, secret and key one part names is where
    another part puts it, and the mirror accepts its settings."""
    tool = require_tool("docker-compose", "docker-compose")
    secrets = DEPLOY / "secrets"
    made = not secrets.exists()
    document = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    try:  # the secret files an operator creates first (see the file's header)
        secrets.mkdir(exist_ok=True)
        for spec in document["secrets"].values():
            (DEPLOY / spec["file"]).touch()
        done = subprocess.run([tool, "-f", str(DEPLOY / "compose.cluster.yaml"), "config", "--quiet"],
                              capture_output=True, text=True, check=False, env={**os.environ, "MIRROR_IMAGE": "m:1"})
    finally:
        if made:
            shutil.rmtree(secrets)
    assert done.returncode == 0, done.stderr
    assert str(document["version"]).startswith("3.")
    services = document["services"]
    assert set(services) == {"mirror", "haproxy", "seaweedfs", "bucket", "postgres"}
    mirror = services["mirror"]
    assert mirror["deploy"]["replicas"] == 3 and mirror["build"]["args"]["EXTRAS"] == "s3"
    assert (PROJECT_ROOT / mirror["build"]["dockerfile"]).is_file()
    for service in services.values():
        assert set(service.get("depends_on", [])) <= set(services)
        assert all(entry in document["secrets"] for entry in service.get("secrets", []))

    # The mirror's settings, with its secrets as files.
    keys = {"s3-accesskey": "AKCLUSTER", "s3-secretkey": "sk-cluster", "cluster-secret": "c" * 64,
            "postgres-dsn": "postgresql://mirror:pw@postgres:5432/mirror"}
    for name, value in keys.items():
        (tmp_path / name).write_text(value + "\n")
    env = {key: str(value).replace("/run/secrets/", f"{tmp_path}/") for key, value in mirror["environment"].items()}
    # The entrypoint adds the replica's own address, then runs the image's command.
    shell, flag, script = mirror["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c") and script.endswith(" exec mirror serve")
    own_address = r"\$\$\(hostname -i \| cut -d' ' -f1\)"  # $$: a literal $ for the shell
    assignment = re.fullmatch(rf"MIRROR_CLUSTER_ADVERTISE=http://{own_address}:(\d+) exec mirror serve", script)
    assert assignment, script
    env["MIRROR_CLUSTER_ADVERTISE"] = f"http://10.0.0.5:{assignment[1]}"
    config = load_config(env=env)
    assert config.cluster.enabled and config.cluster.advertise == "http://10.0.0.5:5000"
    env["MIRROR_CLUSTER_ADVERTISE"] = f"http://fd00::5:{assignment[1]}"  # hostname -i on an IPv6 network
    assert load_config(env=env).cluster.advertise == "http://[fd00::5]:5000"
    assert set(mirror["secrets"]) == set(keys)
    assert (config.storage.driver, config.metadata.driver) == ("s3", "postgres")
    assert (config.storage.s3_accesskey, config.storage.s3_secretkey) == ("AKCLUSTER", "sk-cluster")
    assert config.metadata.postgres_dsn == keys["postgres-dsn"]

    # HAProxy reaches the replicas where they listen, checks /readyz, and is what clients reach.
    haproxy = services["haproxy"]
    (entry,) = haproxy["configs"]
    assert entry["target"] == "/usr/local/etc/haproxy/haproxy.cfg"
    shipped = (DEPLOY / document["configs"][entry["source"]]["file"]).read_text()
    assert re.search(rf"(?m)^\s+server-template mirror \d+ mirror:{config.http.port} ", shipped)
    assert re.search(r"(?m)^\s+option httpchk GET /readyz$", shipped)
    assert "balance roundrobin" in shipped  # no stickiness, uploads in progress included
    assert not re.search(r"(?m)^\s+(cookie|stick|stick-table|balance (source|hdr|uri|url_param))\b", shipped)
    # In a stack, a service's name is a virtual IP unless its endpoint_mode is dnsrr: the name HAProxy
    # resolves must give every replica's own address (and the services reached by name inside the
    # stack are reached at their task, with no IPVS between).
    (template,) = re.findall(r"(?m)^\s+server-template mirror \d+ (\w+):\d+ ", shipped)
    assert template == "mirror"
    for name in ("mirror", "seaweedfs", "postgres"):
        assert services[name]["deploy"]["endpoint_mode"] == "dnsrr", name
    assert "endpoint_mode" not in services["haproxy"].get("deploy", {})  # published: the ingress needs a VIP
    bound = re.search(r"(?m)^\s+bind :(\d+)$", shipped)
    assert bound and haproxy["ports"] == [f"{bound[1]}:{bound[1]}"]
    assert "ports" not in mirror  # replicas are reached through HAProxy only

    # The bucket and the database are where the mirror looks for them.
    seaweedfs = services["seaweedfs"]
    assert config.storage.s3_regionendpoint == "http://seaweedfs:8333" and "-s3.port=8333" in seaweedfs["command"]
    assert "/run/secrets/seaweedfs-s3.json" in seaweedfs["command"]
    assert f"-name {config.storage.s3_bucket}" in " ".join(services["bucket"]["command"])
    postgres = services["postgres"]
    assert (postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"]) == ("mirror", "mirror")
    assert "@postgres:5432/mirror" in keys["postgres-dsn"] and postgres["image"].startswith("postgres:15")
    for name in ("seaweedfs", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"


@pytest.mark.parametrize("names", [("compose.yaml",), ("compose.yaml", "compose.tls.yaml")], ids=["plain", "tls"])
def test_compose_files_are_valid_and_agree_with_each_other(
    names: tuple[str, ...], certificate: ServerCertificate
) -> None:
    tool = require_tool("docker-compose", "docker-compose")
    args = [arg for name in names for arg in ("-f", str(DEPLOY / name))]
    done = subprocess.run([tool, *args, "config", "--quiet"], capture_output=True, text=True, check=False,
                          env={**os.environ, "MIRROR_IMAGE": "mirror:test"})
    assert done.returncode == 0, done.stderr

    document = compose(*names)
    assert str(document["version"]).startswith("3.")  # docker stack deploy reads 3.x
    services = document["services"]
    assert set(services) == {"mirror", "prometheus", "grafana"}
    mirror = services["mirror"]
    assert (PROJECT_ROOT / mirror["build"]["dockerfile"]).is_file() and mirror["build"]["context"] == ".."
    assert mirror["image"].startswith("${MIRROR_IMAGE")
    assert mirror["deploy"]["replicas"] == 1 and "/var/lib/mirror" in mirror["volumes"][0]
    for kind in ("configs", "secrets"):
        for name, spec in document.get(kind, {}).items():
            if kind == "configs":
                assert (DEPLOY / spec["file"]).is_file(), f"{kind}.{name}: {spec['file']} is missing"
            for service in services.values():
                assert all(entry["source"] in document[kind] for entry in service.get(kind, []))

    # The mirror's environment is a configuration the mirror accepts (secrets as test files).
    secret_files = {"/run/secrets/mirror.crt": str(certificate.certificate),
                    "/run/secrets/mirror.key": str(certificate.key)}
    env = {key: secret_files.get(str(value), str(value)) for key, value in mirror["environment"].items()}
    config = load_config(env=env)
    assert config.http.listen == "0.0.0.0:5000" and str(config.storage.path) == "/var/lib/mirror"
    mounted = {f"/run/secrets/{entry['target']}" for entry in mirror.get("secrets", [])}
    assert {value for value in mirror["environment"].values() if str(value).startswith("/run/secrets/")} <= mounted

    # Prometheus scrapes where the mirror serves /metrics, and loads the alert rules beside it.
    prometheus = services["prometheus"]
    config_file = next(a.partition("=")[2] for a in prometheus["command"] if a.startswith("--config.file="))
    targets = {entry["target"]: document["configs"][entry["source"]]["file"] for entry in prometheus["configs"]}
    scrape = yaml.safe_load((DEPLOY / targets[config_file]).read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "mirror"
    metrics_port = listen_port(config.metrics.listen) if config.metrics.listen else config.http.port
    assert job["static_configs"][0]["targets"] == [f"mirror:{metrics_port}"]
    assert config.http.tls_certificate is None or config.metrics.listen, "Prometheus cannot scrape HTTPS here"
    for rules in scrape["rule_files"]:
        assert str(Path(config_file).parent / rules) in targets

    # Grafana: its data source is this Prometheus, its dashboard file is where the provider looks.
    grafana = services["grafana"]
    provisioned = {entry["target"]: DEPLOY / document["configs"][entry["source"]]["file"]
                   for entry in grafana["configs"]}
    sources = yaml.safe_load(provisioned["/etc/grafana/provisioning/datasources/prometheus.yml"].read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(provisioned["/etc/grafana/provisioning/dashboards/mirror.yml"].read_text())
    folder = providers["providers"][0]["options"]["path"]
    dashboards = [target for target in provisioned if target.startswith(folder + "/") and target.endswith(".json")]
    assert dashboards and all(json.loads(provisioned[target].read_text())["panels"] for target in dashboards)


# -- Helm chart ----------------------------------------------------------------------------

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "image": {"repository": "registry.example.internal:5000/mirror", "tag": "1"},
        "config": {"cache": {"tag_ttl": "1m"}, "upstreams": [{"registry": "ghcr.io", "url": "https://ghcr.io"}]},
        "env": {"MIRROR_HTTP_WORKERS": "2"},
        "upstreamCredentials": {"username": "me", "password": "dckr_pat_secret"},
        "auth": {"htpasswd": HTPASSWD, "anonymousPull": False},
        "tls": {"enabled": True, "secretName": "mirror-tls"},
        "metrics": {"port": 9102},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "service": {"type": "NodePort", "nodePort": 30500},
        "persistence": {"storageClass": "fast", "size": "200Gi"},
    },
    "existing-secrets": {
        "upstreamCredentials": {"existingSecret": "hub-credentials"},
        "auth": {"existingSecret": "mirror-users"},
        "persistence": {"existingClaim": "mirror-cache"},
        "serviceMonitor": {"enabled": True, "tlsConfig": {"insecureSkipVerify": True}},
        "tls": {"enabled": True, "secretName": "mirror-tls"},
    },
    "ephemeral": {"persistence": {"enabled": False}, "preStopSleepSeconds": 0,
                  "serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
                  # The README's advice under mutual TLS: TCP probes, which replace the default httpGet.
                  "livenessProbe": {"tcpSocket": {"port": "http"}}, "readinessProbe": {"tcpSocket": {"port": "http"}},
                  "extraEnv": [{"name": "MIRROR_ADMIN_TOKEN_FILE", "value": "/etc/mirror/admin/token"}],
                  "extraVolumes": [{"name": "admin", "secret": {"secretName": "mirror-admin",
                                                                "items": [{"key": "token", "path": "token"}]}}],
                  "extraVolumeMounts": [{"name": "admin", "mountPath": "/etc/mirror/admin", "readOnly": True}]},
    "replicas": {
        "replicaCount": 3,
        "objectStorage": {"enabled": True, "bucket": "images", "regionendpoint": "http://seaweedfs:8333",
                          # A whole number of bytes (YAML reads it as a float: never written 5.36870912e+11).
                          "forcepathstyle": True, "maxSize": 536870912000, "existingSecret": "mirror-s3"},
        "database": {"enabled": True, "existingSecret": "mirror-database"},
        "cluster": {"existingSecret": "mirror-cluster"},
    },
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    home = {f"HELM_{kind}_HOME": str(HELM_HOME / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
    done = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **home})
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def kubernetes_schema() -> jsonschema.protocols.Validator:
    """A validator factory for the API's strict schemas (``$ref`` to one definition each)."""
    definitions = json.loads(kubernetes_definitions().read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    cls = jsonschema.validators.validator_for(definitions)
    return cls({"$defs": definitions["$defs"], "$id": definitions["$id"]}, registry=registry)


def schema_errors(validator: Any, document: dict[str, Any]) -> list[str]:
    group, _, version = document["apiVersion"].rpartition("/")
    definition = f"io.k8s.api.{group.split('.')[0] if group else 'core'}.{version}.{document['kind']}"
    assert definition in validator.schema["$defs"], f"no schema for {definition} in Kubernetes {KUBE_VERSION}"
    check = validator.evolve(schema={"$ref": f"{validator.schema['$id']}#/$defs/{definition}"})
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(document)]


def render(tmp_path: Path, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    helm("lint", "--strict", str(CHART), "-f", str(path))
    out = helm("template", "rel", str(CHART), "--namespace", "registry", "-f", str(path)).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out) if doc}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_chart_renders_valid_consistent_manifests(
    name: str, tmp_path: Path, kubernetes_schema: Any, certificate: ServerCertificate
) -> None:
    values = VALUE_SETS[name]
    objects = render(tmp_path, values)
    for kind, document in objects.items():
        if kind != "ServiceMonitor":
            assert schema_errors(kubernetes_schema, document) == [], kind

    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector
    replicas = values.get("replicaCount", 1)
    assert deployment["spec"]["replicas"] == replicas
    if values.get("objectStorage", {}).get("enabled"):  # pods share the bucket: roll one at a time
        assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                                  "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    else:
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    if replicas > 1:
        budget = objects["PodDisruptionBudget"]
        assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert budget["spec"]["maxUnavailable"] == 1
        (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    else:
        assert "PodDisruptionBudget" not in objects
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] and spec["enableServiceLinks"] is False

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    scheme = "HTTPS" if values.get("tls", {}).get("enabled") else "HTTP"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        handlers = {"httpGet", "tcpSocket", "exec", "grpc"} & set(container[probe])
        assert len(handlers) == 1, (probe, handlers)  # the API server refuses a probe with two
        (handler,) = handlers
        assert container[probe][handler]["port"] in ports
        if probe in values:
            assert handler == next(iter(values[probe]))
        else:
            assert container[probe]["httpGet"]["scheme"] == scheme
    if "livenessProbe" not in values:
        assert {container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]} \
            == {"/healthz", "/readyz"}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    assert [port["appProtocol"] for port in service["spec"]["ports"]] == \
        [scheme.lower(), *(["http"] if values.get("metrics", {}).get("port") else [])]
    # New credentials or users in the chart's Secret roll the pods, as a config change does.
    assert {"checksum/config", "checksum/secret"} <= set(pod["metadata"]["annotations"])
    sleep = values.get("preStopSleepSeconds", 5)
    if sleep:
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
        assert spec["terminationGracePeriodSeconds"] >= sleep + 25  # + http.draintimeout
    else:
        assert "lifecycle" not in container
    account = values.get("serviceAccount", {})
    assert spec["serviceAccountName"] == (objects["ServiceAccount"]["metadata"]["name"] if account.get("create")
                                          else "default")
    if account.get("create"):
        assert objects["ServiceAccount"]["metadata"]["annotations"] == account["annotations"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert {mount["name"] for mount in container["volumeMounts"]} <= set(volumes)
    claim = volumes["data"].get("persistentVolumeClaim", {}).get("claimName")
    if values.get("objectStorage", {}).get("enabled"):  # each pod's spool only
        assert volumes["data"]["emptyDir"]["sizeLimit"] == "20Gi" and "PersistentVolumeClaim" not in objects
    elif values.get("persistence", {}).get("enabled", True):
        expected = (values.get("persistence", {}).get("existingClaim")
                    or objects["PersistentVolumeClaim"]["metadata"]["name"])
        assert claim == expected
    else:  # an emptyDir of persistence.size, the budget within it (a share would be of the node's disk)
        assert volumes["data"]["emptyDir"]["sizeLimit"] == "50Gi" and "PersistentVolumeClaim" not in objects

    if "ServiceMonitor" in objects:
        monitor = objects["ServiceMonitor"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"] == selector
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}

    # The pod's files and environment make a configuration the mirror accepts.
    root = tmp_path / "pod"
    env = materialize(objects, container, volumes, root, certificate)
    config = load_config(root / "etc/mirror/config/config.yaml", env=env)
    assert config.http.listen == "0.0.0.0:5000" and str(config.storage.path) == "/var/lib/mirror"
    if values.get("tls", {}).get("enabled"):
        assert config.http.tls_certificate is not None
    if "upstreamCredentials" in values and "password" in values["upstreamCredentials"]:
        assert (config.upstream.username, config.upstream.password) == ("me", "dckr_pat_secret")
    if values.get("metrics", {}).get("port"):
        assert config.metrics.listen == f"0.0.0.0:{values['metrics']['port']}"
    assert [u.registry for u in config.upstreams] == \
        ["docker.io", *(u["registry"] for u in values.get("config", {}).get("upstreams", []))]
    if values.get("objectStorage", {}).get("enabled"):
        assert (config.storage.driver, config.storage.s3_bucket, config.cache.max_size) == ("s3", "images", 500 << 30)
        assert (config.storage.s3_accesskey, config.storage.s3_secretkey) == ("AKEXISTING", "sk-existing")
        assert config.storage.s3_regionendpoint == "http://seaweedfs:8333" and config.storage.s3_forcepathstyle
    if not values.get("persistence", {}).get("enabled", True):
        assert config.cache.max_size == 40 << 30
    if "extraEnv" in values:
        assert config.admin.token_file is not None and config.admin.token_file.value == "t" * 40
    if values.get("database", {}).get("enabled"):
        assert (config.metadata.driver, config.metadata.postgres_dsn) == ("postgres", "postgresql://m:pw@db/mirror")
    if replicas > 1:  # the pods fetch together, each advertising its own address
        assert config.cluster.enabled and config.cluster.advertise == "http://10.244.1.7:5000"
        ipv6 = {**env, "MIRROR_CLUSTER_ADVERTISE": env["MIRROR_CLUSTER_ADVERTISE"].replace("10.244.1.7", "fd00::7")}
        assert load_config(root / "etc/mirror/config/config.yaml", env=ipv6).cluster.advertise == \
            "http://[fd00::7]:5000"
    else:
        assert not config.cluster.enabled


def materialize(objects: dict[str, dict[str, Any]], container: dict[str, Any], volumes: dict[str, Any],
                root: Path, certificate: ServerCertificate) -> dict[str, str]:
    """Write the pod's mounted ConfigMap and Secret files under *root*; return its environment
    with paths (and secret references) resolved to those files.  Secrets that are not the
    chart's (existingSecret, the TLS Secret) get test content."""
    chart_secret = objects.get("Secret", {})
    external = {"password": "token-from-an-existing-secret", "username": "me", "htpasswd": HTPASSWD,
                "accesskey": "AKEXISTING", "secretkey": "sk-existing", "dsn": "postgresql://m:pw@db/mirror",
                "secret": "c" * 64, "token": "t" * 40,
                "tls.crt": certificate.certificate.read_text(), "tls.key": certificate.key.read_text()}

    def secret_value(name: str, key: str) -> str:
        if name == chart_secret.get("metadata", {}).get("name"):
            return str(chart_secret["stringData"][key])
        return external[key]

    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
            for key, text in objects["ConfigMap"]["data"].items():
                (folder / key).write_text(text)
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in ("tls.crt", "tls.key")]
            for item in items:
                (folder / item["path"]).write_text(secret_value(name, item["key"]))
    env = {}
    for variable in container["env"]:
        if "fieldRef" in variable.get("valueFrom", {}):
            assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[variable["name"]] = "10.244.1.7"
        elif "valueFrom" in variable:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secret_value(ref["name"], ref["key"])
        else:
            value = variable["value"]
            mounted = value.startswith("/etc/mirror/")
            value = value.replace("$(POD_IP)", env.get("POD_IP", "$(POD_IP)"))  # as the kubelet expands it
            env[variable["name"]] = str(root / value.lstrip("/")) if mounted else value
    return env


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": 2}, "replicaCount > 1 needs objectStorage.enabled and database.enabled"),
    ({"replicaCount": 2, "objectStorage": {"enabled": True, "bucket": "b", "maxSize": "1TiB"}},
     "replicaCount > 1 needs objectStorage.enabled and database.enabled"),
    ({"objectStorage": {"enabled": True, "maxSize": "1TiB"}, "database": {"enabled": True, "existingSecret": "db"}},
     "objectStorage.bucket is needed"),
    ({"objectStorage": {"enabled": True, "bucket": "b"}, "database": {"enabled": True, "existingSecret": "db"}},
     "objectStorage.maxSize is needed"),
    ({"database": {"enabled": True}}, "database.existingSecret (a Secret with the key dsn) is needed"),
    ({"replicaCount": 2, "objectStorage": {"enabled": True, "bucket": "b", "maxSize": "1TiB"},
      "database": {"enabled": True, "existingSecret": "db"}}, "cluster.existingSecret (a Secret with the key secret)"),
    # One pod on a bucket keeps its index in PostgreSQL too: in its emptyDir the index would be lost
    # with the pod, and the bucket would refuse the next pod (it remembers its index).
    ({"objectStorage": {"enabled": True, "bucket": "b", "maxSize": "1TiB"}}, "objectStorage.enabled needs database"),
    ({"metrics": {"port": 5000}}, "metrics.port must not be 5000"),
    ({"podLabels": {"app.kubernetes.io/name": "other"}}, "podLabels must not set app.kubernetes.io/name"),
    ({"upstreamCredentials": {"username": "me"}}, "upstreamCredentials.username is set without"),
    ({"tls": {"enabled": True, "secretName": "t"}, "serviceMonitor": {"enabled": True}},
     "serviceMonitor with tls.enabled scrapes the HTTPS API port"),
    ({"persistence": {"enabled": False, "size": "50G"}}, "persistence.size \"50G\""),
], ids=["replicas-on-a-volume", "replicas-without-a-database", "no-bucket", "no-budget", "no-dsn", "no-cluster-secret",
        "bucket-without-a-database", "metrics-on-the-api-port", "labels-over-the-selector", "username-alone",
        "scraping-tls-blind", "emptydir-size-unreadable"])
def test_helm_chart_refuses_values_that_would_make_a_broken_pod(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    done = helm("template", "rel", str(CHART), "-f", str(path), check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_helm_chart_gives_way_to_variables_the_user_sets(tmp_path: Path) -> None:
    """A variable the chart sets itself (the derived budget of an emptyDir, the listener) and the user
    sets too, in ``env`` or ``extraEnv``, appears once, with the user's value (a duplicate entry is
    refused by server-side apply)."""
    objects = render(tmp_path, {"persistence": {"enabled": False, "size": "1Ki"},
                                "env": {"MIRROR_HTTP_LISTEN": "[::]:5000"},
                                "extraEnv": [{"name": "MIRROR_CACHE_MAX_SIZE", "value": "1GiB"}]})
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    names = [variable["name"] for variable in container["env"]]
    assert names.count("MIRROR_CACHE_MAX_SIZE") == names.count("MIRROR_HTTP_LISTEN") == 1, names
    values = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert (values["MIRROR_CACHE_MAX_SIZE"], values["MIRROR_HTTP_LISTEN"]) == ("1GiB", "[::]:5000")
    tiny = render(tmp_path, {"persistence": {"enabled": False, "size": "1Ki"}})
    (container,) = tiny["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {v["name"]: v.get("value") for v in container["env"]}["MIRROR_CACHE_MAX_SIZE"] == "819"  # not 0: no limit


def test_helm_chart_refuses_tls_without_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"tls": {"enabled": True}}))
    done = helm("template", "rel", str(CHART), "-f", str(path), check=False)
    assert done.returncode != 0 and "tls.secretName is needed" in done.stderr


# -- systemd -------------------------------------------------------------------------------


def env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """Active ``KEY=VALUE`` lines, and the names of the commented-out ``#MIRROR_...=`` examples."""
    active, examples = {}, set()
    for line in path.read_text().splitlines():
        if m := re.fullmatch(r"(MIRROR_[A-Z_]+)=(.*)", line):
            active[m[1]] = m[2]
        elif m := re.fullmatch(r"#\s*(MIRROR_[A-Z_]+)=.*", line):
            examples.add(m[1])
    return active, examples


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path, certificate: ServerCertificate) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    unit = (DEPLOY / "systemd" / "mirror.service").read_text()
    assert re.search(r"^ExecStart=/opt/mirror/bin/mirror serve$", unit, re.MULTILINE)
    assert re.search(r"^EnvironmentFile=-/etc/mirror/mirror.env$", unit, re.MULTILINE)
    # Verify with an ExecStart that exists here (the installed path does not).
    local = tmp_path / "mirror.service"
    local.write_text(unit.replace("/opt/mirror/bin/mirror serve", f"{sys.executable} -m mirror serve"))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    rating = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", str(local)],
                            capture_output=True, text=True, check=False)
    assert rating.returncode == 0, rating.stdout[-3000:]
    assert re.search(r"Overall exposure level for mirror\.service: [01]\.\d OK", rating.stdout), rating.stdout[-500:]

    # The environment file: its settings load, and its commented examples name real keys.
    active, examples = env_file(DEPLOY / "systemd" / "mirror.env")
    config = load_config(env={**active, "MIRROR_STORAGE_PATH": "/var/lib/mirror"})
    assert config.http.listen == "0.0.0.0:5000"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("upstream-token", "tls.crt", "tls.key"):
        source = {"tls.crt": certificate.certificate, "tls.key": certificate.key}.get(name)
        (credentials / name).write_text(source.read_text() if source else "token")
    (tmp_path / "htpasswd").write_text(HTPASSWD)
    uncommented = {}
    for line in (DEPLOY / "systemd" / "mirror.env").read_text().splitlines():
        if m := re.fullmatch(r"#\s*(MIRROR_[A-Z_]+)=(.*)", line):
            value = m[2].replace("/run/credentials/mirror.service", str(credentials))
            uncommented[m[1]] = value.replace("/etc/mirror/htpasswd", str(tmp_path / "htpasswd"))
    config = load_config(env={**active, **uncommented})
    assert config.http.tls_key is not None and config.upstream.password == "token"
    assert {u.registry for u in config.upstreams} == {"docker.io", "ghcr.io", "registry.k8s.io"}
    assert examples == set(uncommented)
    # Every credential the env file names is one the unit can load.
    for name in re.findall(r"/run/credentials/mirror\.service/([\w.-]+)", (DEPLOY / "systemd/mirror.env").read_text()):
        assert re.search(rf"^#?LoadCredential={re.escape(name)}:", unit, re.MULTILINE), name


# -- client snippets -----------------------------------------------------------------------


def test_client_snippets_point_at_the_mirror() -> None:
    """Their use by real clients is in test_every_client.py; here, the TLS variants' shape."""
    clients = DEPLOY / "clients"
    plain = json.loads((clients / "docker/daemon.json").read_text())
    tls = json.loads((clients / "docker/daemon.tls.json").read_text())
    assert plain["registry-mirrors"] == [f"http://{PLACEHOLDER}"] and plain["insecure-registries"] == [PLACEHOLDER]
    assert tls == {"registry-mirrors": [f"https://{PLACEHOLDER}"]}
    for kind, scheme in (("containerd", "http"), ("containerd-tls", "https")):
        found = sorted(p.parent.name for p in (clients / kind / "certs.d").glob("*/hosts.toml"))
        assert found == ["docker.io", "ghcr.io"]
        for registry in found:
            hosts = tomllib.loads((clients / kind / "certs.d" / registry / "hosts.toml").read_text())
            assert hosts["server"].startswith("https://")
            host = hosts["host"][f"{scheme}://{PLACEHOLDER}"]
            assert host["capabilities"] == ["pull", "resolve"]
            assert ("ca" in host) == (scheme == "https")
    cri = tomllib.loads((clients / "containerd/config.toml").read_text())
    assert cri["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"
    for name, insecure in (("registries.conf", True), ("registries.tls.conf", False)):
        conf = tomllib.loads((clients / "podman" / name).read_text())
        assert {r["prefix"] for r in conf["registry"]} == {"docker.io", "ghcr.io"}
        for registry in conf["registry"]:
            (mirror,) = registry["mirror"]
            assert mirror["location"] in (PLACEHOLDER, f"{PLACEHOLDER}/ghcr.io")
            assert mirror.get("insecure", False) is insecure


# -- the image -----------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_with_volume_port_and_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "ARG BASE=python:3.11-slim"
    assert [line for line in lines if line.startswith("FROM")] == ["FROM ${BASE} AS build", "FROM ${BASE}"]
    final = lines[lines.index("FROM ${BASE}"):]
    assert "USER 10001:10001" in final and 'VOLUME ["/var/lib/mirror"]' in final and "EXPOSE 5000" in final
    assert any(line.startswith("HEALTHCHECK ") for line in final)
    assert "/usr/local/lib/mirror/healthcheck.py" in text
    # Everything the build COPYs is in the build context that .dockerignore leaves.
    ignore = (PROJECT_ROOT / ".dockerignore").read_text().split()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert f"!{item.rstrip('/')}" in ignore or f"!{item.rstrip('/')}/" in ignore, item

    # ... and installs the dependencies at the versions the suite passed on.
    assert 'pip install --constraint /tmp/constraints.txt "${wheel}${EXTRAS:+[$EXTRAS]}"' in text
    assert "ARG EXTRAS=" in final  # --build-arg EXTRAS=s3 for the S3 driver


def test_constraints_pin_every_dependency_within_the_declared_bounds() -> None:
    """deploy/constraints.txt pins each runtime dependency (and what they need) to one version
    that pyproject.toml's range admits: the versions this suite runs on."""
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"]
    for requirement in map(Requirement, [*declared, *project["optional-dependencies"]["s3"]]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    bounded = {canonicalize_name(r.name): r.specifier for r in map(Requirement, declared)}
    for name in ("uvicorn", "httptools", "httpcore", "diskcache", "prometheus-client"):  # their internals are used
        assert any(spec.operator == "<" for spec in bounded[name]), f"{name} has no upper bound"
        assert pins[name] == Version(version_of(name)), f"{name}: the suite runs on {version_of(name)}"


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MIRROR_", "HEALTHCHECK_"))}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], capture_output=True, text=True,
                          timeout=30, check=False, env={**clean, **env})


def test_healthcheck_script_checks_healthz_over_http_and_https(
    mirror_factory: Any, certificate: ServerCertificate
) -> None:
    plain = mirror_factory()
    assert healthcheck({"MIRROR_HTTP_LISTEN": f"0.0.0.0:{plain.port}"}).returncode == 0
    assert healthcheck({"HEALTHCHECK_URL": f"{plain.url}/healthz"}).returncode == 0
    dead = healthcheck({"MIRROR_HTTP_LISTEN": f"0.0.0.0:{free_port()}"})
    assert dead.returncode == 1 and "unhealthy" in dead.stderr
    tls = {"MIRROR_HTTP_TLS_CERTIFICATE": str(certificate.certificate), "MIRROR_HTTP_TLS_KEY": str(certificate.key)}
    secure = mirror_factory(env=tls, scheme="https", verify=ssl.create_default_context(cafile=certificate.ca))
    listen = {"MIRROR_HTTP_LISTEN": f"0.0.0.0:{secure.port}"}
    assert healthcheck({**listen, "MIRROR_HTTP_TLS_CERTIFICATE": str(certificate.certificate)}).returncode == 0
    assert healthcheck(listen).returncode == 1  # plain HTTP to the HTTPS port


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dockerd, str]]:
    """A dockerd of this module's, with deploy/Dockerfile built on the offline base image (with the
    ``s3`` extra, as compose.cluster.yaml builds it)."""
    require_tool("dockerd", "docker.io")
    root = tmp_path_factory.mktemp("image")
    daemon = Dockerd(root / "dockerd").start()
    try:
        base = rootfs_tar(root / "base.tar")
        done = subprocess.run([docker_client(), "-H", daemon.host, "import", *import_args(), str(base),
                               "mirror-test-base:1"], capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        base.unlink()
        env = {**os.environ, "DOCKER_BUILDKIT": "0", "DOCKER_CONFIG": str(daemon.config_dir)}
        env.pop("DOCKER_HOST", None)
        build = subprocess.run(
            [docker_client(), "-H", daemon.host, "build", "--network", "none", "-f", "deploy/Dockerfile",
             "--build-arg", "BASE=mirror-test-base:1", "--build-arg", "EXTRAS=s3", "-t", "mirror:test", "."],
            capture_output=True, text=True, timeout=900, cwd=PROJECT_ROOT, env=env, check=False)
        assert build.returncode == 0, f"docker build failed:\n{build.stdout[-5000:]}\n{build.stderr[-3000:]}"
        yield daemon, "mirror:test"
    finally:
        daemon.stop()
        shutil.rmtree(root / "dockerd", ignore_errors=True)


@pytest.mark.slow
def test_image_builds_runs_as_non_root_and_serves_the_registry_api(
    built_image: tuple[Dockerd, str], upstream: UpstreamRegistry, images: StandardImages
) -> None:
    daemon, image = built_image
    config = json.loads(daemon.docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001"
    assert set(config["Volumes"]) == {"/var/lib/mirror"} and set(config["ExposedPorts"]) == {"5000/tcp"}
    assert config["Healthcheck"]["Test"] == ["CMD", "python3", "/usr/local/lib/mirror/healthcheck.py"]
    assert config["Entrypoint"] == ["mirror"] and config["Cmd"] == ["serve"]

    port = free_port()
    container = daemon.docker(
        "run", "--detach", "--network", "host", "--health-interval", "1s", "--health-start-period", "30s",
        "-e", f"MIRROR_HTTP_LISTEN=127.0.0.1:{port}", "-e", f"MIRROR_UPSTREAM_URL={upstream.url}",
        "-e", "MIRROR_UPSTREAM_LIBRARY_NAMESPACE=true", image,
    ).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.get(f"{url}/v2/", timeout=2, trust_env=False)
                break
            except httpx.TransportError:
                running = daemon.docker("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
                assert running == "true" and time.monotonic() < deadline, \
                    daemon.docker("logs", container, check=False).stderr[-3000:]
                time.sleep(0.2)
        assert answer.status_code == 200 and answer.headers["docker-distribution-api-version"] == "registry/2.0"
        manifest = httpx.get(f"{url}/v2/small/manifests/1", timeout=30, trust_env=False,
                             headers={"accept": "application/vnd.oci.image.manifest.v1+json"})
        assert manifest.status_code == 200 and manifest.content == images.small.manifest
        layer = images.small.layers[1]
        blob = httpx.get(f"{url}/v2/small/blobs/{layer.digest}", timeout=30, trust_env=False)
        assert blob.status_code == 200 and blob.content == layer.path.read_bytes()

        assert daemon.docker("exec", container, "id", "-u").stdout.strip() == "10001"
        stored = daemon.docker("exec", container, "ls", "/var/lib/mirror/blobs/sha256").stdout.split()
        assert layer.digest.removeprefix("sha256:")[:2] in stored
        deadline = time.monotonic() + 60
        while (status := daemon.docker("inspect", "--format", "{{.State.Health.Status}}", container)
               .stdout.strip()) != "healthy":
            assert status == "starting" and time.monotonic() < deadline, \
                daemon.docker("inspect", "--format", "{{json .State.Health}}", container).stdout
            time.sleep(0.5)
    finally:
        daemon.docker("rm", "--force", "--volumes", container, check=False)


def stand_in(daemon: Dockerd, tag: str) -> None:
    """An image named *tag* that only sleeps (Prometheus and Grafana cannot be pulled here)."""
    dockerfile = 'FROM mirror-test-base:1\nENTRYPOINT ["sh", "-c", "exec sleep 3600", "--"]\n'
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "DOCKER_CONFIG": str(daemon.config_dir)}
    env.pop("DOCKER_HOST", None)
    done = subprocess.run([docker_client(), "-H", daemon.host, "build", "--network", "none", "-t", tag, "-"],
                          input=dockerfile, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr


def task_container(daemon: Dockerd, service: str, timeout: float = 120) -> str:
    """The id of *service*'s running task container, once its health check (if any) passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = daemon.docker("ps", "--filter", f"label=com.docker.swarm.service.name={service}",
                              "--format", "{{.ID}} {{.Status}}").stdout.split("\n")[0].split(" ", 1)
        if len(found) == 2 and found[1].startswith("Up") and "starting" not in found[1]:
            assert "unhealthy" not in found[1], found
            return found[0]
        if time.monotonic() > deadline:
            tasks = daemon.docker("service", "ps", "--no-trunc", service, check=False).stdout
            raise AssertionError(f"{service} has no running task:\n{tasks}\n{daemon.log_tail(20)}")
        time.sleep(1)


PYTHON_GET = """
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
with urllib.request.urlopen(sys.argv[1], timeout=10, context=context) as answer:
    print(answer.status, answer.read().decode()[:100000])
"""


class IsolatedDockerd(Dockerd):
    """dockerd in a network namespace of its own (loopback only).

    Swarm's overlay networks create VXLAN interfaces in dockerd's network namespace, named by a
    VNI that every new swarm numbers alike: in the host's namespace, two swarm daemons (or the
    leftovers of a killed one) collide.  Here they die with the namespace when dockerd stops.
    """

    def args(self) -> list[str]:
        require_tool("unshare", "util-linux")
        return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *super().args()]


@pytest.fixture
def swarm(built_image: tuple[Dockerd, str], tmp_path: Path) -> Iterator[Dockerd]:
    """A single-node swarm (isolated dockerd) holding the built image and the test base image."""
    require_tool("ip", "iproute2")
    source, image = built_image
    daemon = IsolatedDockerd(tmp_path / "swarm-dockerd")
    try:
        daemon.start()
        archive = tmp_path / "images.tar"
        source.docker("save", "-o", str(archive), image, "mirror-test-base:1")
        daemon.docker("load", "-i", str(archive))
        archive.unlink()
        daemon.docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        yield daemon
    finally:
        if daemon.socket.exists():  # a manager leaving first stops far faster than one killed
            daemon.docker("swarm", "leave", "--force", check=False, timeout=60)
        daemon.stop()


@pytest.mark.slow
def test_compose_file_deploys_as_a_swarm_stack_with_tls_secrets(
    swarm: Dockerd, built_image: tuple[Dockerd, str], tmp_path: Path, certificate: ServerCertificate
) -> None:
    daemon, image = swarm, built_image[1]
    node = daemon.docker("node", "ls", "--quiet").stdout.strip()
    daemon.docker("node", "update", "--label-add", "mirror=true", node)
    services = compose("compose.yaml")["services"]
    for name in ("prometheus", "grafana"):
        stand_in(daemon, services[name]["image"])
    # The kit as a user has it: deploy/ beside grafana/, the certificate and key in deploy/certs/.
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copytree(PROJECT_ROOT / "grafana", tmp_path / "grafana")
    (tmp_path / "deploy" / "certs").mkdir()
    shutil.copy(certificate.certificate, tmp_path / "deploy" / "certs" / "domain.crt")
    shutil.copy(certificate.key, tmp_path / "deploy" / "certs" / "domain.key")
    env = {**os.environ, "DOCKER_CONFIG": str(daemon.config_dir), "MIRROR_IMAGE": image}
    env.pop("DOCKER_HOST", None)
    deployed = subprocess.run(
        [docker_client(), "-H", daemon.host, "stack", "deploy", "--resolve-image", "never",
         "-c", "compose.yaml", "-c", "compose.tls.yaml", "mirror"],
        cwd=tmp_path / "deploy", env=env, capture_output=True, text=True, timeout=120, check=False)
    assert deployed.returncode == 0, deployed.stderr
    assert {"mirror_mirror.crt", "mirror_mirror.key"} <= set(daemon.docker("secret", "ls", "--format",
                                                                           "{{.Name}}").stdout.split())

    # The mirror's task: HTTPS with the secrets, healthy by the image's HEALTHCHECK.
    mirror = task_container(daemon, "mirror_mirror")
    run = json.loads(daemon.docker("inspect", mirror).stdout)[0]
    assert run["State"]["Health"]["Status"] == "healthy"
    assert "MIRROR_HTTP_TLS_KEY=/run/secrets/mirror.key" in run["Config"]["Env"]
    listing = daemon.docker("exec", mirror, "ls", "-ln", "/run/secrets/").stdout
    assert re.search(r"^-r-------- +1 10001 +10001 .* mirror\.key$", listing, re.MULTILINE), listing

    # From Prometheus's place in the stack network: /metrics and the HTTPS API.  "mirror" resolves
    # to the service's virtual IP, which swarm routes with IPVS, missing on these machines: the
    # requests go to the task itself (tasks.mirror), on the ports prometheus.tls.yml names.
    prometheus = task_container(daemon, "mirror_prometheus")
    for path in ("/etc/prometheus/prometheus.tls.yml", "/etc/prometheus/alerts.yml"):
        daemon.docker("exec", prometheus, "test", "-s", path)
    scrape = yaml.safe_load((DEPLOY / "prometheus.tls.yml").read_text())
    (target,) = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    daemon.docker("exec", prometheus, "python3", "-c", f"import socket; socket.gethostbyname({host!r})")
    metrics = daemon.docker("exec", prometheus, "python3", "-c", PYTHON_GET,
                            f"http://tasks.{host}:{port}/metrics").stdout
    assert metrics.startswith("200 ") and "mirror_" in metrics
    daemon.docker("cp", str(certificate.ca), f"{prometheus}:/tmp/ca.crt")
    api = daemon.docker("exec", prometheus, "python3", "-c", PYTHON_GET, f"https://tasks.{host}:5000/v2/",
                        "/tmp/ca.crt").stdout
    assert api.strip() == "200 {}"

    grafana = task_container(daemon, "mirror_grafana")
    for path in ("/etc/grafana/provisioning/datasources/prometheus.yml",
                 "/etc/grafana/provisioning/dashboards/mirror.yml",
                 "/var/lib/grafana/dashboards/mirror/mirror.json"):
        daemon.docker("exec", grafana, "test", "-s", path)


def secrets_as_the_header_says(stack_file: Path, cwd: Path) -> None:
    """Run the commands of *stack_file*'s header that make its secret files, as an operator would."""
    lines = stack_file.read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("# The secrets, once")) + 1
    end = next(n for n in range(start, len(lines)) if lines[n].startswith("# Then"))
    start += not lines[start].startswith("#   ")  # the heading's second line
    script = "\n".join(line.removeprefix("#   ") for line in lines[start:end])
    done = subprocess.run(["sh", "-ec", script], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{script}\n{done.stderr}"


def healthy_tasks(daemon: Dockerd, service: str, count: int, timeout: float = 420) -> list[str]:
    """The ids of *service*'s *count* running task containers, once every one's health check passed."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [row.split(" ", 1) for row in daemon.docker(
            "ps", "--filter", f"label=com.docker.swarm.service.name={service}",
            "--format", "{{.ID}} {{.Status}}").stdout.splitlines()]
        healthy = [row[0] for row in rows if "(healthy)" in row[1]]
        if len(healthy) == count:
            return healthy
        if time.monotonic() > deadline:
            tasks = daemon.docker("service", "ps", "--no-trunc", service, check=False).stdout
            logs = daemon.docker("service", "logs", "--tail", "30", service, check=False)
            raise AssertionError(f"{service}: {rows}\n{tasks}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(2)


def task_address(daemon: Dockerd, container: str, network: str) -> str:
    return daemon.docker("inspect", "--format", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                         container).stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three stand-in images to build, six services to start on a loaded machine
def test_cluster_compose_file_deploys_as_a_swarm_stack_of_three_replicas_on_s3(
    swarm: Dockerd, built_image: tuple[Dockerd, str], tmp_path: Path
) -> None:
    """deploy/compose.cluster.yaml with `docker stack deploy`: three replicas behind HAProxy, which
    checks each of them; a push through HAProxy lands in SeaweedFS's bucket and pulls back whole."""
    daemon, image = swarm, built_image[1]
    build_standins(daemon, tmp_path / "standins")  # haproxy:2.6, chrislusf/seaweedfs:3.80, postgres:15
    kit = tmp_path / "kit"
    shutil.copytree(DEPLOY, kit / "deploy")
    secrets_as_the_header_says(kit / "deploy" / "compose.cluster.yaml", kit)
    # HAProxy's port through swarm's ingress needs IPVS, missing on these machines: here it is
    # published on the node itself (mode host), where this swarm's dockerd pushes and pulls.
    document = yaml.safe_load((kit / "deploy" / "compose.cluster.yaml").read_text())
    assert document["services"]["haproxy"]["ports"] == ["5000:5000"]
    document["services"]["haproxy"]["ports"] = [{"target": 5000, "published": 5000, "mode": "host"}]
    (kit / "deploy" / "compose.cluster.host.yaml").write_text(yaml.safe_dump(document))
    env = {**os.environ, "DOCKER_CONFIG": str(daemon.config_dir), "MIRROR_IMAGE": image}
    env.pop("DOCKER_HOST", None)
    deployed = subprocess.run(
        [docker_client(), "-H", daemon.host, "stack", "deploy", "--resolve-image", "never",
         "-c", "compose.cluster.host.yaml", "mirror"],
        cwd=kit / "deploy", env=env, capture_output=True, text=True, timeout=120, check=False)
    assert deployed.returncode == 0, deployed.stderr

    # Everything comes up: the bucket job completes, the database, SeaweedFS and 3 replicas turn healthy.
    healthy_tasks(daemon, "mirror_postgres", 1)
    (seaweedfs,) = healthy_tasks(daemon, "mirror_seaweedfs", 1)
    deadline = time.monotonic() + 300
    while "Complete" not in (states := daemon.docker("service", "ps", "--format", "{{.CurrentState}}",
                                                     "mirror_bucket").stdout):
        assert time.monotonic() < deadline, f"{states}\n{daemon.docker('service', 'logs', 'mirror_bucket').stdout}"
        time.sleep(2)
    replicas = healthy_tasks(daemon, "mirror_mirror", 3)
    haproxy = task_container(daemon, "mirror_haproxy")
    addresses = {task_address(daemon, replica, "mirror_mirror") for replica in replicas}
    assert len(addresses) == 3
    for replica in replicas:
        ready = daemon.docker("exec", replica, "python3", "-c", PYTHON_GET, "http://127.0.0.1:5000/readyz").stdout
        assert ready.startswith("200 "), ready

    # HAProxy found each replica (not one virtual IP) and its checks put all three in the rotation.
    deadline = time.monotonic() + 60
    while True:
        log = daemon.docker("logs", haproxy).stdout  # what its configuration logs to stdout, in order
        found = set(re.findall(r"mirrors/mirror\d+ changed its IP from \S* to ([\d.]+)", log))
        servers = dict(re.findall(r"Server mirrors/(mirror\d+) (?:\('\w+'\) )?is (UP|DOWN)", log))
        if found == addresses and sorted(servers.values()) == ["UP"] * 3:
            break
        assert time.monotonic() < deadline, f"{addresses}\n{log[-4000:]}"
        time.sleep(1)
    # Round-robin over the three, each in the rotation: a server just put back gets its full share
    # only once its slowstart (5 s) is over, so the requests go on until each served some.
    deadline = time.monotonic() + 30
    while True:
        for _ in range(6):
            answer = daemon.docker("exec", haproxy, "wget", "-q", "-O", "-", "http://127.0.0.1:5000/v2/").stdout
            assert answer.strip() == "{}"
        log = daemon.docker("logs", haproxy).stdout
        if len(set(re.findall(r'mirrors/(mirror\d+) .* "GET /v2/ HTTP', log))) == 3:
            break
        assert time.monotonic() < deadline, log[-4000:]
        time.sleep(1)

    # A push through HAProxy, pulled back through it whole.
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(1 << 20))
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(payload, arcname="payload")
    ref = "127.0.0.1:5000/cluster/pushed:1"
    daemon.docker("import", str(layer), ref)
    image_id = daemon.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
    pushed, _ = docker_push(daemon, ref)
    daemon.docker("rmi", ref)
    pull(daemon, ref)
    assert daemon.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip() == image_id
    repo_digests = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout
    assert json.loads(repo_digests) == [f"127.0.0.1:5000/cluster/pushed@{pushed}"]

    # The layer is an object in SeaweedFS's bucket, not a file on any replica.
    manifest = json.loads(daemon.docker(
        "exec", haproxy, "wget", "-q", "-O", "-", "--header",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        f"http://127.0.0.1:5000/v2/cluster/pushed/manifests/{pushed}").stdout)
    (entry,) = manifest["layers"]
    digest = parse_digest(entry["digest"])
    key = f"/buckets/mirror/registry/{object_key(digest)}"
    stored = daemon.docker("exec", seaweedfs, "sh", "-c", f"wget -q -O - http://127.0.0.1:8888{key} | sha256sum")
    assert stored.stdout.split()[0] == digest.hex
    for replica in replicas:
        files = daemon.docker("exec", replica, "find", "/var/lib/mirror", "-type", "f").stdout
        assert digest.hex not in files, files


def test_healthcheck_script_with_mutual_tls(mirror_factory: Any, pki: Pki) -> None:
    """With a client CA, the healthcheck sends the certificate it is given (then /healthz must answer),
    and without one takes the mirror's demand for a certificate as the listener being alive.  Before,
    the container of a mirror with mutual TLS stayed unhealthy."""
    mirror = mirror_factory(env=tls_env(pki, client_ca=True), scheme="https", verify=pki.context(client_cert=True))
    env = {"MIRROR_HTTP_LISTEN": f"0.0.0.0:{mirror.port}", **tls_env(pki, client_ca=True)}
    assert healthcheck(env).returncode == 0
    client = {"HEALTHCHECK_CLIENT_CERTIFICATE": str(pki.client_cert), "HEALTHCHECK_CLIENT_KEY": str(pki.client_key)}
    assert healthcheck({**env, **client}).returncode == 0
    wrong = healthcheck({**env, **client, "HEALTHCHECK_URL": f"https://127.0.0.1:{mirror.port}/nothing-here"})
    assert wrong.returncode == 1, "with a certificate, the answer counts"
    mirror.stop()
    dead = healthcheck(env)
    assert dead.returncode == 1 and "unhealthy" in dead.stderr

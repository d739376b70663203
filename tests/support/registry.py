"""Run the real ``docker-registry`` (distribution 2.8) on loopback.

:class:`UpstreamRegistry` is a plain registry that tests push images into;
:class:`ProxyRegistry` is the same binary as a pull-through cache, used as a
baseline in benchmarks.  Both count requests from their own access log (see
:mod:`.accesslog`).  The configuration is written as JSON, which is YAML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import httpx

from . import client
from .accesslog import AccessEntry, AccessLog
from .images import MANIFEST_MEDIA_TYPES, Image, Index
from .matching import PathMatch
from .procs import Proc, free_port, require_tool, wait_http
from .service import Service

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 15.0


class _RegistryProcess(Service):
    """Shared lifecycle and accounting of a docker-registry subprocess."""

    kind = "registry"
    #: What ``GET /v2/`` at start is verified with (a TLS registry: its CA file).
    verify: Any = True

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.data_dir = root / "data"
        self.config_path = root / "config.yml"
        self.log_path = root / f"{self.kind}.log"
        self.log = AccessLog(self.log_path)
        self._proc: Proc | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url})"

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the registry process is alive."""
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        """Process id of the registry, or None before :meth:`start`."""
        return self._proc.pid if self._proc is not None else None

    def config(self) -> dict[str, Any]:
        """The registry configuration document."""
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "mirror-tests"},
        }

    def start(self) -> Self:
        """Write the config, start the registry and wait for ``GET /v2/``."""
        require_tool(REGISTRY_BINARY, "docker-registry")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        if self._proc is None:
            self._proc = Proc([REGISTRY_BINARY, "serve", self.config_path], self.log_path, name=self.kind)
        self._proc.start()
        try:
            wait_http(f"{self.url}/v2/", START_TIMEOUT, alive=self._proc, verify=self.verify)
        except BaseException:
            self._proc.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the registry (by process group); safe to call twice."""
        if self._proc is not None:
            self._proc.stop()

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the registry log."""
        return self._proc.log_tail(lines) if self._proc is not None else ""

    # Accounting, delegated to the access log.

    def settle(self, quiet: float = 0.2) -> list[AccessEntry]:
        """Wait until the access log is quiet for *quiet* s; return entries."""
        return self.log.settle(quiet)

    def clear_counts(self) -> None:
        """Forget requests logged so far."""
        self.log.clear()

    def requests(self, *, wait: bool = True) -> list[AccessEntry]:
        """Every request since the last :meth:`clear_counts`."""
        return self.log.requests(wait=wait)

    def count(self, method: str | None, path: PathMatch, status: int | None = None,
              *, wait: bool = True) -> int:
        """Number of requests matching method, path (substring or regex), status."""
        return self.log.count(method, path, status, wait=wait)

    def bytes_served(self, path: PathMatch, *, wait: bool = True) -> int:
        """Body bytes sent by GETs whose path matches *path*."""
        return self.log.bytes_served(path, wait=wait)


class UpstreamRegistry(_RegistryProcess):
    """A plain registry (filesystem storage, deletes enabled, no auth)."""

    kind = "upstream"

    def push_image(self, name: str, tag: str | None, image: Image) -> str:
        """Push an image (blobs, then manifest); return the manifest digest."""
        return client.push_image(self.url, name, tag, image)

    def push_index(self, name: str, tag: str | None, index: Index) -> str:
        """Push the children by digest, then the index; return its digest."""
        return client.push_index(self.url, name, tag, index)

    def get_manifest(self, name: str, reference: str, *, accept: tuple[str, ...] = MANIFEST_MEDIA_TYPES,
                     method: str = "GET") -> httpx.Response:
        """Fetch a manifest straight from this registry."""
        return client.get_manifest(self.url, name, reference, accept=accept, method=method)

    def delete_manifest(self, name: str, digest: str) -> int:
        """``DELETE /v2/NAME/manifests/DIGEST``; return the status code."""
        with client.session() as http:
            return http.delete(f"{self.url}/v2/{name}/manifests/{digest}").status_code


class ProxyRegistry(_RegistryProcess):
    """docker-registry in pull-through cache mode in front of *remote_url*."""

    kind = "proxy"

    def __init__(self, root: Path, remote_url: str, *, username: str | None = None,
                 password: str | None = None, port: int | None = None) -> None:
        super().__init__(root, port=port)
        self.remote_url = remote_url
        self.username = username
        self.password = password

    def config(self) -> dict[str, Any]:
        proxy: dict[str, str] = {"remoteurl": self.remote_url}
        if self.username is not None:
            proxy["username"] = self.username
            proxy["password"] = self.password or ""
        return {**super().config(), "proxy": proxy}

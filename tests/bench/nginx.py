"""nginx serving blob files at ``/v2/<name>/blobs/<digest>``: the reference for raw speed.

It runs in the foreground (``daemon off``) in its own process group, with its config, pid
file, logs and temp directories under one directory, listening on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.procs import Proc, free_port, wait_http

NGINX_BINARY = "/usr/sbin/nginx"
START_TIMEOUT = 10.0

_CONFIG = """\
daemon off;
master_process on;
user {user};
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/temp/body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{{64}})$" {{
            alias {root}/blobs/$1;
        }}
    }}
}}
"""


class NginxBlobServer:
    """nginx serving *blobs* (``{digest: file}``, hard-linked into its directory) by digest."""

    def __init__(self, root: Path, blobs: Mapping[str, Path], *, port: int | None = None) -> None:
        self.root = root
        self.blobs = dict(blobs)
        self.port = port or free_port()
        self.config_path = root / "nginx.conf"
        self._proc = Proc([NGINX_BINARY, "-p", root, "-c", self.config_path, "-e", root / "error.log"],
                          root / "nginx.log", name="nginx")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self) -> Self:
        """Write the config, link the blobs, start nginx and wait until it answers."""
        (self.root / "temp").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        for digest, source in self.blobs.items():
            target = self.root / "blobs" / digest
            if not target.exists():
                os.link(source, target)
        # Workers run as this user (not nginx's default "nobody"), so they can read our private temp dir.
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.config_path.write_text(_CONFIG.format(root=self.root, port=self.port, user=user))
        self._proc.start()
        try:
            wait_http(f"{self.url}/", START_TIMEOUT, alive=self._proc)
        except BaseException:
            self._proc.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop nginx's whole process group; safe to call twice."""
        self._proc.stop()

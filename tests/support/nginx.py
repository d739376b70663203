"""nginx as a reverse proxy on loopback, configured as an operator would in two lines.

``location / { proxy_pass URL; }`` and nothing else: no ``X-Forwarded-For``, so every request
reaches the backend from 127.0.0.1, whoever sent it (the case operator endpoints must survive).
It runs in the foreground in its own process group, with its config, pid file, logs and temp
directories under one directory (as ``tests/bench/nginx.py`` does for its blob server).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.procs import Proc, free_port, require_tool, wait_http

NGINX_BINARY = "/usr/sbin/nginx"
START_TIMEOUT = 10.0

_CONFIG = """\
daemon off;
master_process on;
user {user};
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/temp/body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port};
        {location}
    }}
}}
"""


class NginxProxy:
    """nginx passing every request on to *backend* (``http://127.0.0.1:PORT``), adding no headers.

    With a *prefix* (``/artifactory/api/docker/remote``) only requests under it are passed on,
    without it, as a repository manager serves a registry under a path (``url`` stays the origin).
    """

    def __init__(self, root: Path, backend: str, *, port: int | None = None, prefix: str = "") -> None:
        self.root = root
        self.backend = backend
        self.prefix = prefix.rstrip("/")
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

    def start(self) -> Self:
        """Write the config, start nginx and wait until it passes requests on."""
        require_tool(NGINX_BINARY, "nginx-light")
        (self.root / "temp").mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.geteuid()).pw_name  # workers must read our private temp dir
        location = (f"location {self.prefix}/ {{ proxy_pass {self.backend.rstrip('/')}/; }}" if self.prefix
                    else f"location / {{ proxy_pass {self.backend}; }}")
        self.config_path.write_text(_CONFIG.format(root=self.root, port=self.port, user=user, location=location))
        self._proc.start()
        try:
            wait_http(f"{self.url}{self.prefix}/v2/", START_TIMEOUT, alive=self._proc)
        except BaseException:
            self._proc.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop nginx's whole process group; safe to call twice."""
        self._proc.stop()

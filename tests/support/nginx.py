"""nginx on loopback, started as tests and benchmarks need it.

:class:`Nginx` runs it in the foreground in its own process group, with its config, pid file,
logs and temp directories under one directory, listening on 127.0.0.1 only; a subclass says what
its ``server`` block holds.  :class:`NginxProxy` is a reverse proxy configured as an operator
would in two lines: ``location / { proxy_pass URL; }`` and nothing else: no ``X-Forwarded-For``,
so every request reaches the backend from 127.0.0.1, whoever sent it (the case operator endpoints
must survive).  ``tests/bench/nginx.py`` serves blob files with it.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Self

from tests.support.procs import Proc, free_port, require_tool, wait_http
from tests.support.service import Service

NGINX_BINARY = "/usr/sbin/nginx"
START_TIMEOUT = 10.0

_CONFIG = """\
daemon off;
master_process on;
user {user};
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/temp/body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;
{http}
}}
"""


class Nginx(Service):
    """nginx with the ``http`` settings of :meth:`http_block`; ready when :attr:`ready_path` answers."""

    workers = "1"
    connections = 256
    ready_path = "/"

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.config_path = root / "nginx.conf"
        self._proc = Proc([NGINX_BINARY, "-p", root, "-c", self.config_path, "-e", root / "error.log"],
                          root / "nginx.log", name="nginx")

    def http_block(self) -> str:
        """The ``http`` context's own settings and ``server`` block (indented four spaces)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Put in place what the configuration refers to (before nginx starts)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self) -> Self:
        """Write the config, start nginx and wait until it answers."""
        require_tool(NGINX_BINARY, "nginx-light")
        (self.root / "temp").mkdir(parents=True, exist_ok=True)
        self.prepare()
        user = pwd.getpwuid(os.geteuid()).pw_name  # workers must read our private temp dir
        self.config_path.write_text(_CONFIG.format(root=self.root, user=user, workers=self.workers,
                                                   connections=self.connections, http=self.http_block()))
        self._proc.start()
        try:
            wait_http(f"{self.url}{self.ready_path}", START_TIMEOUT, alive=self._proc)
        except BaseException:
            self._proc.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop nginx's whole process group; safe to call twice."""
        self._proc.stop()


class NginxProxy(Nginx):
    """nginx passing every request on to *backend* (``http://127.0.0.1:PORT``), adding no headers.

    With a *prefix* (``/artifactory/api/docker/remote``) only requests under it are passed on,
    without it, as a repository manager serves a registry under a path (``url`` stays the origin).
    """

    def __init__(self, root: Path, backend: str, *, port: int | None = None, prefix: str = "") -> None:
        super().__init__(root, port=port)
        self.backend = backend
        self.prefix = prefix.rstrip("/")
        self.ready_path = f"{self.prefix}/v2/"

    def http_block(self) -> str:
        location = (f"location {self.prefix}/ {{ proxy_pass {self.backend.rstrip('/')}/; }}" if self.prefix
                    else f"location / {{ proxy_pass {self.backend}; }}")
        return (f"    client_max_body_size 0;\n"
                f"    server {{\n"
                f"        listen 127.0.0.1:{self.port};\n"
                f"        {location}\n"
                f"    }}")

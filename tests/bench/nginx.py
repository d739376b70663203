"""nginx serving blob files at ``/v2/<name>/blobs/<digest>``: the reference for raw speed.

As ``tests/support/nginx.py`` runs it (foreground, own process group, everything under one
directory, 127.0.0.1 only), with every worker and nginx's fast file paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tests.support.nginx import NGINX_BINARY, Nginx

__all__ = ["NGINX_BINARY", "NginxBlobServer"]


class NginxBlobServer(Nginx):
    """nginx serving *blobs* (``{digest: file}``, hard-linked into its directory) by digest."""

    workers = "auto"
    connections = 1024

    def __init__(self, root: Path, blobs: Mapping[str, Path], *, port: int | None = None) -> None:
        super().__init__(root, port=port)
        self.blobs = dict(blobs)

    def prepare(self) -> None:
        (self.root / "blobs").mkdir(exist_ok=True)
        for digest, source in self.blobs.items():
            target = self.root / "blobs" / digest
            if not target.exists():
                os.link(source, target)

    def http_block(self) -> str:
        return (f"    default_type application/octet-stream;\n"
                f"    sendfile on;\n"
                f"    tcp_nopush on;\n"
                f"    keepalive_requests 100000;\n"
                f"    server {{\n"
                f"        listen 127.0.0.1:{self.port};\n"
                f'        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{{64}})$" {{\n'
                f"            alias {self.root}/blobs/$1;\n"
                f"        }}\n"
                f"    }}")

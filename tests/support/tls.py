"""A throw-away CA and a server certificate for 127.0.0.1, localhost and more names, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import require_tool


@dataclass(frozen=True)
class ServerCertificate:
    """PEM files: the CA, and the server certificate it signed with its key."""

    ca: Path
    certificate: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run([require_tool("openssl", "openssl"), *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def server_certificate(dir: Path, names: tuple[str, ...] = (), *, local: bool = True) -> ServerCertificate:
    """Make ``ca.crt``, ``server.crt`` and ``server.key`` (EC P-256, valid two days) in *dir*; the
    certificate is for 127.0.0.1, localhost (unless not *local*) and the DNS *names*."""
    dir.mkdir(parents=True, exist_ok=True)
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", "-new", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=mirror test CA", cwd=dir)
    _openssl("req", "-new", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=dir)
    alt = ",".join([*(["IP:127.0.0.1", "DNS:localhost"] if local else []), *(f"DNS:{name}" for name in names)])
    (dir / "server.ext").write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", "server.crt", "-extfile", "server.ext", cwd=dir)
    return ServerCertificate(dir / "ca.crt", dir / "server.crt", dir / "server.key")

"""HAProxy from Debian on loopback, in front of mirror replicas, with the shipped configuration.

:class:`HAProxy` runs ``deploy/haproxy/haproxy.cfg`` as an operator has it, changed only where a
loopback test must: it binds ``127.0.0.1:<port>``, names the replicas' loopback addresses instead of
the ``server-template`` resolved through Docker's DNS (its ``resolvers`` section goes), and adds an
admin socket under its directory so the test can read each server's state (:meth:`HAProxy.states`).
It runs in the foreground (``-db``) in its own process group and is stopped by pid.
"""

from __future__ import annotations

import csv
import io
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from tests.support.procs import Proc, free_port, require_tool, wait_http
from tests.support.service import Service

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = PROJECT_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
START_TIMEOUT = 10.0


def loopback_config(shipped: str, port: int, backends: Sequence[str], admin: Path, check: str = "/readyz") -> str:
    """*shipped* (the text of ``haproxy.cfg``) for replicas at *backends* (``host:port``) on loopback;
    *check*: the path of the health check (a server that is not a mirror has no ``/readyz``)."""
    text, bound = re.subn(r"(?m)^(\s*)bind :5000$", rf"\g<1>bind 127.0.0.1:{port}", shipped)
    text = text.replace("option httpchk GET /readyz", f"option httpchk GET {check}")
    text, templated = re.subn(
        r"(?m)^(\s*)server-template .*$",
        lambda m: "\n".join(f"{m[1]}server mirror{n} {address}" for n, address in enumerate(backends, 1)), text)
    text, resolvers = re.subn(r"(?m)^resolvers docker\n(?:[ \t]+.*\n)+", "", text)
    text, admin_added = re.subn(r"(?m)^global\n", f"global\n    stats socket {admin} mode 600 level admin\n", text)
    assert (bound, templated, resolvers, admin_added) == (1, 1, 1, 1), "deploy/haproxy/haproxy.cfg changed shape"
    return text


class HAProxy(Service):
    """HAProxy balancing over *backends* (``127.0.0.1:port`` of each replica)."""

    def __init__(self, root: Path, backends: Sequence[str], *, port: int | None = None, check: str = "/readyz") -> None:
        self.root, self.backends, self.check = root, list(backends), check
        self.port = port or free_port()
        self.config_path = root / "haproxy.cfg"
        self.admin = root / "admin.sock"
        self._proc = Proc(["/usr/sbin/haproxy", "-db", "-f", self.config_path], root / "haproxy.log", name="haproxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Write the configuration, start HAProxy and wait until a replica answers through it."""
        require_tool("/usr/sbin/haproxy", "haproxy")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(loopback_config(SHIPPED.read_text(), self.port, self.backends, self.admin,
                                                     self.check))
        self._proc.start()
        deadline = time.monotonic() + START_TIMEOUT
        while wait_http(f"{self.url}/v2/", START_TIMEOUT, alive=self._proc).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica answered through HAProxy; log tail:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self) -> int | None:
        return self._proc.stop()

    def states(self) -> dict[str, str]:
        """``{server name: status}`` of the backend (``UP``, ``DOWN``, ``UP 1/2``...), from ``show stat``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.admin))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "mirrors"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

    def log_tail(self, lines: int = 60) -> str:
        return self._proc.log_tail(lines)

"""Run a real Prometheus (Debian's ``prometheus`` package) on loopback, and read the Grafana dashboard.

:class:`Prometheus` scrapes the given targets every second and loads the given rule files;
:meth:`Prometheus.query` asks its HTTP API.  :func:`panel_queries` lists every query of a
dashboard JSON with Grafana's variables replaced, as Grafana would send them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from .procs import Proc, free_port, require_tool
from .service import Service

START_TIMEOUT = 30.0
#: What Grafana's built-in interval variables become in a query (a 1 s scrape interval is assumed).
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


class Prometheus(Service):
    """One prometheus server with its own data directory, scraping *targets* (``HOST:PORT``) every
    *interval* seconds (a scrape may take as long)."""

    def __init__(self, root: Path, targets: Sequence[str], *, job: str = "mirror",
                 rule_files: Sequence[Path] = (), interval: int = 1) -> None:
        self.binary = require_tool("prometheus", "prometheus")
        self.root = root
        self.port = free_port()
        self.config_path = root / "prometheus.yml"
        config = {
            "global": {"scrape_interval": f"{interval}s", "scrape_timeout": f"{interval}s",
                       "evaluation_interval": "1s"},
            "rule_files": [os.fspath(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self._proc = Proc([
            self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ], root / "prometheus.log", name="prometheus")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start and wait until it says it is ready."""
        self._proc.start()
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                if not self._proc.running:
                    raise RuntimeError(f"prometheus exited: {self._proc.log_tail()}")
                try:
                    if http.get(f"{self.url}/-/ready").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self._proc.stop()
                    raise RuntimeError(f"prometheus not ready in {START_TIMEOUT}s: {self._proc.log_tail()}")
                time.sleep(0.1)

    def stop(self) -> None:
        self._proc.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self._proc.log_tail(lines)

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer; raises ``QueryError`` with Prometheus's message."""
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0, trust_env=False)
        doc = answer.json()
        if doc.get("status") != "success":
            raise QueryError(f"{doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one series) for *expr* now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The single value of *expr*, or None when it has no series."""
        found = self.query(expr)
        return float(found[0]["value"][1]) if found else None


class QueryError(Exception):
    """Prometheus refused a query."""


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows keep their panels inside


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every Prometheus query of the dashboard's panels, variables substituted (multi-value ones by ``.*``)."""
    values = dict(GRAFANA_INTERVALS)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "datasource":
            values[variable["name"]] = variable.get("allValue") or ".*"

    def substitute(expr: str) -> str:
        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)",
                      lambda m: values.get(m.group(1) or m.group(2), m.group(0)), expr)

    found = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append(PanelQuery(panel.get("title", "?"), target.get("refId", "?"), substitute(target["expr"])))
    return found

"""Request accounting from docker-registry's own log.

distribution 2.8 logs one logrus text-format line per request once the
response is complete, for example::

    time="..." level=info msg="response completed" ... http.request.method=GET
    http.request.uri="/v2/library/small/blobs/sha256:..." ...
    http.response.status=200 http.response.written=1049149

Failed requests use ``level=error msg="response completed with error"``.
Values are quoted (Go ``%q``) only when they hold characters outside
``[A-Za-z0-9-._/@^+]``, so a URI with a digest is quoted and a tag URI is
not.  The line is written after the handler returns, i.e. possibly a moment
after the client has read the whole body: :meth:`AccessLog.settle` waits
until the log is quiet before counting.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .matching import PathMatch, request_matches

_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)')
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_COMPLETED = ("response completed", "response completed with error")


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "xuU" and len(code) > 1:
        return chr(int(code[1:], 16))
    return _SIMPLE_ESCAPES.get(code, code)


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one logrus text-format line into ``{key: unquoted value}``."""
    fields = {}
    for key, raw in _PAIR.findall(line):
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = _ESCAPE.sub(_unescape, raw[1:-1])
        fields[key] = raw
    return fields


@dataclass(frozen=True)
class AccessEntry:
    """One completed request as docker-registry logged it."""

    method: str
    uri: str
    status: int
    written: int
    request_id: str

    @property
    def path(self) -> str:
        """The URI without its query string."""
        return self.uri.partition("?")[0]

    def matches(self, method: str | None, path: PathMatch, status: int | None = None) -> bool:
        """True if method (None: any), path (see :mod:`.matching`) and status match."""
        return request_matches(self.method, self.path, self.status, method, path, status)


_UVICORN = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


def parse_uvicorn_entry(line: str) -> AccessEntry | None:
    """An :class:`AccessEntry` for one line of the mirror's access log, else None: its JSON lines
    (``{"method": "POST", "path": "/v2/a/blobs/uploads/", "query": "mount=...", "status": 201,
    "bytes": 0, "request_id": ...}``) or uvicorn's own::

        INFO:     127.0.0.1:38190 - "POST /v2/a/blobs/uploads/?mount=sha256%3A...&from=b HTTP/1.1" 201 Created

    The URI is kept as sent (percent-encoded query); uvicorn does not log ``written`` (0 then).
    """
    if line.startswith("{"):
        try:
            doc = json.loads(line)
            uri = doc["path"] + (f"?{doc['query']}" if doc.get("query") else "")
            return AccessEntry(method=doc["method"], uri=uri, status=int(doc["status"]),
                               written=int(doc.get("bytes") or 0), request_id=str(doc.get("request_id", "")))
        except (ValueError, KeyError, TypeError):
            return None
    m = _UVICORN.search(line)
    if m is None:
        return None
    return AccessEntry(method=m["method"], uri=m["uri"], status=int(m["status"]), written=0, request_id="")


def parse_entry(line: str) -> AccessEntry | None:
    """An :class:`AccessEntry` for a "response completed" line, else None."""
    if "response completed" not in line:
        return None
    fields = parse_logfmt(line)
    if fields.get("msg") not in _COMPLETED or "http.request.method" not in fields:
        return None
    return AccessEntry(
        method=fields["http.request.method"],
        uri=fields.get("http.request.uri", ""),
        status=int(fields.get("http.response.status", "0")),
        written=int(fields.get("http.response.written", "0")),
        request_id=fields.get("http.request.id", ""),
    )


class AccessLog:
    """Counts requests from a docker-registry log file.

    :meth:`clear` moves a baseline to the current end of the log, so later
    counts only see newer requests.  By default every query first calls
    :meth:`settle`.
    """

    def __init__(self, path: Path, parse: Callable[[str], AccessEntry | None] = parse_entry) -> None:
        self.path = path
        self.parse = parse
        self._baseline = 0

    def _read(self) -> tuple[list[AccessEntry], int]:
        """Entries after the baseline, and the offset just past the last full line."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._baseline)
                data = handle.read()
        except FileNotFoundError:
            return [], self._baseline
        complete = data[: data.rfind(b"\n") + 1]
        entries = [
            entry
            for line in complete.decode("utf-8", "replace").splitlines()
            if (entry := self.parse(line)) is not None
        ]
        return entries, self._baseline + len(complete)

    def settle(self, quiet: float = 0.2, timeout: float = 10.0) -> list[AccessEntry]:
        """Wait until no new entry appeared for *quiet* seconds; return entries."""
        entries, _ = self._read()
        stable_since = time.monotonic()
        deadline = stable_since + timeout
        while time.monotonic() - stable_since < quiet and time.monotonic() < deadline:
            time.sleep(0.02)
            newer, _ = self._read()
            if len(newer) != len(entries):
                entries, stable_since = newer, time.monotonic()
        return entries

    def clear(self) -> None:
        """Forget all requests logged so far (after letting the log settle)."""
        self.settle()
        _, self._baseline = self._read()

    def requests(self, *, wait: bool = True) -> list[AccessEntry]:
        """All entries since the last :meth:`clear` (settled first if *wait*)."""
        return self.settle() if wait else self._read()[0]

    def count(self, method: str | None, path: PathMatch, status: int | None = None,
              *, wait: bool = True) -> int:
        """How many requests matched *method* (None: any), *path* and *status*."""
        return sum(entry.matches(method, path, status) for entry in self.requests(wait=wait))

    def bytes_served(self, path: PathMatch, *, wait: bool = True) -> int:
        """Body bytes written by GET requests whose path matches *path*.

        HEAD requests are left out: the registry logs a "written" count for
        them although no body goes on the wire.
        """
        return sum(
            entry.written
            for entry in self.requests(wait=wait)
            if entry.method == "GET" and entry.matches(None, path)
        )

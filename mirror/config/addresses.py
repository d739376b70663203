"""Configuration values that are network addresses: ``HOST:PORT`` to listen on, and http(s) URLs.

Parsers as in ``config/values.py``: the raw value in, the text out, ``ValueError`` with a short reason.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit


def parse_listen(value: Any) -> str:
    host, sep, port = str(value).strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:5000")
    return f"{host.strip('[]') or '0.0.0.0'}:{int(port)}"


def parse_url(value: Any, credentials: str = "set upstream.username and upstream.password") -> str:
    """An http(s) URL without user info; *credentials* says where they go instead."""
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"}:
        raise ValueError("expected an http:// or https:// URL")
    if "@" in text:  # user info, even one whose password holds a / (urlsplit ends the host there)
        raise ValueError(f"credentials do not belong in the URL; {credentials}")
    if ("::" in parts.netloc or parts.netloc.count(":") > 2) and not parts.netloc.startswith("["):
        parts = parts._replace(netloc=_bracketed(parts.netloc))
        text = parts.geturl()
    if not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("a query (?...) or fragment (#...) does not belong in the URL")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port when it is read)
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    return text


def parse_upstream_url(value: Any) -> str:
    """An upstream registry's URL (:func:`parse_url`): its root, a path prefix included; the API's
    own ``/v2`` at its end is dropped (``https://host/prefix/v2/`` is ``https://host/prefix``), as
    containerd takes a host's path: the mirror adds ``/v2/`` to every request."""
    text = parse_url(value)
    return text.removesuffix("/v2") if urlsplit(text).path.endswith("/v2") else text


def _bracketed(netloc: str) -> str:
    """``fd00::7:5000`` as ``[fd00::7]:5000``: an IPv6 address as Kubernetes' ``$(POD_IP)`` and
    ``hostname -i`` give it, with a port after it; the port is what follows the last colon.
    RFC 3986 3.2.2 puts the address in brackets; without a port it cannot be told from one."""
    address, _, port = netloc.rpartition(":")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        address = ""
    if not address or not port.isdigit():
        raise ValueError("an IPv6 address goes in brackets, followed by the port: http://[fd00::7]:5000")
    return f"[{address}]:{port}"

"""The ASGI extensions blob responses may use, when the server offers them in ``scope["extensions"]``.

``http.response.zerocopysend``: ``{"type": EXTENSION, "file": fd, "offset": o, "count": n,
"more_body": False}`` after ``http.response.start`` (with a ``Content-Length``): the server
sends the file's bytes itself (``sendfile(2)``).  ``mirror.response.abort``: ``{"type": ABORT}``
ends a response whose body cannot be finished, closing the connection.  The server side is
``server/zerocopy.py``; apps check :func:`available` and otherwise send ordinary body messages.
"""

from __future__ import annotations

from starlette.types import Scope

EXTENSION = "http.response.zerocopysend"


ABORT = "mirror.response.abort"


def available(scope: Scope, extension: str = EXTENSION) -> bool:
    return extension in (scope.get("extensions") or {})

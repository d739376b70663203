"""How a configuration error quotes a value it refuses: secrets never, user-info of URLs hidden."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def redact(text: str) -> str:
    """Hide the user-info part of URLs in a message (``https://user:token@host`` -> ``https://***@host``;
    a password may hold a ``/``), and their query and fragment (``?token=...`` -> ``?***``)."""
    return re.sub(r"(https?://[^\s?#'\"]*)[?#][^\s'\"]*", r"\1?***", re.sub(r"//[^@\s]*@", "//***@", text))


def shown(value: Any, *, secret: bool, names_file: bool) -> str:
    """*value* as a configuration error quotes it: a secret never; a key naming a secret's file only if
    it looks like a path whose first directory exists (one that does not may be the secret itself, given by
    mistake: an S3 secret key may start with ``/``)."""
    if secret:
        return "***"
    if names_file and not re.fullmatch(r"[/.~][^\s=]*", str(value)):
        return "(not shown: not a path, and maybe the secret itself)"
    if names_file and not _directory_exists(str(value)):
        return "(not shown: no such directory, and maybe the secret itself)"
    return redact(repr(value))


def _directory_exists(path: str) -> bool:
    """Whether *path* exists, or its first directory does (``/run`` of ``/run/secrets/key``; not ``/``)."""
    named = Path(path).expanduser()
    try:
        return named.exists() or (len(named.parts) > 2 and Path(*named.parts[:2]).is_dir())
    except OSError:
        return False

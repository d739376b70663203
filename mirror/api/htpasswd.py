"""Users from an htpasswd file of bcrypt entries, as ``htpasswd -B`` writes them.

Only bcrypt (``$2y$``, ``$2b$``, ``$2a$``) is accepted: the other kinds ``htpasswd`` can write
(MD5 ``$apr1$``, ``{SHA}``, ``crypt``, SHA-256/512 ``$5$``/``$6$``, plain text) are too weak
or too fast to guess, and a file holding one is refused at start-up with a message naming
the line.  The file is read again when it changes (looked at no more than once a second);
a broken edit at run time is logged and the users read before stay in force.

Checking a password costs one bcrypt round (milliseconds to tens of milliseconds, by cost):
run :meth:`Htpasswd.verify` in a worker thread.  A successful check is remembered (keyed by
an HMAC under a per-process random key, with the stored hash, so an edited entry no longer
matches), so a client that sends its credentials with every request pays bcrypt once.
Unknown users cost the same bcrypt round as known ones, and bcrypt compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

import bcrypt

log = logging.getLogger("mirror.api.auth")

RELOAD_INTERVAL = 1.0
#: bcrypt reads at most 72 bytes of a password; htpasswd -B does the same.
BCRYPT_MAX_PASSWORD = 72
_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_PREFIXES = [("$apr1$", "an MD5 ($apr1$)"), ("{SHA}", "a SHA-1 ({SHA})"), ("$5$", "a SHA-256 crypt ($5$)"),
             ("$6$", "a SHA-512 crypt ($6$)"), ("$1$", "an MD5 crypt ($1$)")]
_DES_RE = re.compile(r"[./A-Za-z0-9]{13}")
_MAX_REMEMBERED = 4096


class HtpasswdError(Exception):
    """The htpasswd file cannot be read or holds an entry this server refuses."""


def parse_htpasswd(text: str, source: str) -> dict[str, bytes]:
    """``{user: bcrypt hash}`` from the text of an htpasswd file; HtpasswdError names the bad line."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(f"{source} line {number}: expected USER:HASH")
        if not _BCRYPT_RE.fullmatch(stored):
            kind = _kind(stored)
            raise HtpasswdError(f"{source} line {number}: user {user!r} has {kind} password hash; only bcrypt "
                                f"is supported: write the entry with htpasswd -B")
        users[user] = stored.encode("ascii")
    return users


def _kind(stored: str) -> str:
    for prefix, name in _PREFIXES:
        if stored.startswith(prefix):
            return name
    return "a DES crypt" if _DES_RE.fullmatch(stored) else "a plain-text or unknown"


class Htpasswd:
    """The users of one htpasswd file, reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._key = secrets.token_bytes(32)
        self._remembered: set[bytes] = set()
        # Unknown users are checked against this, so they cost what known users cost.
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=10))
        self._load(initial=True)

    def has_user(self, user: str) -> bool:
        self._maybe_reload()
        return user in self._users

    def _load(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            message = f"cannot read the htpasswd file {self.path}: {getattr(exc, 'strerror', None) or exc}"
            if initial:
                raise HtpasswdError(message) from None
            log.error("%s; keeping the %d users read before", message, len(self._users))
            return
        try:
            users = parse_htpasswd(text, str(self.path))
        except HtpasswdError as exc:
            if initial:
                raise
            log.error("%s; keeping the %d users read before", exc, len(self._users))
            users = None
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if users is not None:
            if not initial:
                log.info("reloaded %s: %d users", self.path, len(users))
            # Remembered passwords stay: each is bound to its user's hash, so a changed or removed
            # entry no longer matches, while the others' users keep working through a throttle.
            self._users = users

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_INTERVAL:
            return
        with self._lock:
            if now - self._checked < RELOAD_INTERVAL:
                return
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._load()

    def _token(self, user: str, password: bytes, stored: bytes) -> bytes:
        return hmac.new(self._key, b"\0".join((user.encode(), password, stored)), hashlib.sha256).digest()

    def remembered(self, user: str, password: str) -> bool:
        """True when this password was verified for this user before (cheap: no bcrypt)."""
        self._maybe_reload()
        stored = self._users.get(user)
        secret = password.encode()[:BCRYPT_MAX_PASSWORD]
        return stored is not None and self._token(user, secret, stored) in self._remembered

    def verify(self, user: str, password: str) -> bool:
        """Check a password (blocking: one bcrypt round)."""
        self._maybe_reload()
        stored = self._users.get(user)
        secret = password.encode()[:BCRYPT_MAX_PASSWORD]
        if stored is None:
            bcrypt.checkpw(secret, self._dummy)
            return False
        token = self._token(user, secret, stored)
        if token in self._remembered:
            return True
        try:
            ok = bcrypt.checkpw(secret, stored)
        except ValueError:
            return False
        if ok:
            if len(self._remembered) >= _MAX_REMEMBERED:
                self._remembered = set()
            self._remembered.add(token)
        return ok

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
from collections import Counter
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
        self._dummy = b""
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
            self._dummy = _dummy_hash(users)

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


def _dummy_hash(users: dict[str, bytes]) -> bytes:
    """What an unknown user's password is checked against, so that it costs what a known user's
    does (CWE-208: no telling users apart by the time an answer takes): a hash of a random password
    at the cost most of *users*' hashes have (``htpasswd -B`` writes 5; 10 when there is none)."""
    costs = Counter(int(part) for stored in users.values()
                    if len(parts := stored.split(b"$")) > 2 and (part := parts[2]).isdigit() and 4 <= int(part) <= 31)
    rounds = costs.most_common(1)[0][0] if costs else 10
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=rounds))


#: Failed password checks from one client address within FAILED_LOGIN_WINDOW seconds before it is throttled.
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW = 60.0


class FailedLogins:
    """Failed password checks per client address, over a sliding window (one process's view), and the
    checks under way: a check waits while those could reach the limit (:meth:`busy`), so that
    concurrent guesses cannot all start before the first failure is counted."""

    def __init__(self, limit: int = MAX_FAILED_LOGINS, window: float = FAILED_LOGIN_WINDOW,
                 max_addresses: int = 10000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, list[float]] = {}
        self._checking: dict[str, int] = {}

    def wait(self, address: str, now: float | None = None) -> float:
        """Seconds until *address* may have a password checked again (0: now)."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self._failures.get(address, ()) if t > now - self.window]
        if recent:
            self._failures[address] = recent
        else:
            self._failures.pop(address, None)
        return recent[0] + self.window - now if len(recent) >= self.limit else 0.0

    def failed(self, address: str, now: float | None = None) -> None:
        """Count a failed check of *address*'s."""
        now = time.monotonic() if now is None else now
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            for stale in [a for a, times in self._failures.items() if times[-1] <= now - self.window]:
                del self._failures[stale]
            if len(self._failures) >= self.max_addresses:  # still full: forget the oldest address
                del self._failures[next(iter(self._failures))]
        self._failures.setdefault(address, []).append(now)

    def busy(self, address: str) -> bool:
        """Whether the checks of *address*'s under way could, failing, reach the limit: another one waits."""
        recent = len(self._failures.get(address, ()))
        return recent + self._checking.get(address, 0) >= self.limit

    def begin(self, address: str) -> None:
        """A check of *address*'s starts (:meth:`end` it)."""
        self._checking[address] = self._checking.get(address, 0) + 1

    def end(self, address: str, failed: bool) -> None:
        """A check of *address*'s ended, *failed* or not."""
        left = self._checking.get(address, 1) - 1
        if left > 0:
            self._checking[address] = left
        else:
            self._checking.pop(address, None)
        if failed:
            self.failed(address)

"""What a PostgreSQL DSN (``metadata.postgres.dsn``) gets wrong, read as libpq reads it, in words that
never quote its password."""

from __future__ import annotations

import re

#: Where libpq's connection parameters are listed.
LIBPQ_PARAMETERS = "https://www.postgresql.org/docs/15/libpq-connect.html#LIBPQ-PARAMKEYWORDS"


def dsn_problem(dsn: str) -> str | None:
    """Why libpq cannot connect with *dsn* (a connection string or a postgresql:// URL), as far as
    reading it tells, without its password; None if nothing is wrong there."""
    from psycopg import conninfo  # libpq's own reading of it (loaded only when a DSN is used)

    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except Exception as exc:  # the library's message may quote the DSN, password included
        if m := re.fullmatch(r'invalid (?:connection option|URI query parameter:) "([a-z_]{1,40})"', str(exc).strip()):
            return f"libpq has no connection option {m.group(1)!r} (the parameters: {LIBPQ_PARAMETERS})"
        return "not a libpq connection string or postgresql:// URL"
    url = dsn.lstrip().startswith(("postgresql://", "postgres://"))
    # In a URL, an @, : or / of the password ends the user info, the host or the port early: what
    # follows (the real @host included) is read as the host, the port or the database.
    if url and any("@" in str(parts.get(key) or "") for key in ("host", "port", "dbname")):
        return ("percent-encode the password (an @, : or / in it is read as the end of the user info, the host"
                " or the port: write %40, %3A, %2F)")
    port = next((p for p in str(parts.get("port") or "").split(",") if p and not p.isdigit()), None)
    if port is not None and url and "user" not in parts and "password" not in parts:
        return "the port after the host is not a number"  # no @: this "port" may be a password (user:password)
    return f"port {port!r} is not a number" if port is not None else None


def dsn_key(postgres_dsn_file: object) -> str:
    """The key a DSN was set by, for messages: ``metadata.postgres.dsn_file`` (and its path) when it was read from
    a file, not the ``metadata.postgres.dsn`` the user never wrote."""
    return f"metadata.postgres.dsn_file ({postgres_dsn_file})" if postgres_dsn_file else "metadata.postgres.dsn"

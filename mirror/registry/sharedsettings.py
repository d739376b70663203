"""That the replicas of a cluster share the settings by which each acts on the whole shared store:
``cache`` (the budget, its watermarks, eviction), ``gc``, ``push.upload_ttl`` and ``admin.token_file``.

They are compared as the access settings are (``sharedsecret.py``): the settings' fingerprint
(:func:`fleet_settings`) is the holder of the lease :data:`SETTINGS_LEASE`, kept while a replica runs,
and a replica starting while replicas of another fingerprint hold it says so in one error naming the
settings that differ (:func:`say_differ`).  It still starts: another cache budget or gc schedule
corrupts nothing (one replica evicts or expires for all, earlier than the others would), and operators
change these with a rolling restart, during which old and new replicas run side by side.  The admin
token is compared by an HMAC of its content keyed by it (as ``cluster.secret_file`` is): neither the
token nor that check is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from ..config.sections import Config

log = logging.getLogger("mirror.cluster")

#: The lease whose holder is the replicas' fleet settings (:func:`fleet_settings`).
SETTINGS_LEASE = "cluster-settings"
#: The key of the admin token's check in :func:`fleet_settings`.
TOKEN = "admin.token_file"


def fleet_settings(config: Config) -> str:
    """The settings every replica needs the same of, as JSON (keys sorted); the admin token as an HMAC
    of a fixed text under it (``"not set"`` without one)."""
    cache, gc, token = config.cache, config.gc, config.admin.token_file
    return json.dumps({"cache.max_size": cache.max_size, "cache.high_watermark": cache.high_watermark,
                       "cache.low_watermark": cache.low_watermark, "cache.unused_for": cache.unused_for,
                       "cache.keep_recent": cache.keep_recent, "cache.tag_ttl": cache.tag_ttl,
                       "gc.interval": gc.interval, "gc.grace": gc.grace, "push.upload_ttl": config.push.upload_ttl,
                       TOKEN: "not set" if token is None else
                       hmac.new(token.value.encode(), b"mirror admin token check", hashlib.sha256).hexdigest()},
                      sort_keys=True)


def differences(mine: str, holder: str) -> str:
    """The settings of *mine* that *holder* (another replica's :func:`fleet_settings`) has otherwise,
    named with both values (the admin token's never shown)."""
    try:
        theirs = json.loads(holder)
    except ValueError:
        theirs = {}
    ours = json.loads(mine)
    return "; ".join(f"{TOKEN} another token there" if key == TOKEN and "not set" not in (ours[key], theirs.get(key))
                     else f"{key} {json.dumps(theirs.get(key))} there, {json.dumps(ours[key])} here"
                     for key in sorted(ours) if theirs.get(key) != ours[key])


def say_differ(mine: str, holder: str) -> None:
    """Log, as one error, that the running replicas' fleet settings (*holder*) are not this one's (*mine*)."""
    log.error("the replicas running on this database have other cache, gc, push or admin settings (%s): every "
              "replica needs the same, as each one's collector, eviction and upload expiry act on the whole shared "
              "store (this replica starts all the same; while a rolling change of them is under way, each replica "
              "started with the new ones says this)", differences(mine, holder))

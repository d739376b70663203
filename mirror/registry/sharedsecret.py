"""That the replicas of a cluster share one ``cluster.secret_file``: a replica started with another
is refused at start-up, not left in the load balancer's rotation answering ``503`` whenever another
replica fetches what its clients ask for (every request it signs is refused, and it refuses theirs).

The secret itself never leaves the process.  Its check, ``HMAC-SHA256(secret, "mirror cluster secret
check")`` (hex, 64 characters), is the holder of the lease :data:`LEASE` in the index
(:class:`~mirror.metadata.driver.Lease`, ``cluster.lease_ttl``): some replica of the secret keeps it
(:func:`keep_claim`, every third of the TTL, taking it over when it expired), and a replica starting
while it is held under another check is refused (:func:`secret_problem`), and so is a mirror without
``cluster`` settings while it is held at all.  A replica stopping gives the claim up (another one
running takes it again).  Changing the secret on purpose: stop every replica (one killed: wait one
``cluster.lease_ttl``), start them with the new one.

A replica's ``cluster.advertise`` URL is its name to the others: the lease ``replica:<URL>`` is held
by the running replica that advertises it (:func:`instance`, one per ``mirror serve``, its workers
included).  A replica starting while another one holds its URL (a configuration copied with the
address unchanged) waits up to ``cluster.lease_ttl`` for it to lapse (a predecessor killed at
that address), then is refused: the other replicas would ask it for the fills of the first.

Replicas share who may do what: the settings that decide it (:func:`access_settings`) are the holder of
the lease :data:`ACCESS_LEASE`, kept as the secret's claim is, and a replica starting with others
while it is held is refused (:func:`access_problem`), naming the settings that differ.  Behind a load
balancer, a request one replica refuses would be taken by the next (an anonymous push to a replica
started without ``auth``).  Changing them on purpose: as for the secret, stop every replica first.
The settings by which each replica acts on the whole store (``cache``, ``gc``, ``push.upload_ttl``,
``admin.token_file``) are held and compared the same way, but said, not refused (``sharedsettings.py``).

A mirror without ``cluster`` settings on a database that hosts share (PostgreSQL) holds the lease
:data:`ALONE_LEASE` while it runs (:func:`keep_alone`): another one holding it for :data:`LASTING`
leases' TTLs is said as a warning (two such mirrors on one bucket mark no reads in use for each other's
collector, nor follow each other's fills), as are a cluster's replicas beside it, by it and by them
(:func:`keep_claim`).  Not at once: a rollout's surge pod runs beside the one it
replaces for a moment (its drain), then holds it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time

from ..config.sections import ClusterConfig, Config
from ..metadata.driver import Lease, Metadata, MetadataUnavailable
from ..metadata.holders import RUNNING_TTLS, new_instance, running_lease
from ..observe.said import first_to_say
from .reads import in_index_thread
from .sharedsettings import SETTINGS_LEASE, fleet_settings, say_differ

log = logging.getLogger("mirror.cluster")

#: The lease whose holder is the check of the cluster's secret.
LEASE = "cluster-secret"
#: The lease whose holder is the replicas' access settings (:func:`access_settings`).
ACCESS_LEASE = "cluster-access"
#: The lease held by a mirror without ``cluster`` settings on a database that hosts share.
ALONE_LEASE = "instance-without-cluster"
#: How many ``cluster.lease_ttl`` another such mirror holds :data:`ALONE_LEASE` before it is said.
LASTING = 8
#: The environment variable naming this ``mirror serve``'s instance for its worker processes.
INSTANCE = "MIRROR_SERVE_INSTANCE"


def instance() -> str:
    """This replica's instance: host, pid of ``mirror serve`` and a random part, made once by that
    process and handed to its workers through the environment (:data:`INSTANCE`)."""
    return os.environ.get(INSTANCE) or os.environ.setdefault(INSTANCE, new_instance())


def address_lease(config: ClusterConfig) -> str:
    """The name of the lease by which a running replica holds its ``cluster.advertise`` URL."""
    return f"replica:{config.advertise}"


def address_problem(config: ClusterConfig, metadata: Metadata) -> str | None:
    """Why this replica may not take its ``cluster.advertise`` URL, or None (and it is taken): another
    running replica holds it past ``cluster.lease_ttl`` (and one more second).  Blocking."""
    assert config.advertise is not None
    name, mine = address_lease(config), instance()
    deadline, said = time.monotonic() + config.lease_ttl + 1.0, False
    while (current := metadata.current_lease(name)) is None or current.holder != mine:
        if current is None and metadata.take_lease(name, mine, config.lease_ttl) is not None:
            return None
        if current is not None and not said:  # a replica killed at this address, or a copied configuration
            log.info("cluster.advertise %s is held by %s: waiting up to %.0fs for it to lapse", config.advertise,
                     current.holder, config.lease_ttl + 1.0)
            said = True
        if time.monotonic() > deadline:
            return (f"cluster.advertise {config.advertise}: another replica running on this database advertises "
                    f"the same address ({current.holder if current else 'just taken'}); each replica needs its "
                    "own, the URL the other replicas reach it at")
        time.sleep(0.25)
    return None


def secret_check(secret: str) -> str:
    """What the index keeps of *secret*: an HMAC of a fixed text under it (it tells nothing of it)."""
    return hmac.new(secret.encode(), b"mirror cluster secret check", hashlib.sha256).hexdigest()


def claim(metadata: Metadata, check: str, ttl: float, held: Lease | None,
          name: str = LEASE) -> tuple[Lease | None, bool]:
    """Renew *held*, or take the lease *name* when it is free; return the lease now held (None if a
    sibling holds it) and whether the holder is a replica of another *check* (blocking: index calls)."""
    if held is not None and (renewed := metadata.renew_lease(held, ttl)) is not None:
        return renewed, False
    current = metadata.current_lease(name)
    if current is None and (taken := metadata.take_lease(name, check, ttl)) is not None:
        return taken, False
    current = current or metadata.current_lease(name)
    return None, current is not None and current.holder != check


def access_settings(config: Config) -> str:
    """The settings that decide who may pull, push and delete, as JSON (keys sorted): whether users
    are configured (``auth.htpasswd.path``; not the file's users, which may change while it runs),
    ``auth.anonymous_pull``, ``auth.push_users``, ``auth.admins``, ``push.enabled``, ``push.prefixes``,
    ``push.over_cache``, ``delete.enabled``."""
    auth, push = config.auth, config.push
    return json.dumps({"auth.htpasswd.path": "set" if auth.enabled else "not set",
                       "auth.anonymous_pull": auth.anonymous_pull, "auth.push_users": sorted(auth.push_users),
                       "auth.admins": sorted(auth.admins), "push.enabled": push.enabled,
                       "push.prefixes": sorted(push.prefixes), "push.over_cache": push.over_cache,
                       "delete.enabled": config.delete.enabled}, sort_keys=True)


def access_problem(config: Config, metadata: Metadata) -> str | None:
    """Why this replica may not start with its access settings, or None (and their lease taken, or a
    sibling's found): the replicas running on this database have others.  Blocking."""
    mine = access_settings(config)
    _, other = claim(metadata, mine, config.cluster.lease_ttl, None, ACCESS_LEASE)
    if not other or (current := metadata.current_lease(ACCESS_LEASE)) is None:
        return None
    try:
        theirs = json.loads(current.holder)
    except ValueError:
        theirs = {}
    ours = json.loads(mine)
    differ = "; ".join(f"{key} {json.dumps(theirs.get(key))} there, {json.dumps(ours[key])} here"
                       for key in sorted(ours) if theirs.get(key) != ours[key])
    return (f"the replicas running on this database have other access settings ({differ}): every replica needs "
            "the same, else a request one refuses the next allows; to change them, stop every replica, wait "
            f"cluster.lease_ttl ({config.cluster.lease_ttl:g}s), and start them with the new ones")


def secret_problem(settings: Config, metadata: Metadata) -> str | None:
    """Why this replica may not start with its ``cluster.secret_file``, its access settings
    (:func:`access_problem`) or its ``cluster.advertise`` (:func:`address_problem`), or None (and the
    claims taken, or a sibling's found); for a mirror without ``cluster``, why it may not start beside the
    replicas of a cluster on the same database (they hold the claim).  Blocking.

    A replica's upstreams (registry -> URL) are recorded in the index, and a warning logged when
    the replica started before had others: replicas share each registry's tags and manifests, so one
    fetching a registry from elsewhere serves its manifests to all, whose blobs their upstream may
    not have (a rolling change of upstream warns once, harmlessly)."""
    config, upstreams = settings.cluster, {u.registry: u.url for u in settings.upstreams}
    instance()  # made by ``mirror serve`` itself, for its workers to share
    if not config.enabled or config.secret_file is None:
        if (held := metadata.current_lease(LEASE)) is None:
            return None
        left = held.expires - getattr(metadata, "clock", time.time)()
        return ("the replicas of a cluster run on this database: a mirror beside them needs cluster.advertise (its "
                "own address) and their cluster.secret_file, else it fetches again what they fetch and its reads "
                "are not marked in use for their collectors (if none runs any more, their claim lapses in "
                f"{max(left, 0):.0f}s)")
    _, other = claim(metadata, secret_check(config.secret_file.value), config.lease_ttl, None)
    if not other and (problem := access_problem(settings, metadata) or address_problem(config, metadata)):
        return problem
    if not other:  # said, not refused (sharedsettings.py)
        _, differs = claim(metadata, fleet := fleet_settings(settings), config.lease_ttl, None, SETTINGS_LEASE)
        if differs and (current := metadata.current_lease(SETTINGS_LEASE)) is not None:
            say_differ(fleet, current.holder)
    swap = getattr(metadata, "swap_setting", None)
    if not other and swap is not None \
            and (before := swap("upstreams", upstreams)) not in (None, upstreams):
        log.warning("the replica that started before this one on this database fetched %s; this one fetches %s: "
                    "replicas share each registry's tags and manifests, so give them all the same upstreams",
                    _shown(before), _shown(upstreams))
    if not other:
        return None
    return (f"cluster.secret_file {config.secret_file.path}: the replicas running on this database use another "
            "secret; every replica needs the same file (to change it on purpose, stop every replica, wait "
            f"cluster.lease_ttl ({config.lease_ttl:g}s), and start them with the new one)")


def _shown(upstreams: dict[str, str]) -> str:
    return ", ".join(f"{registry} from {url}" for registry, url in sorted(upstreams.items()))


async def keep_claim(settings: Config, metadata: Metadata) -> None:
    """Keep the claims of this replica's secret and access settings while the server runs (until
    cancelled); a replica of another secret or other settings holding them is said as an error, once
    until it goes."""
    config, access = settings.cluster, access_settings(settings)
    assert config.secret_file is not None
    check, held, said, twin = secret_check(config.secret_file.value), None, False, None
    access_held, access_said = None, False
    fleet, fleet_held = fleet_settings(settings), None
    alone = _Beside(_lasting(settings))
    try:
        while True:
            try:
                held, other = await in_index_thread(claim, metadata, check, config.lease_ttl, held)
                access_held, access_other = await in_index_thread(claim, metadata, access, config.lease_ttl,
                                                                  access_held, ACCESS_LEASE)
                fleet_held, _ = await in_index_thread(claim, metadata, fleet, config.lease_ttl, fleet_held,
                                                      SETTINGS_LEASE)  # other ones are said as a replica starts
            except MetadataUnavailable:  # said where requests need it; claimed again once it answers
                held, other, access_held, access_other, fleet_held = None, False, None, False, None
            if access_other and not access_said:
                log.error("replicas with other access settings (auth, push, delete) run on this database: a "
                          "request one refuses the next may allow; give every replica the same settings")
            access_said = access_other
            with contextlib.suppress(MetadataUnavailable):
                if (other_holder := await in_index_thread(_keep_address, metadata, config)) not in (None, twin):
                    log.error("another replica running on this database advertises this replica's address %s (%s):"
                              " give each replica its own cluster.advertise", config.advertise, other_holder)
                twin = other_holder
            if other and not said:
                log.error("a replica with another cluster.secret_file holds this database's cluster: this "
                          "replica's requests to it and its to this one are refused; is %s the same file on every "
                          "replica?", config.secret_file.path)
            said = other
            with contextlib.suppress(MetadataUnavailable):
                if (seconds := alone.seen(lone := await in_index_thread(_alone_holder, metadata))) is not None:
                    log.warning("a mirror without cluster settings (%s) has run on this database for %.0fs beside "
                                "this cluster's replicas: it does not mark its reads in use for their collectors, "
                                "nor they theirs for its; give it the cluster's settings, or stop it", lone, seconds)
            await asyncio.sleep(config.lease_ttl / 3)
    finally:  # stopping: the claim goes with it (another replica running takes it again)
        with contextlib.suppress(Exception):
            await asyncio.shield(in_index_thread(_give_up, metadata, {LEASE: check, ACCESS_LEASE: access,
                                                                       SETTINGS_LEASE: fleet},
                                                 address_lease(config)))


def _keep_address(metadata: Metadata, config: ClusterConfig) -> str | None:
    """Renew this replica's hold on its ``cluster.advertise`` URL (every worker does), or take it
    again if it lapsed (the index was down); the instance of another replica holding it, or None."""
    return _hold_lease(metadata, address_lease(config), instance(), config.lease_ttl)


def _hold_lease(metadata: Metadata, name: str, mine: str, ttl: float) -> str | None:
    """Renew the lease *name* held by *mine*, or take it when it is free; the other holder, or None."""
    current = metadata.current_lease(name)
    if current is None:
        metadata.take_lease(name, mine, ttl)
    elif current.holder == mine:
        metadata.renew_lease(current, ttl)
    else:
        return current.holder
    return None


def _give_up(metadata: Metadata, claims: dict[str, str], address: str) -> None:
    """Release each of *claims* (lease name -> holder) that is still this replica's kind's (whichever
    replica of it took it: start-up's checks take them too), and this replica's address (workers of it
    still running take them again)."""
    for name, check in claims.items():
        current = metadata.current_lease(name)
        if current is not None and current.holder == check:
            metadata.release_lease(current)
    held = metadata.current_lease(address) if address else None
    if held is not None and held.holder == instance():
        metadata.release_lease(held)


class _Beside:
    """Another holder seen beside this mirror, said once it has lasted *lasting* seconds (once per holder,
    by one worker of this server: ``observe/said.py``)."""

    def __init__(self, lasting: float) -> None:
        self.lasting, self.since = lasting, 0.0
        self.other: str | None = None
        self.said: str | None = None

    def seen(self, holder: str | None) -> float | None:
        """How long *holder* (None: nobody) has run beside this mirror, when that is to be said now; else None."""
        now = time.monotonic()
        if holder != self.other:
            self.other, self.since = holder, now
        elif holder is not None and holder != self.said and now - self.since >= self.lasting:
            self.said = holder
            return now - self.since if first_to_say(f"beside {holder}") else None
        return None


def _lasting(settings: Config) -> float:
    """Seconds another mirror runs beside this one before it is said: :data:`LASTING` lease TTLs, and
    longer than a rollout's drain (``http.draintimeout``) lasts."""
    ttl = settings.cluster.lease_ttl
    return max(LASTING * ttl, settings.http.draintimeout + 3 * ttl)


async def keep_alone(settings: Config, metadata: Metadata) -> None:
    """Hold :data:`ALONE_LEASE` and this mirror's running lease (every worker renews them; until cancelled), and warn,
    once per other holder, when another mirror without ``cluster`` settings, or a cluster's replicas
    (:data:`LEASE`), have run on this database for :func:`_lasting` seconds: they share its bucket."""
    ttl, mine = settings.cluster.lease_ttl, instance()
    beside, failed = _Beside(_lasting(settings)), False
    try:
        while True:
            try:
                holder = await in_index_thread(_keep_alone, metadata, mine, ttl)
            except MetadataUnavailable:  # said where requests need it
                holder = beside.other
            except Exception as exc:  # e.g. a standby that refuses writes: said once, tried again
                holder = beside.other
                if not failed:
                    log.warning("cannot hold this mirror's claim in the index: %s", exc)
                failed = True
            if (seconds := beside.seen(holder)) is not None:
                log.warning("%s has run on this database for %.0fs beside this mirror without cluster settings: "
                            "mirrors on one bucket that are not replicas of one cluster do not mark their reads in "
                            "use for each other's collector (one can evict what the other serves) nor follow each "
                            "other's fills; give them all cluster settings (cluster.advertise, "
                            "cluster.secret_file), or stop one", holder, seconds)
            await asyncio.sleep(ttl / 3)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(in_index_thread(_give_up, metadata, {ALONE_LEASE: mine, running_lease(mine): mine},
                                                 ""))


def _keep_alone(metadata: Metadata, mine: str, ttl: float) -> str | None:
    """Renew or take :data:`ALONE_LEASE` and the running lease (``metadata/holders.py``) for *mine*; who
    else runs on the database (another mirror without ``cluster`` settings holding it, or a cluster's
    replicas holding :data:`LEASE`), or None."""
    _hold_lease(metadata, running_lease(mine), mine, RUNNING_TTLS * ttl)  # this one's alone (holders.py)
    other = _hold_lease(metadata, ALONE_LEASE, mine, ttl)  # held beside a cluster too: its replicas say so
    if metadata.current_lease(LEASE) is not None:
        return "the replicas of a cluster"
    return None if other is None else f"another mirror without cluster settings ({other})"


def _alone_holder(metadata: Metadata) -> str | None:
    """The instance of a mirror without ``cluster`` settings running on this database, or None."""
    current = metadata.current_lease(ALONE_LEASE)
    return None if current is None else current.holder

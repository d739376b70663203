"""The contract of a metadata driver (``mirror/metadata/driver.py``): every driver passes this module.

Each test runs once per driver, over a fresh index.  What another process must see is checked
from real other processes (spawned, each opening its own instance over the same data), as the
server's workers, ``mirror gc`` and other replicas would.  Leases are checked against an
injected clock, and for exclusivity and token order from two processes at once.

A new driver adds an opener to :data:`DRIVERS`: a picklable ``(clock or None) -> Metadata``
over data the test owns.  Without a clock a driver times leases by its own (the postgres driver,
by the database's); the other processes open theirs that way.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mirror.metadata.diskcache import DiskcacheMetadata
from mirror.metadata.driver import (
    Lease,
    ManifestRecord,
    Metadata,
    TagRecord,
    UploadRecord,
    UpstreamReferrers,
    local_repo,
)
from mirror.metadata.postgres import PostgresMetadata
from mirror.metadata.records import PinRecord, RecordKind
from mirror.storage.driver import UploadParts
from tests.support.postgres import PostgresServer

Clock = Callable[[], float]
Opener = Callable[..., Metadata]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REPO = "docker.io/library/alpine"
D1, D2, D3 = (f"sha256:{c * 64}" for c in "123")


def open_diskcache(directory: Path, clock: Clock | None = None) -> Metadata:
    return DiskcacheMetadata(directory, clock=clock or time.time)


def open_postgres(dsn: str, clock: Clock | None = None) -> Metadata:
    return PostgresMetadata(dsn, clock=clock)


def _postgres(request: pytest.FixtureRequest, tmp: Path) -> Opener:
    server: PostgresServer = request.getfixturevalue("postgres")
    return functools.partial(open_postgres, server.create_database())


#: name -> given the test's request (for the servers it needs) and a directory of its own, an opener
#: over data that starts empty.
DRIVERS: dict[str, Callable[[pytest.FixtureRequest, Path], Opener]] = {
    "diskcache": lambda request, tmp: functools.partial(open_diskcache, tmp / "index"),
    "postgres": _postgres,
}


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=sorted(DRIVERS))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    return DRIVERS[request.param](request, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def index(opener: Opener, clock: FakeClock) -> Iterator[Metadata]:
    metadata = opener(clock)
    try:
        yield metadata
    finally:
        metadata.close()


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[ProcessPoolExecutor]:
    """Two other processes, started the way a fresh interpreter starts (no inherited connections)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


# -- in another process --

def _call(opener: Opener, method: str, *args: Any, **kwargs: Any) -> Any:
    metadata = opener()
    try:
        return getattr(metadata, method)(*args, **kwargs)
    finally:
        metadata.close()


def _meet(rendezvous: Path, who: int, step: int = 0) -> None:
    """Wait until both processes reached *step* (so what follows runs at the same time)."""
    (rendezvous / f"ready-{step}-{who}").touch()
    deadline = time.monotonic() + 60
    while len(list(rendezvous.glob(f"ready-{step}-*"))) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the other process never came")
        time.sleep(0.005)


def _write_a_lot(opener: Opener, rendezvous: Path, who: int, count: int) -> None:
    metadata = opener()
    try:
        digests = [f"sha256:{who}{i:063d}" for i in range(count)]
        # One kind of write at a time, so that both processes write the same entries at once.
        for phase in range(6):
            _meet(rendezvous, who, phase)
            for i, digest in enumerate(digests):
                if phase == 0:
                    metadata.set_tag(REPO, f"w{who}-{i}", TagRecord(digest, OCI_MANIFEST, float(i)))
                elif phase == 1:
                    metadata.link(f"docker.io/team/w{who}-{i}", [digest])
                elif phase == 2:
                    metadata.add_referrer(REPO, D1, {"digest": digest, "mediaType": OCI_MANIFEST})
                elif phase == 3:
                    metadata.record_access({(REPO, digest): float(i + 1)})
                elif phase == 4:
                    metadata.add_usage(3)
                else:
                    metadata.pin(REPO, digest, now=1.0)
    finally:
        metadata.close()


def _hold_in_turn(opener: Opener, rendezvous: Path, who: int, turns: int, log: Path) -> list[int]:
    """Take the lease *turns* times; under it, do a read-modify-write that a second holder would
    break, and log the token (in the order the holders held it)."""
    metadata = opener()
    tokens = []
    try:
        _meet(rendezvous, who)
        while len(tokens) < turns:
            lease = metadata.take_lease("sha256:filled-once", f"worker-{who}", ttl=60)
            if lease is None:
                time.sleep(0.001)
                continue
            count = metadata.usage()
            with open(log, "a") as out:
                out.write(f"{lease.token}\n")
            time.sleep(0.002)
            metadata.set_usage(count + 1)
            assert metadata.release_lease(lease)
            tokens.append(lease.token)
    finally:
        metadata.close()
    return tokens


# -- tags --

def test_tags_point_move_and_go(index: Metadata) -> None:
    assert index.get_tag(REPO, "3.19") is None and index.tags(REPO) == [] and not index.untag(REPO, "3.19")
    index.set_tag(REPO, "3.19", TagRecord(D1, OCI_MANIFEST, 10.0))
    index.set_tag(REPO, "3.18", TagRecord(D1, OCI_MANIFEST, 11.0))
    index.set_tag(REPO, "latest", TagRecord(D2, OCI_INDEX, 12.0))
    assert index.get_tag(REPO, "3.19") == TagRecord(D1, OCI_MANIFEST, 10.0)
    assert index.tags(REPO) == ["3.18", "3.19", "latest"]
    assert sorted(index.tags_pointing_to(REPO, D1)) == ["3.18", "3.19"]
    assert index.has_repository(REPO) and index.repositories() == [REPO]

    index.set_tag(REPO, "3.19", TagRecord(D3, OCI_MANIFEST, 13.0))  # moves
    assert index.get_tag(REPO, "3.19") == TagRecord(D3, OCI_MANIFEST, 13.0)
    assert index.tags(REPO) == ["3.18", "3.19", "latest"]
    assert index.untag(REPO, "3.18") and index.get_tag(REPO, "3.18") is None
    index.untag_many(REPO, ["latest", "never-there"])
    assert index.tags(REPO) == ["3.19"] and index.tags_pointing_to(REPO, D1) == []
    index.set_tag("docker.io/library/nginx", "1", TagRecord(D1, OCI_MANIFEST, 14.0))
    assert sorted(index.all_tags()) == [
        ("docker.io/library/alpine", "3.19", TagRecord(D3, OCI_MANIFEST, 13.0)),
        ("docker.io/library/nginx", "1", TagRecord(D1, OCI_MANIFEST, 14.0)),
    ]


# -- manifests, links, repositories --

def test_manifest_records_and_links(index: Metadata) -> None:
    assert index.get_manifest(D1) is None and index.manifest_digests() == [] and index.count_manifests() == 0
    index.put_manifest(D1, OCI_MANIFEST, 1234)
    index.put_manifest(D2, OCI_INDEX, 567)
    assert index.get_manifest(D1) == ManifestRecord(OCI_MANIFEST, 1234)
    assert index.get_manifest(D2) == ManifestRecord(OCI_INDEX, 567)
    assert sorted(index.manifest_digests()) == [D1, D2] and index.count_manifests() == 2

    other = "local/team/app"
    index.link(REPO, [D1, D2, D3])
    index.link(other, [D3])
    assert index.is_linked(REPO, D1) and index.is_linked(other, D3) and not index.is_linked(other, D1)
    assert sorted(index.all_links()) == sorted([(REPO, D1), (REPO, D2), (REPO, D3), (other, D3)])
    assert index.repositories() == [REPO, other] and index.has_repository(other)
    assert index.unlink(REPO, D2) and not index.unlink(REPO, D2)
    assert not index.is_linked(REPO, D2)

    index.record_access({(REPO, D1): 5.0})
    index.forget(links=[(REPO, D1), (REPO, "sha256:" + "9" * 64)], manifests=[D1], accesses=[(REPO, D1)])
    assert sorted(index.all_links()) == [(REPO, D3), (other, D3)]
    assert index.manifest_digests() == [D2] and index.get_manifest(D1) is None and index.access_times() == {}


def test_local_marks(index: Metadata) -> None:
    assert not index.is_local("team/app") and index.repositories() == []
    index.mark_local("team/app", 100.0)
    index.mark_local("team/app", 200.0)
    assert index.is_local("team/app") and not index.is_local("team/other")
    assert index.repositories() == [local_repo("team/app")] and index.has_repository("local/team/app")


def test_a_local_name_that_holds_nothing_is_given_back(index: Metadata) -> None:
    """``release_local``: only a name that holds no link, tag or referrer and has no upload left."""
    assert not index.release_local("team/never")  # not local
    names = ["team/linked", "team/tagged", "team/referred", "team/uploading", "team/empty", "team/empty2"]
    for name in names:
        index.mark_local(name, 1.0)
    index.link(local_repo("team/linked"), [D1])
    index.set_tag(local_repo("team/tagged"), "1", TagRecord(D1, OCI_MANIFEST, 1.0))
    index.add_referrer(local_repo("team/referred"), D1, {"digest": D2, "mediaType": OCI_MANIFEST, "size": 1})
    index.put_upload("u" * 32, UploadRecord("team/uploading", 1.0))
    index.put_upload("v" * 32, UploadRecord("team/empty2/more", 1.0))  # another name, which it prefixes
    index.link(local_repo("team/empty2/more"), [D2])
    assert [index.release_local(name) for name in names] == [False, False, False, False, True, True]
    assert not index.is_local("team/empty") and not index.has_repository(local_repo("team/empty"))
    assert local_repo("team/empty") not in index.repositories() and index.is_local("team/linked")
    assert not index.release_local("team/empty")  # once
    index.delete_upload("u" * 32)
    assert index.release_local("team/uploading")
    index.mark_local("team/empty", 2.0)  # pushed to again: local and in the catalog again
    assert index.is_local("team/empty") and local_repo("team/empty") in index.repositories()


def test_a_repository_that_holds_nothing_leaves_the_catalog(index: Metadata) -> None:
    """``release_repository`` (``mirror migrate --delete``): a cached repository, or a pushed one as
    ``release_local`` gives it back, only once nothing is linked, tagged or referred to in it."""
    cached = ["docker.io/library/linked", "docker.io/library/tagged", "docker.io/library/referred",
              "docker.io/library/empty"]
    for repo in cached:
        index.link(repo, [])
    index.link("docker.io/library/linked", [D1])
    index.set_tag("docker.io/library/tagged", "1", TagRecord(D1, OCI_MANIFEST, 1.0))
    index.add_referrer("docker.io/library/referred", D1, {"digest": D2, "mediaType": OCI_MANIFEST, "size": 1})
    index.mark_local("team/empty", 1.0)
    assert not index.release_repository("docker.io/library/never")
    assert [index.release_repository(repo) for repo in cached] == [False, False, False, True]
    assert index.release_repository(local_repo("team/empty")) and not index.is_local("team/empty")
    assert index.repositories() == sorted(cached[:3]) and not index.has_repository("docker.io/library/empty")
    index.unlink("docker.io/library/linked", D1)
    assert index.release_repository("docker.io/library/linked")
    assert index.repositories() == sorted(cached[1:3])


# -- referrers, pins, uploads, foreign layers --

def test_referrers_pushed_and_upstream(index: Metadata) -> None:
    sig = {"digest": D2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.dev.cosign", "size": 10}
    sbom = {"digest": D3, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json", "size": 20}
    assert index.referrers(REPO, D1) == []
    index.add_referrer(REPO, D1, sig)
    index.add_referrer(REPO, D1, sbom)
    index.add_referrer(REPO, D1, dict(sig, size=99))  # one per digest: the first stays
    assert index.referrers(REPO, D1) == [sig, sbom] and index.referrers("docker.io/library/x", D1) == []
    index.remove_referrer(REPO, D1, D2)
    index.remove_referrer(REPO, D1, D1)  # not there
    assert index.referrers(REPO, D1) == [sbom]

    assert index.upstream_referrers(REPO, D1, None) is None
    assert index.upstream_referrers(REPO, D1, "application/spdx+json") is None
    index.put_upstream_referrers(REPO, D1, "application/spdx+json", [sbom], now=5.0)
    assert index.upstream_referrers(REPO, D1, "application/spdx+json") == [sbom]
    assert index.upstream_referrers(REPO, D1, None) is None  # a filtered list does not cover the whole
    index.put_upstream_referrers(REPO, D1, None, [sig, sbom], now=6.0)
    assert index.upstream_referrers(REPO, D1, None) == [sig, sbom]
    assert index.upstream_referrers(REPO, D1, "application/vnd.dev.cosign") == [sig, sbom]  # the whole, unfiltered
    assert index.upstream_referrers(REPO, D1, "application/spdx+json") == [sbom]

    assert index.referrers_api("docker.io") is None
    index.set_referrers_api("docker.io", False)
    index.set_referrers_api("ghcr.io", True)
    assert index.referrers_api("docker.io") is False and index.referrers_api("ghcr.io") is True
    index.set_referrers_api("docker.io", True)
    assert index.referrers_api("docker.io") is True


def test_pins(index: Metadata) -> None:
    assert index.pins() == [] and not index.is_pinned(REPO, D1) and not index.unpin(REPO, D1)
    index.pin(REPO, D1, now=1.0)
    index.pin(REPO, D1)
    index.pin("local/team/app", D2)
    assert index.is_pinned(REPO, D1) and not index.is_pinned(REPO, D2)
    assert sorted(index.pins()) == [("docker.io/library/alpine", D1), ("local/team/app", D2)]
    assert index.unpin(REPO, D1) and index.pins() == [("local/team/app", D2)]


def test_a_pin_made_under_a_tag_is_taken_back_by_unpin_tagged_only_while_every_pin_of_it_was(
    index: Metadata,
) -> None:
    """A preload under a tag pins ``tagged``: the pin goes with the image's last tag.  A user's pin (the
    web UI) or a preload by digest is for good, whichever came first."""
    index.pin(REPO, D1, tagged=True)
    assert index.pins(tagged=True) == [(REPO, D1)] and index.unpin_tagged(REPO, D1)
    assert not index.is_pinned(REPO, D1) and index.pins() == [] and not index.unpin_tagged(REPO, D1)
    index.pin(REPO, D1, tagged=True)
    index.pin(REPO, D1)  # then pinned by a user
    index.pin(REPO, D2)
    index.pin(REPO, D2, tagged=True)  # then preloaded under a tag
    assert index.pins(tagged=True) == [] and sorted(index.pins()) == sorted([(REPO, D1), (REPO, D2)])
    assert not index.unpin_tagged(REPO, D1) and not index.unpin_tagged(REPO, D2)
    assert index.is_pinned(REPO, D1) and index.is_pinned(REPO, D2)
    index.pin("local/team/app", D1, tagged=True)
    assert index.unpin("local/team/app", D1)  # unpin takes back any pin, and its kind with it
    index.pin("local/team/app", D1)
    assert not index.unpin_tagged("local/team/app", D1) and index.is_pinned("local/team/app", D1)


def test_uploads(index: Metadata) -> None:
    uuids = ["0f6f3a0e-6a51-4f7b-9bd2-4f0b0f1bd3a1", "a4c2d7b4-1d61-4c4c-8a0e-0e6f4f9c3b22"]
    assert index.get_upload(uuids[0]) is None and index.upload_ids() == []
    index.put_upload(uuids[0], UploadRecord("team/app", 10.0))
    index.put_upload(uuids[1], UploadRecord("team/other", 11.0))
    assert index.get_upload(uuids[0]) == UploadRecord("team/app", 10.0)
    assert sorted(index.upload_ids()) == uuids
    index.delete_upload(uuids[0])
    index.delete_upload(uuids[0])
    assert index.get_upload(uuids[0]) is None and index.upload_ids() == [uuids[1]]


def test_an_upload_record_keeps_where_its_parts_went_and_each_new_part(index: Metadata) -> None:
    """The state a process restarted, or another one, continues an upload from (``registry/uploads.py``)."""
    uuid = "5d1c0f0e8f7a4b7e9c3a2b1d0e9f8a7b"
    index.put_upload(uuid, UploadRecord("team/app", 12.5))
    first = UploadRecord("team/app", 12.5, UploadParts("mpu-1~x", 5 << 20, ('"etag-1"',)))
    index.put_upload(uuid, first)
    assert index.get_upload(uuid) == first
    second = UploadRecord("team/app", 12.5, UploadParts("mpu-1~x", 5 << 20, ('"etag-1"', '"etag-2"')))
    index.put_upload(uuid, second)
    got = index.get_upload(uuid)
    assert got == second and got is not None and got.parts is not None and got.parts.sent == 10 << 20
    index.delete_upload(uuid)
    assert index.get_upload(uuid) is None


def test_an_upload_record_keeps_the_size_of_its_tail_and_its_last_write(index: Metadata) -> None:
    """What the replicas of a cluster continue an upload from (``registry/roaming.py``)."""
    uuid = "7e2d1c0b9a8f4e6d8c7b6a5f4e3d2c1b"
    index.put_upload(uuid, UploadRecord("team/app", 12.5, tail=12345, written_at=20.25))
    assert index.get_upload(uuid) == UploadRecord("team/app", 12.5, None, 12345, 20.25)
    parted = UploadRecord("team/app", 12.5, UploadParts("mpu-2~y", 5 << 20, ('"etag-1"',)), 0, 30.5)
    index.put_upload(uuid, parted)
    assert index.get_upload(uuid) == parted
    assert UploadRecord.unflat("team/app", 1.0, "mpu", 5, ["e"]) == UploadRecord("team/app", 1.0, UploadParts(
        "mpu", 5, ("e",))), "a record kept before tails were"


def test_foreign_layer_urls(index: Metadata) -> None:
    assert index.foreign_urls(D1) == ()
    index.set_foreign_urls(D1, iter(["https://example.com/a", "https://example.com/b"]))
    assert index.foreign_urls(D1) == ("https://example.com/a", "https://example.com/b")


def test_an_index_records_whose_copy_it_is(index: Metadata) -> None:
    """``mirror migrate`` marks its target a copy of the source (by id): a later run takes it for one."""
    assert index.copy_of() is None
    index.mark_copy_of("0123abcd")
    assert index.copy_of() == "0123abcd" != index.index_id()
    index.mark_copy_of("4567ef")
    assert index.copy_of() == "4567ef"


def test_every_kind_is_listed_a_page_at_a_time_and_found_by_key(index: Metadata) -> None:
    """What ``mirror migrate`` copies and compares in bounded memory: each kind of record as listed
    (in the same order whatever the page size, each once) and as looked up by key."""
    assert all(list(index.records(kind)) == [] == list(index.find_records(kind, [])) for kind in RecordKind)
    sig = {"digest": D2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.dev.cosign", "size": 10}
    sbom = {"digest": D3, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json", "size": 20}
    app, longer = "local/team/app", f"{REPO}-edge"  # a name that another one starts
    index.set_tag(REPO, "3.19", TagRecord(D1, OCI_MANIFEST, 10.5))
    index.set_tag(app, "1", TagRecord(D2, OCI_INDEX, 11.0))
    index.put_manifest(D1, OCI_MANIFEST, 1234)
    index.put_manifest(D2, OCI_INDEX, 567)
    index.link(REPO, [D1, D2, D3])
    index.link(longer, [D1])
    index.mark_local("team/app", 100.5)
    index.pin(REPO, D1, now=7.25)
    index.pin(longer, D1, now=8.5, tagged=True)
    index.add_referrer(REPO, D1, sbom)
    index.add_referrer(REPO, D1, sig)
    index.add_referrer(app, D2, sig)
    index.add_referrer(app, D3, sbom)
    index.remove_referrer(app, D3, D3)  # nothing left for that subject: not listed
    index.put_upstream_referrers(REPO, D1, None, [sig, sbom], now=5.0)
    index.put_upstream_referrers(REPO, D1, "application/spdx+json", [sbom], now=6.0)
    index.set_referrers_api("docker.io", True)
    index.set_referrers_api("ghcr.io", False)
    index.set_foreign_urls(D3, ["https://example.com/a", "https://example.com/b"])
    index.record_access({(REPO, D1): 10.0, (longer, D1): 8.0})

    expected: dict[RecordKind, dict[tuple[str, ...], Any]] = {
        RecordKind.TAGS: {(REPO, "3.19"): TagRecord(D1, OCI_MANIFEST, 10.5),
                          (app, "1"): TagRecord(D2, OCI_INDEX, 11.0)},
        RecordKind.MANIFESTS: {(D1,): ManifestRecord(OCI_MANIFEST, 1234), (D2,): ManifestRecord(OCI_INDEX, 567)},
        RecordKind.LINKS: {(REPO, D1): True, (REPO, D2): True, (REPO, D3): True, (longer, D1): True},
        RecordKind.REPOSITORIES: {(REPO,): True, (app,): True, (longer,): True},
        RecordKind.LOCALS: {("team/app",): 100.5},
        RecordKind.PINS: {(REPO, D1): PinRecord(7.25, False), (longer, D1): PinRecord(8.5, True)},
        RecordKind.REFERRERS: {(REPO, D1): (sbom, sig), (app, D2): (sig,)},
        RecordKind.UPSTREAM_REFERRERS: {
            (REPO, D1, ""): UpstreamReferrers(REPO, D1, None, 5.0, (sig, sbom)),
            (REPO, D1, "application/spdx+json"): UpstreamReferrers(REPO, D1, "application/spdx+json", 6.0, (sbom,))},
        RecordKind.REFERRERS_APIS: {("docker.io",): True, ("ghcr.io",): False},
        RecordKind.FOREIGN_URLS: {(D3,): ("https://example.com/a", "https://example.com/b")},
        RecordKind.ACCESS: {(REPO, D1): 10.0, (longer, D1): 8.0},
    }
    for kind, records in expected.items():
        listings = [list(index.records(kind, page=page)) for page in (1, 2, 1000)]
        assert listings[0] == listings[1] == listings[2] and dict(listings[0]) == records, kind
        assert len(listings[0]) == len(records), kind
        first = next(iter(records))
        absent = ("docker.io/library/none", *first[1:])
        assert index.find_records(kind, [*records, absent, first]) == records, kind


def test_a_listing_reads_each_page_when_the_one_before_is_used_up(index: Metadata) -> None:
    """No page is read ahead: records written or withdrawn further on while a listing runs are seen."""
    index.link(REPO, [D1, D2])
    listing = index.records(RecordKind.LINKS, page=1)
    assert next(listing) == ((REPO, D1), True)
    index.link(REPO, [D3])
    index.forget(links=[(REPO, D2)])
    assert list(listing) == [((REPO, D3), True)]


# -- upkeep: access times, usage --

def test_access_times_keep_the_latest_use(index: Metadata) -> None:
    assert index.access_times() == {}
    index.record_access({(REPO, D1): 10.0, ("local/team/app", D1): 3.0})
    index.record_access({(REPO, D1): 7.0, (REPO, D2): 8.0})  # an older batch written late
    assert index.access_times() == {(REPO, D1): 10.0, (REPO, D2): 8.0, ("local/team/app", D1): 3.0}
    index.record_access({(REPO, D1): 12.5})
    assert index.access_times()[REPO, D1] == 12.5


def test_usage_arithmetic_and_held_reasons(index: Metadata) -> None:
    assert index.usage() == 0 and index.held() == {}
    assert index.add_usage(1000) == 1000
    assert index.add_usage(-300) == 700
    assert index.add_usage(0) == 700 == index.usage()
    index.set_usage(5 << 40)  # a large store: no overflow
    assert index.add_usage(1) == (5 << 40) + 1
    index.set_held({"in_use": 10, "recent": 0})
    assert index.held() == {"in_use": 10, "recent": 0}
    index.set_held({})
    assert index.held() == {}


def test_everything_outlives_the_instance(opener: Opener, clock: FakeClock) -> None:
    first = opener(clock)
    first.set_tag(REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0))
    first.put_manifest(D1, OCI_MANIFEST, 10)
    first.link(REPO, [D1])
    first.pin(REPO, D1)
    first.mark_local("team/app", 1.0)
    first.add_usage(42)
    lease = first.take_lease("x", "a", ttl=30)
    first.close()
    again = opener(clock)
    try:
        assert again.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0) and again.is_linked(REPO, D1)
        assert again.count_manifests() == 1 and again.is_pinned(REPO, D1) and again.is_local("team/app")
        assert again.usage() == 42 and again.current_lease("x") == lease
    finally:
        again.close()


# -- the generation --

def test_the_generation_moves_on_withdrawals_only_in_every_process(
    index: Metadata, opener: Opener, elsewhere: ProcessPoolExecutor,
) -> None:
    """Memos in every process are dropped when the generation moves: after each withdrawal, by
    this instance or one in another process, and after a manifest record changes, but not after
    additions (that would empty every worker's memory for nothing)."""
    def moves(method: str, *args: Any, here: bool = False, **kwargs: Any) -> bool:
        """Does the generation this instance reads move after *method* (here or in another process)?
        It may take a moment to arrive from another process: waited for up to 5 s when it is
        expected to move, 0.1 s when not (pass ``stays=True``); this instance's own changes show
        when the call returns."""
        stays = kwargs.pop("stays", False)
        before = index.generation.read()
        if here:
            getattr(index, method)(*args, **kwargs)
        else:
            elsewhere.submit(_call, opener, method, *args, **kwargs).result()
        deadline = time.monotonic() + (0.0 if here else 0.1 if stays else 5.0)
        while index.generation.read() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return index.generation.read() != before

    record = TagRecord(D1, OCI_MANIFEST, 1.0)
    for here in (True, False):
        repo = f"docker.io/library/here-{here}"
        # Additions, and withdrawals of nothing.
        assert not moves("link", repo, [D1, D2, D3], here=here, stays=True)
        assert not moves("put_manifest", D1, OCI_MANIFEST, 10, here=here, stays=True)
        assert not moves("put_manifest", D1, OCI_MANIFEST, 10, here=here, stays=True)  # again, the same
        assert not moves("set_tag", repo, "a", record, here=here, stays=True)
        confirmed = TagRecord(D1, OCI_MANIFEST, 2.0)  # the same manifest, confirmed again later
        assert not moves("set_tag", repo, "a", confirmed, here=here, stays=True)
        assert not moves("set_tag", repo, "b", record, here=here, stays=True)
        assert not moves("forget", here=here, stays=True)
        assert not moves("forget", links=[(repo, "sha256:" + "9" * 64)], here=here, stays=True)
        assert not moves("unlink", repo, "sha256:" + "9" * 64, here=here, stays=True)
        assert not moves("untag", repo, "never", here=here, stays=True)
        assert not moves("untag_many", repo, [], here=here, stays=True)
        # Withdrawals.
        assert moves("set_tag", repo, "a", TagRecord(D2, OCI_MANIFEST, 3.0), here=here)
        assert moves("set_tag", repo, "a", TagRecord(D2, OCI_INDEX, 3.0), here=here)
        assert moves("untag", repo, "a", here=here)
        assert moves("put_manifest", D1, OCI_INDEX, 10, here=here)  # recorded again otherwise: kept answers are stale
        assert moves("untag_many", repo, ["b"], here=here)
        assert moves("unlink", repo, D1, here=here)
        assert moves("forget", links=[(repo, D2)], here=here)
        assert moves("forget", manifests=[D1], here=here)
        assert moves("mark_local", f"team/{here}", 1.0, here=here)  # its requests stop going upstream
        assert not moves("mark_local", f"team/{here}", 2.0, here=here, stays=True)
        assert moves("release_local", f"team/{here}", here=here)  # its requests go upstream again
        assert not moves("release_local", f"team/{here}", here=here, stays=True)


def test_writes_of_one_instance_are_read_by_another(index: Metadata, opener: Opener,
                                                    elsewhere: ProcessPoolExecutor) -> None:
    elsewhere.submit(_call, opener, "set_tag", REPO, "1", TagRecord(D1, OCI_MANIFEST, 1.0)).result()
    assert index.get_tag(REPO, "1") == TagRecord(D1, OCI_MANIFEST, 1.0)
    index.link(REPO, [D2])
    assert elsewhere.submit(_call, opener, "all_links").result() == [(REPO, D2)]


# -- concurrent writers --

def test_two_processes_writing_at_once_lose_nothing(
    index: Metadata, opener: Opener, elsewhere: ProcessPoolExecutor, tmp_path: Path,
) -> None:
    """Every read-modify-write in the index (a repository's tag list, the catalog, a subject's
    referrers, the byte count) is atomic across processes."""
    count = 300
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    done = [elsewhere.submit(_write_a_lot, opener, rendezvous, who, count) for who in (1, 2)]
    for future in done:
        future.result()
    digests = {f"sha256:{who}{i:063d}" for who in (1, 2) for i in range(count)}
    assert index.tags(REPO) == sorted(f"w{who}-{i}" for who in (1, 2) for i in range(count))
    assert set(index.repositories()) == {REPO} | {f"docker.io/team/w{who}-{i}" for who in (1, 2) for i in range(count)}
    assert {str(d["digest"]) for d in index.referrers(REPO, D1)} == digests
    assert len(index.referrers(REPO, D1)) == 2 * count
    assert set(index.access_times()) == {(REPO, d) for d in digests}
    assert set(index.pins()) == {(REPO, d) for d in digests}
    assert index.usage() == 2 * count * 3


# -- leases --

def test_a_lease_is_exclusive_until_it_expires_or_is_released(opener: Opener, clock: FakeClock) -> None:
    one, two = opener(clock), opener(clock)  # two instances over the same data, say two replicas
    try:
        lease = one.take_lease("sha256:abc", "replica-1", ttl=30)
        assert lease is not None and (lease.name, lease.holder, lease.expires) == ("sha256:abc", "replica-1",
                                                                                   clock.now + 30)
        assert two.take_lease("sha256:abc", "replica-2", ttl=30) is None
        assert one.take_lease("sha256:abc", "replica-1", ttl=30) is None  # not even its holder
        assert two.current_lease("sha256:abc") == lease and two.current_lease("sha256:other") is None
        other = two.take_lease("sha256:other", "replica-2", ttl=30)  # names are independent
        assert other is not None and other.token != lease.token

        clock.now += 29
        renewed = one.renew_lease(lease, ttl=30)
        assert renewed == Lease("sha256:abc", "replica-1", lease.token, clock.now + 30)
        clock.now += 29
        assert two.take_lease("sha256:abc", "replica-2", ttl=30) is None  # renewed: still held
        assert two.current_lease("sha256:abc") == renewed
        assert one.release_lease(renewed)
        assert two.current_lease("sha256:abc") is None
        after_release = two.take_lease("sha256:abc", "replica-2", ttl=30)
        assert after_release is not None and after_release.token > renewed.token
        assert not one.release_lease(renewed)  # no longer its lease: nothing happens
        assert one.current_lease("sha256:abc") == after_release
    finally:
        one.close()
        two.close()


def test_an_expired_lease_passes_on_with_a_larger_fencing_token(opener: Opener, clock: FakeClock) -> None:
    one, two = opener(clock), opener(clock)
    try:
        lease = one.take_lease("sha256:abc", "replica-1", ttl=10)
        assert lease is not None
        clock.now += 10  # expired at exactly its expiry
        assert one.current_lease("sha256:abc") is None
        taken = two.take_lease("sha256:abc", "replica-2", ttl=10)
        assert taken is not None and taken.token > lease.token and taken.holder == "replica-2"
        # The paused holder comes back: it cannot renew nor release what it lost.
        assert one.renew_lease(lease, ttl=10) is None
        assert not one.release_lease(lease)
        assert one.current_lease("sha256:abc") == taken

        clock.now += 11  # the new holder paused too; nobody took over
        assert two.renew_lease(taken, ttl=10) is None
        assert not two.release_lease(taken)  # it was no longer held: the holder must not trust its work
        third = one.take_lease("sha256:abc", "replica-1", ttl=10)
        assert third is not None and third.token > taken.token
    finally:
        one.close()
        two.close()


def test_leases_released_or_expired_long_enough_ago_are_forgotten_and_their_names_granted_again(
    opener: Opener, clock: FakeClock,
) -> None:
    one = opener(clock)
    try:
        released = one.take_lease("upload:a", "replica-1", ttl=10)
        expired = one.take_lease("fill:b", "replica-1", ttl=10)
        assert released is not None and expired is not None and one.release_lease(released)
        clock.now += 100
        recent = one.take_lease("fill:c", "replica-2", ttl=10)
        held = one.take_lease("collector", "replica-2", ttl=1000)
        assert recent is not None and held is not None
        clock.now += 50  # "upload:a" released 150 s ago, "fill:b" expired 140 s ago, "fill:c" 40 s ago
        assert one.prune_leases(60) >= 1  # "fill:b"; a driver may forget a released lease at once
        assert one.prune_leases(60) == 0
        assert one.renew_lease(expired, ttl=10) is None and not one.release_lease(released)
        assert one.current_lease("collector") == held  # held leases stay, whatever their age
        assert one.renew_lease(recent, ttl=10) is None  # kept, still expired
        again = one.take_lease("fill:b", "replica-2", ttl=10)
        assert again is not None and again.token > max(held.token, recent.token)  # one counter, still growing
    finally:
        one.close()


def test_leases_between_processes_are_exclusive_and_tokens_grow_in_holding_order(
    index: Metadata, opener: Opener, elsewhere: ProcessPoolExecutor, tmp_path: Path,
) -> None:
    turns = 15
    rendezvous, log = tmp_path / "rendezvous", tmp_path / "tokens"
    rendezvous.mkdir()
    holders = [elsewhere.submit(_hold_in_turn, opener, rendezvous, who, turns, log) for who in (1, 2)]
    tokens = [future.result() for future in holders]
    # No two held it at once: no update made under the lease was lost...
    assert index.usage() == 2 * turns
    # ...and each grant's token is larger than those of every holder before it.
    held = [int(line) for line in log.read_text().split()]
    assert len(held) == 2 * turns and held == sorted(set(held))
    assert sorted(tokens[0] + tokens[1]) == held
    assert index.current_lease("sha256:filled-once") is None


def test_a_diskcache_index_a_later_version_wrote_is_read_leaving_its_new_fields_aside(tmp_path: Path) -> None:
    """A rollback reads records a later version wrote with more fields (an upload record that grew
    from 3 to 8 fields made an older version answer 500 and its fsck crash): the fields it knows are
    taken, the rest left aside."""
    index = open_diskcache(tmp_path / "index")
    try:
        cache = index._cache  # type: ignore[attr-defined]
        cache.set("tag/team/app:1", (D1, "application/vnd.oci.image.manifest.v1+json", 1700000000.0, "later"))
        cache.set(f"manifest/{D1}", ("application/vnd.oci.image.manifest.v1+json", 512, "later"))
        cache.set("upload/u1", ("team/app", 1700000000.0, None, None, None, 0, None, "later", 7))
        assert index.get_tag("team/app", "1") == TagRecord(D1, "application/vnd.oci.image.manifest.v1+json",
                                                            1700000000.0)
        assert [t for _, t, _ in index.all_tags()] == ["1"]
        assert index.get_manifest(D1) == ManifestRecord("application/vnd.oci.image.manifest.v1+json", 512)
        upload = index.get_upload("u1")
        assert upload is not None and (upload.name, upload.started_at, upload.parts) == ("team/app", 1700000000.0, None)
    finally:
        index.close()

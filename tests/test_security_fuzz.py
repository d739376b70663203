"""Hostile input, property-based (hypothesis): generated names, references, digests, ranges and query
strings on every route of two mirrors (open, and with logins).  Never a 500, errors always in the
spec's format, and no file outside the data directories created, read, changed or deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.mirror import MirrorServer
from tests.support.registry import UpstreamRegistry
from tests.support.security import (
    ACCEPT,
    ALICE,
    ALICE_PASSWORD,
    auth_env,
    basic,
    request,
)

FUZZ_EXAMPLES = 150
SENTINEL_HEX = "ab" + "0" * 62
#: Files beside the data directories, laid out as the store lays out its own: a path built from
#: unvalidated input (``../``, an absolute path) would reach one of them.
SENTINELS = [
    "secret.txt", f"blobs/sha256/ab/{SENTINEL_HEX}", f"uploads/{'0' * 32}", f"tmp/sha256-{SENTINEL_HEX}.partial",
    "index/cache.db", "data/../outside.txt", "nested/deeper/secret.txt",
]


class Fuzzed:
    """Two mirrors (open, and with logins) whose data directories sit among sentinel files."""

    def __init__(self, root: Path, open: MirrorServer, guarded: MirrorServer, client: httpx.Client) -> None:
        self.root = root
        self.open = open
        self.guarded = guarded
        self.client = client
        self.before = self.snapshot()

    def __repr__(self) -> str:
        return f"Fuzzed({self.root})"

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Every path under the root outside the data directories, with size, mtime and atime of files."""
        found: dict[str, tuple[Any, ...]] = {}
        skip = {self.open.data_dir, self.guarded.data_dir}
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
            for name in dirs:
                found[os.path.relpath(Path(folder, name), self.root)] = ("dir",)
            for name in files:
                st = os.stat(Path(folder, name))
                found[os.path.relpath(Path(folder, name), self.root)] = (st.st_size, st.st_mtime_ns, st.st_atime_ns)
        return found

    def assert_untouched(self) -> None:
        after = self.snapshot()
        changed = {path for path in self.before.keys() | after.keys() if self.before.get(path) != after.get(path)}
        assert not changed, f"files outside the data directory were created, read, changed or deleted: {changed}"
        for server in (self.open, self.guarded):
            assert server.running, server.log_tail()
            log = server.log_path.read_text(errors="replace")
            assert "Traceback" not in log and "Exception in ASGI" not in log, server.log_tail(80)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamRegistry,
           images: StandardImages) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz-root")
    logs = tmp_path_factory.mktemp("fuzz-logs")
    for relative in SENTINELS:
        path = (root / relative).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"sentinel {relative}\n")
        # An atime older than the mtime: any read of the file updates it (even under relatime).
        st = path.stat()
        os.utime(path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    users = logs / "htpasswd"
    users.write_text(ALICE + "\n")
    open_ = MirrorServer(root / "data", upstream.url, log_dir=logs)
    guarded = MirrorServer(root / "data-auth", upstream.url, log_dir=logs,
                           env=auth_env(users, anonymous_pull=True))
    with contextlib_closing(open_), contextlib_closing(guarded):
        open_.start()
        guarded.start()
        # Something in the store to read, ranges to serve, uploads to continue.
        assert request(open_, "GET", "/v2/library/small/manifests/1").status_code == 200
        for layer in images.small.layers:
            assert request(open_, "GET", f"/v2/library/small/blobs/{layer.digest}").status_code == 200
        with httpx.Client(timeout=30, trust_env=False) as client:
            fuzz = Fuzzed(root, open_, guarded, client)
            assert len([v for v in fuzz.before.values() if v != ("dir",)]) == len(SENTINELS)
            yield fuzz


class contextlib_closing:
    """Stop a MirrorServer however the block ends."""

    def __init__(self, server: MirrorServer) -> None:
        self.server = server

    def __enter__(self) -> MirrorServer:
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def _hypothesis() -> Any:
    import hypothesis
    import hypothesis.strategies as st

    return hypothesis, st


hypothesis, st = _hypothesis()
FUZZ = hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
                           suppress_health_check=[hypothesis.HealthCheck.too_slow])


def traversals(root_hint: str = "/tmp") -> list[str]:
    return [
        "..", ".", "../secret.txt", "../../secret.txt", "../../../secret.txt", "../../../../secret.txt",
        "a/../../secret.txt", "library/../../../secret.txt", "..\\secret.txt", "%2e%2e/secret.txt",
        f"../blobs/sha256/ab/{SENTINEL_HEX}", f"../uploads/{'0' * 32}", f"../../uploads/{'0' * 32}",
        "sha256:../../secret.txt", f"sha256:../../../blobs/sha256/ab/{SENTINEL_HEX}", "sha256:..",
        f"sha256:{SENTINEL_HEX}/../../../../secret.txt", "/etc/passwd", "\x00", "a\x00b", "\n", "~", "//",
    ]


_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
valid_names = st.from_regex(rf"{_COMPONENT}(?:/{_COMPONENT}){{0,3}}", fullmatch=True)
known_names = st.sampled_from(["library/small", "small", "library/multi", "fuzz/mine", "library/nope"])
names = st.one_of(valid_names, known_names, st.sampled_from(traversals()), st.text(max_size=40),
                  st.text(alphabet="ab/.:-_%\\", max_size=30))
sha256_hex = st.binary(min_size=32, max_size=32).map(lambda b: b.hex())
digests = st.one_of(
    sha256_hex.map(lambda h: f"sha256:{h}"),
    st.from_regex(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+", fullmatch=True),
    st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}"),
    st.sampled_from(traversals()), st.text(max_size=80), st.text(max_size=70).map(lambda t: f"sha256:{t}"),
)
tags = st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}", fullmatch=True)
references = st.one_of(tags, digests, st.just("1"))
uuids = st.one_of(st.from_regex(r"[0-9a-f]{32}", fullmatch=True), st.sampled_from(traversals()),
                  st.text(max_size=40))
# Header values as a client can send them: no control characters, no surrounding whitespace.
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
header_bytes = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F))
#: Strings that str.isdigit() or int() accept although the grammars do not (superscripts, other scripts...).
TRICKY_NUMBERS = ["\u00b2", "\u0661\u0662", "\uff11", " 1", "1 ", "+1", "-0", "0x10", "1e3", "1_000", "\u00b9\u2070"]
numbers = st.one_of(st.integers(min_value=-5, max_value=2**70).map(str), st.just(""), st.sampled_from(TRICKY_NUMBERS))
ranges = st.one_of(
    st.none(), st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers),
    st.builds(lambda a, b: f"bytes={a}-{b},{b}-", numbers, numbers), header_text, header_bytes,
)
query_values = st.one_of(header_text, st.text(max_size=30), numbers, valid_names, digests, tags,
                         st.sampled_from(traversals()))
queries = st.dictionaries(st.sampled_from(["n", "last", "mount", "from", "digest", "artifactType", "ns", "x"]),
                          query_values, max_size=4)
bodies = st.one_of(st.binary(max_size=300), st.just(b""), st.just(b'{"schemaVersion": 2}'))


def seg(text: str, *, slashes: bool = True) -> str:
    """Percent-encode for the path (dots too, so that ``..`` reaches the server as such)."""
    from urllib.parse import quote

    return quote(text, safe="/" if slashes else "").replace(".", "%2E")


def check(answer: httpx.Response, method: str) -> None:
    from mirror.spec.errors import CODES

    assert answer.status_code < 500, f"{method} {answer.request.url} -> {answer.status_code} {answer.text}"
    assert answer.headers.get("x-content-type-options") == "nosniff", answer.request.url
    assert "Traceback" not in answer.text
    if answer.status_code >= 400 and method != "HEAD":
        assert answer.headers["content-type"].startswith("application/json"), (answer.request.url, answer.text)
        errors = answer.json()["errors"]
        assert isinstance(errors, list) and errors, answer.text
        for entry in errors:
            assert entry["code"] in CODES and isinstance(entry["message"], str), answer.text


def send(fuzz: Fuzzed, method: str, path: str, *, server: MirrorServer | None = None,
         params: dict[str, str] | None = None, headers: dict[str, Any] | None = None,
         content: bytes | None = None) -> httpx.Response:
    server = server or fuzz.open
    # Non-ASCII header text goes out as UTF-8 bytes (HTTP's obs-text), as a hostile client could send it.
    # (Surrounding whitespace is not part of a header value: h11 refuses to send it.)
    raw = {k.encode(): (v.encode() if isinstance(v, str) else v).strip() for k, v in (headers or {}).items()}
    answer = fuzz.client.request(method, f"{server.url}{path}", params=params, headers=raw, content=content)
    check(answer, method)
    return answer


@hypothesis.given(method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]), name=names, reference=references,
                  params=queries, body=bodies,
                  content_type=st.sampled_from(["application/vnd.oci.image.manifest.v1+json", "text/plain", ""]))
@FUZZ
def test_fuzz_manifests(fuzzed: Fuzzed, method: str, name: str, reference: str, params: dict[str, str],
                        body: bytes, content_type: str) -> None:
    send(fuzzed, method, f"/v2/{seg(name)}/manifests/{seg(reference, slashes=False)}", params=params,
         headers={"Accept": ACCEPT, "Content-Type": content_type}, content=body if method == "PUT" else None)


def test_fuzz_manifests_touched_nothing_outside(fuzzed: Fuzzed) -> None:
    fuzzed.assert_untouched()


@hypothesis.given(method=st.sampled_from(["GET", "HEAD", "DELETE"]), name=names, digest=digests,
                  byte_range=ranges, params=queries)
@hypothesis.example(method="GET", name="library/small", digest=f"sha256:{SENTINEL_HEX}", byte_range="bytes=\u00b2-",
                    params={})
@hypothesis.example(method="GET", name="library/../../..", digest=f"sha256:../../../blobs/sha256/ab/{SENTINEL_HEX}",
                    byte_range=None, params={"ns": "../../secret.txt"})
@FUZZ
def test_fuzz_blobs_and_ranges(fuzzed: Fuzzed, method: str, name: str, digest: str, byte_range: Any,
                               params: dict[str, str]) -> None:
    headers = {} if byte_range is None else {"Range": byte_range}
    send(fuzzed, method, f"/v2/{seg(name)}/blobs/{seg(digest, slashes=False)}", params=params, headers=headers)


def test_fuzz_known_blob_ranges(fuzzed: Fuzzed, images: StandardImages) -> None:
    """Ranges on a blob that is in the store (the generated digests are almost never there)."""
    layer = images.small.layers[0]

    @hypothesis.given(byte_range=ranges, name=st.just("library/small"))
    @FUZZ
    def ranges_on_a_stored_blob(byte_range: Any, name: str) -> None:
        answer = send(fuzzed, "GET", f"/v2/{name}/blobs/{layer.digest}",
                      headers={} if byte_range is None else {"Range": byte_range})
        assert answer.status_code in (200, 206, 416), answer.text

    ranges_on_a_stored_blob()
    fuzzed.assert_untouched()


@hypothesis.given(method=st.sampled_from(["POST", "PATCH", "PUT", "GET", "HEAD", "DELETE"]), name=names,
                  uuid=uuids, params=queries, body=bodies, content_range=st.one_of(st.none(), header_text,
                  st.builds(lambda a, b: f"{a}-{b}", numbers, numbers)), fresh=st.booleans())
@hypothesis.example(method="PATCH", name="x", uuid="", params={}, body=b"x", content_range=b"\xb2-\xb3",
                    fresh=True)  # superscript digits, as the server decodes header bytes (latin-1)
@hypothesis.example(method="PUT", name="x", uuid="", params={"digest": "sha256:" + "0" * 64}, body=b"x",
                    content_range=None, fresh=True)
@hypothesis.example(method="PATCH", name="fuzz/mine", uuid="../" * 3 + "0" * 32, params={}, body=b"x",
                    content_range=None, fresh=False)
@FUZZ
def test_fuzz_uploads(fuzzed: Fuzzed, method: str, name: str, uuid: str, params: dict[str, str], body: bytes,
                      content_range: str | bytes | None, fresh: bool) -> None:
    if fresh:  # continue a real upload (of a valid name) with the generated parameters
        started = send(fuzzed, "POST", "/v2/fuzz/mine/blobs/uploads/")
        uuid, name = started.headers["docker-upload-uuid"], "fuzz/mine"
    headers: dict[str, str | bytes] = {"Content-Type": "application/octet-stream"}
    if content_range is not None:
        headers["Content-Range"] = content_range
    path = f"/v2/{seg(name)}/blobs/uploads/" + ("" if method == "POST" else seg(uuid, slashes=False))
    send(fuzzed, method, path, params=params, headers=headers,
         content=body if method in ("POST", "PATCH", "PUT") else None)


def test_fuzz_uploads_touched_nothing_outside(fuzzed: Fuzzed) -> None:
    fuzzed.assert_untouched()


@hypothesis.given(name=names, n=st.one_of(st.none(), numbers), last=st.one_of(st.none(), query_values),
                  params=queries, catalog=st.booleans(), method=st.sampled_from(["GET", "HEAD"]))
@hypothesis.example(name="library/small", n="\u00b2", last=None, params={}, catalog=False, method="GET")
@hypothesis.example(name="x", n="\u00b9\u2070", last="../..", params={}, catalog=True, method="GET")
@hypothesis.example(name="library/small", n="1", last="..%2F..\n", params={}, catalog=False, method="GET")
@FUZZ
def test_fuzz_tags_and_catalog_pagination(fuzzed: Fuzzed, name: str, n: str | None, last: str | None,
                                          params: dict[str, str], catalog: bool, method: str) -> None:
    params = {**params, **({"n": n} if n is not None else {}), **({"last": last} if last is not None else {})}
    path = "/v2/_catalog" if catalog else f"/v2/{seg(name)}/tags/list"
    answer = send(fuzzed, method, path, params=params)
    if answer.status_code == 200 and method == "GET":
        link = answer.headers.get("link")
        assert link is None or (link.startswith("</v2/") and "\n" not in link), link


@hypothesis.given(name=names, digest=digests, params=queries, method=st.sampled_from(["GET", "HEAD"]))
@FUZZ
def test_fuzz_referrers(fuzzed: Fuzzed, name: str, digest: str, params: dict[str, str], method: str) -> None:
    send(fuzzed, method, f"/v2/{seg(name)}/referrers/{seg(digest, slashes=False)}", params=params)


@hypothesis.given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
                  path=st.one_of(st.text(max_size=60), st.sampled_from(traversals()),
                                 st.lists(st.one_of(names, st.sampled_from(["manifests", "blobs", "uploads", "tags",
                                                                            "list", "referrers", "_catalog"])),
                                          max_size=6).map("/".join)),
                  params=queries)
@FUZZ
def test_fuzz_any_path_under_v2(fuzzed: Fuzzed, method: str, path: str, params: dict[str, str]) -> None:
    send(fuzzed, method, f"/v2/{seg(path)}", params=params)


authorizations = st.one_of(
    st.none(),
    st.builds(lambda u, p: basic(u, p)["Authorization"], st.text(max_size=12), st.text(max_size=12)),
    st.just(basic("alice", ALICE_PASSWORD)["Authorization"]),
    st.builds(lambda t: f"Bearer {t}".strip(), header_text), st.builds(lambda t: f"Basic {t}".strip(), header_text),
    header_text, header_bytes.map(lambda b: (b"Basic " + b).strip()),
)


@hypothesis.given(authorization=authorizations, method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
                  path=st.sampled_from(["/v2/", "/v2", "/auth/token", "/v2/library/small/manifests/1",
                                        "/v2/_catalog", "/v2/fuzz/mine/blobs/uploads/", "/v2/x/manifests/1",
                                        "/healthz"]),
                  params=queries)
@FUZZ
def test_fuzz_credentials(fuzzed: Fuzzed, authorization: Any, method: str, path: str,
                          params: dict[str, str]) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    answer = send(fuzzed, method, path, server=fuzzed.guarded, params=params, headers=headers)
    if answer.status_code == 401:
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith(("Bearer realm=", "Basic realm=")) and "\n" not in challenge


def test_fuzz_touched_nothing_outside_the_data_directories(fuzzed: Fuzzed) -> None:
    fuzzed.assert_untouched()
    # The watch itself works: a read of a sentinel is seen (then undone).
    sentinel = fuzzed.root / "secret.txt"
    before = sentinel.stat()
    sentinel.read_bytes()
    with pytest.raises(AssertionError, match="secret.txt"):
        fuzzed.assert_untouched()
    os.utime(sentinel, ns=(before.st_atime_ns, before.st_mtime_ns))
    fuzzed.assert_untouched()

"""The spec's grammars: names, tags, digests and ranges."""

import pytest

from mirror.spec.reference import (
    ByteRange,
    Digest,
    InvalidDigest,
    InvalidName,
    InvalidRange,
    InvalidTag,
    UnsupportedDigest,
    parse_digest,
    parse_name,
    parse_range,
    parse_reference,
    parse_tag,
)

HEX = "a" * 64


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "a/b/c/d", "my-org/app_1", "a.b/c__d", "x" * 255])
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize("name", ["", "Alpine", "a//b", "/a", "a/", "../etc", "a/../b", "a b", "a_", "-a",
                                  "a:b", "x" * 256, "a/%2e%2e", "a\x00b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        parse_name(name)


def test_tags() -> None:
    assert parse_tag("v1.2.3-rc_1") == "v1.2.3-rc_1"
    assert parse_tag("a" * 128)
    for bad in ["", ".hidden", "-x", "a" * 129, "a/b", "a:b", ".."]:
        with pytest.raises(InvalidTag):
            parse_tag(bad)


def test_digests() -> None:
    assert parse_digest(f"sha256:{HEX}") == Digest("sha256", HEX)
    assert parse_digest("sha512:" + "b" * 128).algorithm == "sha512"
    for bad in ["sha256:" + "A" * 64, "sha256:abc", "sha256:" + "a" * 65, "sha256", ":abc", f"sha256:{HEX}/..",
                "sha512:" + "b" * 64]:
        with pytest.raises(InvalidDigest):
            parse_digest(bad)
    with pytest.raises(UnsupportedDigest):
        parse_digest("md5:d41d8cd98f00b204e9800998ecf8427e")
    assert Digest.of(b"") == parse_digest("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_reference_is_tag_or_digest() -> None:
    assert parse_reference("latest") == "latest"
    assert isinstance(parse_reference(f"sha256:{HEX}"), Digest)


@pytest.mark.parametrize("header,expected", [
    ("bytes=0-9", ByteRange(0, 9)),
    ("bytes=10-", ByteRange(10, 99)),
    ("bytes=-10", ByteRange(90, 99)),
    ("bytes=90-1000", ByteRange(90, 99)),
    ("bytes=-1000", ByteRange(0, 99)),
    ("Bytes= 0-9 ,", ByteRange(0, 9)),  # the unit case-insensitive, empty list elements and spaces ignored
    # RFC 9110 14.2: another unit is ignored, as (here) is a set of several ranges: the whole body.
    ("items=0-1", None),
    ("bytes=0-1,5-6", None),
    ("bytes=0-1, 200-300", None),
    # RFC 9110 14.1.2: last-pos and suffix-length are 1*DIGIT, unbounded: past the end is "the rest".
    ("bytes=0-" + "9" * 30, ByteRange(0, 99)),
    ("bytes=42-" + "9" * 5000, ByteRange(42, 99)),  # (more digits than Python's int() takes)
    ("bytes=-" + "9" * 30, ByteRange(0, 99)),
    ("bytes=" + "0" * 25 + "5-" + "0" * 25 + "7", ByteRange(5, 7)),  # leading zeros are no size
])
def test_ranges(header: str, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-1", "bytes=-0", "bytes=-", "bytes=0-1,5-x", "bytes=,",
                                    "bytes=100-,200-", "=0-1", "0-1", "bytes=a-b", "bytes=" + "9" * 30 + "-",
                                    "bytes=" + "9" * 30 + "-" + "9" * 31, "bytes=9-" + "0" * 25])
def test_bad_ranges(header: str) -> None:
    with pytest.raises(InvalidRange):
        parse_range(header, 100)

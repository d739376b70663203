"""The /v2/ URL grammar (mirror/spec/endpoints.py): what the routes, the metrics' route label and access
control all read from a request path.  The behaviour over HTTP is tested in test_pull_api.py,
test_push_api.py, test_security_access.py and test_observability.py; this is the table itself."""

from __future__ import annotations

import pytest

from mirror.spec.endpoints import Kind, endpoint

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("path,kind,name,argument", [
    ("/v2/", "base", None, None),
    ("/v2", "base", None, None),
    ("/v2/_catalog", "catalog", None, None),
    ("/v2/library/alpine/manifests/3.20", "manifest", "library/alpine", "3.20"),
    (f"/v2/a/b/c/manifests/{DIGEST}", "manifest", "a/b/c", DIGEST),
    (f"/v2/team/app/blobs/{DIGEST}", "blob", "team/app", DIGEST),
    ("/v2/team/app/blobs/uploads/", "upload", "team/app", ""),
    ("/v2/team/app/blobs/uploads/0f3c", "upload", "team/app", "0f3c"),
    ("/v2/team/app/blobs/uploads", "blob", "team/app", "uploads"),  # no slash: a (bad) digest
    ("/v2/blobs/manifests/blobs/tags/list", "tags", "blobs/manifests/blobs", None),
    (f"/v2/app/referrers/{DIGEST}", "referrers", "app", DIGEST),
    # Names are taken as sent; whether they are valid is reference.py's to say.
    ("/v2/Team//App/manifests/1", "manifest", "Team//App", "1"),
    ("/v2/team/app", "unknown", None, None),
    ("/v2/team/app/manifests/", "unknown", None, None),
    ("/v2/_catalog/", "unknown", None, None),
    ("/v2foo", "unknown", None, None),
])
def test_paths_name_one_endpoint(path: str, kind: str, name: str | None, argument: str | None) -> None:
    found = endpoint(path, "GET")
    assert found.kind == kind and found.kind.value == kind
    assert found.name == name
    raw = [value for value in (found.reference, found.digest, found.upload) if value is not None]
    assert raw == ([] if argument is None else [argument])


def test_route_labels_are_the_ones_the_dashboard_and_tests_know() -> None:
    assert [k.value for k in Kind] == ["base", "catalog", "upload", "manifest", "blob", "tags", "referrers",
                                       "unknown"]


@pytest.mark.parametrize("path,method,action,allowed", [
    ("/v2/", "GET", "ping", True),
    ("/v2/", "POST", "push", False),
    ("/v2/", "DELETE", "push", False),
    ("/v2/_catalog", "GET", "pull", True),
    ("/v2/app/manifests/1", "HEAD", "pull", True),
    ("/v2/app/manifests/1", "PUT", "push", True),
    ("/v2/app/manifests/1", "DELETE", "delete", True),
    ("/v2/app/manifests/1", "PATCH", "push", False),
    (f"/v2/app/blobs/{DIGEST}", "DELETE", "delete", True),
    (f"/v2/app/blobs/{DIGEST}", "PUT", "push", False),
    # Every step of an upload is a push, its status and cancelling included.
    ("/v2/app/blobs/uploads/u", "GET", "push", True),
    ("/v2/app/blobs/uploads/u", "DELETE", "push", True),
    ("/v2/app/tags/list", "DELETE", "delete", False),
    ("/v2/app/nothing", "GET", "pull", False),
    ("/v2/app/nothing", "DELETE", "delete", False),
])
def test_methods_and_the_access_they_need(path: str, method: str, action: str, allowed: bool) -> None:
    found = endpoint(path, method)
    assert (found.action, found.allowed) == (action, allowed)
    assert found.writes == (action in ("push", "delete"))


@pytest.mark.parametrize("path,repository", [
    ("/v2/team/app/manifests/1", "team/app"),
    ("/v2/team/App/manifests/1", None),
    ("/v2/team//app/blobs/uploads/", None),
    ("/v2/" + "a" * 256 + "/tags/list", None),  # longer than the spec's 255
    ("/v2/", None),
    ("/v2/team/app", None),
])
def test_the_repository_is_the_name_only_when_it_parses(path: str, repository: str | None) -> None:
    assert endpoint(path, "POST").repository == repository

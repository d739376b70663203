"""Shared fixtures: a real upstream registry, standard images, and factories
for mirrors, dockerd instances, fault proxies and Hub emulators.

Every fixture stops what it started however the test ends; a failing test
also gets the log tails of its mirrors printed in its report.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.catalog import StandardImages
from tests.support.dockerd import Dockerd
from tests.support.faults import FaultProxy
from tests.support.hub import HubEmulator
from tests.support.mirror import MirrorServer
from tests.support.postgres import PostgresServer
from tests.support.procs import require_tool
from tests.support.registry import REGISTRY_BINARY, UpstreamRegistry

#: Fixtures of the security tests (tests/test_security_*.py): a test PKI, htpasswd users, ...; a real
#: S3 server (SeaweedFS) for the object-store driver.
pytest_plugins = ["tests.support.security", "tests.support.seaweedfs"]


def _free_disk() -> str:
    where = tempfile.gettempdir()
    return f"free disk under {where}: {shutil.disk_usage(where).free / 2**30:.1f} GiB"


def pytest_report_header(config: pytest.Config) -> str:
    """A full disk fails tests anywhere in the run with errors far from their cause: say how much is free."""
    return f"{_free_disk()} (a full run needs about 12 GiB at its peak)"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(f"at the end, {_free_disk()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Keep each phase's report on the item, so fixtures can see failures."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _stop_all(stoppers: Sequence[Callable[[], object]]) -> None:
    """Call every stop function (last made, first stopped) even if some raise."""
    with contextlib.ExitStack() as stack:
        for stop in stoppers:
            stack.callback(stop)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{phase}", None), "failed", False) for phase in ("setup", "call")
    )


class SharedUpstream(UpstreamRegistry):
    """The session's registry: a test that stops it would break every test after it."""

    def stop(self) -> None:
        raise AssertionError("the session's shared upstream cannot be stopped: use upstream_factory()")

    def close(self) -> None:
        super().stop()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    """The session's docker-registry; tests must not stop or restart it (both raise)."""
    require_tool(REGISTRY_BINARY, "docker-registry")
    registry = SharedUpstream(tmp_path_factory.mktemp("upstream"))
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


@pytest.fixture(scope="session")
def images(upstream: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory) -> StandardImages:
    """The standard image set, built once and pushed to :func:`upstream`."""
    built = StandardImages.build(tmp_path_factory.mktemp("images"))
    built.push(upstream.url)
    return built


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL 15 cluster (fails, never skips, if it is not installed); each test
    takes a database of its own with :meth:`PostgresServer.create_database`."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def upstream_factory(tmp_path: Path) -> Iterator[Callable[[], UpstreamRegistry]]:
    """Make extra, started registries of the test's own (to stop, restart...)."""
    require_tool(REGISTRY_BINARY, "docker-registry")
    made: list[UpstreamRegistry] = []

    def make() -> UpstreamRegistry:
        registry = UpstreamRegistry(tmp_path / f"upstream-{len(made)}")
        made.append(registry)
        return registry.start()

    try:
        yield make
    finally:
        _stop_all([registry.stop for registry in made])


@pytest.fixture
def mirror_factory(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamRegistry
) -> Iterator[Callable[..., MirrorServer]]:
    """Make started :class:`MirrorServer` instances (upstream defaults to the
    session registry); all are stopped at teardown."""
    made: list[MirrorServer] = []

    def make(
        upstream_url: str | None = None,
        *,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        config: Path | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> MirrorServer:
        root = tmp_path / f"mirror-{len(made)}"
        server = MirrorServer(
            root / "data", upstream_url or upstream.url, workers=workers, env=env, config=config,
            log_dir=root, **kwargs,
        )
        made.append(server)
        return server.start() if start else server

    try:
        yield make
    finally:
        try:
            _stop_all([server.stop for server in made])
        finally:
            if _failed(request):
                for server in made:
                    print(f"--- {server!r} log tail ---\n{server.log_tail(80)}")


@pytest.fixture
def mirror(mirror_factory: Callable[..., MirrorServer]) -> MirrorServer:
    """One started mirror in front of the session upstream."""
    return mirror_factory()


@pytest.fixture
def dockerd_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Dockerd]]:
    """Make started :class:`Dockerd` instances; all are stopped at teardown."""
    require_tool("dockerd", "docker.io")
    made: list[Dockerd] = []

    def make(registry_mirror: str | None = None, insecure_registries: Sequence[str] = (),
             **kwargs: Any) -> Dockerd:
        daemon = Dockerd(tmp_path / f"dockerd-{len(made)}", registry_mirror, insecure_registries, **kwargs)
        made.append(daemon)
        return daemon.start()

    try:
        yield make
    finally:
        try:
            _stop_all([daemon.stop for daemon in made])
        finally:
            if _failed(request):
                for daemon in made:
                    print(f"--- dockerd {daemon.root_dir} log tail ---\n{daemon.log_tail(40)}")


@pytest.fixture
def fault_proxy(upstream: UpstreamRegistry) -> Iterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of the session upstream."""
    with FaultProxy(upstream.url) as proxy:
        yield proxy


@pytest.fixture
def hub_factory(upstream: UpstreamRegistry) -> Iterator[Callable[..., HubEmulator]]:
    """Make started :class:`HubEmulator` instances (keyword options as in its
    constructor) in front of the session upstream."""
    made: list[HubEmulator] = []

    def make(upstream_url: str | None = None, **kwargs: Any) -> HubEmulator:
        hub = HubEmulator(upstream_url or upstream.url, **kwargs)
        made.append(hub)
        return hub.start()

    try:
        yield make
    finally:
        _stop_all([hub.stop for hub in made])


@pytest.fixture
def hub(hub_factory: Callable[..., HubEmulator]) -> HubEmulator:
    """A started Hub emulator, no credentials, no rate limit."""
    return hub_factory()


@pytest.fixture(scope="session")
def skopeo() -> str:
    """Path of skopeo, or a loud failure saying how to install it."""
    return require_tool("skopeo", "skopeo")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client for talking to the servers the tests start (no proxies from the environment)."""
    with httpx.Client(timeout=60.0, trust_env=False) as session:
        yield session

"""Fixtures for the SIPp integration tests: a per-test ``lab`` that always stops what it started,
and prints every peer's trace summary and the proxy's output when the test fails."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.faultlib import PeerErrors
from tests.integration.harness import SIPP, Lab, Pki, make_test_pki


@pytest.fixture(autouse=True)
def _peer_errors_fail_the_test() -> Iterator[None]:
    """Fails the test when a Python peer it created (faultlib's UA, ClearIP stub, relay) recorded
    an error in its own thread. Autouse, so set up first and torn down last: after the ``lab``
    fixture has closed (and joined) every peer."""
    PeerErrors.take_created()  # peers a previous test leaked are not this test's
    yield
    errors = [e for peer in PeerErrors.take_created() for e in peer.errors]
    if errors:
        pytest.fail(f"{len(errors)} error(s) in the test's own peers:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture(autouse=True)
def _sipp_is_installed(request: pytest.FixtureRequest) -> None:
    """Tests marked ``sipp`` need SIPp: skipped without it, an error under CI=true."""
    if request.node.get_closest_marker("sipp") is not None:
        require_tool("sipp", "Debian package sip-tester", path=Path(SIPP))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"\n######## lab state (files in {tmp_path}) ########\n{the_lab.describe()}")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))

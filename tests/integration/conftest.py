"""Fixtures for integration tests: a :class:`Cluster` that always cleans up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import Cluster


@pytest.fixture
def cluster(request) -> Iterator[Cluster]:
    """Masters and minions started by the test, stopped (by PID) at the end."""
    c = Cluster.create()
    try:
        yield c
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for p in c.procs:
                print(f"===== {p.name} log (tail) =====\n{p.log_text()[-4000:]}")
        c.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the item, so fixtures can print logs on failure."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)

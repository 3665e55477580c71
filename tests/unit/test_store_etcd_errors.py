"""How the etcd store reads the errors behind pyetcd's exceptions (no server needed).

pyetcd raises its own exception classes from inside the handler of the gRPC error, so the status
details live on ``__context__``. The gRPC error here is a small stand-in with ``details()``, the
one method the store reads; the real errors are exercised against real etcd members in
``tests/integration/test_store_contract.py`` (quorum loss) and the leader-loss drill.
"""

from __future__ import annotations

import pytest

from hamaster.store.etcd import _grpc_details, _no_leader, _server_timed_out


class _Status(Exception):
    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def details(self) -> str:
        return self._details


def _raised_from(details: str) -> BaseException:
    """An exception raised while handling a gRPC-like error, as pyetcd does."""
    try:
        try:
            raise _Status(details)
        except _Status:
            raise RuntimeError("etcd connection failed") from None
    except RuntimeError as exc:
        # `from None` hides the context from tracebacks but keeps __context__: mirror pyetcd,
        # which raises plainly inside the handler.
        exc.__suppress_context__ = False
        return exc


@pytest.mark.parametrize("details, timed_out, no_leader", [
    ("etcdserver: request timed out", True, False),
    ("context deadline exceeded", True, False),
    ("etcdserver: no leader", False, True),
    ("etcdserver: leader changed", False, True),
    ("failed to connect to all addresses; Connection refused", False, False),
])
def test_classification(details: str, timed_out: bool, no_leader: bool) -> None:
    exc = _raised_from(details)
    assert _grpc_details(exc) == details
    assert _server_timed_out(exc) is timed_out
    assert _no_leader(exc) is no_leader


def test_no_details_anywhere() -> None:
    assert _grpc_details(ValueError("x")) == ""
    assert _grpc_details(None) == ""
    assert not _server_timed_out(ValueError("deadline exceeded in the message only"))

"""A minion's request/reply exchange with one master, over real ZeroMQ sockets on loopback.

The reply wait is cut into slices (``REPLY_RECHECK_S``) so that a reply whose event-loop
wake-up was lost is still read; these tests pin that slicing changes nothing else: a late
reply is delivered whole, a silent master times out on time, a fresh socket is closed.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import zmq
import zmq.asyncio

from hamaster.minion import connection
from hamaster.minion.connection import MasterConnection


def _conn(ctx: zmq.asyncio.Context, port: int) -> MasterConnection:
    ident = SimpleNamespace(opts={}, minion_id="m1")
    return MasterConnection(ident, ctx, "127.0.0.1", port, on_publication=lambda c, load: None)  # type: ignore[arg-type]


async def _exchange(reply_after: float | None, timeout: float) -> tuple[bytes | None, float, str]:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def master() -> None:
        ident, empty, body = await router.recv_multipart()
        if reply_after is not None:
            await asyncio.sleep(reply_after)        # the master is slow, not the test
            await router.send_multipart([ident, empty, b"re:" + body])

    task = asyncio.create_task(master())
    conn = _conn(ctx, port)
    t0 = time.monotonic()
    outcome, got = "ok", None
    try:
        got = await conn._roundtrip(b"hello", timeout)
    except TimeoutError:
        outcome = "timeout"
    finally:
        took = time.monotonic() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        router.close(0)
        ctx.term()
    return got, took, outcome


def test_reply_later_than_several_recheck_slices_is_delivered() -> None:
    late = connection.REPLY_RECHECK_S * 2.5
    got, took, outcome = asyncio.run(_exchange(reply_after=late, timeout=5.0))
    assert outcome == "ok" and got == b"re:hello"
    assert late <= took < 5.0


def test_silent_master_times_out_on_the_deadline() -> None:
    got, took, outcome = asyncio.run(_exchange(reply_after=None, timeout=1.2))
    assert outcome == "timeout" and got is None
    assert 1.2 <= took < 1.2 + connection.REPLY_RECHECK_S


@pytest.mark.parametrize("timeout", [0.3, 0.7])
def test_timeout_shorter_or_longer_than_one_slice(timeout: float) -> None:
    _, took, outcome = asyncio.run(_exchange(reply_after=None, timeout=timeout))
    assert outcome == "timeout" and timeout <= took < timeout + 0.3


def test_reply_whose_wakeup_was_lost_is_read_at_the_next_recheck(caplog: pytest.LogCaptureFixture) -> None:
    """The one stand-in here: the first ``recv`` is replaced by a future that never completes,
    which is what a lost event-loop wake-up looks like from the caller (it cannot be provoked
    on demand). The reply itself travels over real sockets."""

    async def run() -> tuple[bytes, float]:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        conn = _conn(ctx, port)
        req = conn._new_req()
        real_recv = req.recv
        calls = []

        def recv(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls.append(1)
            return asyncio.get_running_loop().create_future() if len(calls) == 1 else real_recv(*a, **kw)

        req.recv = recv  # type: ignore[method-assign]

        async def master() -> None:
            ident, empty, body = await router.recv_multipart()
            await router.send_multipart([ident, empty, b"re:" + body])

        task = asyncio.create_task(master())
        t0 = time.monotonic()
        try:
            got = await conn._roundtrip(b"hello", 5.0, req)
            took = time.monotonic() - t0
            await task
        finally:
            task.cancel()
            req.close(0)
            router.close(0)
            ctx.term()
        return got, took

    with caplog.at_level("WARNING", logger="hamaster.minion.connection"):
        got, took = asyncio.run(run())
    assert got == b"re:hello"
    assert took < connection.REPLY_RECHECK_S + 1.0      # not the 5 s request timeout
    assert any("missed event-loop wake-up" in r.getMessage() for r in caplog.records)

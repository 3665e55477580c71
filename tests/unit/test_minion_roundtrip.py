"""A minion's request/reply exchange with one master, over real ZeroMQ sockets on loopback.

The reply is awaited in one piece and read once more at the deadline: a late reply is delivered
whole, a silent master times out on time, a master with no connection is told apart
(:class:`Unreachable`), and an event loop that runs late (a busy swarm) loses no reply and logs
no "missed wake-up" (the old 0.5 s re-check raced pyzmq's reader callback and reported one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
import zmq
import zmq.asyncio

from hamaster.minion.connection import MasterConnection, Unreachable
from tests.integration.harness import free_port
from tests.kit import wait_until


def _conn(ctx: zmq.asyncio.Context, port: int) -> MasterConnection:
    ident = SimpleNamespace(opts={}, minion_id="m1")
    return MasterConnection(ident, ctx, "127.0.0.1", port, on_publication=lambda c, load: None)  # type: ignore[arg-type]


async def _exchange(reply_after: float | None, timeout: float, busy: float = 0.0,
                    ) -> tuple[bytes | None, float, str]:
    """One roundtrip against a ROUTER answering after ``reply_after`` s (never if None); with
    ``busy``, the event loop is kept busy by callbacks each holding it that long (CPU work
    standing in for the RSA of a swarm's other identities)."""
    ctx = zmq.asyncio.Context()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, 10000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    loop = asyncio.get_running_loop()
    stop = False

    def hog() -> None:
        end = time.monotonic() + busy
        while time.monotonic() < end:
            pass
        if not stop:
            loop.call_soon(hog)

    def master() -> None:  # its own thread: the master's timing does not depend on our loop
        try:
            ident, empty, body = router.recv_multipart()
        except zmq.ZMQError:
            return
        if reply_after is not None:
            time.sleep(reply_after)        # the master is slow, not the test
            router.send_multipart([ident, empty, b"re:" + body])

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    if busy:
        loop.call_soon(hog)
    conn = _conn(ctx, port)
    t0 = time.monotonic()
    outcome, got = "ok", None
    try:
        got = await conn._roundtrip(b"hello", timeout)
    except TimeoutError:
        outcome = "timeout"
    finally:
        took = time.monotonic() - t0
        stop = True
        await asyncio.to_thread(thread.join, 15)
        router.close(0)
        ctx.term()
    return got, took, outcome


def test_late_reply_is_delivered() -> None:
    got, took, outcome = asyncio.run(_exchange(reply_after=1.3, timeout=5.0))
    assert outcome == "ok" and got == b"re:hello"
    assert 1.3 <= took < 5.0


def test_silent_master_times_out_on_the_deadline() -> None:
    got, took, outcome = asyncio.run(_exchange(reply_after=None, timeout=1.2))
    assert outcome == "timeout" and got is None
    assert 1.2 <= took < 1.2 + 0.3


@pytest.mark.parametrize("timeout", [0.3, 0.7])
def test_timeout_is_kept(timeout: float) -> None:
    _, took, outcome = asyncio.run(_exchange(reply_after=None, timeout=timeout))
    assert outcome == "timeout" and timeout <= took < timeout + 0.3


def test_no_master_is_unreachable_not_busy() -> None:
    """Nothing listens: the frame is never handed over (IMMEDIATE), which the auth back-off
    treats as "master down", not "master busy"."""

    async def run() -> BaseException | None:
        ctx = zmq.asyncio.Context()
        conn = _conn(ctx, free_port())
        try:
            await conn._roundtrip(b"hello", 0.6)
        except TimeoutError as exc:
            return exc
        finally:
            ctx.term()
        return None

    assert isinstance(asyncio.run(run()), Unreachable)


def test_busy_event_loop_loses_no_reply_and_logs_no_missed_wakeup(
        caplog: pytest.LogCaptureFixture) -> None:
    """Replies arrive while callbacks hold the loop 0.2 s at a time: each is delivered, none is
    reported as a missed wake-up (what the old sliced wait logged in swarms)."""
    with caplog.at_level(logging.DEBUG, logger="hamaster.minion.connection"):
        for reply_after in (0.45, 0.5, 0.55, 0.6):
            got, took, outcome = asyncio.run(_exchange(reply_after, 5.0, busy=0.2))
            assert outcome == "ok" and got == b"re:hello", reply_after
            assert took < reply_after + 2.5
    assert not any("wake-up" in r.getMessage() for r in caplog.records)


def test_reply_that_came_during_the_last_late_iteration_is_read() -> None:
    """The reply is in by the deadline but the loop was too busy to read it: the read at the
    deadline takes it instead of reporting a timeout."""
    got, _, outcome = asyncio.run(_exchange(reply_after=0.1, timeout=0.35, busy=0.4))
    assert outcome == "ok" and got == b"re:hello"


@contextlib.asynccontextmanager
async def _pooled_rig(master: Callable[[zmq.Socket, threading.Event], None],
                      ) -> AsyncIterator[MasterConnection]:
    """A connection to a ROUTER served by ``master(router, stop)`` in its own thread; the
    thread, the connection and both sockets are closed on the way out, also on failure."""
    ctx = zmq.asyncio.Context()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, 200)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=master, args=(router, stop), daemon=True)
    thread.start()
    conn = _conn(ctx, port)
    try:
        yield conn
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        await conn.stop()
        router.close(0)
        ctx.term()


def test_parallel_requests_reuse_their_sockets_and_idle_extras_are_closed() -> None:
    """Start-up requests run in parallel, each on its own REQ socket. The sockets are kept for
    the next overlapping requests (no new connections: no churn), and those left unused for
    ``IDLE_REQ_TTL`` are closed, down to one: every connection kept costs the master."""

    async def run() -> None:
        seen: list[bytes] = []
        batch = [4]               # answer once this many requests are held (they overlap)

        def master(router: zmq.Socket, stop: threading.Event) -> None:
            held: list[list[bytes]] = []
            while not stop.is_set():
                try:
                    frames = router.recv_multipart()
                except zmq.Again:
                    continue
                seen.append(frames[0])
                held.append(frames)
                if len(held) >= batch[0]:
                    for ident, empty, body in held:
                        router.send_multipart([ident, empty, b"re:" + body])
                    held = []

        async with _pooled_rig(master) as conn:

            async def parallel(tag: bytes) -> None:
                replies = await asyncio.gather(
                    *(conn._pooled_roundtrip(tag + b"%d" % i, "test", timeout=5.0)
                      for i in range(4)))
                assert sorted(replies) == sorted(b"re:" + tag + b"%d" % i for i in range(4))

            await parallel(b"a")
            first = set(seen)
            assert len(first) == 4 and len(conn._idle_reqs) == 4
            await parallel(b"b")                   # the same four sockets again
            assert set(seen[4:]) == first and len(conn._idle_reqs) == 4
            # as if 100 s had passed without a request
            conn._idle_reqs = [(sock, since - 100) for sock, since in conn._idle_reqs]
            batch[0] = 1
            assert await conn._pooled_roundtrip(b"c", "test", timeout=5.0) == b"re:c"
            assert seen[-1] in first               # served on a kept socket …
            assert len(conn._idle_reqs) == 1       # … the only one still open

    asyncio.run(run())


def _answer_after(router: zmq.Socket, delays: dict[bytes, float], seen: list[bytes],
                  stop: threading.Event) -> None:
    """A master thread: answers each request after ``delays[body]`` seconds (0 if absent),
    each on its own timer, and records the connection (ROUTER identity) it came on."""
    timers: list[threading.Timer] = []
    lock = threading.Lock()

    def reply(frames: list[bytes]) -> None:
        with lock:
            router.send_multipart([frames[0], frames[1], b"re:" + frames[2]])

    while not stop.is_set():
        try:
            with lock:
                frames = router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.002)
            continue
        seen.append(frames[0])
        t = threading.Timer(delays.get(frames[2], 0.0), reply, args=(frames,))
        timers.append(t)
        t.start()
    for t in timers:
        t.cancel()


@pytest.mark.parametrize("first_takes, same_socket", [(0.1, True), (3.0, False)])
def test_a_request_overlapping_a_short_exchange_waits_for_its_socket(
        first_takes: float, same_socket: bool) -> None:
    """A return that overlaps a heartbeat in flight waits (up to ``REQ_REUSE_WAIT``) for that
    socket instead of opening a second connection to the master; behind a slow exchange it
    opens its own after that wait and is not held up further."""

    async def run() -> None:
        seen: list[bytes] = []

        def master(router: zmq.Socket, stop: threading.Event) -> None:
            _answer_after(router, {b"ping": first_takes}, seen, stop)

        async with _pooled_rig(master) as conn:
            assert await conn._pooled_roundtrip(b"hello", "test", timeout=5.0) == b"re:hello"
            ping = asyncio.ensure_future(conn._pooled_roundtrip(b"ping", "test", timeout=5.0))
            # the ping is in flight on the only kept socket once the master has it
            await asyncio.to_thread(wait_until, lambda: len(seen) == 2, 5, 0.005,
                                    what="the master receiving the ping")
            t0 = time.monotonic()
            assert await conn._pooled_roundtrip(b"ret", "test", timeout=5.0) == b"re:ret"
            took = time.monotonic() - t0
            assert await ping == b"re:ping"
            assert len(seen) == 3
            if same_socket:
                assert len(set(seen)) == 1, "the return opened a second connection"
            else:
                assert len(set(seen)) == 2 and seen[2] != seen[1]
                assert took < first_takes - 1.0, f"the return waited {took:.2f} s"

    asyncio.run(run())


def test_heartbeat_hint_spaces_heartbeats_and_stretches_the_dead_window() -> None:
    """A master's ``heartbeat_interval`` hint: taken when longer than our own interval, capped,
    the dead-master window stretched in proportion; nonsense and no hint mean our own."""
    ctx = zmq.asyncio.Context()
    try:
        conn = _conn(ctx, 1)      # defaults: heartbeat 2 s, dead after 6 s
        assert (conn.heartbeat_every, conn.dead_window) == (2.0, 6.0)
        conn._take_heartbeat_hint(10.0)
        assert (conn.heartbeat_every, conn.dead_window) == (10.0, 30.0)
        conn._take_heartbeat_hint(1.5)          # shorter than ours: ours
        assert (conn.heartbeat_every, conn.dead_window) == (2.0, 6.0)
        conn._take_heartbeat_hint(10_000)       # capped
        assert conn.heartbeat_every == 120.0 and conn.dead_window == 360.0
        for nonsense in (True, "10", -5, None, float("nan")):
            conn._take_heartbeat_hint(nonsense)
            assert (conn.heartbeat_every, conn.dead_window) == (2.0, 6.0), nonsense
    finally:
        ctx.term()

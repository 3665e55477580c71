"""The master's auth queue: one waiting _auth per minion, bounded, stale requests shed."""

from __future__ import annotations

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, generate_key_string
from hamaster.master.authqueue import AuthQueue, auth_minion_id


class Clock:
    """A settable clock (the queue's ages are measured with it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _queue(max_len: int = 3, max_age: float = 4.0) -> tuple[AuthQueue, list[str], Clock]:
    shed: list[str] = []
    clock = Clock()
    return AuthQueue(max_len, max_age, shed.append, clock), shed, clock


def test_newer_auth_of_the_same_minion_replaces_the_waiting_one() -> None:
    q, shed, _ = _queue()
    q.offer("a", "a1")
    q.offer("b", "b1")
    q.offer("a", "a2")
    assert shed == ["duplicate"] and len(q) == 2
    assert [q.take(), q.take(), q.take()] == ["b1", "a2", None]


def test_full_queue_drops_the_oldest() -> None:
    q, shed, _ = _queue(max_len=2)
    for mid in ("a", "b", "c"):
        q.offer(mid, mid)
    assert shed == ["full"]
    assert [q.take(), q.take()] == ["b", "c"]


def test_requests_older_than_max_age_are_shed_not_answered() -> None:
    q, shed, clock = _queue(max_age=4.0)
    q.offer("old", "old")
    clock.now += 3.0
    q.offer("new", "new")
    clock.now += 1.5            # old waited 4.5 s, new 1.5 s
    assert q.take() == "new"
    assert shed == ["stale"] and len(q) == 0


def test_auth_frames_are_recognised_and_nothing_else() -> None:
    _, pub = crypto.generate_keypair(2048)
    frame, _ = messages.auth_request("web-1", pub.decode(), messages.new_nonce(), None)
    assert auth_minion_id(frame) == "web-1"
    session = Crypticle(generate_key_string())
    body = messages.stamp_load({"cmd": "_return", "id": "web-1"}, "web-1", b"tok", "n1")
    assert auth_minion_id(messages.aes_request("web-1", session, body)) is None
    assert auth_minion_id(codec.dumps({"enc": "clear", "load": {"cmd": "_auth"}})) is None
    for junk in (b"", b"\xc1", b"\x00" * 10, codec.dumps([1, 2]), b"x" * 100_000):
        assert auth_minion_id(junk) is None


"""Replay and flood defences of the sans-io layer (issue #18): the request replay guard, the
publication serial floor, the new-key throttle, and the request handler that uses them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, SerialGuard
from hamaster.bus.replay import RequestReplayGuard
from hamaster.master.jobs import JobTracker
from hamaster.pki_sync.keys import AuthDecision, KeyRegistry, KeyState, NewKeyThrottle
from hamaster.store.fs import FsStore
from tests.unit.request_fuzz import MINION_ID, Rig, make_rig, resolve

# -- RequestReplayGuard ------------------------------------------------------------------------


def test_guard_refuses_a_seen_nonce_and_forgets_only_what_the_window_refuses() -> None:
    g = RequestReplayGuard(ttl=300, cap=100)
    assert g.admit("a", 1000, now=1000) is None
    assert g.admit("a", 1000, now=1000) is not None
    assert g.admit("b", 1001, now=1001) is None
    # 400 s later both are older than the window: forgotten (the window refuses them now)
    assert g.admit("c", 1400, now=1400) is None
    assert len(g) == 1
    assert g.floor == float("-inf")


def test_guard_eviction_raises_the_floor_so_no_replay_reopens() -> None:
    g = RequestReplayGuard(ttl=0, cap=512)  # no window: the floor is the only memory
    captured = ("n-captured", 100)
    assert g.admit(*captured, now=100) is None
    for i in range(600):  # the old code forgot the captured nonce after 512 newer ones
        assert g.admit(f"n{i}", 101 + i // 10, now=200) is None
    assert len(g) == 512
    assert g.floor >= 100
    assert g.admit(*captured, now=200) is not None
    assert g.admit("brand-new", 200, now=200) is None


def test_guard_without_ts_judges_by_nonce() -> None:
    g = RequestReplayGuard(ttl=0, cap=2)
    assert g.admit("x", None, now=1) is None
    assert g.admit("x", None, now=1) is not None


# -- SerialGuard floor ---------------------------------------------------------------------------


def test_serial_floor_refuses_publications_made_before_auth() -> None:
    g = SerialGuard()
    g.set_floor("K", 7)
    assert not g.accept("K", 7)
    assert not g.accept("K", 3)
    assert g.accept("K", 8)
    assert not g.accept("K", 8)
    # a publication that only decrypted after the re-auth that set the floor
    g2 = SerialGuard()
    g2.set_floor("K2", 5)
    assert g2.accept("K2", 5, ignore_floor=True)
    assert not g2.accept("K2", 5, ignore_floor=True)
    # a floor never moves the mark of a key whose publications this process has seen
    g.set_floor("K", 100)
    assert g.accept("K", 9)
    g.set_floor("K", True)  # not a serial
    assert g.accept("K", 10)


# -- new-key throttle ------------------------------------------------------------------------------


def test_throttle_rate_and_cap() -> None:
    now = [0.0]
    seen: list[str] = []
    t = NewKeyThrottle(rate=2, max_pending=5, clock=lambda: now[0])
    t.on_throttle = seen.append
    assert [t.allow(0) for _ in range(3)] == [True, True, False]
    now[0] += 1.0
    assert t.allow(2) and t.allow(3) and not t.allow(4)
    now[0] += 10.0
    assert not t.allow(5)
    assert seen == ["rate", "rate", "cap"]
    assert NewKeyThrottle().allow(10**6)  # zero: unbounded


def test_registry_holds_back_new_keys_without_recording_them(tmp_path) -> None:
    _, pub = crypto.generate_keypair(1024)
    reg = KeyRegistry(FsStore(tmp_path / "pki"), "", throttle=NewKeyThrottle(0, 3))
    reg.load()
    decisions = [reg.authorize(f"new{i}", pub.decode()) for i in range(6)]
    assert decisions == [AuthDecision.PENDING] * 6
    assert len(reg.list_keys()[KeyState.PENDING]) == 3
    # auto_accept is not bounded (the operator accepts whoever asks)
    auto = KeyRegistry(FsStore(tmp_path / "pki2"), "", auto_accept=True,
                       throttle=NewKeyThrottle(0, 1))
    auto.load()
    assert all(auto.authorize(f"a{i}", pub.decode()) is AuthDecision.ACCEPTED for i in range(3))


# -- stale returns ---------------------------------------------------------------------------------


def test_older_return_does_not_replace_a_newer_one() -> None:
    tr = JobTracker()
    tr.add("20261206120000000000", {}, ["m"])
    assert not tr.is_stale_return("20261206120000000000", "m", 200)
    assert tr.is_stale_return("20261206120000000000", "m", 100)
    assert not tr.is_stale_return("20261206120000000000", "m", 200)
    assert not tr.is_stale_return("20261206120000000001", "m", 1)  # unknown job: no judgement


# -- the request handler ------------------------------------------------------------------------


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = make_rig()
    try:
        yield r
    finally:
        r.close()


def _answer(rig: Rig, frame: bytes) -> object:
    return codec.loads(resolve(rig.handler.handle(frame, allow_defer=True)))


def test_handler_window_refuses_an_old_request_even_when_its_nonce_was_forgotten(rig: Rig) -> None:
    now = [time.time()]
    rig.handler.clock = lambda: now[0]
    frame = rig.aes_frame({"cmd": "_minion_event", "tag": "t"}, now=now[0])
    assert isinstance(_answer(rig, frame), bytes)
    assert _answer(rig, frame) == "bad load"
    now[0] += 301  # past request_server_ttl (300 s by default)
    assert isinstance(_answer(rig, rig.aes_frame({"cmd": "_minion_event"}, now=now[0])), bytes)
    assert len(rig.handler.sessions[MINION_ID].replay) == 1  # the captured nonce is forgotten
    assert _answer(rig, frame) == "bad load"
    # a minion clock 200 s behind is inside the tolerance
    assert isinstance(_answer(rig, rig.aes_frame({"cmd": "_minion_event"}, now=now[0] - 200)),
                      bytes)


def test_handler_requires_a_nonce(rig: Rig) -> None:
    body = {"cmd": "_minion_event", "id": MINION_ID, "ts": int(time.time()), "tok": rig.tok}
    frame = codec.dumps({"enc": "aes", "load": rig.session.dumps(body),
                         "version": 3, "id": MINION_ID})
    assert _answer(rig, frame) == "bad load"


def test_refused_auth_keeps_the_accepted_session(rig: Rig) -> None:
    foreign = crypto.normalize_pem(crypto.generate_keypair(1024)[1])
    for _ in range(3):
        reply = _answer(rig, rig.auth_frame(pub=foreign, token=False))
        assert isinstance(reply, dict) and "sig" in reply  # a signed refusal
    sess = rig.handler.sessions[MINION_ID]
    assert sess.session.key_string == rig.session.key_string
    ret = _answer(rig, rig.aes_frame({"cmd": "_hamaster_ping"}))
    assert isinstance(ret, bytes)


def test_large_request_is_decrypted_off_the_loop(rig: Rig) -> None:
    frame = rig.aes_frame({"cmd": "_return", "jid": "20261206120000000000",
                           "return": "x" * (400 * 1024)})
    deferred = rig.handler.handle(frame, allow_defer=True)
    assert not isinstance(deferred, bytes) and deferred.finish is not None
    reply = deferred.finish(deferred.run())
    assert messages.parse_aes_reply(reply, rig.session, _nonce_of(rig, frame)) is None
    # the same frame again: the finish step (on the loop) sees the replay
    again = rig.handler.handle(frame, allow_defer=True)
    assert codec.loads(again.finish(again.run())) == "bad load"


def _nonce_of(rig: Rig, frame: bytes) -> str:
    return Crypticle(rig.session.key_string).loads(
        codec.to_bytes(codec.loads(frame)["load"]))["nonce"]


def test_auth_reply_carries_the_publish_serial(rig: Rig) -> None:
    rig.handler.publish_key.next_serial()
    rig.handler.publish_key.next_serial()
    nonce = messages.new_nonce()
    frame, token = messages.auth_request(MINION_ID, rig.minion_pub_text, nonce, rig.master_pub)
    result = messages.parse_auth_reply(
        resolve(rig.handler.handle(frame)), minion_priv=rig.minion_priv, nonce=nonce,
        token_plain=token, pinned_master_pub=rig.handler.master_pub_text)
    assert result.publish_serial == 2


# -- saved serial marks (a stock salt-master gives no serial at auth) ---------------------------


def test_serial_marks_survive_a_restart(tmp_path) -> None:
    from hamaster.minion.serialmarks import SerialMarks

    marks = SerialMarks(str(tmp_path / "cache"))
    assert marks.get("K") is None
    marks.record("K", 5)
    marks.record("K", 3)  # never lowered
    path = tmp_path / "cache" / "publication_serials.json"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert "K" not in path.read_text()  # digests, not keys
    again = SerialMarks(str(tmp_path / "cache"))  # the minion restarted
    assert again.get("K") == 5
    guard = SerialGuard()
    guard.set_floor("K", again.get("K"))
    assert not guard.accept("K", 5) and guard.accept("K", 6)
    path.write_text("{not json")
    assert SerialMarks(str(tmp_path / "cache")).get("K") is None

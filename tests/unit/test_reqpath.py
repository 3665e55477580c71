"""The master's request path: wire checks once on the loop, only the store-bound rest deferred.

A real :class:`~hamaster.master.reqhandler.RequestHandler` over a real key registry on a
temporary ``FsStore`` (``tests/unit/request_fuzz.py``'s rig); no sockets.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.master.reqhandler import Deferred
from tests.unit.request_fuzz import MINION_ID, Rig, make_rig, resolve


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = make_rig()
    try:
        yield r
    finally:
        r.close()


def _count(rig: Rig, kind: str, label: str) -> float:
    counter = rig.handler.metrics.requests_rejected if kind == "reject" \
        else rig.handler.metrics.auth_requests
    return counter.labels("fuzz", label)._value.get()


def _new_key() -> str:
    return crypto.normalize_pem(crypto.generate_keypair(1024)[1])


def test_accepted_auth_is_answered_at_once(rig: Rig) -> None:
    reply = rig.handler.handle(rig.auth_frame(), allow_defer=True)
    assert isinstance(reply, bytes)
    assert isinstance(codec.loads(reply), dict) and "sig" in codec.loads(reply)


def test_deferred_auth_runs_the_wire_checks_once(rig: Rig, monkeypatch) -> None:
    """A new key needs the store: the Deferred carries the checked request and runs only the
    key decision (the old path raised and re-ran the whole clear handler in the pool)."""
    calls = []
    real = messages.parse_auth_load
    monkeypatch.setattr(messages, "parse_auth_load", lambda load: calls.append(1) or real(load))
    deferred = rig.handler.handle(rig.auth_frame(mid="newbie", pub=_new_key()), allow_defer=True)
    assert isinstance(deferred, Deferred) and deferred.finish is None
    assert len(calls) == 1
    reply = codec.loads(deferred.run())
    assert codec.loads(codec.to_bytes(reply["load"]))["ret"] is True  # pending
    assert len(calls) == 1
    assert _count(rig, "auth", "pending") == 1


def test_without_allow_defer_the_store_decision_runs_inline(rig: Rig) -> None:
    reply = rig.handler.handle(rig.auth_frame(mid="newbie", pub=_new_key()))
    assert isinstance(reply, bytes)
    frame = rig.aes_frame({"cmd": "_serve_file", "path": "top.sls"})
    assert isinstance(rig.handler.handle(frame), bytes)


def test_store_command_defers_only_the_command(rig: Rig) -> None:
    frame = rig.aes_frame({"cmd": "_serve_file", "path": "top.sls"})
    deferred = rig.handler.handle(frame, allow_defer=True)
    assert isinstance(deferred, Deferred) and deferred.kind == "store"
    # the nonce was recorded on the loop: the same frame again is a replay before any deferral
    assert codec.loads(rig.handler.handle(frame, allow_defer=True)) == messages.BAD_LOAD
    assert _count(rig, "reject", "replay") == 1
    ret = messages.parse_aes_reply(deferred.run(), rig.session, _nonce(rig, frame))
    assert ret == {"data": "", "dest": "top.sls"}


def test_pillar_defers_with_its_own_kind(rig: Rig) -> None:
    rig.handler.defer_pillar = True
    deferred = rig.handler.handle(rig.aes_frame({"cmd": "_pillar"}), allow_defer=True)
    assert isinstance(deferred, Deferred) and deferred.kind == "pillar"
    assert isinstance(codec.loads(deferred.run()), dict)


def test_a_failing_store_decision_is_answered_not_raised(rig: Rig, monkeypatch) -> None:
    def broken(mid: str, pub: str) -> None:
        raise RuntimeError("store bug")

    deferred = rig.handler.handle(rig.auth_frame(mid="newbie", pub=_new_key()), allow_defer=True)
    assert isinstance(deferred, Deferred)
    monkeypatch.setattr(rig.handler.keys, "authorize", broken)
    assert codec.loads(deferred.run()) == messages.BAD_LOAD
    assert _count(rig, "reject", "internal") == 1


def test_invalid_id_with_unsupported_sig_algo_is_refused_as_salt_does(rig: Rig) -> None:
    """It used to reach the signature with an unknown algorithm: an internal error."""
    frame, _ = messages.auth_request("../x", rig.minion_pub_text, messages.new_nonce(), None,
                                     sig_algo="PKCS1v15-MD5")
    reply = resolve(rig.handler.handle(frame, allow_defer=True))
    assert reply == messages.auth_unsigned_reply("bad sig algo")
    assert _count(rig, "reject", "internal") == 0
    assert _count(rig, "auth", "invalid_id") == 1


@pytest.mark.parametrize("enc_algo,token,want", [
    ("OAEP-MD5", False, messages.plain_reply("Some exception handling minion payload")),
    ("OAEP-MD5", True, messages.auth_unsigned_reply("bad enc algo")),
])
def test_bad_enc_algo_through_the_handler(rig: Rig, enc_algo: str, token: bool,
                                          want: bytes) -> None:
    load = {"cmd": "_auth", "id": MINION_ID, "nonce": messages.new_nonce(), "enc_algo": enc_algo,
            "pub": rig.minion_pub_text}
    if token:
        load["token"] = b"t" * 256
    assert rig.handler.handle(messages.clear_request(load), allow_defer=True) == want
    assert _count(rig, "auth", "bad_algo") == 1


def test_unknown_clear_command_is_a_bad_load(rig: Rig) -> None:
    frame = messages.clear_request({"cmd": "publish", "fun": "test.ping", "id": "cli"})
    assert codec.loads(rig.handler.handle(frame, allow_defer=True)) == messages.BAD_LOAD
    assert _count(rig, "reject", "unknown_clear_cmd") == 1


def _nonce(rig: Rig, frame: bytes) -> str:
    from hamaster.bus.crypticle import Crypticle

    inner = Crypticle(rig.session.key_string).loads(codec.to_bytes(codec.loads(frame)["load"]))
    return inner["nonce"]

"""Byte-level checks of the wire code against frames captured from real Salt 3008.5.

The vectors (test-only keys) live in ``shared/vectors/salt-3008.5`` next to the checkout; see its
README.md for what each ``seq`` is. No sockets: every test works on the recorded bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, CrypticleError

_DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "salt-3008.5"


def _vector_dir() -> Path:
    if _DEFAULT_DIR.is_dir():
        return _DEFAULT_DIR
    env = os.environ.get("HAMASTER_VECTORS")
    if env and Path(env).is_dir():
        return Path(env)
    return _DEFAULT_DIR


VDIR = _vector_dir()

pytestmark = pytest.mark.skipif(
    not VDIR.is_dir(),
    reason=f"Salt 3008.5 wire vectors not found at {_DEFAULT_DIR} (set HAMASTER_VECTORS)",
)

# Publications from this seq on are under the rotated publish key #2 (README: seq 40-46).
ROTATION_SEQ = 41


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _jsonl(name: str) -> dict[int, dict]:
    path = VDIR / name
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["seq"]] = rec
    return out


FRAMES = _jsonl("frames.jsonl")
DECODED = _jsonl("decoded.jsonl")


def _from_json(obj: Any) -> Any:
    """Undo decoded.jsonl's JSON encoding of msgpack values (``__bytes__`` → bytes)."""
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        assert not (set(obj) & {"__bin__", "__ext__", "__map__"}), obj
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _seqs(pred) -> list[int]:
    return sorted(s for s, rec in DECODED.items() if pred(rec))


def _kind_seqs(prefix: str) -> list[int]:
    return _seqs(lambda r: (r.get("kind") or "").startswith(prefix))


def payload(seq: int) -> bytes:
    """The Salt payload of a record: the last ZeroMQ frame."""
    return base64.b64decode(FRAMES[seq]["frames_b64"][-1])


@cache
def _keyfile(name: str) -> bytes:
    return (VDIR / "keys" / name).read_bytes()


@cache
def master_priv():
    return crypto.load_private_key(_keyfile("master.pem"))


@cache
def minion_priv():
    return crypto.load_private_key(_keyfile("minion.pem"))


@cache
def derived() -> dict:
    return json.loads(_keyfile("derived.json"))


def session_key() -> str:
    keys = derived()["session_keys"]
    assert len({k["key_string"] for k in keys}) == 1
    return keys[0]["key_string"]


def publish_key(number: int) -> str:
    return derived()["publish_aes_keys"][number - 1]["key_string"]


def request_nonce(seq: int) -> str:
    """The nonce of the request ``seq`` answers: clear ``_auth`` load or decrypted aes load."""
    req = DECODED[DECODED[seq]["reply_to_seq"]]
    if req["kind"].startswith("clear_request"):
        return req["envelope"]["load"]["nonce"]
    return req["inner"]["nonce"]


def force_iv(monkeypatch, fixed_iv: bytes) -> None:
    """Make every Crypticle encryption in this test use ``fixed_iv`` (replaying a capture)."""
    real = Crypticle.encrypt
    monkeypatch.setattr(
        Crypticle, "encrypt", lambda self, data, iv=None: real(self, data, iv=fixed_iv)
    )


def _priv_for(pub):
    for priv in (minion_priv(), master_priv()):
        if priv.public_key().public_numbers() == pub.public_numbers():
            return priv
    raise AssertionError("unknown key")


def force_oaep(monkeypatch, table: dict[bytes, bytes]) -> None:
    """Replay captured OAEP ciphertexts (OAEP is randomised) for known plaintexts."""

    def oaep(key, data, algo=crypto.DEFAULT_ENC_ALGO):
        assert crypto.oaep_decrypt(_priv_for(key), table[data], algo) == data
        return table[data]

    monkeypatch.setattr(crypto, "oaep_encrypt", oaep)


# --------------------------------------------------------------------------------------------
# The vector set itself
# --------------------------------------------------------------------------------------------


def test_vector_set_is_complete():
    assert len(FRAMES) == 70
    assert set(FRAMES) == set(DECODED)
    assert _keyfile("minion_id").decode().strip() == "vecminion"
    checks = json.loads((VDIR / "checks.json").read_text())["checks"]
    assert all(c["fail"] == 0 for c in checks.values())


@pytest.mark.parametrize("seq", sorted(FRAMES))
def test_frame_roundtrips_byte_identically(seq):
    rec = FRAMES[seq]
    data = payload(seq)
    if rec["channel"] == "req":
        frames = [base64.b64decode(f) for f in rec["frames_b64"]]
        assert len(frames) == 3 and frames[1] == b""
    obj = codec.loads(data)
    assert codec.dumps(obj) == data
    if "envelope" in DECODED[seq]:
        assert obj == _from_json(DECODED[seq]["envelope"])


def test_encoder_uses_str16_never_str8():
    # 32..255-byte strings are str16 (0xda) on Salt's wire, never str8 (0xd9).
    assert codec.dumps("x" * 32)[:3] == b"\xda\x00\x20"
    assert codec.dumps(b"\xff" * 255)[:3] == b"\xda\x00\xff"
    assert codec.dumps("x" * 31)[:1] == b"\xbf"
    assert codec.dumps(1795647182)[:1] == b"\xce"
    assert codec.dumps(47505)[:1] == b"\xcd"


# --------------------------------------------------------------------------------------------
# _auth
# --------------------------------------------------------------------------------------------

SIGNED_AUTH_REPLIES = _seqs(
    lambda r: (r.get("kind") or "").startswith("auth_reply:") and r["kind"] != "auth_reply:unsigned"
)


def test_signed_auth_reply_seqs_present():
    assert SIGNED_AUTH_REPLIES == [2, 4, 6, 44, 69]


@pytest.mark.parametrize("seq", SIGNED_AUTH_REPLIES)
def test_signed_auth_reply_verifies_and_resigns_identically(seq):
    env = codec.loads(payload(seq))
    assert list(env) == ["enc", "load", "sig"]  # no "version" in the reply
    body, sig = codec.to_bytes(env["load"]), codec.to_bytes(env["sig"])
    assert crypto.verify(master_priv().public_key(), body, sig)
    assert crypto.sign(master_priv(), body) == sig
    assert codec.loads(body)["nonce"] == request_nonce(seq)


@pytest.mark.parametrize("seq,ret", [(2, True), (4, True), (69, False)])
def test_auth_status_reply_matches_capture(seq, ret):
    frame = messages.auth_status_reply(master_priv(), ret, request_nonce(seq))
    assert frame == payload(seq)
    result = messages.parse_auth_reply(
        frame,
        minion_priv=minion_priv(),
        nonce=request_nonce(seq),
        token_plain=None,
        pinned_master_pub=_keyfile("master.pub").decode(),
    )
    assert result.status == ("pending" if ret else "rejected")


@pytest.mark.parametrize("seq", [6, 44])
@pytest.mark.parametrize("pinned", [True, False])
def test_accepted_reply_parses_to_derived_keys(seq, pinned):
    token = derived()["auth_token_plaintext"].encode() if seq == 44 else None
    pub_text = _keyfile("master.pub").decode()
    result = messages.parse_auth_reply(
        payload(seq),
        minion_priv=minion_priv(),
        nonce=request_nonce(seq),
        token_plain=token,
        pinned_master_pub=pub_text if pinned else None,
        master_finger=crypto.pem_fingerprint(pub_text),
    )
    number = 1 if seq == 6 else 2
    assert result.status == "accepted"
    assert result.aes_key == publish_key(number)
    assert result.session_key == session_key() == derived()["master_cache_sessions_file"]
    assert result.publish_port == 47505
    assert result.master_pub_text == crypto.normalize_pem(pub_text)


def test_accepted_reply_with_token_also_parses_without_checking_token():
    result = messages.parse_auth_reply(
        payload(44),
        minion_priv=minion_priv(),
        nonce=request_nonce(44),
        token_plain=None,
        pinned_master_pub=_keyfile("master.pub").decode(),
    )
    assert result.aes_key == publish_key(2)


def test_accepted_reply_without_token_field_refuses_a_token_we_sent():
    with pytest.raises(messages.AuthReplyError, match="token"):
        messages.parse_auth_reply(
            payload(6),
            minion_priv=minion_priv(),
            nonce=request_nonce(6),
            token_plain=b"we sent one",
            pinned_master_pub=_keyfile("master.pub").decode(),
        )


def test_accepted_reply_wrong_token_refused():
    with pytest.raises(messages.AuthReplyError, match="token"):
        messages.parse_auth_reply(
            payload(44),
            minion_priv=minion_priv(),
            nonce=request_nonce(44),
            token_plain=b"not-the-token",
            pinned_master_pub=_keyfile("master.pub").decode(),
        )


@pytest.mark.parametrize("seq", [6, 44])
def test_auth_accepted_reply_rebuilds_capture(seq, monkeypatch):
    inner = codec.loads(codec.to_bytes(codec.loads(payload(seq))["load"]))
    number = 1 if seq == 6 else 2
    token_plain = derived()["auth_token_plaintext"].encode() if seq == 44 else None
    table = {
        publish_key(number).encode(): inner["aes"],
        session_key().encode(): inner["session"],
    }
    if token_plain is not None:
        table[token_plain] = inner["token"]
    force_oaep(monkeypatch, table)
    frame = messages.auth_accepted_reply(
        master_priv(),
        inner["pub_key"],
        minion_priv().public_key(),
        aes_key=publish_key(number),
        session_key=session_key(),
        publish_port=47505,
        nonce=request_nonce(seq),
        token_plain=token_plain,
    )
    assert frame == payload(seq)
    assert messages.aes_key_signature(master_priv(), publish_key(number)) == inner["sig"]


def test_auth_reply_pub_key_is_normalised_master_key():
    inner = codec.loads(codec.to_bytes(codec.loads(payload(6))["load"]))
    assert list(inner) == ["enc", "pub_key", "publish_port", "aes", "session", "sig", "nonce"]
    text = _keyfile("master.pub").decode()
    assert inner["pub_key"] == text.strip()
    assert inner["pub_key"] == crypto.public_pem(master_priv().public_key())
    inner44 = codec.loads(codec.to_bytes(codec.loads(payload(44))["load"]))
    assert list(inner44) == [
        "enc", "pub_key", "publish_port", "token", "aes", "session", "sig", "nonce",
    ]  # fmt: skip


@pytest.mark.parametrize("seq", _seqs(lambda r: r.get("kind") == "clear_request:_auth"))
def test_auth_request_parses(seq):
    req = messages.parse_request(payload(seq))
    assert isinstance(req, messages.ClearRequest) and req.version == 3
    auth = messages.parse_auth_load(req.load)
    assert auth.minion_id == "vecminion"
    assert re.fullmatch(r"[0-9a-f]{32}", auth.nonce)
    assert list(req.load)[:2] == ["cmd", "id"] and list(req.load)[-1] == "pub"
    if DECODED[seq].get("probe") != "auth-other-key-same-id":
        assert auth.pub == _keyfile("minion.pub").decode().strip()
    if seq == 43:
        token = crypto.oaep_decrypt(master_priv(), auth.token)
        assert token.decode() == derived()["auth_token_plaintext"]


@pytest.mark.parametrize("seq", [1, 43])
def test_auth_request_rebuilds_capture(seq, monkeypatch):
    load = messages.parse_request(payload(seq)).load
    token_plain = None
    master_pub = None
    if seq == 43:
        token_plain = derived()["auth_token_plaintext"].encode()
        force_oaep(monkeypatch, {token_plain: load["token"]})
        master_pub = master_priv().public_key()
    frame, token = messages.auth_request(
        "vecminion",
        _keyfile("minion.pub").decode().strip(),
        load["nonce"],
        master_pub,
        token_plain=token_plain,
    )
    assert frame == payload(seq)
    assert token == token_plain


def test_bad_algorithm_replies_match_capture():
    assert messages.plain_reply("Some exception handling minion payload") == payload(63)
    assert messages.auth_unsigned_reply("bad enc algo") == payload(65)
    assert messages.auth_unsigned_reply("bad sig algo") == payload(67)
    for seq in (63, 65, 67):
        with pytest.raises(messages.AuthReplyError):
            messages.parse_auth_reply(
                payload(seq),
                minion_priv=minion_priv(),
                nonce=request_nonce(seq),
                token_plain=None,
                pinned_master_pub=_keyfile("master.pub").decode(),
            )


@pytest.mark.parametrize("seq", _seqs(lambda r: r.get("kind") == "clear_request:_auth"
                                     and not (r.get("probe") or "").startswith("auth-bad-")))
def test_auth_request_passes_the_wire_checks(seq):
    auth = messages.parse_auth_request(messages.parse_request(payload(seq)))
    assert auth == messages.parse_auth_load(messages.parse_request(payload(seq)).load)


@pytest.mark.parametrize("request_seq,reply_seq", [(62, 63), (64, 65), (66, 67)])
def test_auth_request_bad_algorithm_refusal_is_salts_reply(request_seq, reply_seq):
    assert DECODED[reply_seq]["reply_to_seq"] == request_seq
    with pytest.raises(messages.AuthRefused) as exc:
        messages.parse_auth_request(messages.parse_request(payload(request_seq)))
    assert exc.value.reason == "bad_algo"
    assert exc.value.reply(master_priv()) == payload(reply_seq)


def test_auth_request_invalid_id_refusal_is_salts_signed_false():
    """The signed ``{"ret": False, "nonce"}`` Salt gave in seq 69, for an id Salt calls invalid."""
    load = dict(messages.parse_request(payload(68)).load)
    load["id"] = "../vecminion"
    with pytest.raises(messages.AuthRefused) as exc:
        messages.parse_auth_request(messages.ClearRequest(load=load, version=3))
    assert exc.value.reason == "invalid_id"
    assert exc.value.reply(master_priv()) == payload(69)


@pytest.mark.parametrize("seq", _seqs(lambda r: r.get("kind") == "clear_request:publish"))
def test_cli_publish_is_not_a_served_clear_command(seq):
    with pytest.raises(messages.BadRequest) as exc:
        messages.parse_auth_request(messages.parse_request(payload(seq)))
    assert exc.value.reason == "unknown_clear_cmd"


# --------------------------------------------------------------------------------------------
# X9.31
# --------------------------------------------------------------------------------------------


def test_minion_tok_is_deterministic_x931_of_salt():
    tok = base64.b64decode(derived()["tok_x931_of_b'salt'_with_minion_key_b64"])
    assert crypto.x931_sign(minion_priv(), b"salt") == tok
    assert crypto.x931_recover(minion_priv().public_key(), tok) == b"salt"


def _x931_vectors() -> list[dict]:
    path = VDIR / "keys" / "x931_vectors.json"
    return json.loads(path.read_text())["vectors"] if path.is_file() else []


@pytest.mark.parametrize("vec", _x931_vectors(), ids=lambda v: v["public_op_branch"])
def test_x931_vectors(vec):
    priv = master_priv() if vec["signer"].startswith("master") else minion_priv()
    sig = base64.b64decode(vec["signature_b64"])
    msg = vec["message_ascii"].encode()
    assert crypto.x931_recover(priv.public_key(), sig) == msg
    assert crypto.x931_sign(priv, msg) == sig
    if "aes_key_string" in vec:
        assert hashlib.sha256(vec["aes_key_string"].encode()).hexdigest().encode() == msg
        assert messages.aes_key_signature(priv, vec["aes_key_string"]) == sig
    # Not valid under the other key.
    other = minion_priv() if priv is master_priv() else master_priv()
    assert crypto.x931_recover(other.public_key(), sig) != msg


def test_x931_vectors_cover_both_branches():
    branches = {v["public_op_branch"].split(",")[0] for v in _x931_vectors()}
    assert branches == {"direct", "n_minus"}
    assert len(_x931_vectors()) == 5


# --------------------------------------------------------------------------------------------
# aes requests and replies (session Crypticle)
# --------------------------------------------------------------------------------------------

AES_REQUESTS = _kind_seqs("aes_request:")
AES_REPLIES = _kind_seqs("aes_reply:")
WRONG_KEY_PROBE, VERSION2_PROBE, NO_TOK_PROBE = 54, 56, 58


def test_aes_seqs_present():
    assert len(AES_REQUESTS) == 15  # 11 minion requests + 4 synthetic probes
    assert len(AES_REPLIES) == 11  # 10 to the minion + 1 to the unknown-cmd probe
    assert {WRONG_KEY_PROBE, VERSION2_PROBE, NO_TOK_PROBE} <= set(AES_REQUESTS)


@pytest.mark.parametrize("seq", AES_REQUESTS)
def test_aes_request_opens_with_session_key(seq):
    minimum = 2 if seq == VERSION2_PROBE else 3
    req = messages.parse_request(payload(seq), minimum_version=minimum)
    assert isinstance(req, messages.AesRequest)
    assert req.minion_id == "vecminion"
    assert (req.enc_algo, req.sig_algo) == ("OAEP-SHA1", "PKCS1v15-SHA1")
    assert list(codec.loads(payload(seq))) == [
        "enc",
        "load",
        "version",
        "id",
        "enc_algo",
        "sig_algo",
    ]
    session = Crypticle(session_key())
    minion_pub = minion_priv().public_key()
    if seq == WRONG_KEY_PROBE:
        with pytest.raises(messages.BadRequest) as exc:
            messages.open_aes_request(req, session, minion_pub)
        assert exc.value.reason == "decrypt"
        return
    if seq == NO_TOK_PROBE:
        with pytest.raises(messages.BadRequest) as exc:
            messages.open_aes_request(req, session, minion_pub)
        assert exc.value.reason == "no_token"
        return
    load, tok = messages.open_aes_request(req, session, minion_pub)
    assert load == _from_json(DECODED[seq]["inner"])
    assert tok == crypto.x931_sign(minion_priv(), b"salt")
    assert load["id"] == req.minion_id
    # Already-proved tok: same result without the RSA check.
    assert messages.open_aes_request(req, session, minion_pub, verified_tok=tok)[0] == load
    # ts window against the capture time.
    t = FRAMES[seq]["t"]
    messages.open_aes_request(req, session, minion_pub, now=t, ttl=5)
    with pytest.raises(messages.BadRequest) as exc:
        messages.open_aes_request(req, session, minion_pub, now=t + 3600, ttl=5)
    assert exc.value.reason == "replay"


def test_wrong_key_probe_opens_with_zero_key():
    req = messages.parse_request(payload(WRONG_KEY_PROBE))
    zero = Crypticle(base64.b64encode(bytes(56)).decode())
    load, _ = messages.open_aes_request(req, zero, minion_priv().public_key())
    assert load["cmd"] == "_vector_unknown_cmd"


def test_version2_probe_refused_by_default():
    with pytest.raises(messages.BadRequest) as exc:
        messages.parse_request(payload(VERSION2_PROBE))
    assert exc.value.reason == "version"


def test_not_an_envelope_probe_is_malformed():
    assert codec.loads(payload(60)) == {"hello": "world"}
    with pytest.raises(messages.BadRequest) as exc:
        messages.parse_request(payload(60))
    assert exc.value.reason == "malformed"


def test_refused_frames_claimed_id_for_the_log():
    assert messages.claimed_id(payload(VERSION2_PROBE)) == "vecminion"  # envelope id
    assert messages.claimed_id(payload(1)) == "vecminion"  # clear _auth: the load's id
    assert messages.claimed_id(payload(60)) is None  # {"hello": "world"}
    assert messages.claimed_id(payload(60)[:-3]) is None  # truncated
    assert messages.claimed_id(codec.dumps({"id": "x" * 256, "enc": "aes"})) is None
    assert messages.claimed_id(codec.dumps(["vecminion"])) is None


def test_aes_request_tok_from_other_key_refused():
    req = messages.parse_request(payload(AES_REQUESTS[0]))
    with pytest.raises(messages.BadRequest) as exc:
        messages.open_aes_request(req, Crypticle(session_key()), master_priv().public_key())
    assert exc.value.reason == "bad_token"


@pytest.mark.parametrize("seq", [s for s in AES_REQUESTS if s != WRONG_KEY_PROBE])
def test_aes_request_reencrypts_identically(seq, monkeypatch):
    env = codec.loads(payload(seq))
    ct = codec.to_bytes(env["load"])
    session = Crypticle(session_key())
    inner = session.loads(ct)
    assert session.dumps(inner, iv=ct[:16]) == ct
    force_iv(monkeypatch, ct[:16])
    frame = messages.aes_request("vecminion", session, inner, version=env["version"])
    assert frame == payload(seq)


@pytest.mark.parametrize("seq", AES_REPLIES)
def test_aes_reply_decrypts_and_reencrypts_identically(seq, monkeypatch):
    session = Crypticle(session_key())
    nonce = request_nonce(seq)
    ret = messages.parse_aes_reply(payload(seq), session, nonce)
    assert ret == _from_json(DECODED[seq]["inner"])
    ct = codec.loads(payload(seq))
    assert isinstance(ct, bytes)
    assert codec.dumps(session.dumps(ret, nonce=nonce, iv=ct[:16])) == payload(seq)
    force_iv(monkeypatch, ct[:16])
    assert messages.aes_reply(session, ret, nonce) == payload(seq)


@pytest.mark.parametrize("seq", AES_REPLIES[:2])
def test_aes_reply_wrong_nonce_or_key_refused(seq):
    with pytest.raises(messages.BadLoadReply):
        messages.parse_aes_reply(payload(seq), Crypticle(session_key()), "0" * 32)
    with pytest.raises(messages.BadLoadReply):
        messages.parse_aes_reply(payload(seq), Crypticle(publish_key(1)), request_nonce(seq))


def test_observed_aes_return_values():
    returns = {
        DECODED[s]["kind"].split(":", 1)[1]: _from_json(DECODED[s]["inner"]) for s in AES_REPLIES
    }
    assert returns["_minion_event"] is None
    assert returns["_return"] is None
    assert returns["_mine"] is True
    assert returns["_register_resources"] is True
    assert returns["_vector_unknown_cmd"] == {}


PLAIN_REPLIES = _kind_seqs("plain_string_reply")


@pytest.mark.parametrize("seq", [s for s in PLAIN_REPLIES if s != 63])
def test_bad_load_reply_matches_capture(seq):
    assert payload(seq) == messages.plain_reply() == b"\xa8bad load"
    with pytest.raises(messages.BadLoadReply, match="bad load"):
        messages.parse_aes_reply(payload(seq), Crypticle(session_key()), "0" * 32)


def test_bad_load_seqs():
    assert [s for s in PLAIN_REPLIES if s != 63] == [55, 57, 59, 61]


# --------------------------------------------------------------------------------------------
# _pillar private reply
# --------------------------------------------------------------------------------------------

PILLAR_REPLY = 9


def test_pillar_reply_opens():
    pillar = messages.parse_pillar_reply(
        payload(PILLAR_REPLY),
        minion_priv=minion_priv(),
        master_pub=master_priv().public_key(),
        nonce=request_nonce(PILLAR_REPLY),
    )
    assert pillar == {"vector_pillar": {"greeting": "hello-from-pillar", "n": 42}}


def test_pillar_reply_wrong_nonce_refused():
    with pytest.raises(messages.AuthReplyError, match="nonce"):
        messages.parse_pillar_reply(
            payload(PILLAR_REPLY),
            minion_priv=minion_priv(),
            master_pub=master_priv().public_key(),
            nonce="0" * 32,
        )


def test_pillar_reply_rebuilds_capture(monkeypatch):
    env = codec.loads(payload(PILLAR_REPLY))
    assert list(env) == ["key", "pillar"]
    k = DECODED[PILLAR_REPLY]["private_key_string"]
    assert crypto.oaep_decrypt(minion_priv(), env["key"]).decode() == k
    sealed_ct = codec.to_bytes(env["pillar"])
    force_oaep(monkeypatch, {k.encode(): env["key"]})
    force_iv(monkeypatch, sealed_ct[:16])
    frame = messages.pillar_reply(
        master_priv(),
        minion_priv().public_key(),
        {"vector_pillar": {"greeting": "hello-from-pillar", "n": 42}},
        request_nonce(PILLAR_REPLY),
        pillar_key=k,
    )
    assert frame == payload(PILLAR_REPLY)


def test_own_pillar_reply_roundtrips_and_tampered_signature_refused():
    nonce = messages.new_nonce()
    pillar = {"a": {"b": [1, "two"]}, "n": 42}
    frame = messages.pillar_reply(master_priv(), minion_priv().public_key(), pillar, nonce)
    opened = messages.parse_pillar_reply(
        frame, minion_priv=minion_priv(), master_pub=master_priv().public_key(), nonce=nonce
    )
    assert opened == pillar

    env = codec.loads(frame)
    k = crypto.oaep_decrypt(minion_priv(), env["key"]).decode()
    sealed = Crypticle(k).loads(env["pillar"])
    sig = bytearray(sealed["sig"])
    sig[10] ^= 1
    forged = codec.dumps(
        {
            "key": env["key"],
            "pillar": Crypticle(k).dumps({"data": sealed["data"], "sig": bytes(sig)}),
        }
    )
    with pytest.raises(messages.AuthReplyError, match="signature"):
        messages.parse_pillar_reply(
            forged, minion_priv=minion_priv(), master_pub=master_priv().public_key(), nonce=nonce
        )
    # Signed by a key other than the master's.
    with pytest.raises(messages.AuthReplyError, match="signature"):
        messages.parse_pillar_reply(
            frame, minion_priv=minion_priv(), master_pub=minion_priv().public_key(), nonce=nonce
        )


# --------------------------------------------------------------------------------------------
# Publications
# --------------------------------------------------------------------------------------------

PUBLICATIONS = _kind_seqs("publication")


def test_publication_seqs():
    assert PUBLICATIONS == [20, 25, 30, 34, 41, 48]


def _pub_key_number(seq: int) -> int:
    return 2 if seq >= ROTATION_SEQ else 1


@pytest.mark.parametrize("seq", PUBLICATIONS)
def test_publication_opens_with_right_publish_key(seq):
    key = publish_key(_pub_key_number(seq))
    assert DECODED[seq]["aes_key_used"] == key
    inner = messages.open_publication(payload(seq), Crypticle(key), master_priv().public_key())
    assert inner == _from_json(DECODED[seq]["inner"])
    assert list(inner) == ["fun", "arg", "tgt", "jid", "ret", "tgt_type", "user", "serial"]


@pytest.mark.parametrize("seq", PUBLICATIONS)
def test_publication_rewraps_identically(seq, monkeypatch):
    env = codec.loads(payload(seq))
    assert list(env) == ["enc", "load", "sig_algo", "sig"]
    cipher = Crypticle(publish_key(_pub_key_number(seq)))
    inner = cipher.loads(env["load"])
    ct = codec.to_bytes(env["load"])
    expected = codec.dumps(
        {
            "enc": "aes",
            "load": cipher.dumps(inner, iv=ct[:16]),
            "sig_algo": "PKCS1v15-SHA1",
            "sig": crypto.sign(master_priv(), ct),
        }
    )
    assert expected == payload(seq)
    force_iv(monkeypatch, ct[:16])
    assert messages.wrap_publication(cipher, master_priv(), inner) == payload(seq)


def test_rotated_publication_does_not_open_with_old_key():
    seq = ROTATION_SEQ
    with pytest.raises(CrypticleError):
        messages.open_publication(
            payload(seq), Crypticle(publish_key(1)), master_priv().public_key()
        )


def test_publication_signed_by_other_key_refused():
    seq = PUBLICATIONS[0]
    with pytest.raises(messages.PublicationError):
        messages.open_publication(
            payload(seq), Crypticle(publish_key(1)), minion_priv().public_key()
        )


def test_publication_serials_increase_per_key():
    from hamaster.bus.crypticle import SerialGuard

    guard = SerialGuard()
    for seq in PUBLICATIONS:
        key = publish_key(_pub_key_number(seq))
        inner = messages.open_publication(payload(seq), Crypticle(key), master_priv().public_key())
        assert guard.accept(key, inner["serial"])
        assert not guard.accept(key, inner["serial"])  # replay


# --------------------------------------------------------------------------------------------
# Clear publish requests (salt CLI) and fingerprints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", _kind_seqs("clear_request:publish"))
def test_cli_publish_request_rebuilds(seq):
    req = messages.parse_request(payload(seq))
    assert isinstance(req, messages.ClearRequest)
    assert req.load["cmd"] == "publish"
    assert req.load["key"] == derived()["root_key"]
    assert messages.clear_request(req.load) == payload(seq)
    assert list(codec.loads(payload(seq))) == ["enc", "load", "version"]


def test_pem_fingerprint_is_deterministic_and_colon_formatted():
    file_text = _keyfile("master.pub").decode()
    wire_text = crypto.public_pem(master_priv().public_key())
    fp = crypto.pem_fingerprint(file_text)
    assert re.fullmatch(r"([0-9a-f]{2}:){31}[0-9a-f]{2}", fp)
    assert fp == crypto.pem_fingerprint(file_text)
    assert fp == crypto.pem_fingerprint(wire_text) == crypto.pem_fingerprint(file_text.encode())
    assert fp == crypto.pem_fingerprint(file_text.replace("\n", "\r\n"))
    assert fp != crypto.pem_fingerprint(_keyfile("minion.pub"))
    body = "".join(line + "\n" for line in file_text.strip().splitlines()[1:-1])
    assert fp.replace(":", "") == hashlib.sha256(body.encode()).hexdigest()
    assert re.fullmatch(r"([0-9a-f]{2}:){19}[0-9a-f]{2}", crypto.pem_fingerprint(file_text, "sha1"))


def test_auth_queue_recognises_every_salt_auth_request_and_no_aes_request() -> None:
    """The master's auth queue tells a clear ``_auth`` from everything else before decoding
    (a byte search, then a msgpack decode): on real salt-minion frames, every ``_auth`` request
    is queued under its minion id and no encrypted request is taken for one."""
    from hamaster.master.authqueue import auth_minion_id

    auths = aes = 0
    for rec in FRAMES.values():
        if rec["channel"] != "req" or rec["dir"] != "minion->master":
            continue
        payload = base64.b64decode(rec["frames_b64"][-1])
        env = codec.loads(payload)
        if env.get("enc") == "clear" and env["load"].get("cmd") == "_auth":
            auths += 1
            assert auth_minion_id(payload) == env["load"]["id"], rec["seq"]
        else:
            aes += 1
            assert auth_minion_id(payload) is None, rec["seq"]
    assert auths >= 3 and aes >= 5

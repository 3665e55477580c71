"""Sans-io robustness: hostile or broken bytes only ever raise the documented exception types.

``parse_request`` / ``parse_auth_load`` / ``parse_auth_request`` / ``open_aes_request`` →
:class:`BadRequest` (``parse_auth_request``'s Salt-answered refusals: :class:`AuthRefused`);
``parse_auth_reply`` / ``parse_pillar_reply`` → :class:`AuthReplyError` (``BadLoadReply`` for a
bare string); ``parse_aes_reply`` → :class:`BadLoadReply`; ``open_publication`` →
:class:`PublicationError` (``CrypticleError`` only for "wrong publish key").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import msgpack
import pytest

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, CrypticleError, generate_key_string
from hamaster.bus.messages import AuthReplyError, BadLoadReply, BadRequest, PublicationError

SEED = 20261125


@dataclass
class Keys:
    master: object
    master_text: str
    other_master: object
    other_master_text: str
    minion: object
    minion_text: str
    session: str
    aes: str


@pytest.fixture(scope="module")
def keys() -> Keys:
    def gen():
        priv_pem, pub_pem = crypto.generate_keypair(2048)
        return crypto.load_private_key(priv_pem), pub_pem.decode().strip()

    m, mt = gen()
    o, ot = gen()
    n, nt = gen()
    return Keys(m, mt, o, ot, n, nt, generate_key_string(), generate_key_string())


def _tok(keys: Keys) -> bytes:
    return crypto.x931_sign(keys.minion, b"salt")


@pytest.fixture(scope="module")
def valid_frames(keys) -> list[bytes]:
    """A few well-formed request frames to truncate and mutate."""
    session = Crypticle(keys.session)
    load = messages.stamp_load(
        {"cmd": "_return", "fun": "test.ping", "return": True}, "m1", _tok(keys), "a" * 32, now=1
    )
    auth, _ = messages.auth_request("m1", keys.minion_text, "b" * 32, keys.master.public_key())
    return [
        messages.aes_request("m1", session, load),
        auth,
        messages.clear_request({"cmd": "publish", "tgt": "*", "fun": "test.ping", "arg": []}),
    ]


def _expect_bad_request(frame, reason: str | None = None) -> BadRequest:
    with pytest.raises(BadRequest) as exc:
        messages.parse_request(frame)
    if reason is not None:
        assert exc.value.reason == reason, exc.value
    return exc.value


def _parse_or_bad_request(frame) -> None:
    """Either a request object or BadRequest; anything else fails the test."""
    try:
        req = messages.parse_request(frame)
    except BadRequest:
        return
    assert isinstance(req, (messages.ClearRequest, messages.AesRequest))


# --------------------------------------------------------------------------------------------
# parse_request
# --------------------------------------------------------------------------------------------


def test_valid_frames_parse(valid_frames):
    assert isinstance(messages.parse_request(valid_frames[0]), messages.AesRequest)
    assert isinstance(messages.parse_request(valid_frames[1]), messages.ClearRequest)
    assert isinstance(messages.parse_request(valid_frames[2]), messages.ClearRequest)


def test_every_truncation_is_bad_request(valid_frames):
    n = 0
    for frame in valid_frames:
        for cut in range(len(frame)):
            _expect_bad_request(frame[:cut], "malformed")
            n += 1
    assert n > 1000


def test_trailing_bytes_are_bad_request(valid_frames):
    for frame in valid_frames:
        _expect_bad_request(frame + b"\x00", "malformed")
        _expect_bad_request(frame + frame, "malformed")


def test_random_bytes_are_bad_request():
    rng = random.Random(SEED)
    for i in range(600):
        size = rng.choice([0, 1, 2, 3, 5, 8, 16, 31, 64, 200, 1000, 5000])
        data = bytes(rng.getrandbits(8) for _ in range(size))
        if i % 3 == 0 and data:
            data = bytes([0x80 | (data[0] & 0x0F)]) + data[1:]  # start with a fixmap header
        _expect_bad_request(data)


def test_random_mutations_never_escape(valid_frames):
    rng = random.Random(SEED + 1)
    for _ in range(600):
        frame = bytearray(rng.choice(valid_frames))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(frame))
            if op == 0:
                frame[pos] = rng.getrandbits(8)
            elif op == 1:
                del frame[pos]
            else:
                frame.insert(pos, rng.getrandbits(8))
        _parse_or_bad_request(bytes(frame))


@pytest.mark.parametrize(
    "env,reason",
    [
        ({"enc": "clear", "load": 5, "version": 3}, "malformed"),
        ({"enc": "clear", "load": "text", "version": 3}, "malformed"),
        ({"enc": "clear", "load": [1, 2], "version": 3}, "malformed"),
        ({"enc": "clear", "load": None, "version": 3}, "malformed"),
        ({"enc": "aes", "load": 5, "version": 3, "id": "m1"}, "malformed"),
        ({"enc": "aes", "load": [b"x"], "version": 3, "id": "m1"}, "malformed"),
        ({"enc": "aes", "load": {"a": 1}, "version": 3, "id": "m1"}, "malformed"),
        ({"enc": "aes", "load": None, "version": 3, "id": "m1"}, "malformed"),
        ({"enc": "clear", "load": {}, "version": "3"}, "malformed"),
        ({"enc": "clear", "load": {}, "version": 3.0}, "malformed"),
        ({"enc": "clear", "load": {}, "version": True}, "malformed"),
        ({"enc": "clear", "load": {}, "version": None}, "malformed"),
        ({"enc": "clear", "load": {}, "version": [3]}, "malformed"),
        ({"enc": "clear", "load": {}}, "version"),
        ({"enc": "clear", "load": {}, "version": 2}, "version"),
        ({"enc": "clear", "load": {}, "version": -(2**63)}, "version"),
        ({"enc": "rsa", "load": {}, "version": 3}, "malformed"),
        ({"enc": "", "load": {}, "version": 3}, "malformed"),
        ({"enc": 1, "load": {}, "version": 3}, "malformed"),
        ({"enc": None, "load": {}, "version": 3}, "malformed"),
        ({"enc": ["aes"], "load": {}, "version": 3}, "malformed"),
        ({"enc": {"aes": 1}, "load": {}, "version": 3}, "malformed"),
        ({"enc": b"\xffaes", "load": {}, "version": 3}, "malformed"),
        ({"enc": "aes", "load": b"\x00" * 80, "version": 3}, "malformed"),  # id missing
        ({"enc": "aes", "load": b"\x00" * 80, "version": 3, "id": ""}, "malformed"),
        ({"enc": "aes", "load": b"\x00" * 80, "version": 3, "id": 7}, "malformed"),
        ({"enc": "aes", "load": b"\x00" * 80, "version": 3, "id": None}, "malformed"),
        ({"enc": "aes", "load": b"\x00" * 80, "version": 3, "id": ["m1"]}, "malformed"),
        ({"enc": "aes", "load": b"\x00" * 80, "version": 3, "id": b"\xff\xfe"}, "malformed"),
        ({"load": {}, "version": 3}, "malformed"),
        ({"enc": "clear", "version": 3}, "malformed"),
        ({}, "malformed"),
        ({1: 2, 3: 4}, "malformed"),
    ],
)
def test_wrong_types_are_bad_request(env, reason):
    _expect_bad_request(codec.dumps(env), reason)


@pytest.mark.parametrize(
    "obj", [None, True, 0, 1, -1, 2**64 - 1, 1.5, "bad load", b"\xff", [], [1, 2], ["enc", "load"]]
)
def test_non_map_frames_are_bad_request(obj):
    _expect_bad_request(msgpack.packb(obj, use_bin_type=False), "malformed")


@pytest.mark.parametrize("obj", [None, "string", 5, ["list"], bytearray(b"\x80")])
def test_non_bytes_input_is_bad_request(obj):
    _expect_bad_request(obj, "malformed")


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # never used
        b"\xd4\x01",  # truncated fixext
        b"\xc7\x05\x01abc",  # truncated ext8
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion entries
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion entries
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc6\x7f\xff\xff\xff",  # bin32 claiming 2 GiB
        b"\x81\x91\x01\x01",  # map with an array (unhashable) key
        b"\x81\x81\x01\x01\x01",  # map with a map key
        b"\x81\xa3enc\xd6\xff\x00\x00\x00\x00",  # ext -1 (timestamp) value
        b"\x82\xa3enc\xc4\x05clear\xa4load\x80",  # bin-typed enc, no version
        b"\x91" * 2000 + b"\xc0",  # nested deeper than msgpack allows
        b"\x91" * 600 + b"\xc0",  # nested within msgpack's limit, deep for Python
        b"\x81\xa1a" * 900 + b"\xc0",  # deep maps
        b"\x83\xa3enc\xa5clear\xa4load" + b"\x81\xa1a" * 900 + b"\xc0" + b"\xa7version\x03",
    ],
    ids=lambda d: f"{d[:8].hex()}-{len(d)}B",
)
def test_garbage_msgpack_is_bad_request(data):
    _expect_bad_request(data)


def test_oversized_frame_refused_before_parsing(valid_frames):
    frame = valid_frames[0]
    with pytest.raises(codec.DecodeError, match="limit"):
        codec.loads(frame, max_size=len(frame) - 1)
    assert codec.loads(frame, max_size=len(frame))
    with pytest.raises(BadRequest) as exc:
        messages.parse_request(frame, max_size=len(frame) - 1)
    assert exc.value.reason == "too_large"
    assert isinstance(messages.parse_request(frame, max_size=len(frame)), messages.AesRequest)


def test_frame_beyond_max_request_refused():
    big = bytearray(messages.REQUEST_MAX + 1)  # zero bytes: length check comes first
    exc = _expect_bad_request(memoryview(big), "too_large")
    assert "exceeds" in str(exc)


def test_clear_request_capped(valid_frames):
    clear = valid_frames[-1]
    assert isinstance(messages.parse_request(clear, max_clear=len(clear)), messages.ClearRequest)
    with pytest.raises(BadRequest) as exc:
        messages.parse_request(clear, max_clear=len(clear) - 1)
    assert exc.value.reason == "too_large"
    # an aes request of the same size is not a clear request: only max_size applies to it
    aes = valid_frames[0]
    assert isinstance(messages.parse_request(aes, max_clear=10), messages.AesRequest)


# --------------------------------------------------------------------------------------------
# parse_auth_load
# --------------------------------------------------------------------------------------------


def _auth_load(keys: Keys, **changes) -> dict:
    load = {
        "cmd": "_auth",
        "id": "m1",
        "nonce": "c" * 32,
        "enc_algo": "OAEP-SHA1",
        "sig_algo": "PKCS1v15-SHA1",
        "pub": keys.minion_text,
    }
    for k, v in changes.items():
        if v is _MISSING:
            load.pop(k, None)
        else:
            load[k] = v
    return load


_MISSING = object()


def test_auth_load_valid(keys):
    auth = messages.parse_auth_load(_auth_load(keys, token=b"\x01\x02"))
    assert auth.minion_id == "m1" and auth.token == b"\x01\x02" and auth.nonce == "c" * 32
    assert messages.parse_auth_load(_auth_load(keys, nonce=_MISSING)).nonce is None


@pytest.mark.parametrize(
    "changes",
    [
        {"id": _MISSING},
        {"id": ""},
        {"id": 5},
        {"id": None},
        {"id": ["m1"]},
        {"id": {"m": 1}},
        {"id": b"\xff\xfe"},
        {"pub": _MISSING},
        {"pub": 5},
        {"pub": None},
        {"pub": ""},
        {"pub": "not a key"},
        {"pub": b"\xff-----BEGIN"},
        {"pub": ["-----BEGIN PUBLIC KEY-----"]},
        {"nonce": 5},
        {"nonce": ["a"]},
        {"nonce": b"\xff" * 32},
        {"nonce": {"a": 1}},
        {"token": 5},
        {"token": ["x"]},
        {"token": {"x": 1}},
        {"token": True},
    ],
)
def test_auth_load_wrong_types(keys, changes):
    with pytest.raises(BadRequest) as exc:
        messages.parse_auth_load(_auth_load(keys, **changes))
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize("value", [None, 0, 1.5, [], {}, b"\xff", "x", True])
@pytest.mark.parametrize("field", ["enc_algo", "sig_algo", "autosign_grains", "cmd", "extra"])
def test_auth_load_odd_optional_fields_never_escape(keys, field, value):
    try:
        auth = messages.parse_auth_load(_auth_load(keys, **{field: value}))
    except BadRequest:
        return
    assert isinstance(auth.enc_algo, str) and isinstance(auth.sig_algo, str)
    assert auth.autosign_grains is None or isinstance(auth.autosign_grains, dict)


def test_auth_load_through_parse_request_random_fields(keys):
    rng = random.Random(SEED + 2)
    values = [
        None,
        0,
        -1,
        2**40,
        1.5,
        True,
        "",
        "x",
        "-----BEGIN",
        b"\xff\x00",
        [],
        [1],
        {},
        {"a": 1},
    ]
    for _ in range(400):
        load = _auth_load(keys)
        for field in rng.sample(["id", "pub", "nonce", "token", "enc_algo", "sig_algo"], 2):
            load[field] = rng.choice(values)
        req = messages.parse_request(messages.clear_request(load))
        try:
            messages.parse_auth_load(req.load)
        except BadRequest:
            pass


# --------------------------------------------------------------------------------------------
# parse_auth_request: every wire check of an _auth, before any key decision
# --------------------------------------------------------------------------------------------


def _auth_req(keys: Keys, **changes) -> messages.ClearRequest:
    req = messages.parse_request(messages.clear_request(_auth_load(keys, **changes)))
    assert isinstance(req, messages.ClearRequest)
    return req


def test_auth_request_valid(keys):
    auth = messages.parse_auth_request(_auth_req(keys, token=b"\x01"))
    assert (auth.minion_id, auth.token, auth.enc_algo) == ("m1", b"\x01", "OAEP-SHA1")


@pytest.mark.parametrize("cmd", ["publish", None, 5, "_AUTH", ["_auth"], _MISSING])
def test_auth_request_other_clear_commands_are_not_served(keys, cmd):
    with pytest.raises(BadRequest) as exc:
        messages.parse_auth_request(_auth_req(keys, cmd=cmd))
    assert exc.value.reason == "unknown_clear_cmd"
    assert not isinstance(exc.value, messages.AuthRefused)  # answered "bad load"


@pytest.mark.parametrize("mid", ["../m1", "a/b", ".hidden", "x" * 241, "m1\n", " m1", "m1 ",
                                 "a\\b", "..", "m\x1b[31m"])
def test_auth_request_invalid_id_gets_a_signed_refusal(keys, mid):
    with pytest.raises(messages.AuthRefused) as exc:
        messages.parse_auth_request(_auth_req(keys, id=mid))
    assert exc.value.reason == "invalid_id"
    reply = exc.value.reply(keys.master)
    assert reply == messages.auth_status_reply(keys.master, False, "c" * 32)
    result = messages.parse_auth_reply(reply, minion_priv=keys.minion, nonce="c" * 32,
                                       token_plain=None, pinned_master_pub=keys.master_text)
    assert result.status == "rejected"


def test_auth_request_invalid_id_with_an_unsupported_sig_algo(keys):
    """Salt cannot sign with the algorithm asked for and answers "bad sig algo" unsigned (it
    used to raise inside the signature: an internal error logged with a traceback)."""
    with pytest.raises(messages.AuthRefused) as exc:
        messages.parse_auth_request(_auth_req(keys, id="../x", sig_algo="PKCS1v15-MD5"))
    assert exc.value.reason == "invalid_id"
    assert exc.value.reply(keys.master) == messages.auth_unsigned_reply("bad sig algo")


@pytest.mark.parametrize("changes,reason,reply", [
    ({"enc_algo": "OAEP-MD5"}, "bad_algo", messages.plain_reply(messages.EXC_HANDLING_REPLY)),
    ({"enc_algo": "OAEP-MD5", "token": b"t"}, "bad_algo", messages.auth_unsigned_reply(
        "bad enc algo")),
    ({"sig_algo": "PKCS1v15-MD5"}, "bad_algo", messages.auth_unsigned_reply("bad sig algo")),
    ({"sig_algo": "PKCS1v15-MD5", "token": b"t"}, "bad_algo", messages.auth_unsigned_reply(
        "bad sig algo")),
    ({"enc_algo": ["x"], "sig_algo": None}, "bad_algo", messages.plain_reply(
        messages.EXC_HANDLING_REPLY)),
])
def test_auth_request_unsupported_algorithms(keys, changes, reason, reply):
    with pytest.raises(messages.AuthRefused) as exc:
        messages.parse_auth_request(_auth_req(keys, **changes))
    assert exc.value.reason == reason
    assert exc.value.reply(keys.master) == reply


def test_auth_request_random_loads_raise_only_bad_request(keys):
    rng = random.Random(SEED + 3)
    values = [None, 0, True, "", "x", "../x", "OAEP-MD5", "PKCS1v15-SHA224", b"\xff", [], {}]
    for _ in range(400):
        load = _auth_load(keys)
        for field in rng.sample(["cmd", "id", "pub", "nonce", "token", "enc_algo", "sig_algo"], 2):
            load[field] = rng.choice(values)
        req = messages.parse_request(messages.clear_request(load))
        try:
            messages.parse_auth_request(req)
        except messages.AuthRefused as exc:
            assert isinstance(exc.reply(keys.master), bytes)
        except BadRequest:
            pass


# --------------------------------------------------------------------------------------------
# open_aes_request
# --------------------------------------------------------------------------------------------


def _aes_req(keys: Keys, inner, mid: str = "m1", key: str | None = None) -> messages.AesRequest:
    ct = Crypticle(key or keys.session).dumps(inner)
    frame = codec.dumps({"enc": "aes", "load": ct, "version": 3, "id": mid})
    req = messages.parse_request(frame)
    assert isinstance(req, messages.AesRequest)
    return req


def _open(keys: Keys, req, **kw):
    return messages.open_aes_request(req, Crypticle(keys.session), keys.minion.public_key(), **kw)


def test_open_aes_request_valid(keys):
    load = messages.stamp_load({"cmd": "_mine"}, "m1", _tok(keys), "d" * 32, now=100)
    got, tok = _open(keys, _aes_req(keys, load), now=101, ttl=60)
    assert got == load and tok == _tok(keys)


@pytest.mark.parametrize(
    "inner_fn,reason",
    [
        (lambda k: "a string", "malformed"),
        (lambda k: [1, 2], "malformed"),
        (lambda k: None, "malformed"),
        (lambda k: {"cmd": "_mine", "tok": _tok(k)}, "forged"),  # no id
        (lambda k: {"cmd": "_mine", "id": "m2", "tok": _tok(k)}, "forged"),
        (lambda k: {"id": "m1", "tok": _tok(k)}, "malformed"),  # no cmd
        (lambda k: {"cmd": 5, "id": "m1", "tok": _tok(k)}, "malformed"),
        (lambda k: {"cmd": "_mine", "id": "m1"}, "no_token"),
        (lambda k: {"cmd": "_mine", "id": "m1", "tok": 5}, "malformed"),
        (lambda k: {"cmd": "_mine", "id": "m1", "tok": ["x"]}, "malformed"),
        (lambda k: {"cmd": "_mine", "id": "m1", "tok": b"\x00" * 256}, "bad_token"),
        (lambda k: {"cmd": "_mine", "id": "m1", "tok": b"short"}, "bad_token"),
        (lambda k: {"cmd": "_mine", "id": "m1", "tok": b"\xff" * 256}, "bad_token"),
        (
            lambda k: {"cmd": "_mine", "id": "m1", "tok": crypto.x931_sign(k.master, b"salt")},
            "bad_token",
        ),
        (
            lambda k: {"cmd": "_mine", "id": "m1", "tok": crypto.x931_sign(k.minion, b"salT")},
            "bad_token",
        ),
    ],
)
def test_open_aes_request_bad_loads(keys, inner_fn, reason):
    with pytest.raises(BadRequest) as exc:
        _open(keys, _aes_req(keys, inner_fn(keys)))
    assert exc.value.reason == reason


@pytest.mark.parametrize("ts", [None, "100", [100], 100 - 61, 100 + 61])
def test_open_aes_request_stale_or_bad_ts(keys, ts):
    inner = {"cmd": "_mine", "id": "m1", "tok": _tok(keys), "nonce": "e" * 32}
    if ts is not None:
        inner["ts"] = ts
    with pytest.raises(BadRequest) as exc:
        _open(keys, _aes_req(keys, inner), now=100, ttl=60)
    assert exc.value.reason == "replay"


@pytest.mark.parametrize("nonce", [_MISSING, "", 5, None, ["n"], {"n": 1}])
def test_open_aes_request_without_a_nonce(keys, nonce):
    inner = {"cmd": "_mine", "id": "m1", "tok": _tok(keys), "ts": 100, "nonce": nonce}
    if nonce is _MISSING:
        del inner["nonce"]
    with pytest.raises(BadRequest) as exc:
        _open(keys, _aes_req(keys, inner), now=100, ttl=60)
    assert exc.value.reason == "no_nonce"


def test_open_aes_request_wrong_session_key(keys):
    inner = {"cmd": "_mine", "id": "m1", "tok": _tok(keys)}
    with pytest.raises(BadRequest) as exc:
        _open(keys, _aes_req(keys, inner, key=generate_key_string()))
    assert exc.value.reason == "decrypt"


def test_open_aes_request_random_payloads(keys):
    rng = random.Random(SEED + 3)
    for _ in range(300):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 15, 64, 80, 96, 500])))
        req = messages.AesRequest("m1", payload, 3, "OAEP-SHA1", "PKCS1v15-SHA1")
        with pytest.raises(BadRequest):
            _open(keys, req)


# --------------------------------------------------------------------------------------------
# parse_auth_reply
# --------------------------------------------------------------------------------------------

NONCE = "f" * 32


def _accepted(
    keys: Keys, signer=None, pub_text=None, token=None, aes_sig=None, minion_pub=None, nonce=NONCE
):
    return messages.auth_accepted_reply(
        signer or keys.master,
        pub_text or keys.master_text,
        minion_pub or keys.minion.public_key(),
        aes_key=keys.aes,
        session_key=keys.session,
        publish_port=4505,
        nonce=nonce,
        token_plain=token,
        aes_sig=aes_sig,
    )


def _parse_reply(keys: Keys, frame, **kw):
    args = dict(
        minion_priv=keys.minion,
        nonce=NONCE,
        token_plain=None,
        pinned_master_pub=keys.master_text,
    )
    args.update(kw)
    return messages.parse_auth_reply(frame, **args)


def test_auth_reply_valid(keys):
    token = b"tok-plain"
    r = _parse_reply(keys, _accepted(keys, token=token), token_plain=token)
    assert (r.status, r.aes_key, r.session_key, r.publish_port) == (
        "accepted",
        keys.aes,
        keys.session,
        4505,
    )
    r = _parse_reply(
        keys,
        _accepted(keys),
        pinned_master_pub=None,
        master_finger=crypto.pem_fingerprint(keys.master_text).upper(),
    )
    assert r.status == "accepted"
    assert r.master_pub_text == crypto.normalize_pem(keys.master_text)


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("pos", [0, 100, 255])
def test_auth_reply_forged_signature(keys, pos):
    env = codec.loads(_accepted(keys))
    env["sig"] = _flip(env["sig"], pos)
    with pytest.raises(AuthReplyError, match="signature"):
        _parse_reply(keys, codec.dumps(env))


def test_auth_reply_tampered_load(keys):
    env = codec.loads(_accepted(keys))
    inner = codec.loads(env["load"])
    inner["publish_port"] = 1
    env["load"] = codec.dumps(inner)
    with pytest.raises(AuthReplyError, match="signature"):
        _parse_reply(keys, codec.dumps(env))


@pytest.mark.parametrize("nonce", [None, "0" * 32])
def test_auth_reply_wrong_nonce(keys, nonce):
    with pytest.raises(AuthReplyError, match="nonce"):
        _parse_reply(keys, _accepted(keys, nonce=nonce))
    with pytest.raises(AuthReplyError, match="nonce"):
        _parse_reply(keys, messages.auth_status_reply(keys.master, True, nonce))


def test_auth_reply_from_other_master_than_pinned(keys):
    # Entirely self-consistent reply from another master: refused by the pinned key.
    frame = _accepted(keys, signer=keys.other_master, pub_text=keys.other_master_text)
    with pytest.raises(AuthReplyError, match="signature"):
        _parse_reply(keys, frame)
    with pytest.raises(AuthReplyError, match="signature"):
        _parse_reply(keys, messages.auth_status_reply(keys.other_master, True, NONCE))
    # Accepted only on first contact (nothing pinned, no master_finger).
    assert _parse_reply(keys, frame, pinned_master_pub=None).status == "accepted"


def test_auth_reply_offering_a_different_key_than_pinned(keys):
    # Signed by the pinned master but announcing another key: refused.
    frame = _accepted(keys, pub_text=keys.other_master_text)
    with pytest.raises(AuthReplyError, match="pinned"):
        _parse_reply(keys, frame)


def test_auth_reply_master_finger_mismatch(keys):
    frame = _accepted(keys, signer=keys.other_master, pub_text=keys.other_master_text)
    with pytest.raises(AuthReplyError, match="master_finger"):
        _parse_reply(
            keys,
            frame,
            pinned_master_pub=None,
            master_finger=crypto.pem_fingerprint(keys.master_text),
        )
    with pytest.raises(AuthReplyError, match="master_finger"):
        _parse_reply(keys, _accepted(keys), master_finger="00:11")


def test_auth_reply_bad_x931_sig(keys):
    for sig in (
        messages.aes_key_signature(keys.other_master, keys.aes),
        messages.aes_key_signature(keys.master, keys.session),
        b"\x00" * 256,
        b"short",
    ):
        with pytest.raises(AuthReplyError, match="X9.31"):
            _parse_reply(keys, _accepted(keys, aes_sig=sig))


def test_auth_reply_keys_for_another_minion(keys):
    frame = _accepted(keys, minion_pub=keys.other_master.public_key())
    with pytest.raises(AuthReplyError, match="decrypt"):
        _parse_reply(keys, frame)


def test_auth_reply_token_mismatch_or_missing(keys):
    with pytest.raises(AuthReplyError, match="token"):
        _parse_reply(keys, _accepted(keys, token=b"one"), token_plain=b"two")
    with pytest.raises(AuthReplyError, match="token"):
        _parse_reply(keys, _accepted(keys), token_plain=b"two")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        codec.dumps("bad load"),
        codec.dumps("Some exception handling minion payload"),
        codec.dumps(None),
        codec.dumps(5),
        codec.dumps([]),
        codec.dumps({}),
        codec.dumps({"enc": "clear"}),
        codec.dumps({"enc": "clear", "load": {"ret": "bad enc algo"}}),
        codec.dumps({"enc": "clear", "load": "x"}),
        codec.dumps({"enc": "clear", "load": 5, "sig": b"\x00" * 256}),
        codec.dumps({"enc": "clear", "load": b"\xc1", "sig": b"\x00" * 256}),
        codec.dumps({"enc": "clear", "load": codec.dumps([1]), "sig": b"\x00" * 256}),
        codec.dumps({"enc": "clear", "load": codec.dumps({"ret": True}), "sig": 5}),
        codec.dumps({"enc": "clear", "load": codec.dumps({"ret": True}), "sig": None}),
        codec.dumps(
            {"enc": "clear", "load": codec.dumps({"ret": True, "nonce": NONCE}), "sig": b""}
        ),
    ],
    ids=lambda d: f"{d[:8].hex()}-{len(d)}B",
)
def test_auth_reply_garbage(keys, frame):
    with pytest.raises(AuthReplyError):
        _parse_reply(keys, frame)
    # First contact (nothing pinned): a bare pending/rejected status may be taken at face
    # value, but garbage never yields an accepted result.
    try:
        result = _parse_reply(keys, frame, pinned_master_pub=None)
    except AuthReplyError:
        return
    assert result.status in ("pending", "rejected") and result.aes_key is None


def test_first_contact_status_still_checks_nonce(keys):
    body = codec.dumps({"ret": True, "nonce": "0" * 32})
    frame = codec.dumps({"enc": "clear", "load": body, "sig": b""})
    with pytest.raises(AuthReplyError, match="nonce"):
        _parse_reply(keys, frame, pinned_master_pub=None)


def test_auth_reply_first_contact_with_unusable_offered_key(keys):
    body = codec.dumps(
        {"enc": "pub", "pub_key": "-----BEGIN PUBLIC KEY-----\nnope", "nonce": NONCE}
    )
    frame = codec.dumps({"enc": "clear", "load": body, "sig": crypto.sign(keys.master, body)})
    with pytest.raises(AuthReplyError):
        _parse_reply(keys, frame, pinned_master_pub=None)
    body = codec.dumps({"enc": "pub", "pub_key": 5, "nonce": NONCE})
    frame = codec.dumps({"enc": "clear", "load": body, "sig": crypto.sign(keys.master, body)})
    with pytest.raises(AuthReplyError):
        _parse_reply(keys, frame, pinned_master_pub=None)


def test_auth_reply_random_mutations(keys):
    good = _accepted(keys)
    expected = _parse_reply(keys, good)
    rng = random.Random(SEED + 4)
    for _ in range(300):
        frame = bytearray(good)
        pos = rng.randrange(len(frame))
        frame[pos] ^= 1 << rng.randrange(8)
        try:
            result = _parse_reply(keys, bytes(frame))
        except AuthReplyError:
            continue
        assert result == expected  # only a change outside the signed load can pass


def test_auth_reply_random_bytes(keys):
    rng = random.Random(SEED + 5)
    for _ in range(300):
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 4, 40, 400])))
        with pytest.raises(AuthReplyError):
            _parse_reply(keys, data)


# --------------------------------------------------------------------------------------------
# parse_aes_reply / parse_pillar_reply
# --------------------------------------------------------------------------------------------


def test_aes_reply_garbage(keys):
    session = Crypticle(keys.session)
    rng = random.Random(SEED + 6)
    frames = [b"", b"\xc1", codec.dumps(None), codec.dumps({}), codec.dumps([b"x"]), codec.dumps(5)]
    frames += [bytes(rng.getrandbits(8) for _ in range(n)) for n in range(0, 300, 3)]
    frames += [codec.dumps(bytes(rng.getrandbits(8) for _ in range(n))) for n in (16, 64, 80, 96)]
    good = messages.aes_reply(session, {"a": 1}, NONCE)
    frames += [_flip(good, pos) for pos in range(3, len(good))]
    for frame in frames:
        with pytest.raises(BadLoadReply):
            messages.parse_aes_reply(frame, session, NONCE)
    assert messages.parse_aes_reply(good, session, NONCE) == {"a": 1}


def test_pillar_reply_garbage(keys):
    kw = dict(minion_priv=keys.minion, master_pub=keys.master.public_key(), nonce=NONCE)
    good = messages.pillar_reply(keys.master, keys.minion.public_key(), {"p": 1}, NONCE)
    assert messages.parse_pillar_reply(good, **kw) == {"p": 1}
    k = generate_key_string()
    enc_k = crypto.oaep_encrypt(keys.minion.public_key(), k.encode())
    frames = [
        b"",
        b"\xc1",
        codec.dumps({}),
        codec.dumps([1]),
        codec.dumps({"key": 5, "pillar": b"x"}),
        codec.dumps({"key": b"x" * 256, "pillar": b"x"}),
        codec.dumps({"key": enc_k, "pillar": 5}),
        codec.dumps({"key": enc_k, "pillar": b"x" * 96}),
        codec.dumps({"key": enc_k, "pillar": Crypticle(k).dumps("not a map")}),
        codec.dumps({"key": enc_k, "pillar": Crypticle(k).dumps({"data": 5, "sig": b"x"})}),
        codec.dumps({"key": enc_k, "pillar": Crypticle(k).dumps({"data": b"x", "sig": 5})}),
        codec.dumps({"key": enc_k, "pillar": Crypticle(k).dumps({"data": b"x", "sig": b"y"})}),
        messages.pillar_reply(keys.master, keys.minion.public_key(), {"p": 1}, "0" * 32),
        messages.pillar_reply(keys.other_master, keys.minion.public_key(), {"p": 1}, NONCE),
        messages.pillar_reply(keys.master, keys.other_master.public_key(), {"p": 1}, NONCE),
    ]
    frames += [_flip(good, pos) for pos in range(0, len(good), 7)]
    for frame in frames:
        with pytest.raises((AuthReplyError, BadLoadReply)):
            messages.parse_pillar_reply(frame, **kw)
    with pytest.raises(BadLoadReply):
        messages.parse_pillar_reply(codec.dumps("bad load"), **kw)


def test_pillar_reply_key_binding(keys):
    """Signed data whose key differs from the outer key (a replayed pillar) is refused."""
    k = generate_key_string()
    enc_k = crypto.oaep_encrypt(keys.minion.public_key(), k.encode())
    other_enc = crypto.oaep_encrypt(keys.minion.public_key(), k.encode())
    data = codec.dumps({"key": other_enc, "pillar": {"p": 1}, "nonce": NONCE})
    sealed = Crypticle(k).dumps({"data": data, "sig": crypto.sign(keys.master, data)})
    with pytest.raises(AuthReplyError, match="binding"):
        messages.parse_pillar_reply(
            codec.dumps({"key": enc_k, "pillar": sealed}),
            minion_priv=keys.minion,
            master_pub=keys.master.public_key(),
            nonce=NONCE,
        )


# --------------------------------------------------------------------------------------------
# open_publication
# --------------------------------------------------------------------------------------------

PUB_INNER = {
    "fun": "test.ping",
    "arg": [],
    "tgt": "*",
    "jid": "1",
    "ret": "",
    "tgt_type": "glob",
    "serial": 1,
}


def _open_pub(keys: Keys, frame, pub=None):
    return messages.open_publication(frame, Crypticle(keys.aes), pub or keys.master.public_key())


def test_publication_valid(keys):
    frame = messages.wrap_publication(Crypticle(keys.aes), keys.master, PUB_INNER)
    assert _open_pub(keys, frame) == PUB_INNER


@pytest.mark.parametrize("pos", [0, 128, 255])
def test_publication_forged_signature(keys, pos):
    env = codec.loads(messages.wrap_publication(Crypticle(keys.aes), keys.master, PUB_INNER))
    env["sig"] = _flip(env["sig"], pos)
    with pytest.raises(PublicationError, match="signature"):
        _open_pub(keys, codec.dumps(env))


def test_publication_signed_by_other_master(keys):
    frame = messages.wrap_publication(Crypticle(keys.aes), keys.other_master, PUB_INNER)
    with pytest.raises(PublicationError, match="signature"):
        _open_pub(keys, frame)


def test_publication_tampered_ciphertext(keys):
    env = codec.loads(messages.wrap_publication(Crypticle(keys.aes), keys.master, PUB_INNER))
    env["load"] = _flip(env["load"], 20)
    with pytest.raises(PublicationError, match="signature"):
        _open_pub(keys, codec.dumps(env))


def test_publication_under_other_publish_key_is_crypticle_error(keys):
    frame = messages.wrap_publication(Crypticle(generate_key_string()), keys.master, PUB_INNER)
    with pytest.raises(CrypticleError):
        _open_pub(keys, frame)


@pytest.mark.parametrize(
    "env_fn",
    [
        lambda k, c: {"enc": "aes", "load": c.dumps(PUB_INNER)},  # unsigned
        lambda k, c: {"enc": "clear", "load": c.dumps(PUB_INNER), "sig": b"x"},
        lambda k, c: {"load": c.dumps(PUB_INNER), "sig": b"x"},
        lambda k, c: {"enc": "aes", "sig": b"x"},
        lambda k, c: {"enc": "aes", "load": 5, "sig": b"x"},
        lambda k, c: {"enc": "aes", "load": c.dumps(PUB_INNER), "sig": 5},
        lambda k, c: {"enc": "aes", "load": c.dumps(PUB_INNER), "sig": None},
        lambda k, c: {"enc": "aes", "load": c.dumps(PUB_INNER), "sig": [b"x"]},
        lambda k, c: _signed(k, c.dumps(PUB_INNER), sig_algo="PKCS1v15-MD5"),
        lambda k, c: _signed(k, c.dumps("not a map")),
        lambda k, c: _signed(k, c.dumps([PUB_INNER])),
        lambda k, c: _signed(k, c.dumps({x: v for x, v in PUB_INNER.items() if x != "tgt"})),
        lambda k, c: _signed(k, c.dumps({x: v for x, v in PUB_INNER.items() if x != "fun"})),
    ],
)
def test_publication_malformed(keys, env_fn):
    c = Crypticle(keys.aes)
    with pytest.raises(PublicationError):
        _open_pub(keys, codec.dumps(env_fn(keys, c)))


def _signed(keys: Keys, load: bytes, sig_algo: str = "PKCS1v15-SHA1") -> dict:
    return {"enc": "aes", "load": load, "sig_algo": sig_algo, "sig": crypto.sign(keys.master, load)}


def test_publication_random_bytes(keys):
    rng = random.Random(SEED + 7)
    for _ in range(300):
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 8, 64, 512])))
        with pytest.raises(PublicationError):
            _open_pub(keys, data)
    for obj in (None, 5, "x", [], {}, {"enc": "aes"}):
        with pytest.raises(PublicationError):
            _open_pub(keys, codec.dumps(obj))

"""Salt's session cipher: AES-192-CBC + HMAC-SHA256, pickle:: prefix, nonce and serial guards."""

from __future__ import annotations

import base64
import hmac
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hamaster.bus import codec
from hamaster.bus.crypticle import (
    PICKLE_PREFIX,
    Crypticle,
    CrypticleError,
    SerialGuard,
    generate_key_string,
)

KEY = base64.b64encode(bytes(range(56))).decode()
OTHER = base64.b64encode(bytes(range(1, 57))).decode()
NONCE = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def c() -> Crypticle:
    return Crypticle(KEY)


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        0,
        2**40,
        "x",
        "é",
        b"\xff\x00",
        [],
        {},
        {"a": [1, "two", {"b": None}]},
        "y" * 70000,
    ],
)
def test_roundtrip(c, obj):
    assert c.loads(c.dumps(obj)) == obj
    assert c.loads(c.dumps(obj, nonce=NONCE), nonce=NONCE) == obj


def test_key_string_as_bytes_and_generated():
    assert Crypticle(KEY.encode()).loads(Crypticle(KEY).dumps({"a": 1})) == {"a": 1}
    k = generate_key_string()
    assert len(base64.b64decode(k)) == 56
    assert k != generate_key_string()
    assert Crypticle(k).loads(Crypticle(k).dumps("ok")) == "ok"


def test_wire_layout(c):
    iv = bytes(range(16))
    ct = c.dumps({"a": 1}, iv=iv)
    assert ct[:16] == iv
    assert (len(ct) - 32) % 16 == 0
    hmac_key = base64.b64decode(KEY)[24:]
    assert ct[-32:] == hmac.new(hmac_key, ct[:-32], sha256).digest()
    assert c.decrypt(ct) == PICKLE_PREFIX + codec.dumps({"a": 1})
    assert c.dumps({"a": 1}, iv=iv) == ct  # deterministic given the IV
    assert c.dumps({"a": 1}) != c.dumps({"a": 1})  # random IV otherwise


def test_nonce_follows_prefix(c):
    plain = c.decrypt(c.dumps(None, nonce=NONCE))
    assert plain == PICKLE_PREFIX + NONCE.encode() + b"\xc0"


def test_nonce_mismatch_refused(c):
    ct = c.dumps({"a": 1}, nonce=NONCE)
    with pytest.raises(CrypticleError, match="nonce"):
        c.loads(ct, nonce="f" * 32)


def test_missing_nonce_refused_when_expected(c):
    with pytest.raises(CrypticleError):
        c.loads(c.dumps({"a": 1}), nonce=NONCE)


def test_wrong_key_refused(c):
    with pytest.raises(CrypticleError, match="HMAC"):
        Crypticle(OTHER).loads(c.dumps("secret"))


@pytest.mark.parametrize("where", [0, 16, 20, -33, -1])
def test_tampered_byte_refused(c, where):
    ct = bytearray(c.dumps({"a": "b" * 40}))
    ct[where] ^= 0x01
    with pytest.raises(CrypticleError, match="HMAC"):
        c.loads(bytes(ct))


@pytest.mark.parametrize("cut", [1, 16, 32, 47, 48])
def test_truncated_refused(c, cut):
    ct = c.dumps({"a": "b" * 40})
    with pytest.raises(CrypticleError):
        c.loads(ct[:-cut])


@pytest.mark.parametrize("data", [b"", b"x", b"x" * 63, b"x" * 64, b"x" * 65, b"x" * 80])
def test_short_or_misaligned_refused(c, data):
    with pytest.raises(CrypticleError):
        c.loads(data)


def test_appended_bytes_refused(c):
    ct = c.dumps("x")
    with pytest.raises(CrypticleError):
        c.loads(ct + bytes(16))


def _seal(c: Crypticle, raw_padded: bytes, iv: bytes = bytes(16)) -> bytes:
    """Encrypt already-padded bytes with a valid HMAC, to test the checks after the HMAC."""
    raw = base64.b64decode(KEY)
    enc = Cipher(algorithms.AES(raw[:24]), modes.CBC(iv)).encryptor()
    body = iv + enc.update(raw_padded) + enc.finalize()
    return body + hmac.new(raw[24:], body, sha256).digest()


@pytest.mark.parametrize(
    "padded",
    [
        b"pickle::\xc0" + bytes(7),  # pad byte 0
        b"pickle::\xc0" + b"\x11" * 7,  # pad 17 > 16
        b"pickle::\xc0" + b"\x01\x02\x03\x04\x05\x06\x07",  # inconsistent pad bytes
        b"pickle::\xc0\x10\x10\x10\x10\x10\x10\x07",  # pad 7 but bytes differ
    ],
)
def test_bad_padding_refused_even_with_valid_hmac(c, padded):
    assert len(padded) % 16 == 0
    with pytest.raises(CrypticleError, match="padding"):
        c.loads(_seal(c, padded))


def test_missing_prefix_refused(c):
    with pytest.raises(CrypticleError, match="pickle"):
        c.loads(_seal(c, b"notpickle::\xc0" + b"\x04" * 4))


def test_garbage_msgpack_refused(c):
    with pytest.raises(CrypticleError):
        c.loads(_seal(c, b"pickle::\xc1" + b"\x07" * 7))  # 0xc1 is never valid msgpack


def test_full_pad_block(c):
    # len(plaintext) % 16 == 0 → a whole block of 0x10 is added.
    obj = "a" * 7  # 0xa7 + 7 bytes = 8, + "pickle::" = 16
    plain = PICKLE_PREFIX + codec.dumps(obj)
    assert len(plain) == 16
    iv = bytes(16)
    ct = c.dumps(obj, iv=iv)
    assert len(ct) == 16 + 32 + 32  # IV + two blocks + HMAC
    assert c.loads(ct) == obj
    raw = base64.b64decode(KEY)
    dec = Cipher(algorithms.AES(raw[:24]), modes.CBC(iv)).decryptor()
    padded = dec.update(ct[16:-32]) + dec.finalize()
    assert padded[16:] == b"\x10" * 16
    assert c.loads(_seal(c, plain + b"\x10" * 16)) == obj


@pytest.mark.parametrize("n", range(0, 40))
def test_every_pad_length(c, n):
    assert c.loads(c.dumps("z" * n)) == "z" * n


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64!!",
        "AAAA",  # 3 bytes
        base64.b64encode(bytes(55)).decode(),
        base64.b64encode(bytes(57)).decode(),
        base64.b64encode(bytes(32)).decode(),  # an AES-256 key alone is not a Crypticle key
        "é" * 76,
        b"\xff" * 76,
        base64.b64encode(bytes(56)).decode()[:-1],  # broken padding
        None,
        56,
    ],
)
def test_bad_key_strings(bad):
    with pytest.raises(CrypticleError):
        Crypticle(bad)


def test_serial_guard_per_key():
    g = SerialGuard()
    assert g.accept(KEY, 1)
    assert not g.accept(KEY, 1)  # replay
    assert g.accept(KEY, 2)
    assert not g.accept(KEY, 1)  # older
    assert g.accept(KEY, 5)  # gaps are fine
    assert not g.accept(KEY, 4)
    # A new (rotated) key restarts at 1.
    assert g.accept(OTHER, 1)
    assert not g.accept(OTHER, 1)
    assert g.accept(OTHER, 2)
    # The old key's state is kept.
    assert not g.accept(KEY, 5)
    assert g.accept(KEY, 6)


@pytest.mark.parametrize("serial", [0, -1, None, "2", 2.0, True, [3]])
def test_serial_guard_rejects_non_positive_and_non_int(serial):
    assert not SerialGuard().accept(KEY, serial)

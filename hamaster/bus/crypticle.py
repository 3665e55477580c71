"""Salt's session cipher ("Crypticle"): AES-192-CBC + HMAC-SHA256, with nonce and serial guards.

Wire form: ``IV (16) || AES-CBC(PKCS#7(plaintext)) || HMAC-SHA256(hmac_key, IV || ciphertext)``.
The plaintext is ``b"pickle::"`` + an optional 32-character nonce + msgpack(obj). Pure code.
"""

from __future__ import annotations

import base64
import hmac
import os
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as openssl_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hamaster.bus import codec

PICKLE_PREFIX = b"pickle::"
AES_KEY_SIZE = 24
HMAC_KEY_SIZE = 32
SIG_SIZE = 32
NONCE_SIZE = 32


class CrypticleError(ValueError):
    """Ciphertext that fails authentication, padding, prefix or nonce checks."""


def generate_key_string() -> str:
    """A fresh key string: base64 of 24 AES bytes followed by 32 HMAC bytes."""
    return base64.b64encode(os.urandom(AES_KEY_SIZE + HMAC_KEY_SIZE)).decode()


def _mac(key: bytes, body: bytes | memoryview) -> bytes:
    """HMAC-SHA256 by cryptography's OpenSSL: a minion's :mod:`hmac` has only CPython's built-in
    SHA-256 (:mod:`hamaster.cli.lean`), 6x slower on a 1 MiB file chunk and 2x on a small one."""
    h = openssl_hmac.HMAC(key, hashes.SHA256())
    h.update(body)
    return h.finalize()


class Crypticle:
    """Encrypt/decrypt Salt session and publication payloads with one key string."""

    __slots__ = ("key_string", "_aes_key", "_hmac_key")

    def __init__(self, key_string: str | bytes) -> None:
        try:
            if isinstance(key_string, bytes):
                key_string = key_string.decode("ascii")
            raw = base64.b64decode(key_string, validate=True)
        except (ValueError, TypeError) as exc:
            raise CrypticleError("key string is not base64") from exc
        if len(raw) != AES_KEY_SIZE + HMAC_KEY_SIZE:
            raise CrypticleError(f"key string decodes to {len(raw)} bytes, expected 56")
        self.key_string = key_string
        self._aes_key = raw[:AES_KEY_SIZE]
        self._hmac_key = raw[AES_KEY_SIZE:]

    def encrypt(self, data: bytes, iv: bytes | None = None) -> bytes:
        """Encrypt and authenticate ``data``; ``iv`` is for byte-exact tests only."""
        iv = os.urandom(16) if iv is None else iv
        pad = 16 - len(data) % 16
        enc = Cipher(algorithms.AES(self._aes_key), modes.CBC(iv)).encryptor()
        body = iv + enc.update(data + bytes([pad]) * pad) + enc.finalize()
        return body + _mac(self._hmac_key, body)

    def decrypt(self, data: bytes | memoryview) -> bytes:
        """Check the HMAC (constant time) and padding, and return the plaintext."""
        if len(data) < 16 + 16 + SIG_SIZE or (len(data) - SIG_SIZE) % 16:
            raise CrypticleError("ciphertext has an impossible length")
        body, mac = data[:-SIG_SIZE], data[-SIG_SIZE:]
        if not hmac.compare_digest(_mac(self._hmac_key, body), mac):
            raise CrypticleError("HMAC check failed (wrong key or tampered data)")
        dec = Cipher(algorithms.AES(self._aes_key), modes.CBC(body[:16])).decryptor()
        plain = dec.update(body[16:]) + dec.finalize()
        pad = plain[-1]
        if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
            raise CrypticleError("bad padding")
        return plain[:-pad]

    def dumps(self, obj: Any, nonce: str | None = None, iv: bytes | None = None) -> bytes:
        """Serialise and encrypt ``obj``, with ``nonce`` after the prefix when given."""
        prefix = PICKLE_PREFIX + (nonce.encode("ascii") if nonce else b"")
        return self.encrypt(prefix + codec.dumps(obj), iv=iv)

    def loads(self, data: bytes | memoryview, nonce: str | None = None) -> Any:
        """Decrypt and deserialise; when ``nonce`` is given it must follow the prefix."""
        plain = self.decrypt(data if isinstance(data, memoryview) else codec.to_bytes(data))
        if not plain.startswith(PICKLE_PREFIX):
            raise CrypticleError("plaintext lacks the pickle:: prefix")
        plain = plain[len(PICKLE_PREFIX) :]
        if nonce is not None:
            got = plain[:NONCE_SIZE]
            if not hmac.compare_digest(got, nonce.encode("ascii")):
                raise CrypticleError("nonce mismatch (replayed or misrouted reply)")
            plain = plain[NONCE_SIZE:]
        try:
            return codec.loads(plain)
        except codec.DecodeError as exc:
            raise CrypticleError(str(exc)) from None


class SerialGuard:
    """Replay guard for publications: serials must increase, per publish key.

    At its first auth a process learns a *floor* for the key it is given, from a hamaster
    master's signed auth reply (the key's current serial, :meth:`set_floor`): a publication made
    before that auth (one captured before this minion restarted, say) is refused. A publication
    that arrived before an auth and only decrypted after it is checked with ``ignore_floor``:
    this process did not hold that key, so it did not run it.
    """

    __slots__ = ("_last", "_floor")

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._floor: dict[str, int] = {}

    def set_floor(self, key_string: str, serial: Any) -> None:
        """Refuse serials up to ``serial`` under a key this guard has not seen publications of."""
        if not isinstance(serial, int) or isinstance(serial, bool) or key_string in self._last:
            return
        self._floor[key_string] = max(serial, self._floor.get(key_string, 0))

    def accept(self, key_string: str, serial: Any, ignore_floor: bool = False) -> bool:
        """True if ``serial`` is newer than the last one seen under ``key_string``."""
        if not isinstance(serial, int) or isinstance(serial, bool):
            return False
        last = self._last.get(key_string, 0)
        if not ignore_floor:
            last = max(last, self._floor.get(key_string, 0))
        if serial <= last:
            return False
        self._last[key_string] = serial
        return True

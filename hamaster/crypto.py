"""RSA and key-file primitives used by Salt's wire protocol.

OAEP encryption, PKCS#1 v1.5 signatures, the X9.31 "private encrypt" Salt uses for its minion
token and auth-reply signature, key generation and key files written 0600. Pure functions: no
sockets, no global state.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ENC_ALGOS = {"OAEP-SHA1": hashes.SHA1, "OAEP-SHA224": hashes.SHA224}
SIG_ALGOS = {"PKCS1v15-SHA1": hashes.SHA1, "PKCS1v15-SHA224": hashes.SHA224}
DEFAULT_ENC_ALGO = "OAEP-SHA1"
DEFAULT_SIG_ALGO = "PKCS1v15-SHA1"

#: hashlib names of the digests :func:`hexdigest` takes from cryptography's OpenSSL.
OPENSSL_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512, "sha3_224": hashes.SHA3_224,
    "sha3_256": hashes.SHA3_256, "sha3_384": hashes.SHA3_384, "sha3_512": hashes.SHA3_512,
}


class CryptoError(Exception):
    """A key could not be loaded or an RSA operation failed."""


class UnknownAlgorithm(CryptoError):
    """An ``enc_algo`` / ``sig_algo`` name this implementation does not support."""


def generate_keypair(keysize: int = 2048) -> tuple[bytes, bytes]:
    """Return ``(private PEM (PKCS#1), public PEM (SubjectPublicKeyInfo))`` for a new RSA key."""
    priv, pub, _ = generate_keypair_with_key(keysize)
    return priv, pub


def generate_keypair_with_key(keysize: int = 2048) -> tuple[bytes, bytes, rsa.RSAPrivateKey]:
    """Like :func:`generate_keypair`, plus the key object (no need to parse the PEM again)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=keysize)
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return priv, public_pem(key.public_key()).encode() + b"\n", key


def load_private_key(pem: bytes | str, own: bool = False) -> rsa.RSAPrivateKey:
    """Load an RSA private key from PEM text.

    ``own``: the key is this process's own, read from a 0600 file it wrote. OpenSSL's RSA
    consistency check (~60 ms of CPU for 2048 bits, a large part of a minion's start-up) is then
    skipped: it protects against malformed keys from elsewhere, and whoever can rewrite our own
    key file owns that key anyway.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None,
                                                 unsafe_skip_rsa_key_validation=own)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not a usable RSA private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CryptoError("private key is not RSA")
    return key


def load_public_key(pem: bytes | str) -> rsa.RSAPublicKey:
    """Load an RSA public key from PEM text (SubjectPublicKeyInfo or PKCS#1)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data.strip() + b"\n")
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not a usable RSA public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CryptoError("public key is not RSA")
    return key


def public_pem(key: rsa.RSAPublicKey) -> str:
    """SubjectPublicKeyInfo PEM text with no trailing newline, as Salt puts keys on the wire."""
    return (
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
        .strip()
    )


def normalize_pem(pem: bytes | str) -> str:
    """The canonical text of a PEM key, so two copies of one key compare equal: ``\n`` line
    endings, each line stripped, blank lines dropped, no trailing newline.

    The one normaliser for key text (key registry, sessions, pinned master keys, fingerprints).
    Bytes are decoded as UTF-8 with undecodable bytes replaced (never raises): text that is not
    a key stays not a key.
    """
    text = pem.decode("utf-8", errors="replace") if isinstance(pem, bytes) else pem
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


def pem_fingerprint(pem: bytes | str, algo: str = "sha256") -> str:
    """Salt's key fingerprint (``master_finger``, ``salt-key -f``).

    Salt hashes the base64 body lines of the PEM file *as text*, each with its newline, without
    the BEGIN/END lines, and prints the digest as colon-separated hex pairs.
    """
    lines = normalize_pem(pem).split("\n")
    body = "".join(line + "\n" for line in lines if not line.startswith("-----"))
    digest = hashlib.new(algo, body.encode()).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def hexdigest(algo: str, data: bytes) -> str:
    """The hex digest of ``data`` with ``algo`` (a :mod:`hashlib` name), for bulk data (files).

    Computed by the OpenSSL that cryptography links statically when it has the algorithm: a
    minion's :mod:`hashlib` has only CPython's built-in hashes (:mod:`hamaster.cli.lean`), ~5×
    slower on large files. Other names go to :func:`hashlib.new` (ValueError when unknown).
    """
    cls = OPENSSL_DIGESTS.get(algo.lower())
    if cls is not None:
        try:
            h = hashes.Hash(cls())
        except UnsupportedAlgorithm:  # e.g. MD5 under an OpenSSL FIPS provider
            pass
        else:
            h.update(data)
            return h.finalize().hex()
    return hashlib.new(algo, data).hexdigest()


def _enc_hash(algo: str) -> type[hashes.HashAlgorithm]:
    try:
        return ENC_ALGOS[algo]
    except KeyError:
        raise UnknownAlgorithm(f"unsupported enc_algo {algo!r}") from None


def _sig_hash(algo: str) -> type[hashes.HashAlgorithm]:
    try:
        return SIG_ALGOS[algo]
    except KeyError:
        raise UnknownAlgorithm(f"unsupported sig_algo {algo!r}") from None


def oaep_encrypt(key: rsa.RSAPublicKey, data: bytes, algo: str = DEFAULT_ENC_ALGO) -> bytes:
    """RSA-OAEP encrypt ``data`` to ``key`` (MGF1 with the same hash)."""
    h = _enc_hash(algo)
    return key.encrypt(data, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))


def oaep_decrypt(key: rsa.RSAPrivateKey, data: bytes, algo: str = DEFAULT_ENC_ALGO) -> bytes:
    """RSA-OAEP decrypt; raises :class:`CryptoError` on any failure."""
    h = _enc_hash(algo)
    try:
        return key.decrypt(data, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))
    except ValueError as exc:
        raise CryptoError("OAEP decryption failed") from exc


def sign(key: rsa.RSAPrivateKey, data: bytes, algo: str = DEFAULT_SIG_ALGO) -> bytes:
    """PKCS#1 v1.5 signature of ``data``."""
    return key.sign(data, padding.PKCS1v15(), _sig_hash(algo)())


def verify(key: rsa.RSAPublicKey, data: bytes, sig: bytes, algo: str = DEFAULT_SIG_ALGO) -> bool:
    """Check a PKCS#1 v1.5 signature; False on mismatch or an unknown algorithm."""
    try:
        key.verify(sig, data, padding.PKCS1v15(), _sig_hash(algo)())
    except (InvalidSignature, UnknownAlgorithm, ValueError, TypeError):
        return False
    return True


def _x931_pad(msg: bytes, k: int) -> int:
    j = k - len(msg) - 1
    if j < 1:
        raise CryptoError("message too long for X9.31 padding")
    if j == 1:
        block = b"\x6a" + msg + b"\xcc"
    else:
        block = b"\x6b" + b"\xbb" * (j - 2) + b"\xba" + msg + b"\xcc"
    return int.from_bytes(block, "big")


def x931_sign(key: rsa.RSAPrivateKey, msg: bytes) -> bytes:
    """X9.31 "private encrypt" of ``msg``: the value Salt uses for ``tok`` and the auth ``sig``.

    ``cryptography`` has no X9.31 padding, so this is the raw RSA private operation (with CRT)
    over the padded block, returning ``min(s, n - s)`` as the standard requires.
    """
    nums = key.private_numbers()
    n = nums.public_numbers.n
    k = (n.bit_length() + 7) // 8
    m = _x931_pad(msg, k)
    # CRT private operation.
    s1 = pow(m, nums.dmp1, nums.p)
    s2 = pow(m, nums.dmq1, nums.q)
    h = (nums.iqmp * (s1 - s2)) % nums.p
    s = s2 + h * nums.q
    s = min(s, n - s)
    return s.to_bytes(k, "big")


def x931_recover(key: rsa.RSAPublicKey, sig: bytes) -> bytes | None:
    """Public operation on an X9.31 signature; returns the signed message or None if invalid."""
    nums = key.public_numbers()
    n = nums.n
    k = (n.bit_length() + 7) // 8
    if len(sig) != k:
        return None
    s = int.from_bytes(sig, "big")
    if s >= n:
        return None
    v = pow(s, nums.e, n)
    if v & 0xF != 0xC:
        v = n - v
    block = v.to_bytes(k, "big")
    if block[-1] != 0xCC:
        return None
    if block[0] == 0x6A:
        return block[1:-1]
    if block[0] != 0x6B:
        return None
    i = 1
    while i < len(block) and block[i] == 0xBB:
        i += 1
    if i >= len(block) or block[i] != 0xBA:
        return None
    return block[i + 1 : -1]


def new_aes_key_string() -> str:
    """A fresh Crypticle key string: base64 of 24 AES bytes + 32 HMAC bytes."""
    return base64.b64encode(secrets.token_bytes(56)).decode()


def write_secret_file(path: str | Path, data: bytes,
                      mode: int = 0o600, durable: bool = True) -> None:
    """Atomically write ``data`` to ``path`` with ``mode`` (never world-readable in between).

    ``durable=False`` skips the fsync: for caches that can be rebuilt (a per-minion grains cache
    written for every new minion of a storm: the fsyncs held the pillar threads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

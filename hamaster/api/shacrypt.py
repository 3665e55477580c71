"""SHA-crypt (``$5$`` SHA-256 and ``$6$`` SHA-512, Drepper's specification) for htpasswd files.

Python's ``crypt`` module is deprecated (gone in 3.13) and passlib is unmaintained; this is the
published algorithm, checked against the specification's test vectors.
"""

from __future__ import annotations

import hashlib
import hmac

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ROUNDS_DEFAULT = 5000
ROUNDS_MIN = 1000
ROUNDS_MAX = 999_999_999

# Byte order of the final encoding: (b2, b1, b0) triples, then the tail.
_ORDER_512 = [
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
    (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54),
    (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60),
    (40, 61, 19), (62, 20, 41),
]
_ORDER_256 = [
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5), (6, 16, 26),
    (27, 7, 17), (18, 28, 8), (9, 19, 29),
]


def _b64(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat(block: bytes, length: int) -> bytes:
    return (block * (length // len(block) + 1))[:length]


def sha_crypt(password: bytes, setting: str) -> str:
    """Hash ``password`` with the ``$5$``/``$6$`` ``setting`` (``$6$[rounds=N$]salt[$...]``).

    Raises ``ValueError`` for a setting that is not SHA-crypt.
    """
    if setting.startswith("$6$"):
        algo, hlen, order = hashlib.sha512, 64, _ORDER_512
    elif setting.startswith("$5$"):
        algo, hlen, order = hashlib.sha256, 32, _ORDER_256
    else:
        raise ValueError("not a SHA-crypt setting")
    ident = setting[:3]
    rest = setting[3:]
    rounds = ROUNDS_DEFAULT
    custom_rounds = False
    if rest.startswith("rounds="):
        num, sep, rest = rest[len("rounds="):].partition("$")
        if not sep or not num.isdigit():
            raise ValueError("bad rounds= in SHA-crypt setting")
        rounds = min(max(int(num), ROUNDS_MIN), ROUNDS_MAX)
        custom_rounds = True
    salt = rest.split("$", 1)[0][:16].encode()
    pw = password
    b = algo(pw + salt + pw).digest()
    a = algo(pw + salt)
    n = len(pw)
    while n > hlen:
        a.update(b)
        n -= hlen
    a.update(b[:n])
    n = len(pw)
    while n:
        a.update(b if n & 1 else pw)
        n >>= 1
    c = a.digest()
    p = _repeat(algo(pw * len(pw)).digest(), len(pw)) if pw else b""
    s = _repeat(algo(salt * (16 + c[0])).digest(), len(salt)) if salt else b""
    for i in range(rounds):
        h = algo(p if i & 1 else c)
        if i % 3:
            h.update(s)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    enc = "".join(_b64(c[x], c[y], c[z], 4) for x, y, z in order)
    enc += _b64(0, 0, c[63], 2) if hlen == 64 else _b64(0, c[31], c[30], 3)
    head = f"{ident}rounds={rounds}$" if custom_rounds else ident
    return f"{head}{salt.decode()}${enc}"


def verify(password: bytes, hashed: str) -> bool:
    """Whether ``password`` matches the SHA-crypt string ``hashed`` (constant-time compare)."""
    try:
        return hmac.compare_digest(sha_crypt(password, hashed), hashed)
    except (ValueError, UnicodeError):
        return False

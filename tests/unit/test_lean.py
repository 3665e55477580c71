"""The minion's lean imports: no second OpenSSL, no asyncio TLS, and nothing it needs is lost."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from hamaster import crypto

PROBE = r"""
import sys
import hamaster.cli.minion  # the entry point applies the lean imports first
import asyncio.sslproto, hashlib, hmac
# everything a running minion imports: the daemon and every execution module
import hamaster.minion.daemon
from hamaster.minion.modules.registry import FunctionRegistry
assert FunctionRegistry().get("cp.get_file") is not None
from hamaster import crypto
big = bytes(range(256)) * 4096
assert crypto.hexdigest("sha256", big) == hashlib.sha256(big).hexdigest()
print("ssl" in sys.modules, "_hashlib" in sys.modules, asyncio.sslproto.ssl is None)
print(hashlib.sha256(b"abc").hexdigest())
print(hashlib.new("md5", b"abc").hexdigest(), hashlib.new("sha1", b"abc").hexdigest())
print(hmac.new(b"key", b"The quick brown fox jumps over the lazy dog", hashlib.sha256).hexdigest())
from hamaster.bus.crypticle import Crypticle, generate_key_string
c = Crypticle(generate_key_string())
assert c.decrypt(c.encrypt(b"payload")) == b"payload"
import ssl  # still importable by code that needs it later
print(ssl.OPENSSL_VERSION.startswith("OpenSSL"))
"""


def test_minion_imports_no_openssl_copy_and_hashes_still_work() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "False False True"          # neither ssl nor _hashlib was loaded by the minion
    assert out[1] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert out[2] == "900150983cd24fb0d6963f7d28e17f72 a9993e364706816aba3e25717850c26c9cd0d89d"
    assert out[3] == "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert out[4] == "True"


@pytest.mark.parametrize("algo", [*crypto.OPENSSL_DIGESTS, "SHA256", "blake2b", "sha512_256"])
def test_hexdigest_is_hashlibs_digest(algo: str) -> None:
    """File hashes through cryptography's OpenSSL equal hashlib's, whatever the name's case."""
    data = b"hamaster \x00\xff" * 1000
    try:
        want = hashlib.new(algo, data).hexdigest()
    except ValueError:
        pytest.skip(f"{algo} not in this Python's hashlib")
    assert crypto.hexdigest(algo, data) == want


def test_hexdigest_refuses_unknown_names_as_hashlib_does() -> None:
    with pytest.raises(ValueError):
        crypto.hexdigest("sha257", b"x")

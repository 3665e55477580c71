"""Keep the minion process small: one copy of OpenSSL, and no TLS support it never uses.

A minion runs on every host of a fleet, so its resident memory is paid thousands of times.
Two standard-library imports load the system's OpenSSL although the minion needs neither:

- asyncio imports :mod:`ssl` (libssl + libcrypto) only to offer TLS transports; hamaster talks
  ZeroMQ and never opens an asyncio TLS connection.
- :mod:`hashlib` and :mod:`hmac` use ``_hashlib`` (libcrypto) when present, else CPython's
  built-in SHA-1/SHA-2/SHA-3/MD5/BLAKE2. Every algorithm the minion uses is built in, and the RSA
  and AES work is done by ``cryptography``, which carries its *own* statically linked OpenSSL:
  ``_hashlib`` would be a second copy of libcrypto in the process.

Either import alone loads libcrypto, so both are hidden or the saving is gone. Measured
(2026-12-06, CPython 3.11, ``bench/bench_minion.py``): a minion connected to a master, idle,
35.1 MiB RSS with this, 40.0 MiB without (the system libcrypto alone maps 3.4 MiB); nothing else
the minion imports at start can be left out for as much (asyncio, pyzmq, cryptography, PyYAML and
msgpack are all used; ``python -X importtime``). Bulk hashing of files does not pay for it: the
minion hashes file contents with :func:`hamaster.crypto.hexdigest`, i.e. with cryptography's
OpenSSL, as fast as ``_hashlib``; the built-in SHA-256 (~5× slower on large data) only sees small
inputs (HMACs of messages, digests of keys). ``tests/unit/test_lean.py`` and
``tests/integration/test_minion_footprint.py`` fail if the minion loads either library again.
"""

from __future__ import annotations

import sys

#: Modules hidden while asyncio, hashlib and hmac are first imported.
HIDDEN = ("ssl", "_hashlib")


def import_lean() -> None:
    """Import asyncio, hashlib and hmac with :data:`HIDDEN` unavailable, then unhide them.

    The three modules record that TLS and OpenSSL hashes are unavailable and use what they do
    without; a later ``import ssl`` (an https fetch in a module, the metrics exporter) still
    loads ssl as usual. Does nothing for a module already imported by then.
    """
    hidden = [name for name in HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import asyncio  # noqa: F401
        import hashlib  # noqa: F401
        import hmac  # noqa: F401
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]

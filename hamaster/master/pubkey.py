"""The master's publish key: the AES key string publications are encrypted with, and its serial.

Each master has its own publish key (minions learn it per master at ``_auth``), rotated when an
accepted key is deleted or rejected so that minion cannot read later publications. The serial
restarts at 1 with every key, as Salt's does.
"""

from __future__ import annotations

import logging
import threading

from cryptography.hazmat.primitives.asymmetric import rsa

from hamaster.bus.crypticle import Crypticle, generate_key_string
from hamaster.bus.messages import aes_key_signature

log = logging.getLogger(__name__)


class PublishKey:
    """Current publish key, its Crypticle, its X9.31 signature and the next serial."""

    def __init__(self, master_priv: rsa.RSAPrivateKey) -> None:
        self._priv = master_priv
        self._lock = threading.Lock()
        self.generation = 0
        self._set(generate_key_string())

    def _set(self, key: str) -> None:
        self.key = key
        self.cipher = Crypticle(key)
        self.signature = aes_key_signature(self._priv, key)
        self.serial = 0
        self.generation += 1

    def rotate(self, reason: str) -> None:
        """Replace the key; minions holding the old one must re-authenticate to read jobs."""
        with self._lock:
            self._set(generate_key_string())
        log.info("rotated the publish key (%s)", reason)

    def rekey(self, master_priv: rsa.RSAPrivateKey, reason: str) -> None:
        """Sign with a new master key from now on, and rotate (the old key's signature and
        every minion's copy of the publish key become useless)."""
        with self._lock:
            self._priv = master_priv
            self._set(generate_key_string())
        log.info("rotated the publish key (%s)", reason)

    def snapshot(self, signer: rsa.RSAPrivateKey | None = None) -> tuple[str, bytes, int]:
        """``(key, signature, serial)`` read together (a rotation may run in another thread).

        With ``signer`` (the master key the caller signs its reply with), the signature is
        made with that key if the cached one was not: while a master adopts the cluster's new
        keypair, an ``_auth`` answered in a worker thread could otherwise sign its reply with
        the new key and carry the publish key's signature by the old one, which the minion
        refuses ("publish key signature (X9.31 sig) does not verify").
        """
        with self._lock:
            key, sig, serial, priv = self.key, self.signature, self.serial, self._priv
        if signer is not None and signer is not priv:
            sig = aes_key_signature(signer, key)
        return key, sig, serial

    def next_serial(self) -> int:
        """The serial for the next publication under the current key."""
        with self._lock:
            self.serial += 1
            return self.serial

"""A minion's identity: its id, its RSA key pair, and the pinned master key.

The id comes from config, else the saved ``minion_id`` file, else the hostname (saved on first
start so it never changes underneath the operator). The key pair lives in ``pki_dir``
(``minion.pem`` 0600, ``minion.pub``); the first master key seen is pinned in
``minion_master.pub`` (trust on first use) and every master must present that key afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from hamaster import crypto

log = logging.getLogger(__name__)


def conf_dir_of(opts: dict) -> str | None:
    """The config directory this minion was started with, if any."""
    conf = opts.get("conf_file")
    return os.path.dirname(conf) if conf else None


def resolve_minion_id(opts: dict) -> str:
    """The minion id: config ``id``, else the saved ``minion_id`` file, else the hostname."""
    if opts.get("id"):
        return str(opts["id"])
    candidates = []
    cdir = conf_dir_of(opts)
    if cdir:
        candidates.append(os.path.join(cdir, "minion_id"))
    candidates.append(os.path.join(opts.get("cachedir", "/var/cache/hamaster/minion"), "minion_id"))
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as fh:
                saved = fh.read().strip()
            if saved:
                return saved
        except OSError:
            continue
    mid = socket.gethostname()
    for path in candidates:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(mid + "\n")
            log.info("minion id %s saved to %s", mid, path)
            break
        except OSError:
            continue
    return mid


class MinionIdentity:
    """Keys and id of one minion identity (a swarm process holds many)."""

    def __init__(self, opts: dict, minion_id: str, pki_dir: str | None = None) -> None:
        self.opts = opts
        self.minion_id = minion_id
        self.pki_dir = Path(pki_dir or opts["pki_dir"])
        self.priv_pem, pub_pem, self.priv = self._load_or_create_keys(
            int(opts.get("keysize", 2048)))
        self.pub_text = crypto.normalize_pem(pub_pem)
        self.tok = crypto.x931_sign(self.priv, b"salt")
        self._pinned: str | None = None
        self._pin_lock = threading.Lock()

    def _load_or_create_keys(self, keysize: int) -> tuple[bytes, bytes, rsa.RSAPrivateKey]:
        priv_path = self.pki_dir / "minion.pem"
        pub_path = self.pki_dir / "minion.pub"
        if priv_path.exists():
            priv = priv_path.read_bytes()
            if priv_path.stat().st_mode & 0o077:
                os.chmod(priv_path, 0o600)
                log.warning("tightened permissions of %s to 0600", priv_path)
            key = crypto.load_private_key(priv, own=True)
            pub = crypto.public_pem(key.public_key()).encode() + b"\n"
            if not pub_path.exists():
                pub_path.write_bytes(pub)
            return priv, pub, key
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pki_dir, 0o700)
        priv, pub, key = crypto.generate_keypair_with_key(keysize)
        crypto.write_secret_file(priv_path, priv, 0o600)
        crypto.write_secret_file(pub_path, pub, 0o644)
        log.info("generated minion key pair in %s", self.pki_dir)
        return priv, pub, key

    @property
    def pinned_path(self) -> Path:
        """Where the trusted master key is kept."""
        return self.pki_dir / "minion_master.pub"

    def pinned_master_pub(self) -> str | None:
        """The pinned master key text, or None before first contact."""
        if self._pinned is None:
            try:
                self._pinned = crypto.normalize_pem(self.pinned_path.read_text())
            except OSError:
                return None
        return self._pinned

    def pin_master_pub(self, text: str) -> str:
        """Trust ``text`` as the master key from now on, unless a key is pinned already.

        Check-and-pin is atomic (a lock in this process, an exclusive create on disk): of
        several concurrent first authentications exactly one key is pinned, and every caller
        gets that key back; a caller whose ``text`` differs must refuse its master. Memory and
        ``minion_master.pub`` always hold the same key.
        """
        norm = crypto.normalize_pem(text)
        with self._pin_lock:
            current = self.pinned_master_pub()
            if current is not None:
                return current
            path = self.pinned_path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write((norm + "\n").encode())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, path)          # fails if another process pinned first
            except FileExistsError:
                current = self.pinned_master_pub()
                if current is not None:
                    return current
                raise
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            self._pinned = norm
        log.info("%s: pinned master key %s", self.minion_id, crypto.pem_fingerprint(norm))
        return norm

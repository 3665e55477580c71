"""The ``gpg`` renderer: decrypt PGP blocks in rendered data with the real ``gpg`` binary.

As Salt's: every string of the data (after ``yaml``) that holds ``-----BEGIN PGP MESSAGE-----``
… ``-----END PGP MESSAGE-----`` blocks gets each block replaced by its decryption, done by
``gpg --homedir <gpg_keydir> --decrypt`` (the key must have no passphrase, as Salt requires).
In a cluster without ``gpg_keydir``, the key is the cluster's: ``hamaster-run pillar.gpg_push``
stores an armored export in the shared store (``pillar_gpg/keys.asc``) and each master imports
it into its private ``<cachedir>/pillar_gpg`` (0700) when it changes.
A block that cannot be decrypted is a render error. Decrypted values live only in memory: a
small cache keyed by the ciphertext's sha256 spares a ``gpg`` process per compile; nothing is
written to disk, the store or the log. A compile that decrypted anything is marked secret, and
its pillar is not copied to the shared minion data cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from hamaster.pillar.render import RenderError

log = logging.getLogger(__name__)

PGP_BLOCK = re.compile(r"-----BEGIN PGP MESSAGE-----.*?-----END PGP MESSAGE-----", re.DOTALL)
GPG_TIMEOUT = 20.0
_CACHE_MAX = 4096
#: Shared-store key of the cluster's pillar GPG key (armored secret key export).
STORE_KEY = "pillar_gpg/keys.asc"
#: How often a master re-reads :data:`STORE_KEY` (seconds).
KEY_RECHECK = 5.0


class GpgDecrypter:
    """Decrypts PGP blocks with ``gpg`` and one key directory (thread-safe)."""

    def __init__(self, keydir: str, gpg_binary: str | None = None,
                 key_source: Callable[[], bytes | None] | None = None) -> None:
        """``key_source`` (the cluster's key in the shared store) is imported into ``keydir``
        (a private directory of this master) whenever it changes."""
        self.keydir = keydir
        self.gpg = gpg_binary or shutil.which("gpg") or "gpg"
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._key_source = key_source
        self._import_lock = threading.Lock()
        self._key_sha = ""
        self._key_checked = -KEY_RECHECK

    def _sync_key(self) -> None:
        """Import the store's key into ``keydir`` when it changed (checked every few seconds)."""
        if self._key_source is None or time.monotonic() - self._key_checked < KEY_RECHECK:
            return
        self._key_checked = time.monotonic()
        try:
            data = self._key_source()
        except Exception as exc:
            log.warning("cannot read the cluster's pillar gpg key: %s", exc)
            return
        if not data:
            return
        sha = hashlib.sha256(data).hexdigest()
        if sha == self._key_sha:
            return
        os.makedirs(self.keydir, mode=0o700, exist_ok=True)
        os.chmod(self.keydir, 0o700)
        proc = subprocess.run([self.gpg, "--homedir", self.keydir, "--batch", "--yes", "--quiet",
                               "--pinentry-mode", "loopback", "--passphrase", "", "--import"],
                              input=data, capture_output=True, timeout=GPG_TIMEOUT, check=False)
        if proc.returncode != 0:
            log.error("cannot import the cluster's pillar gpg key: %s",
                      proc.stderr.decode(errors="replace").strip()[-300:])
            return
        self._key_sha = sha
        with self._lock:
            self._cache.clear()
        log.info("imported the cluster's pillar gpg key (%s…) into %s", sha[:12], self.keydir)

    def decrypt_block(self, block: str) -> str:
        """The plaintext of one armored PGP message (raises :class:`RenderError`)."""
        key = hashlib.sha256(block.encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._import_lock:  # one import at a time
            self._sync_key()
        if not os.path.isdir(self.keydir):
            raise RenderError(f"gpg_keydir {self.keydir} does not exist")
        argv = [self.gpg, "--homedir", self.keydir, "--batch", "--yes", "--quiet", "--no-tty",
                "--pinentry-mode", "loopback", "--passphrase", "", "--decrypt"]
        try:
            proc = subprocess.run(argv, input=block.encode(), capture_output=True,
                                  timeout=GPG_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RenderError(f"gpg could not run: {exc}") from None
        if proc.returncode != 0:
            # gpg's message names the key, never the plaintext
            detail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise RenderError(f"Could not decrypt a PGP block (gpg: {detail[0]})")
        text = proc.stdout.decode("utf-8", errors="replace")
        with self._lock:
            self._cache[key] = text
            while len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        return text

    def close(self) -> None:
        """Stop the gpg-agent that decrypting started in ``keydir``, if this master owns it
        (the directory it imports the cluster's key into; an operator's ``gpg_keydir`` is
        left alone)."""
        gpgconf = shutil.which("gpgconf")
        if self._key_source is None or gpgconf is None or not os.path.isdir(self.keydir):
            return
        try:
            subprocess.run([gpgconf, "--homedir", self.keydir, "--kill", "gpg-agent"],
                           capture_output=True, timeout=GPG_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("could not stop the gpg-agent of %s: %s", self.keydir, exc)

    def decrypt(self, data: Any, found: list[bool] | None = None) -> Any:
        """``data`` with every PGP block in its strings (and keys) decrypted."""
        if isinstance(data, str):
            if "-----BEGIN PGP MESSAGE-----" not in data:
                return data
            if found is not None:
                found.append(True)
            return PGP_BLOCK.sub(lambda m: self.decrypt_block(m.group(0)), data)
        if isinstance(data, dict):
            return {self.decrypt(k, found): self.decrypt(v, found) for k, v in data.items()}
        if isinstance(data, list):
            return [self.decrypt(v, found) for v in data]
        return data

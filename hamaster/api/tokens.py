"""API tokens in the shared store, so that a token issued by one master works on every master.

A token is 20 random bytes in hex (salt-api's shape). Only its SHA-256 is stored, under
``api/tokens/<sha256>``, with the session record (user, eauth, start, expire, perms, groups):
whoever can read the store cannot use a token from it. A master caches a record it has read for
at most ``cache_ttl`` seconds (``ha_poll_interval``), so a logout on any master, or expiry,
takes effect everywhere within one poll interval. A single master (no shared store) keeps its
tokens under ``cachedir/api`` in the same layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from typing import Any

from hamaster.store.base import Store, StoreError

log = logging.getLogger(__name__)

PREFIX = "api/tokens/"
TOKEN_BYTES = 20
MAX_TOKEN_LEN = 128


def token_digest(token: str) -> str | None:
    """The store name of ``token`` (its SHA-256), or None for a string that is not a token."""
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LEN:
        return None
    try:
        int(token, 16)
    except ValueError:
        return None
    return hashlib.sha256(token.lower().encode()).hexdigest()


class TokenStore:
    """Create, look up and delete tokens; thread-safe (called from the API's worker threads)."""

    def __init__(self, store: Store, cache_ttl: float = 0.5) -> None:
        self.store = store
        self.cache_ttl = max(0.0, cache_ttl)
        self._cache: dict[str, tuple[dict, float]] = {}
        self._lock = threading.Lock()

    def create(self, user: str, eauth: str, perms: list[Any], groups: list[str],
               lifetime: float) -> dict:
        """Mint a token for ``user``; returns the record with ``token`` (never stored)."""
        token = secrets.token_hex(TOKEN_BYTES)
        now = time.time()
        rec = {"user": user, "eauth": eauth, "start": now, "expire": now + lifetime,
               "perms": perms, "groups": groups}
        digest = token_digest(token)
        assert digest is not None
        self.store.put(PREFIX + digest, json.dumps(rec).encode())
        with self._lock:
            self._cache[digest] = (rec, time.monotonic())
        return {**rec, "token": token}

    def get(self, token: str) -> dict | None:
        """The live record of ``token``, or None (unknown, malformed, expired or logged out).

        Raises :class:`StoreError` when the store cannot be read and the token is not cached.
        """
        digest = token_digest(token)
        if digest is None:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[1] <= self.cache_ttl:
            rec = hit[0]
        else:
            raw = self.store.get(PREFIX + digest)
            if raw is None:
                with self._lock:
                    self._cache.pop(digest, None)
                return None
            try:
                rec = json.loads(raw)
            except ValueError:
                log.warning("malformed token record %s… ignored", digest[:12])
                return None
            if not isinstance(rec, dict):
                return None
            with self._lock:
                self._cache[digest] = (rec, now)
                if len(self._cache) > 100_000:
                    self._cache.clear()
        if float(rec.get("expire", 0)) <= time.time():
            return None
        return rec

    def delete(self, token: str) -> bool:
        """Log ``token`` out everywhere; True if it existed."""
        digest = token_digest(token)
        if digest is None:
            return False
        with self._lock:
            self._cache.pop(digest, None)
        return self.store.delete(PREFIX + digest)

    def purge_expired(self) -> int:
        """Delete expired token records from the store; returns how many."""
        gone = 0
        try:
            records = self.store.get_many(PREFIX.rstrip("/"))
        except StoreError as exc:
            log.debug("token purge skipped: %s", exc)
            return 0
        now = time.time()
        for key, raw in records.items():
            try:
                expire = float(json.loads(raw).get("expire", 0))
            except (ValueError, AttributeError, TypeError):
                expire = 0.0
            if expire <= now and self.store.delete(key):
                gone += 1
        return gone

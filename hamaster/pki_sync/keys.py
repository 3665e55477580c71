"""Minion key states (accepted, pending, rejected, denied) and the master keypair, on a store.

The layout is Salt's pki layout under a store prefix: ``<prefix>minions/<id>``,
``minions_pre/<id>``, ``minions_rejected/<id>``, ``minions_denied/<id>``, ``master.pem`` and
``master.pub``. A single master uses ``FsStore(pki_dir)`` with prefix ``""`` so files land
exactly where salt-master puts them; a cluster shares one store under ``pki/master/``.

:class:`KeyRegistry` keeps an in-memory view (fed by the store's watch) so authentication of a
known minion never waits on the backend, and makes Salt's ``_auth`` decision in
:meth:`KeyRegistry.authorize`.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from hamaster.crypto import normalize_pem, pem_fingerprint
from hamaster.ids import is_plain, shown, valid_minion_id
from hamaster.options import opt
from hamaster.store.base import Change, Store, StoreUnavailable

log = logging.getLogger(__name__)


class KeyState(StrEnum):
    """Where a minion key lives; the value is Salt's pki sub-directory name."""

    ACCEPTED = "minions"
    PENDING = "minions_pre"
    REJECTED = "minions_rejected"
    DENIED = "minions_denied"


class AuthDecision(StrEnum):
    """Outcome of a minion's authentication request."""

    ACCEPTED = "accepted"
    PENDING = "pending"
    REJECTED = "rejected"
    DENIED = "denied"


class KeyRegistryError(Exception):
    """A key operation cannot be done; the message says why and what to do."""


class UnknownMinion(KeyRegistryError):
    """No key for this minion id in the requested state(s)."""

    def __init__(self, mid: str, states: Iterable[KeyState] | None = None):
        where = ", ".join(s.value for s in states) if states else "any state"
        super().__init__(f"no key for minion {mid!r} in {where}; list keys with `hamaster-key -L`")
        self.mid = mid


ChangeCallback = Callable[[str, "KeyState | None", "KeyState | None"], None]

#: :meth:`KeyRegistry.refresh` of more ids than this reloads every key at once instead.
REFRESH_ONE_BY_ONE = 32
# Operation locks, one per stripe of minion ids (an id always maps to the same one).
OP_LOCK_STRIPES = 64

# Precedence when one id has files in several states.
_PRECEDENCE = (KeyState.ACCEPTED, KeyState.REJECTED, KeyState.DENIED, KeyState.PENDING)


@functools.lru_cache(maxsize=65536)
def is_public_key(pem: str) -> bool:
    """True if ``pem`` parses as a PEM public key (SubjectPublicKeyInfo or PKCS#1); cached."""
    try:
        serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError):
        return False
    return True


def pem_finger(pem: str) -> str:
    """Salt's fingerprint (``salt-key -f``, ``master_finger``): sha256 over the PEM body lines."""
    if not is_public_key(normalize_pem(pem)):
        raise KeyRegistryError("key is not a valid PEM public key")
    return pem_fingerprint(pem)


def key_hint(flag: str, mid: str) -> str:
    """"`hamaster-key FLAG ID`" for an id safe in a shell word, else how to do it by hand.

    A log line never suggests a command line built from an id that could carry shell syntax.
    """
    if is_plain(mid):
        return f"`hamaster-key {flag} {mid}`"
    return f"`hamaster-key {flag}` with this id (quote it; check `hamaster-key -L`)"


def _read_pattern_file(path: str | None, what: str) -> list[str]:
    if not path:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        log.debug("%s %s does not exist", what, path)
        return []
    except OSError as exc:
        log.warning("cannot read %s %s: %s", what, path, exc)
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _matches(mid: str, patterns: list[str]) -> bool:
    return any(mid == p or fnmatch.fnmatchcase(mid, p) for p in patterns)


def _join_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


class NewKeyThrottle:
    """Bounds how fast unknown ids can add pending keys: a token bucket (``rate`` new keys per
    second, bursts of ``rate``) and a cap on the pending keys in total. Zero disables either.
    Keys accepted at once (``auto_accept``, ``autosign_file``) are not bounded: such a master
    accepts whoever asks, by the operator's choice."""

    def __init__(self, rate: float = 0.0, max_pending: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.max_pending = int(max_pending)
        self.clock = clock
        self._tokens = max(self.rate, 1.0)
        self._at = clock()
        self._lock = threading.Lock()
        #: Called with ``"rate"`` or ``"cap"`` for every key not recorded (a metric).
        self.on_throttle: Callable[[str], None] | None = None

    def allow(self, pending_now: int) -> bool:
        """True when one more pending key may be written now (and spend a token)."""
        reason = None
        with self._lock:
            if self.max_pending and pending_now >= self.max_pending:
                reason = "cap"
            elif self.rate > 0:
                now = self.clock()
                self._tokens = min(max(self.rate, 1.0), self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                else:
                    reason = "rate"
        if reason is None:
            return True
        if self.on_throttle is not None:
            self.on_throttle(reason)
        return False


class KeyRegistry:
    """Minion key states on a store, with an in-memory view kept current by the store's watch."""

    def __init__(self, store: Store, prefix: str = "", *, auto_accept: bool = False,
                 autosign_file: str | None = None, autoreject_file: str | None = None,
                 open_mode: bool = False, throttle: NewKeyThrottle | None = None):
        """Create a registry for keys under ``prefix`` of ``store``; call :meth:`load`.

        ``throttle`` bounds new pending keys (a key it holds back is answered as pending without
        being recorded: the minion asks again after ``acceptance_wait_time``).
        """
        self.throttle = throttle or NewKeyThrottle()
        self.store = store
        self.prefix = _join_prefix(prefix)
        self.auto_accept = auto_accept
        self.autosign_file = autosign_file
        self.autoreject_file = autoreject_file
        self.open_mode = open_mode
        # Two kinds of lock: ``_lock`` guards the in-memory view and is only ever held for memory
        # work, so the request path's lookups never wait on the store; an id's operation lock
        # (:meth:`_op_lock`, one of ``OP_LOCK_STRIPES``) serialises the decisions and
        # transitions of that id (which read and write the store). Different ids proceed in
        # parallel: a storm of new keys on a remote store (etcd) is paced by the store pool's
        # threads, not by one round trip after another.
        self._lock = threading.RLock()
        self._op_locks = [threading.RLock() for _ in range(OP_LOCK_STRIPES)]
        self._view: dict[KeyState, dict[str, str]] = {s: {} for s in KeyState}
        self._callbacks: list[ChangeCallback] = []
        self._watching = False
        # Per id: state changes made in the view whose callbacks have not finished yet (see
        # :meth:`settled`; a key-change barrier must not confirm before they have run).
        self._unfired: dict[str, int] = {}
        # Per id, how many watch changes were applied: a direct store read (refresh, load)
        # that raced with the watch must not undo what the watch applied meanwhile (a stale
        # "absent" would turn ACCEPTED -> None -> ACCEPTED and rotate the publish key).
        self._wseq: dict[str, int] = {}

    # ------------------------------------------------------------------ memory view

    def _key(self, state: KeyState, mid: str) -> str:
        return f"{self.prefix}{state.value}/{mid}"

    def _state_in_view(self, mid: str) -> KeyState | None:
        for state in _PRECEDENCE:
            if mid in self._view[state]:
                return state
        return None

    def _set(self, mid: str, state: KeyState, pem: str | None,
             events: list[tuple[str, KeyState | None, KeyState | None]]) -> None:
        """Update the view for (mid, state); record an event when ``state_of`` changes."""
        norm = normalize_pem(pem) if pem is not None else None
        with self._lock:
            old = self._state_in_view(mid)
            if norm is None:
                self._view[state].pop(mid, None)
            else:
                self._view[state][mid] = norm
            new = self._state_in_view(mid)
            if old != new:
                self._unfired[mid] = self._unfired.get(mid, 0) + 1
        if old != new:
            events.append((mid, old, new))

    def _fire(self, events: list[tuple[str, KeyState | None, KeyState | None]]) -> None:
        for mid, old, new in events:
            log.info("minion key %s: %s -> %s", shown(mid), old.name if old else None,
                     new.name if new else None)
            try:
                for cb in list(self._callbacks):
                    try:
                        cb(mid, old, new)
                    except Exception:
                        log.exception("key change callback failed for %s", shown(mid))
            finally:
                with self._lock:
                    left = self._unfired.get(mid, 0) - 1
                    if left > 0:
                        self._unfired[mid] = left
                    else:
                        self._unfired.pop(mid, None)

    def settled(self, mid: str) -> bool:
        """True when every change of ``mid``'s state seen so far has been handed to the
        :meth:`on_change` callbacks and they have returned (sessions dropped, publish key
        rotated): the view's state of ``mid`` is then in force in this process."""
        with self._lock:
            return mid not in self._unfired

    def refresh(self, ids: Iterable[str]) -> None:
        """Re-read the state of ``ids`` from the store (not the watch) and apply any change.

        Used by the key-change barrier (:mod:`hamaster.pki_sync.confirm`): a request names ids
        whose change this process may not have seen yet through its watch. Many ids are read
        with one full :meth:`load` (a few range reads) instead of four reads per id. Raises
        :class:`StoreUnavailable` when the store cannot be read.
        """
        ids = [m for m in ids if valid_minion_id(m)]
        if len(ids) > REFRESH_ONE_BY_ONE:
            self.load()
            return
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        try:
            for mid in ids:
                with self._op_lock(mid):
                    self._refresh(mid, events)
        finally:
            self._fire(events)

    def load(self) -> None:
        """Fill the in-memory view from the store (raises StoreUnavailable if unreachable).

        Ids the watch changed while the store was being read keep what the watch applied.
        """
        with self._lock:
            seq0 = dict(self._wseq)
        fresh: dict[KeyState, dict[str, str]] = {s: {} for s in KeyState}
        for state in KeyState:
            base = f"{self.prefix}{state.value}"
            for key in self.store.list(base):
                mid = key[len(base) + 1:]
                if not valid_minion_id(mid):
                    continue
                raw = self.store.get(key)
                if raw is not None:
                    fresh[state][mid] = normalize_pem(raw)
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        with self._lock:
            ids = {m for s in KeyState for m in self._view[s]} | {
                m for s in KeyState for m in fresh[s]}
            for mid in ids:
                if self._wseq.get(mid, 0) != seq0.get(mid, 0):
                    continue
                for state in KeyState:
                    new = fresh[state].get(mid)
                    if self._view[state].get(mid) != new:
                        self._set(mid, state, new, events)
        self._fire(events)

    def attach_watch(self) -> None:
        """Keep the view current from the store's watch (then reload to close the gap)."""
        if not self._watching:
            self.store.watch(self.prefix.rstrip("/"), self._on_store_changes)
            self._watching = True
        try:
            self.load()
        except StoreUnavailable as exc:
            log.warning("key store unavailable while loading keys: %s (using memory)", exc)

    def _on_store_changes(self, changes: list[Change]) -> None:
        """Apply a batch from the watch; one event per id for the whole batch (a move seen as
        "pending deleted, accepted put" in one batch is PENDING -> ACCEPTED, nothing between)."""
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        with self._lock:
            before: dict[str, KeyState | None] = {}
            for change in changes:
                if not change.key.startswith(self.prefix):
                    continue
                parts = change.key[len(self.prefix):].split("/")
                if len(parts) != 2 or not valid_minion_id(parts[1]):
                    continue
                try:
                    state = KeyState(parts[0])
                except ValueError:
                    continue
                mid = parts[1]
                if mid not in before:
                    before[mid] = self._state_in_view(mid)
                self._wseq[mid] = self._wseq.get(mid, 0) + 1
                if change.value is None:
                    self._view[state].pop(mid, None)
                else:
                    self._view[state][mid] = normalize_pem(change.value)
            for mid, old in before.items():
                new = self._state_in_view(mid)
                if old != new:
                    self._unfired[mid] = self._unfired.get(mid, 0) + 1   # see settled()
                    events.append((mid, old, new))
        self._fire(events)

    def on_change(self, cb: ChangeCallback) -> None:
        """Register ``cb(minion_id, old_state, new_state)``, called when a key's state changes."""
        self._callbacks.append(cb)

    def state_of(self, mid: str) -> KeyState | None:
        """The key's state from memory (ACCEPTED wins when files exist in several states)."""
        with self._lock:
            return self._state_in_view(mid)

    def accepted_pub(self, mid: str) -> str | None:
        """The accepted public key of ``mid`` from memory; None if absent or not a valid key."""
        with self._lock:
            pem = self._view[KeyState.ACCEPTED].get(mid)
        if pem is None or not is_public_key(pem):
            return None
        return pem

    def accepted_ids(self) -> list[str]:
        """Sorted ids with an accepted key (from memory)."""
        with self._lock:
            return sorted(self._view[KeyState.ACCEPTED])

    def list_keys(self) -> dict[KeyState, list[str]]:
        """Ids per state (from memory), sorted."""
        with self._lock:
            return {s: sorted(self._view[s]) for s in KeyState}

    def get_pub(self, mid: str, state: KeyState) -> str | None:
        """The key text of ``mid`` in ``state`` (from memory), or None."""
        with self._lock:
            return self._view[state].get(mid)

    # ------------------------------------------------------------------ transitions

    def _move(self, mid: str, sources: Iterable[KeyState], target: KeyState,
              events: list[tuple[str, KeyState | None, KeyState | None]]) -> bool:
        """Move the key of ``mid`` from the first present source state to ``target``."""
        for src in sources:
            raw = self.store.get(self._key(src, mid))
            if raw is None:
                self._set(mid, src, None, events)
                continue
            self.store.put(self._key(target, mid), raw)
            self._set(mid, target, raw.decode("utf-8", "replace"), events)
            for other in sources:
                if other != target:
                    self.store.delete(self._key(other, mid))
                    self._set(mid, other, None, events)
            return True
        return False

    def accept(self, mid: str, include_rejected: bool = False,
               include_denied: bool = False) -> bool:
        """Accept the pending (optionally rejected/denied) key of ``mid``; False if none."""
        sources = [KeyState.PENDING]
        if include_rejected:
            sources.append(KeyState.REJECTED)
        if include_denied:
            sources.append(KeyState.DENIED)
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        try:
            with self._op_lock(mid):
                return self._move(mid, sources, KeyState.ACCEPTED, events)
        finally:
            self._fire(events)

    def reject(self, mid: str, include_accepted: bool = False,
               include_denied: bool = False) -> bool:
        """Reject the pending (optionally accepted/denied) key of ``mid``; False if none."""
        sources = [KeyState.PENDING]
        if include_accepted:
            sources.append(KeyState.ACCEPTED)
        if include_denied:
            sources.append(KeyState.DENIED)
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        try:
            with self._op_lock(mid):
                return self._move(mid, sources, KeyState.REJECTED, events)
        finally:
            self._fire(events)

    def delete(self, mid: str, state: KeyState | None = None) -> bool:
        """Delete the key of ``mid`` in ``state`` (all states if None); True if one existed."""
        states = [state] if state else list(KeyState)
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        found = False
        try:
            with self._op_lock(mid):
                for st in states:
                    if self.store.delete(self._key(st, mid)):
                        found = True
                    self._set(mid, st, None, events)
        finally:
            self._fire(events)
        return found

    def accept_all(self, include_rejected: bool = False,
                   include_denied: bool = False) -> list[str]:
        """Accept every pending (optionally rejected/denied) key; returns the ids accepted."""
        keys = self.list_keys()
        ids = set(keys[KeyState.PENDING])
        if include_rejected:
            ids |= set(keys[KeyState.REJECTED])
        if include_denied:
            ids |= set(keys[KeyState.DENIED])
        return [m for m in sorted(ids) if self.accept(m, include_rejected, include_denied)]

    def reject_all(self, include_accepted: bool = False,
                   include_denied: bool = False) -> list[str]:
        """Reject every pending (optionally accepted/denied) key; returns the ids rejected."""
        keys = self.list_keys()
        ids = set(keys[KeyState.PENDING])
        if include_accepted:
            ids |= set(keys[KeyState.ACCEPTED])
        if include_denied:
            ids |= set(keys[KeyState.DENIED])
        return [m for m in sorted(ids) if self.reject(m, include_accepted, include_denied)]

    def delete_all(self, state: KeyState | None = None) -> list[str]:
        """Delete every key (in ``state`` if given); returns the ids deleted."""
        keys = self.list_keys()
        states = [state] if state else list(KeyState)
        ids = {m for s in states for m in keys[s]}
        return [m for m in sorted(ids) if self.delete(m, state)]

    def finger(self, mid: str, state: KeyState | None = None) -> str:
        """Salt-style fingerprint of the key of ``mid`` (in ``state`` or its current state)."""
        with self._lock:
            if state is None:
                state = self._state_in_view(mid)
            pem = self._view[state].get(mid) if state is not None else None
        if pem is None:
            raise UnknownMinion(mid, [state] if state else None)
        return pem_finger(pem)

    # ------------------------------------------------------------------ authentication

    def _op_lock(self, mid: str) -> threading.RLock:
        """The lock that serialises the store operations of ``mid`` (shared with the ids of
        its stripe)."""
        return self._op_locks[hash(mid) % OP_LOCK_STRIPES]

    def _refresh(self, mid: str,
                 events: list[tuple[str, KeyState | None, KeyState | None]]) -> None:
        """Re-read all states of ``mid`` from the store into memory.

        The four states are read at once (one snapshot on etcd, not on a directory), and the
        watch may apply a change of ``mid`` while they run: then the read is repeated (it is at
        least as new as that change when it starts after it). If the watch keeps racing, only
        what the read found present is applied: a stale "absent" never removes a key the watch
        has just added.
        """
        for attempt in range(3):
            with self._lock:
                seq0 = self._wseq.get(mid, 0)
            # one read of the four states (etcd: one transaction, one revision)
            raw = self.store.get_keys([self._key(s, mid) for s in KeyState])
            fresh = {s: raw.get(self._key(s, mid)) for s in KeyState}
            with self._lock:
                raced = self._wseq.get(mid, 0) != seq0
                if raced and attempt < 2:
                    continue
                for state, raw in fresh.items():
                    pem = raw.decode("utf-8", "replace") if raw is not None else None
                    if pem is None and raced:
                        continue
                    cur = self._view[state].get(mid)
                    if (pem is None) != (cur is None) or (
                            pem is not None and normalize_pem(pem) != cur):
                        self._set(mid, state, pem, events)
                return

    def accepted_in_memory(self, mid: str, pub: str | bytes) -> bool:
        """True when memory holds exactly this accepted key: :meth:`authorize` would answer
        ACCEPTED without touching the store (the common case, safe on the request path)."""
        if self.open_mode:
            return True
        pub_n = normalize_pem(pub)
        with self._lock:
            return (self._view[KeyState.ACCEPTED].get(mid) == pub_n
                    and mid not in self._view[KeyState.REJECTED])

    def authorize(self, mid: str, pub: str | bytes) -> AuthDecision:
        """Salt's decision for a minion presenting (``mid``, ``pub``) at ``_auth``.

        Writes pending/denied/rejected/accepted files as Salt does. Re-reads the store for
        this id unless memory already holds the same accepted key; if the store is
        unavailable, decides from memory and never accepts a key that is not accepted there.
        """
        if not valid_minion_id(mid):
            # The request handler refuses (and rate-limits the log of) invalid ids before this.
            log.debug("auth refused: invalid minion id %s", shown(mid))
            return AuthDecision.REJECTED
        if self.open_mode:
            return AuthDecision.ACCEPTED
        pub_n = normalize_pem(pub)
        events: list[tuple[str, KeyState | None, KeyState | None]] = []
        try:
            with self._op_lock(mid):
                return self._decide(mid, pub_n, events)
        finally:
            self._fire(events)

    def _decide(self, mid: str, pub_n: str,
                events: list[tuple[str, KeyState | None, KeyState | None]],
                retry: bool = True) -> AuthDecision:
        view = self._view
        if (view[KeyState.ACCEPTED].get(mid) == pub_n and mid not in view[KeyState.REJECTED]
                and is_public_key(pub_n)):
            return AuthDecision.ACCEPTED
        # This runs on the master's request path: once the store is known to be down, decide
        # from memory at once instead of waiting for a store timeout on every pending auth.
        store_ok = self.store.healthy()
        if store_ok:
            try:
                self._refresh(mid, events)
            except StoreUnavailable as exc:
                store_ok = False
                log.warning("auth of %s decided from memory, key store unavailable: %s",
                            shown(mid), exc)
        if mid in view[KeyState.REJECTED]:
            return AuthDecision.REJECTED
        accepted = view[KeyState.ACCEPTED].get(mid)
        if accepted is not None:
            if not is_public_key(accepted):
                log.warning("accepted key file for %s is not a valid public key; ignoring it "
                            "(delete it with %s)", shown(mid), key_hint("-d", mid))
            elif accepted == pub_n:
                return AuthDecision.ACCEPTED
            else:
                log.warning("minion %s presented a key different from its accepted key; "
                            "stored it as denied (check %s)", shown(mid), key_hint("-f", mid))
                self._write(mid, KeyState.DENIED, pub_n, events, store_ok)
                return AuthDecision.DENIED
        if _matches(mid, _read_pattern_file(self.autoreject_file, "autoreject_file")):
            if store_ok:
                self.store.put(self._key(KeyState.REJECTED, mid), (pub_n + "\n").encode())
                self._set(mid, KeyState.REJECTED, pub_n, events)
                if self.store.delete(self._key(KeyState.PENDING, mid)) or \
                        mid in view[KeyState.PENDING]:
                    self._set(mid, KeyState.PENDING, None, events)
            return AuthDecision.REJECTED
        auto = self.auto_accept or _matches(
            mid, _read_pattern_file(self.autosign_file, "autosign_file"))
        pending = view[KeyState.PENDING].get(mid)
        if pending is not None:
            if pending != pub_n:
                log.warning("minion %s presented a key different from its pending key; "
                            "stored it as denied", shown(mid))
                self._write(mid, KeyState.DENIED, pub_n, events, store_ok)
                return AuthDecision.DENIED
            if auto and store_ok and is_public_key(pub_n):
                if self._move(mid, [KeyState.PENDING], KeyState.ACCEPTED, events) or not retry:
                    return AuthDecision.ACCEPTED
                # another master moved (or removed) it meanwhile: decide on fresh state
                return self._decide(mid, pub_n, events, retry=False)
            return AuthDecision.PENDING
        if not store_ok:
            return AuthDecision.PENDING
        if not is_public_key(pub_n):
            log.warning("minion %s presented something that is not a public key", shown(mid))
            return AuthDecision.REJECTED
        target = KeyState.ACCEPTED if auto else KeyState.PENDING
        if target is KeyState.PENDING and not self.throttle.allow(len(view[KeyState.PENDING])):
            log.debug("new key of %r not recorded: too many new keys (pending_keys_per_second, "
                      "max_pending_keys)", mid[:64])
            return AuthDecision.PENDING
        if accepted is not None:  # a corrupted accepted file: replace it only when auto
            if auto:
                self.store.put(self._key(target, mid), (pub_n + "\n").encode())
                self._set(mid, target, pub_n, events)
                return AuthDecision.ACCEPTED
            target = KeyState.PENDING
        if self.store.compare_and_put(self._key(target, mid), None, (pub_n + "\n").encode()):
            self._set(mid, target, pub_n, events)
            if target is KeyState.ACCEPTED:
                return AuthDecision.ACCEPTED
            log.info("new minion key %s is pending: accept it with %s", shown(mid),
                     key_hint("-a", mid))
            return AuthDecision.PENDING
        if retry:  # another master wrote this id meanwhile: decide again on fresh state
            return self._decide(mid, pub_n, events, retry=False)
        return AuthDecision.PENDING

    def _write(self, mid: str, state: KeyState, pub_n: str,
               events: list[tuple[str, KeyState | None, KeyState | None]],
               store_ok: bool) -> None:
        if not store_ok:
            return
        try:
            self.store.put(self._key(state, mid), (pub_n + "\n").encode())
        except StoreUnavailable as exc:
            log.warning("could not record %s key of %s: %s", state.name.lower(), shown(mid), exc)
            return
        self._set(mid, state, pub_n, events)


# ---------------------------------------------------------------------- master keypair


def generate_keypair(keysize: int = 2048) -> tuple[bytes, bytes]:
    """A new RSA keypair: (PKCS#1 "RSA PRIVATE KEY" PEM, SubjectPublicKeyInfo PEM)."""
    from hamaster.crypto import generate_keypair as _generate

    return _generate(keysize)


@functools.lru_cache(maxsize=4)
def public_pem_of(private_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a PEM private key (remembered for the last few keys:
    loading an RSA private key costs tens of milliseconds of CPU holding the GIL, and the
    identity check compares the store's key every few seconds)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def master_key_names(prefix: str) -> tuple[str, str]:
    """The store keys of the cluster's (private, public) master key under ``prefix``."""
    pre = _join_prefix(prefix)
    return f"{pre}master.pem", f"{pre}master.pub"


def read_master_keypair(store: Store, prefix: str) -> tuple[bytes, bytes] | None:
    """The cluster's (private PEM, public PEM) as the store holds it now, or None if absent.

    The public key is always *derived* from ``master.pem``: the two files can never be read
    as a mixed pair. Raises :class:`KeyRegistryError` if ``master.pem`` is not a valid key.
    """
    pem_key, _ = master_key_names(prefix)
    priv = store.get(pem_key)
    if priv is None:
        return None
    try:
        return priv, public_pem_of(priv)
    except (ValueError, TypeError) as exc:
        raise KeyRegistryError(
            f"master key {pem_key} is not a valid unencrypted PEM private key ({exc}); "
            "restore it from backup (minions trust it) or remove master.pem and master.pub "
            "to generate a new pair"
        ) from exc


def write_master_pub(store: Store, prefix: str, pub: bytes) -> None:
    """Keep ``master.pub`` (Salt's layout) equal to the key derived from ``master.pem``.

    Written when absent, rewritten (with a warning) when it differs; never an error: the
    public key the master serves is the one derived from ``master.pem``.
    """
    _, pub_key = master_key_names(prefix)
    try:
        existing = store.get(pub_key)
        if existing is None:
            store.compare_and_put(pub_key, None, pub)
        elif normalize_pem(existing) != normalize_pem(pub):
            log.warning("%s did not match master.pem; rewrote it from the private key", pub_key)
            store.put(pub_key, pub)
    except StoreUnavailable as exc:
        log.warning("could not write %s: %s", pub_key, exc)


def load_or_create_master_keypair(store: Store, prefix: str,
                                  keysize: int = 2048) -> tuple[bytes, bytes]:
    """Return the master's (private PEM, public PEM), creating them once for the whole cluster.

    Creation is create-if-absent (``compare_and_put(expected=None)``): a master that loses the
    race adopts the winner's pair; an existing ``master.pem`` is never overwritten. The public
    key is derived from ``master.pem`` (``master.pub`` is (re)written to match it). This is the
    rule for stores whose create-if-absent is atomic across masters (fs, etcd); the rsync
    backend agrees on the pair first (:mod:`hamaster.pki_sync.masterkey`).
    """
    pem_key, _ = master_key_names(prefix)
    pair = read_master_keypair(store, prefix)
    if pair is None:
        new_priv, _ = generate_keypair(keysize)
        if store.compare_and_put(pem_key, None, new_priv):
            log.info("created master keypair %s", pem_key)
        pair = read_master_keypair(store, prefix)
        if pair is None:
            raise KeyRegistryError(f"master key {pem_key} vanished right after creation; "
                                   "is another process deleting it?")
    write_master_pub(store, prefix, pair[1])
    return pair


def open_key_registry(opts: dict[str, Any]) -> KeyRegistry:
    """Single-master registry on ``opts['pki_dir']`` (Salt's layout), loaded from disk."""
    from hamaster.store.fs import FsStore

    store = FsStore(opts["pki_dir"], poll_interval=opt(opts, "ha_poll_interval"))
    registry = KeyRegistry(
        store, "",
        auto_accept=bool(opts.get("auto_accept", False)),
        autosign_file=opts.get("autosign_file"),
        autoreject_file=opts.get("autoreject_file"),
        open_mode=bool(opts.get("open_mode", False)),
        throttle=throttle_from_opts(opts),
    )
    registry.load()
    return registry


def throttle_from_opts(opts: dict[str, Any]) -> NewKeyThrottle:
    """The new-key throttle of ``pending_keys_per_second`` and ``max_pending_keys``."""
    return NewKeyThrottle(float(opts.get("pending_keys_per_second", 50.0) or 0),
                          int(opts.get("max_pending_keys", 10000) or 0))

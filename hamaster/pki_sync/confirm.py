"""The key-change barrier: a minion key change is in force on every live master when it returns.

A key change (``hamaster-key -d/-D/-r/-R/-a/-A``, later the API and the reactor) is written to
the shared store by whoever makes it; each master learns of it through its store watch, one poll
interval (or one rsync push) later. The barrier closes that gap:

1. The requester writes ``cluster/keysync/<nonce>/request``: the ids and what must hold for each
   (:class:`Expect`: accepted, or not accepted), the live masters it waits on and a deadline.
2. Every master watches ``cluster/keysync``. On a request (:class:`KeyChangeResponder`) it
   re-reads those ids' state from the store itself (:meth:`KeyRegistry.refresh`, so it never
   trusts the watch order between two prefixes), applies it (the key registry's callbacks: sessions
   dropped, publish key rotated) and waits until the registry reports them :meth:`settled
   <hamaster.pki_sync.keys.KeyRegistry.settled>`; then it runs the master's *fence* (a call on
   the master's event loop, so no publication prepared with the old publish key can still be on
   its way) and writes ``cluster/keysync/<nonce>/ack/<master_id>``.
3. The requester (:func:`confirm_key_change`) polls the acks until every master it waits on has
   confirmed, or the deadline passes; then it deletes the request.

Which masters are waited on: those alive when the request is written, as
:func:`hamaster.master.membership.read_masters` decides (present on the backend — an etcd lease,
or a heartbeat younger than its ttl on fs/rsync — and not marked ``stopped``). A master that
stops gracefully during the wait (its record says ``stopped``) is no longer waited on; any other
master that has not confirmed by the deadline is named in the result. A master that was not
live is not waited on: it reads the store when it resumes.

The store change itself is never undone by a failed barrier; the result says which master has
not confirmed, and the caller reports it.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hamaster.pki_sync.keys import KeyRegistry, KeyState, valid_minion_id
from hamaster.store.base import Change, Store, StoreError

log = logging.getLogger(__name__)

KEYSYNC_PREFIX = "cluster/keysync"
REQUEST_NAME = "request"
ACK_DIR = "ack"
#: How often the requester reads the acks and a responder re-checks a request not yet in force.
POLL_S = 0.05
#: A responder that cannot confirm for this long writes a "waiting" ack saying why.
REPORT_AFTER_S = 1.0
#: Requests whose deadline passed this long ago are removed by any master (a requester that
#: died before cleaning up).
SWEEP_AFTER_S = 60.0
SWEEP_EVERY_S = 30.0
#: Exit status of ``hamaster-key`` when the change is stored but a live master has not
#: confirmed it within the wait.
EXIT_UNCONFIRMED = 3
#: Largest request accepted from the store (ids of a ``-D`` of a big cluster fit comfortably).
MAX_REQUEST_BYTES = 900_000


class Expect(StrEnum):
    """What must hold on every master for one id before it confirms."""

    ACCEPTED = "accepted"          # the key is accepted (its minion can authenticate)
    NOT_ACCEPTED = "not_accepted"  # sessions dropped, publish key rotated, returns refused

    def holds(self, state: KeyState | None) -> bool:
        """True when a key in ``state`` (None: no key) satisfies this expectation."""
        return (state is KeyState.ACCEPTED) == (self is Expect.ACCEPTED)


def request_key(nonce: str) -> str:
    """Store key of the request ``nonce``."""
    return f"{KEYSYNC_PREFIX}/{nonce}/{REQUEST_NAME}"


def ack_prefix(nonce: str) -> str:
    """Store prefix under which masters acknowledge the request ``nonce``."""
    return f"{KEYSYNC_PREFIX}/{nonce}/{ACK_DIR}"


def _valid_segment(name: str) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 200 and "/" not in name
            and "\\" not in name and "\0" not in name and not name.startswith("."))


@dataclass(frozen=True)
class KeyChangeRequest:
    """One barrier request as stored at :func:`request_key`."""

    nonce: str
    expect: dict[str, Expect]
    origin: str
    created: float
    deadline: float                # wall clock (epoch seconds); masters give up after it
    masters: tuple[str, ...] = ()  # the masters the requester waits on (informational)

    def to_bytes(self) -> bytes:
        """The JSON stored for this request."""
        return json.dumps({"nonce": self.nonce,
                           "expect": {m: e.value for m, e in self.expect.items()},
                           "origin": self.origin, "created": self.created,
                           "deadline": self.deadline, "masters": list(self.masters)},
                          sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, nonce: str, raw: bytes) -> KeyChangeRequest:
        """Parse a stored request; raises ``ValueError`` on anything malformed."""
        if len(raw) > MAX_REQUEST_BYTES:
            raise ValueError(f"request is {len(raw)} bytes (limit {MAX_REQUEST_BYTES})")
        try:
            doc = json.loads(raw)
            expect = {str(m): Expect(e) for m, e in dict(doc["expect"]).items()}
            created, deadline = float(doc["created"]), float(doc["deadline"])
            masters = tuple(str(m) for m in doc.get("masters") or ())
            origin = str(doc.get("origin", "?"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"malformed key-change request: {exc!r}") from exc
        bad = [m for m in expect if not valid_minion_id(m)]
        if bad:
            raise ValueError(f"invalid minion ids in key-change request: {bad[:3]}")
        return cls(nonce, expect, origin, created, deadline, masters)


@dataclass(frozen=True)
class Ack:
    """One master's answer to a request."""

    master_id: str
    ok: bool            # True: in force there; False: still waiting (``detail`` says on what)
    detail: str = ""
    ts: float = 0.0
    aes_generation: int | None = None

    def to_bytes(self) -> bytes:
        """The JSON stored for this ack."""
        return json.dumps({"master_id": self.master_id, "ok": self.ok, "detail": self.detail,
                           "ts": self.ts, "aes_generation": self.aes_generation}).encode()

    @classmethod
    def from_bytes(cls, master_id: str, raw: bytes) -> Ack:
        """Parse a stored ack; raises ``ValueError`` on anything malformed."""
        try:
            doc = json.loads(raw)
            gen = doc.get("aes_generation")
            return cls(master_id, bool(doc["ok"]), str(doc.get("detail", "")),
                       float(doc.get("ts", 0.0)), int(gen) if gen is not None else None)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"malformed ack from {master_id}: {exc!r}") from exc


# ---------------------------------------------------------------------- requester side


@dataclass
class BarrierResult:
    """What :func:`confirm_key_change` saw."""

    nonce: str = ""
    waited_on: list[str] = field(default_factory=list)
    confirmed: dict[str, float] = field(default_factory=dict)  # master → seconds to its ack
    missing: dict[str, str] = field(default_factory=dict)      # master → why it is unconfirmed
    skipped: dict[str, str] = field(default_factory=dict)      # master → why not waited on
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every master waited on confirmed."""
        return not self.missing

    def describe_missing(self) -> str:
        """One line per unconfirmed master, for an operator."""
        return "; ".join(f"{m}: {why}" for m, why in sorted(self.missing.items()))


MembersFn = Callable[[], dict[str, dict[str, Any]]]


def _alive(rec: dict[str, Any]) -> bool:
    return bool(rec.get("alive"))       # decided by hamaster.master.membership


def confirm_key_change(store: Store, expect: dict[str, Expect], members: MembersFn,
                       timeout: float, origin: str = "hamaster-key",
                       after_write: Callable[[], None] | None = None,
                       poll: float = POLL_S) -> BarrierResult:
    """Wait until every live master has put ``expect`` in force, or ``timeout`` seconds pass.

    ``members()`` returns every master's ``cluster/masters/<id>`` record with ``alive`` (and
    ``stopped`` after a graceful stop), as :func:`hamaster.master.membership.read_masters` does.
    ``after_write`` runs once the request is stored (the rsync CLI pushes its tree with it).
    Raises :class:`StoreError` if the request cannot be written.
    """
    t0 = time.monotonic()
    result = BarrierResult()
    if not expect or timeout <= 0:
        return result
    records = members()
    waiting = sorted(m for m, rec in records.items() if _alive(rec) and _valid_segment(m))
    for mid, rec in sorted(records.items()):
        if mid not in waiting:
            result.skipped[mid] = ("stopped" if rec.get("stopped")
                                   else f"not alive (last heartbeat "
                                        f"{rec.get('last_seen_s', '?')} s ago)")
    result.waited_on = list(waiting)
    if not waiting:
        return result
    now = time.time()
    nonce = f"{int(now * 1000):x}-{secrets.token_hex(6)}"
    result.nonce = nonce
    req = KeyChangeRequest(nonce, dict(expect), origin, now, now + timeout, tuple(waiting))
    store.put(request_key(nonce), req.to_bytes())
    if after_write is not None:
        after_write()
    pending = set(waiting)
    last_detail: dict[str, str] = {}
    deadline = t0 + timeout
    next_members = time.monotonic() + 0.5
    try:
        while True:
            try:
                raw_acks = store.get_many(ack_prefix(nonce))
            except StoreError as exc:
                log.debug("reading acks of %s: %s", nonce, exc)
                raw_acks = {}
            for key, raw in raw_acks.items():
                master = key.rsplit("/", 1)[-1]
                if master not in pending:
                    continue
                try:
                    ack = Ack.from_bytes(master, raw)
                except ValueError as exc:
                    last_detail[master] = str(exc)
                    continue
                if ack.ok:
                    pending.discard(master)
                    result.confirmed[master] = round(time.monotonic() - t0, 3)
                elif ack.detail:
                    last_detail[master] = ack.detail
            now_m = time.monotonic()
            if pending and now_m >= next_members:
                next_members = now_m + 0.5
                try:
                    current = members()
                except StoreError:
                    current = {}
                for master in sorted(pending):
                    if current.get(master, {}).get("stopped"):
                        pending.discard(master)
                        result.skipped[master] = "stopped during the wait"
            if not pending or now_m >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - now_m)))
    finally:
        try:
            store.delete_tree(f"{KEYSYNC_PREFIX}/{nonce}")
        except StoreError as exc:
            log.warning("could not remove key-change request %s (masters sweep it later): %s",
                        nonce, exc)
    for master in sorted(pending):
        rec = records.get(master, {})
        why = last_detail.get(master) or "no confirmation"
        result.missing[master] = (f"{why} within {timeout:.3g} s (last heartbeat "
                                  f"{rec.get('last_seen_s', '?')} s before the request)")
    result.elapsed = round(time.monotonic() - t0, 3)
    return result


# ---------------------------------------------------------------------- master side


FenceFn = Callable[[list[str]], "int | None"]


@dataclass
class _Pending:
    req: KeyChangeRequest
    seen: float = field(default_factory=time.monotonic)
    reported: bool = False


class KeyChangeResponder:
    """A master's side of the barrier: applies requested key changes, then acknowledges them.

    ``fence(ids)`` is the master's last step before the ack (runs on this responder's thread):
    it must return only once nothing prepared under the old state can still go out (the master
    runs a call on its event loop, drops the sessions of ``ids`` there, and returns its publish
    key's generation); an exception means "not yet", and the request is tried again.
    """

    def __init__(self, store: Store, registry: KeyRegistry, master_id: str,
                 fence: FenceFn | None = None, poll: float = POLL_S) -> None:
        """Answer requests under ``cluster/keysync`` of ``store`` as ``master_id``."""
        self.store = store
        self.registry = registry
        self.master_id = master_id
        self.fence = fence
        self.poll = poll
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = 0.0
        self.acked = 0

    # -- lifecycle ------------------------------------------------------------------------

    def attach(self) -> None:
        """Watch the request prefix (before the store's watcher starts) and queue open requests."""
        self.store.watch(KEYSYNC_PREFIX, self._on_changes)
        try:
            existing = self.store.get_many(KEYSYNC_PREFIX)
        except StoreError as exc:
            log.warning("key-change requests not read at start: %s", exc)
            return
        self._on_changes([Change(k, v) for k, v in existing.items()])

    def start(self) -> None:
        """Start the thread that applies and acknowledges requests."""
        if not _valid_segment(self.master_id):
            log.error("master_id %r cannot be used in the store; key changes will not be "
                      "confirmed by this master", self.master_id)
            return
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="keysync", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- watch ------------------------------------------------------------------------------

    def _on_changes(self, changes: list[Change]) -> None:
        """Watch callback (store thread): queue new requests, forget removed ones."""
        queued = False
        for change in changes:
            parts = change.key.split("/")
            if len(parts) != 4 or parts[3] != REQUEST_NAME or not _valid_segment(parts[2]):
                continue
            nonce = parts[2]
            if change.value is None:
                with self._lock:
                    self._pending.pop(nonce, None)
                continue
            try:
                req = KeyChangeRequest.from_bytes(nonce, change.value)
            except ValueError as exc:
                log.warning("ignoring key-change request %s: %s", nonce, exc)
                continue
            with self._lock:
                if nonce not in self._pending:
                    self._pending[nonce] = _Pending(req)
                    queued = True
        if queued:
            self._wake.set()

    # -- work -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = bool(self._pending)
            self._wake.wait(timeout=self.poll if busy else 1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.process_once()
                if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
                    self._last_sweep = time.monotonic()
                    self.sweep()
            except Exception:  # the responder never dies
                log.exception("key-change responder pass failed")

    def process_once(self) -> int:
        """Try every queued request once; returns how many were acknowledged."""
        with self._lock:
            items = list(self._pending.items())
        done = 0
        for nonce, item in items:
            if self._try(item):
                done += 1
                with self._lock:
                    self._pending.pop(nonce, None)
        return done

    def _try(self, item: _Pending) -> bool:
        """One attempt at ``item``; True when it is finished (acknowledged or given up)."""
        req = item.req
        if time.time() > req.deadline + 1.0:
            log.warning("key-change request %s from %s expired before it was in force here "
                        "(%s)", req.nonce, req.origin, self._why_not(req))
            return True
        try:
            self.registry.refresh(req.expect)
        except StoreError as exc:
            return self._waiting(item, f"store unreadable: {exc}")
        why = self._why_not(req)
        if why:
            return self._waiting(item, why)
        gen = None
        if self.fence is not None:
            try:
                gen = self.fence(sorted(m for m, e in req.expect.items()
                                        if e is Expect.NOT_ACCEPTED))
            except Exception as exc:
                return self._waiting(item, f"not applied on the event loop yet: {exc!r}")
        ack = Ack(self.master_id, True, "", time.time(), gen)
        try:
            if self.store.get(request_key(req.nonce)) is None:
                return True     # the requester is gone (gave up or done): nothing to answer
            self.store.put(f"{ack_prefix(req.nonce)}/{self.master_id}", ack.to_bytes())
        except StoreError as exc:
            return self._waiting(item, f"cannot write the ack: {exc}")
        self.acked += 1
        log.info("key change %s in force here (%d ids, %.3f s after it was seen)",
                 req.nonce, len(req.expect), time.monotonic() - item.seen)
        return True

    def _why_not(self, req: KeyChangeRequest) -> str:
        """Empty when every id of ``req`` is as expected and settled here, else why not."""
        for mid, expect in sorted(req.expect.items()):
            state = self.registry.state_of(mid)
            if not expect.holds(state):
                return f"{mid} is {state.name.lower() if state else 'absent'} here"
            if not self.registry.settled(mid):
                return f"the change of {mid} is still being applied"
        return ""

    def _waiting(self, item: _Pending, why: str) -> bool:
        """Not in force yet: say so once in the store (the requester names it on timeout)."""
        if not item.reported and time.monotonic() - item.seen >= REPORT_AFTER_S:
            item.reported = True
            ack = Ack(self.master_id, False, why, time.time())
            try:
                self.store.put(f"{ack_prefix(item.req.nonce)}/{self.master_id}", ack.to_bytes())
            except StoreError:
                pass
            log.info("key change %s not in force here yet: %s", item.req.nonce, why)
        return False

    def sweep(self, now: float | None = None) -> int:
        """Remove requests (with their acks) whose deadline passed over :data:`SWEEP_AFTER_S`
        ago, and acks left without a request as old; returns how many nonces were removed."""
        now = time.time() if now is None else now
        try:
            raw = self.store.get_many(KEYSYNC_PREFIX)
        except StoreError:
            return 0
        by_nonce: dict[str, dict[str, bytes]] = {}
        for key, value in raw.items():
            parts = key.split("/", 2)
            if len(parts) == 3 and "/" in parts[2]:
                nonce, rest = parts[2].split("/", 1)
                by_nonce.setdefault(nonce, {})[rest] = value
        removed = 0
        for nonce, entries in by_nonce.items():
            try:
                if REQUEST_NAME in entries:
                    ends = KeyChangeRequest.from_bytes(nonce, entries[REQUEST_NAME]).deadline
                else:
                    ends = int(nonce.split("-", 1)[0], 16) / 1000.0
            except ValueError:
                ends = 0.0
            if now > ends + SWEEP_AFTER_S:
                try:
                    self.store.delete_tree(f"{KEYSYNC_PREFIX}/{nonce}")
                    removed += 1
                except (StoreError, ValueError):
                    continue
        return removed


def expect_for(ids: Iterable[str], accepted: bool) -> dict[str, Expect]:
    """The expectation for ``ids`` after an accept (True) or a delete/reject (False)."""
    exp = Expect.ACCEPTED if accepted else Expect.NOT_ACCEPTED
    return {mid: exp for mid in ids}

"""The minion data cache: each minion's grains, last compiled pillar and mine data.

In a cluster it lives in the shared store, one key per minion and kind::

    minion_data/<id>/grains   minion_data/<id>/pillar   minion_data/<id>/mine   (msgpack)

so every master targets by grain or pillar (``-G``, ``-I``, ``G@``, ``I@``) and answers
``_mine_get`` the same way, also for minions that never connected to it, and a master's death
loses nothing. Each master keeps the whole cache in memory, fed by the store's watch; requests
read memory only. Writes go through one background thread that coalesces repeated writes of the
same key and skips values that did not change, so the request path never waits on the store.
A record larger than ``minion_data_max_size`` (default 512 KiB; etcd values are at most 1 MiB) is
kept in memory only, with a warning.

Without a shared store (a single master) the cache is in memory only.

Mine semantics are Salt's (``salt/daemons/masterapi.py``): ``_mine`` updates (or with ``clear``
replaces) the minion's functions, ``_mine_get`` answers ``{minion: data}`` for one function or
``{function: {minion: data}}`` for several, honouring a minion-side ``allow_tgt`` ACL,
``_mine_delete`` drops one function, ``_mine_flush`` all of them.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from hamaster.bus import codec
from hamaster.ids import valid_minion_id
from hamaster.store.base import Change, Store, StoreError

log = logging.getLogger(__name__)

PREFIX = "minion_data/"
KINDS = ("grains", "pillar", "mine")
DEFAULT_MAX_RECORD = 512 * 1024
#: Most records the writer sends in one batch.
WRITE_BATCH = 256
MINE_ACL_ID = "__saltmine_acl__"
MINE_ACL_DATA = "__data__"

#: ``check(tgt, tgt_type) -> [minion ids]`` (the master's targeting).
TargetCheck = Callable[[Any, str], list[str]]


def _valid_id(mid: Any) -> bool:
    """The project's one minion-id rule (:mod:`hamaster.ids`)."""
    return valid_minion_id(mid)


class MinionDataCache:
    """Grains, pillar and mine of every minion: memory first, the shared store behind it."""

    def __init__(self, store: Store | None, max_record: int = DEFAULT_MAX_RECORD) -> None:
        self.store = store
        self.max_record = max_record
        self._data: dict[str, dict[str, Any]] = {}
        self._written: dict[str, str] = {}  # key -> sha256 of the bytes last written/seen
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes | None] | None] = queue.Queue()
        self._pending: dict[str, bytes | None] = {}
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        #: Called with ``(minion_id, grains)`` when another master's grains arrive by watch.
        self.on_grains: Callable[[str, dict], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the store's records, watch for other masters' writes, start the writer."""
        if self.store is None:
            return
        try:
            self.store.watch(PREFIX.rstrip("/"), self._on_changes)
            records = self.store.get_many(PREFIX.rstrip("/"))
        except StoreError as exc:
            log.warning("minion data cache: store unavailable at start (%s); memory only until "
                        "it answers", exc)
            records = {}
        self._on_changes([Change(k, v) for k, v in sorted(records.items())])
        self._thread = threading.Thread(target=self._writer, name="minion-data-writer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush pending writes (bounded) and stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    # -- memory view ---------------------------------------------------------------------------

    def _on_changes(self, changes: list[Change]) -> None:
        for ch in changes:
            rest = ch.key[len(PREFIX):] if ch.key.startswith(PREFIX) else ""
            mid, _, kind = rest.partition("/")
            if not _valid_id(mid) or kind not in KINDS:
                continue
            if ch.value is None:
                with self._lock:
                    rec = self._data.get(mid)
                    if rec is not None:
                        rec.pop(kind, None)
                    self._written.pop(ch.key, None)
                continue
            digest = hashlib.sha256(ch.value).hexdigest()
            with self._lock:
                if self._written.get(ch.key) == digest:
                    continue  # our own write coming back
            try:
                value = codec.loads(ch.value)
            except codec.DecodeError:
                log.warning("minion data cache: undecodable record %s ignored", ch.key)
                continue
            if not isinstance(value, dict):
                continue
            with self._lock:
                self._data.setdefault(mid, {})[kind] = value
                self._written[ch.key] = digest
            if kind == "grains" and self.on_grains is not None:
                try:
                    self.on_grains(mid, value)
                except Exception:
                    log.exception("grains callback failed for %s", mid)

    def get(self, mid: str, kind: str) -> dict | None:
        """The cached ``kind`` record of ``mid`` (None when unknown)."""
        with self._lock:
            rec = self._data.get(mid)
            return None if rec is None else rec.get(kind)

    def pillar_of(self, mid: str) -> dict | None:
        """The last pillar compiled for ``mid`` by any master (None when unknown)."""
        return self.get(mid, "pillar")

    def grains_of(self, mid: str) -> dict | None:
        """The last grains ``mid`` sent to any master (None when unknown)."""
        return self.get(mid, "grains")

    def ids(self) -> list[str]:
        """Minions with any cached data."""
        with self._lock:
            return sorted(self._data)

    # -- writes --------------------------------------------------------------------------------

    def put(self, mid: str, kind: str, value: dict, memory_only: bool = False) -> None:
        """Record ``value`` in memory now and in the store soon (skipped when unchanged).

        ``memory_only`` keeps it out of the store (and removes an older stored record)."""
        if not _valid_id(mid) or kind not in KINDS:
            return
        if memory_only and self.store is not None:
            with self._lock:
                stored = f"{PREFIX}{mid}/{kind}" in self._written
            if stored:
                self.drop(mid, kind)
        with self._lock:
            self._data.setdefault(mid, {})[kind] = value
        if self.store is None or memory_only:
            return
        try:
            raw = codec.dumps(value)
        except (TypeError, ValueError, OverflowError) as exc:
            log.warning("minion data cache: %s of %s cannot be encoded: %s", kind, mid, exc)
            return
        key = f"{PREFIX}{mid}/{kind}"
        if len(raw) > self.max_record:
            if key not in self._warned and len(self._warned) < 10000:
                self._warned.add(key)
                log.warning("minion data cache: %s of %s is %d bytes, over minion_data_max_size "
                            "(%d); kept in this master's memory only", kind, mid, len(raw),
                            self.max_record)
            return
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            if self._written.get(key) == digest and key not in self._pending:
                return
            self._written[key] = digest
            first = key not in self._pending
            self._pending[key] = raw
        if first:
            self._queue.put((key, raw))

    def drop(self, mid: str, kind: str) -> None:
        """Forget ``kind`` of ``mid`` in memory and in the store."""
        with self._lock:
            rec = self._data.get(mid)
            if rec is not None:
                rec.pop(kind, None)
        if self.store is None:
            return
        key = f"{PREFIX}{mid}/{kind}"
        with self._lock:
            self._written.pop(key, None)
            first = key not in self._pending
            self._pending[key] = None
        if first:
            self._queue.put((key, None))

    def _writer(self) -> None:
        """Write queued records: whatever is waiting goes out as one batch (``put_many``: one
        etcd transaction per ``TXN_MAX_OPS`` keys), so a storm of new minions costs the store a
        round trip per batch, not one per record."""
        assert self.store is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            stop = False
            while len(items) < WRITE_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            puts: list[tuple[str, bytes]] = []
            deletes: list[str] = []
            with self._lock:
                for key, queued in items:
                    raw = self._pending.pop(key, None) if key in self._pending else queued
                    if raw is None:
                        deletes.append(key)
                    else:
                        puts.append((key, raw))
            self._write(puts, deletes)
            if stop:
                return

    def _write(self, puts: list[tuple[str, bytes]], deletes: list[str]) -> None:
        assert self.store is not None
        for attempt in range(3):
            try:
                if puts:
                    self.store.put_many(puts)
                    puts = []
                while deletes:
                    self.store.delete(deletes[0])
                    deletes.pop(0)
                return
            except StoreError as exc:
                if attempt == 2:
                    log.warning("minion data cache: cannot write %d records (%s): %s",
                                len(puts) + len(deletes), (puts[0][0] if puts else deletes[0]),
                                exc)

    def forget(self, mid: str) -> None:
        """Drop everything cached for ``mid`` (its key was deleted)."""
        for kind in KINDS:
            self.drop(mid, kind)

    # -- mine ----------------------------------------------------------------------------------

    def mine_store(self, mid: str, data: Any, clear: bool = False) -> bool:
        """``_mine``: merge ``data`` (``{function: result}``) into ``mid``'s mine."""
        if not isinstance(data, dict):
            return False
        with self._lock:
            old = (self._data.get(mid) or {}).get("mine")
        new = dict(data) if clear or not isinstance(old, dict) else {**old, **data}
        self.put(mid, "mine", new)
        return True

    def mine_delete(self, mid: str, fun: Any) -> bool:
        """``_mine_delete``: drop function ``fun`` from ``mid``'s mine."""
        mine = self.get(mid, "mine")
        if not isinstance(mine, dict) or not isinstance(fun, str):
            return False
        if fun in mine:
            self.put(mid, "mine", {k: v for k, v in mine.items() if k != fun})
        return True

    def mine_flush(self, mid: str) -> bool:
        """``_mine_flush``: drop all of ``mid``'s mine."""
        self.drop(mid, "mine")
        return True

    def mine_get(self, requester: str, tgt: Any, tgt_type: str, fun: Any,
                 check: TargetCheck) -> dict:
        """``_mine_get`` for ``requester`` (the authenticated minion)."""
        if isinstance(fun, str):
            functions = sorted(set(fun.split(",")))
            as_dict = len(functions) > 1
        elif isinstance(fun, list):
            functions = [str(f) for f in fun]
            as_dict = True
        else:
            return {}
        try:
            minions = check(tgt, tgt_type)
        except (ValueError, TypeError) as exc:
            log.info("_mine_get from %s: invalid target %r (%s): %s", requester, tgt, tgt_type, exc)
            return {}
        ret: dict[str, Any] = {}
        for minion in minions:
            mine = self.get(minion, "mine")
            if not isinstance(mine, Mapping):
                continue
            for function in functions:
                if function not in mine:
                    continue
                entry = mine[function]
                result = entry
                if isinstance(entry, Mapping) and MINE_ACL_ID in entry:
                    result = entry.get(MINE_ACL_DATA)
                    if "allow_tgt" in entry:
                        try:
                            allowed = check(entry["allow_tgt"], str(entry.get("allow_tgt_type",
                                                                              "glob")))
                        except (ValueError, TypeError):
                            allowed = []
                        if requester not in allowed:
                            continue
                if as_dict:
                    ret.setdefault(function, {})[minion] = result
                else:
                    ret[minion] = result
        return ret

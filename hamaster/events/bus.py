"""The cluster event bus: every master writes its events to the shared store; every master reads
all of them back as one logical stream.

Store layout: ``events/<master_id>/<seq>`` — one value per *batch* of events written by that
master (JSON ``{"src", "events": [{"tag", "data", "ts", "fp"?}]}``). ``seq`` is 20 digits, the
writer's ``time.time_ns()`` forced to grow (so it keeps growing across restarts while the clock
does). Only master ``<master_id>`` writes under its own directory, so there is never a write
conflict and order per source is the order of ``seq``.

Writing never happens on the event loop: :meth:`EventBus.emit` queues, a writer thread puts a
batch every ``BATCH_INTERVAL`` (a store that is down keeps the events queued, bounded by
``MAX_QUEUED``; the oldest are dropped and counted past that). A batch the writer stored is
delivered locally at once; other masters get it through their store watch (etcd: milliseconds,
fs: a poll interval).

Reading: each master keeps the last ``memory`` events of the whole cluster in memory, fed by the
watch on ``events/`` (and loaded from the store at start). A position in the stream is per
source: ``{master_id: (seq, index)}``; a listener passes the last position it saw (to any
master) and gets the events after it, in arrival order there, in order per source. A position
names the sources it has seen; events of a source it does not name are all new to it. Masters
may pick different copies of a merged minion event (the one that reached them first); a
listener resuming elsewhere does not get an event again whose other copy lies within its
position. Limit: a copy that has not reached the new master yet (within a poll interval of the
resume) cannot be recognised, and the event may then be delivered twice.

Merging: a multi-master minion sends one copy of each event to every master. Minion events
(``_minion_event``, start events) and key events carry a fingerprint ``fp`` = sha256 of
(minion id, tag, data without ``_stamp``). The copy that arrives first at a master is delivered
there; later copies are marked ``dup`` and skipped (counted in ``hamaster_events_merged_total``):

- *strong* fingerprints — the data carries the job id it was fired from (``__pub_jid``, which
  Salt's ``event.send`` adds inside a job): copies are merged however far apart they arrive (a
  stock minion with one master down delivers the other copies seconds late), within the
  retention;
- other fingerprints (start events, ``event.fire_master`` outside a job, key events): copies
  whose receipt times (``ts``, each receiving master's clock) are within ``merge_window``
  seconds (default 5) are one event. Limits: the same minion firing the *identical* event twice
  within the window is merged (add a counter or a timestamp to the data to keep them apart);
  copies delivered further apart than the window, or master clocks skewed by more, stay apart.

The reactor applies the same rule cluster-wide through its claims
(:mod:`hamaster.events.reactor`).

Retention: batches older than ``retention`` seconds (by their ``seq``) are deleted by every
master every ``SWEEP_EVERY`` seconds (any source, so a master gone for good is swept too).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hamaster.store.base import Change, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

EVENTS_PREFIX = "events"
BATCH_INTERVAL = 0.05
MAX_BATCH = 500
MAX_QUEUED = 100_000
MAX_FINGERPRINTS = 500_000
#: An event whose JSON is larger is stored with its data replaced by a note (bad or huge input
#: from a minion must not wedge the bus: etcd refuses values over 1 MB).
MAX_EVENT_BYTES = 256 * 1024
#: A batch is cut before its JSON passes this size.
MAX_BATCH_BYTES = 768 * 1024
SWEEP_EVERY = 30.0
DEFAULT_RETENTION = 3600.0
DEFAULT_MEMORY = 20_000
DEFAULT_MERGE_WINDOW = 5.0

Position = dict[str, tuple[int, int]]


def stamp(ts: float | None = None) -> str:
    """Salt's ``_stamp``: ISO 8601 with microseconds, UTC (``2026-12-06T13:05:29.123456``)."""
    when = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return when.replace(tzinfo=None).isoformat(timespec="microseconds")


def strong_id(data: Any) -> bool:
    """True when the event data names the job it was fired from (``__pub_jid``): one firing."""
    if not isinstance(data, dict):
        return False
    inner = data.get("data")
    return "__pub_jid" in data or (isinstance(inner, dict) and "__pub_jid" in inner)


def fingerprint(minion_id: str, tag: str, data: Any) -> str:
    """The merge key of a minion event: its sender, tag and data (``_stamp`` left out)."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "_stamp"}
    blob = json.dumps([minion_id, tag, data], sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def encode_position(pos: Position) -> str:
    """``src@seq.idx,src2@seq.idx`` (what ``state.event`` prints and takes back)."""
    return ",".join(f"{src}@{seq}.{idx}" for src, (seq, idx) in sorted(pos.items()))


def decode_position(text: str | None) -> Position | None:
    """The inverse of :func:`encode_position`; None for an empty text; ValueError if malformed."""
    if not text:
        return None
    out: Position = {}
    for part in str(text).split(","):
        src, sep, rest = part.rpartition("@")
        seq, dot, idx = rest.partition(".")
        if not sep or not src or not seq.isdigit() or not dot or not idx.isdigit():
            raise ValueError(f"bad event position {part!r} (expected source@seq.index)")
        out[src] = (int(seq), int(idx))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


@dataclass
class Event:
    """One event in the stream."""

    src: str
    seq: int
    idx: int
    tag: str
    data: Any
    ts: float
    fp: str | None = None
    dup: bool = False
    strong: bool = False
    #: Set by :meth:`EventBus.read`: the whole stream position just after this event (every
    #: source), what a listener passes back to resume after it.
    cursor: str = ""

    @property
    def pos(self) -> tuple[int, int]:
        return (self.seq, self.idx)

    def as_dict(self) -> dict:
        """What listeners get: Salt's ``{"tag", "data"}``, the master that wrote it, and the
        position to resume after it (all sources)."""
        return {"tag": self.tag, "data": self.data, "source": self.src,
                "position": self.cursor or f"{self.src}@{self.seq}.{self.idx}"}


@dataclass
class _Batch:
    seq: int
    events: list[dict] = field(default_factory=list)


class EventBus:
    """This master's side of the cluster bus: a writer thread and the in-memory stream."""

    def __init__(self, store: Store, master_id: str, metrics: Any = None,
                 retention: float = DEFAULT_RETENTION, memory: int = DEFAULT_MEMORY,
                 merge_window: float = DEFAULT_MERGE_WINDOW) -> None:
        self.store = store
        self.master_id = master_id
        self.metrics = metrics
        self.retention = float(retention)
        self.merge_window = float(merge_window)
        self._q: queue.Queue[dict | None] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._stream: deque[Event] = deque(maxlen=int(memory))
        self._seen_batches: dict[tuple[str, int], float] = {}
        self._fps: dict[str, list[float]] = {}      # fingerprint -> receipt times seen
        # fingerprint -> every copy seen: (source, position, receipt time)
        self._copies: dict[str, list[tuple[str, tuple[int, int], float]]] = {}
        self._tips: Position = {}
        self._last_seq = 0
        self._listeners: list[tuple[Callable[[list[Event]], None], bool]] = []
        self._pending: list[list[Change]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_sweep = 0.0
        self.healthy = True

    # -- emitting -----------------------------------------------------------------------------

    def emit(self, tag: str, data: Any, merge_id: str | None = None,
             merge_data: Any = None) -> None:
        """Queue one event (never blocks, never raises). ``merge_id``: the minion id of an event
        several masters may receive copies of (see the module's merging rule); ``merge_data``:
        what identifies it (default ``data``; a ``_minion_event`` passes the minion's own data,
        not the envelope around it, whose ``ts`` differs between copies)."""
        try:
            ts = time.time()
            if isinstance(data, dict):
                data = dict(data)
                data.setdefault("_stamp", stamp(ts))
            ev = {"tag": str(tag)[:1024], "data": data, "ts": ts}
            if merge_id is not None:
                what = data if merge_data is None else merge_data
                ev["fp"] = fingerprint(merge_id, str(tag), what)
                if strong_id(what) or strong_id({"data": what}):
                    ev["strong"] = True
            ev["_size"] = size = len(json.dumps(ev, default=_jsonable))
            if size > MAX_EVENT_BYTES:
                log.warning("event %s of %d bytes: data replaced by a note (limit %d)",
                            ev["tag"], size, MAX_EVENT_BYTES)
                ev["data"] = {"_hamaster_truncated": True, "bytes": size,
                              "_stamp": stamp(ts)}
                ev["_size"] = 512
            if self._queued >= MAX_QUEUED:
                if self.metrics is not None:
                    self.metrics.events_dropped.labels(self.master_id).inc()
                return
            self._queued += 1
            self._q.put(ev)
        except Exception:  # an event must never break the caller
            log.exception("event %r not queued", tag)

    # -- lifecycle ----------------------------------------------------------------------------

    def attach(self) -> None:
        """Watch ``events/`` (before the store's watcher starts), then load what is retained."""
        with self._lock:
            self._pending = []
        self.store.watch(EVENTS_PREFIX, self._on_changes)
        try:
            existing = self.store.get_many(EVENTS_PREFIX)
        except StoreError as exc:
            log.warning("event bus: cannot load retained events (%s); starting empty", exc)
            existing = {}
        with self._lock:
            pending, self._pending = self._pending or [], None
        batches = [(k, v) for k, v in existing.items()]
        for changes in pending:
            batches.extend((c.key, c.value) for c in changes if c.value is not None)
        # Retained history in time order (seq is the writer's clock), each source in order.
        batches.sort(key=lambda kv: (_seq_of(kv[0]), kv[0]))
        self._ingest(batches, notify=False)
        own = [seq for (src, seq) in self._seen_batches if src == self.master_id]
        self._last_seq = max(own, default=0)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is queued (best effort, a few seconds) and stop."""
        self._stop.set()
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def on_events(self, callback: Callable[[list[Event]], None],
                  with_copies: bool = False) -> None:
        """Call ``callback(events)`` (on a store or writer thread) for new events; merged copies
        too (marked ``dup``) with ``with_copies`` (the reactor: which copy a master sees first
        differs between masters, so after a failover a copy may be the only one left to act on;
        its claims de-duplicate)."""
        self._listeners.append((callback, with_copies))

    # -- the writer ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    def _run(self) -> None:
        pending: list[dict] = []
        stopping = False
        while True:
            try:
                item = self._q.get(timeout=1.0 if not pending else 0.5)
            except queue.Empty:
                item = None
                if not pending:
                    self._maybe_sweep()
                    if stopping or self._stop.is_set():
                        return
                    continue
            if item is None and self._stop.is_set():
                stopping = True
            elif item is not None:
                pending.append(item)
            deadline = time.monotonic() + BATCH_INTERVAL
            while len(pending) < MAX_BATCH:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self._q.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                pending.append(nxt)
            while pending:
                n, size = 0, 0
                while n < min(len(pending), MAX_BATCH) and (
                        n == 0 or size + pending[n].get("_size", 0) <= MAX_BATCH_BYTES):
                    size += pending[n].get("_size", 0)
                    n += 1
                chunk = pending[:n]
                if not self._write(chunk):
                    break
                pending = pending[n:]
                self._queued -= len(chunk)
            if stopping and (not pending or not self.healthy):
                return
            if pending:
                self._stop.wait(1.0)
            self._maybe_sweep()

    def _write(self, events: list[dict]) -> bool:
        seq = self._next_seq()
        key = f"{EVENTS_PREFIX}/{self.master_id}/{seq:020d}"
        body = json.dumps({"src": self.master_id,
                           "events": [{k: v for k, v in e.items() if k != "_size"}
                                      for e in events]},
                          default=_jsonable, separators=(",", ":")).encode()
        try:
            self.store.put(key, body)
        except StoreUnavailable as exc:
            if self.healthy:
                log.error("event bus: store write failed, keeping %d events queued: %s",
                          len(events), exc)
            self.healthy = False
            return False
        except StoreError as exc:   # refused for good (too large …): drop it, never wedge
            log.error("event bus: store refused a batch of %d events, dropped: %s",
                      len(events), exc)
            if self.metrics is not None:
                self.metrics.events_dropped.labels(self.master_id).inc(len(events))
            return True
        if not self.healthy:
            log.warning("event bus: store writable again")
        self.healthy = True
        if self.metrics is not None:
            self.metrics.events_written.labels(self.master_id).inc(len(events))
        self._ingest([(key, body)])
        return True

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_EVERY:
            return
        self._last_sweep = now
        try:
            self.sweep()
        except StoreError as exc:
            log.debug("event bus: sweep failed: %s", exc)

    def sweep(self, now: float | None = None) -> int:
        """Delete batches (any source) older than the retention; returns how many."""
        cutoff = int(((now or time.time()) - self.retention) * 1e9)
        gone = 0
        for key in self.store.list(EVENTS_PREFIX):
            if _seq_of(key) < cutoff and self.store.delete(key):
                gone += 1
        with self._lock:
            for k in [k for k in self._seen_batches if k[1] < cutoff]:
                del self._seen_batches[k]
            horizon = time.time() - max(2 * self.merge_window, self.retention)
            for fp in [fp for fp, ts in self._fps.items() if max(ts) < horizon]:
                del self._fps[fp]
                self._copies.pop(fp, None)
            while len(self._fps) > MAX_FINGERPRINTS:
                fp = next(iter(self._fps))
                del self._fps[fp]
                self._copies.pop(fp, None)
        return gone

    # -- reading ------------------------------------------------------------------------------

    def _on_changes(self, changes: list[Change]) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.append(changes)
                return
        self._ingest([(c.key, c.value) for c in changes if c.value is not None])

    def _ingest(self, batches: Iterable[tuple[str, bytes]], notify: bool = True) -> None:
        fresh: list[Event] = []
        merged = 0
        # Each source's batches in sequence order, whatever order the store listed them in (a
        # listener's position per source is a high-water mark: a batch ingested after a later
        # one of the same source would be skipped by every reader already past it).
        ordered = _in_source_order(batches)
        with self._lock:
            for key, raw in ordered:
                parts = key.split("/")
                if len(parts) != 3 or not parts[2].isdigit():
                    continue
                src, seq = parts[1], int(parts[2])
                if (src, seq) in self._seen_batches:
                    continue
                try:
                    body = json.loads(raw)
                    events = body["events"]
                    if not isinstance(events, list):
                        raise TypeError("events is not a list")
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("event bus: ignoring malformed batch %s: %s", key, exc)
                    self._seen_batches[(src, seq)] = time.time()
                    continue
                self._seen_batches[(src, seq)] = time.time()
                tip = self._tips.get(src)
                if tip is not None and seq < tip[0]:
                    log.warning("event bus: batch %s arrived after a later batch of %s; a "
                                "listener already past that one does not get its events",
                                key, src)
                for idx, e in enumerate(events):
                    if not isinstance(e, dict) or not isinstance(e.get("tag"), str):
                        continue
                    ev = Event(src=src, seq=seq, idx=idx, tag=e["tag"], data=e.get("data"),
                               ts=float(e.get("ts") or seq / 1e9), fp=e.get("fp"),
                               strong=bool(e.get("strong")))
                    if ev.fp:
                        prior = self._fps.setdefault(ev.fp, [])
                        if (ev.strong and prior) or any(
                                abs(ev.ts - t) <= self.merge_window for t in prior):
                            ev.dup = True
                            merged += 1
                            log.debug("event bus: %s from %s@%s merged (a copy)", ev.tag, src,
                                      seq)
                        prior.append(ev.ts)
                        self._copies.setdefault(ev.fp, []).append((src, ev.pos, ev.ts))
                    self._stream.append(ev)
                    old = self._tips.get(src)
                    if old is None or ev.pos > old:
                        self._tips[src] = ev.pos
                    fresh.append(ev)
        if merged and self.metrics is not None:
            self.metrics.events_merged.labels(self.master_id).inc(merged)
        if notify and fresh:
            unique = [ev for ev in fresh if not ev.dup]
            for cb, with_copies in list(self._listeners):
                batch = fresh if with_copies else unique
                if not batch:
                    continue
                try:
                    cb(batch)
                except Exception:
                    log.exception("event listener failed")

    def position(self) -> Position:
        """The newest position of every source seen (a listener starting "now")."""
        with self._lock:
            return dict(self._tips)

    def read(self, since: Position | None, tagmatch: str = "*", limit: int = 1000,
             ) -> tuple[list[Event], Position]:
        """Events after ``since`` (all retained ones if None) matching ``tagmatch``; and the
        position after them (every source, so a later read resumes exactly there)."""
        pos: Position = dict(since or {})
        start = dict(pos)
        out: list[Event] = []
        with self._lock:
            for ev in self._stream:
                last = pos.get(ev.src)
                if last is not None and ev.pos <= last:
                    continue
                if len(out) >= limit:
                    break
                pos[ev.src] = ev.pos
                if ev.dup or not fnmatch.fnmatchcase(ev.tag, tagmatch):
                    continue
                if ev.fp and self._consumed(ev, start):
                    continue
                out.append(dataclasses.replace(ev, cursor=encode_position(pos)))
            else:
                for src, tip in self._tips.items():
                    if src not in pos or pos[src] < tip:
                        pos[src] = tip
        return out, pos

    def _consumed(self, ev: Event, since: Position) -> bool:
        """True when another copy of ``ev`` lies at or before ``since``: a listener resuming
        here with a position from another master, which delivered that copy instead."""
        for src, pos, ts in self._copies.get(ev.fp or "", ()):
            if src != ev.src and src in since and pos <= since[src] and (
                    ev.strong or abs(ts - ev.ts) <= self.merge_window):
                return True
        return False

    def events_after(self, since: Position | None) -> list[Event]:
        """Every event after ``since`` in memory, merged copies included (the reactor's
        catch-up: ``since`` may come from another master, which kept other copies)."""
        with self._lock:
            return [ev for ev in self._stream
                    if not (ev.src in (since or {}) and ev.pos <= (since or {})[ev.src])]


def _in_source_order(batches: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``batches`` with each source's batches sorted by sequence, in the slots that source held
    (the order between sources, which copy of a merged event came first, is kept)."""
    out = list(batches)
    slots: dict[str, list[int]] = {}
    for i, (key, _raw) in enumerate(out):
        slots.setdefault(key.rsplit("/", 1)[0], []).append(i)
    for idxs in slots.values():
        if len(idxs) > 1:
            mine = sorted((out[i] for i in idxs), key=lambda kv: (_seq_of(kv[0]), kv[0]))
            for i, kv in zip(idxs, mine, strict=True):
                out[i] = kv
    return out


def _seq_of(key: str) -> int:
    tail = key.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0

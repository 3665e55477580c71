"""Jobs as the master sees them: publish, collect returns, stream them to waiting CLIs.

Returns are handed to waiters at once and written to the job cache by a background writer
thread in batches, so a slow or unreachable store never delays the request path.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hamaster.jobs.cache import JobCache
from hamaster.store.base import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

RECENT_JOBS = 2000
MAX_RETURNS_IN_MEMORY = 200_000
"""Recent jobs are kept in memory for fast lookups; the job cache in the store has them all."""


@dataclass
class JobRecord:
    """A job published (or seen) by this master, kept in memory for fast lookups."""

    jid: str
    load: dict
    minions: list[str]
    published_at: float
    returns: dict[str, dict] = field(default_factory=dict)
    #: The request timestamp (``ts``) of each minion's return, to refuse an older one later.
    return_ts: dict[str, float] = field(default_factory=dict)


class JobWriter(threading.Thread):
    """Writes loads and returns to the job cache in batches, off the event loop."""

    def __init__(self, cache: JobCache) -> None:
        super().__init__(name="job-writer", daemon=True)
        self.cache = cache
        self.q: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.healthy = True

    def put_load(self, jid: str, load: dict) -> None:
        """Queue a job load for the cache."""
        self.q.put(("load", (jid, load)))

    def put_return(self, jid: str, minion_id: str, ret: dict) -> None:
        """Queue one return for the cache."""
        self.q.put(("ret", (jid, minion_id, ret)))

    def stop(self) -> None:
        """Flush what is queued and stop."""
        self.q.put(None)
        self.join(timeout=10)

    def run(self) -> None:
        pending: list[tuple[str, Any]] = []
        while True:
            item = self.q.get()
            stop = item is None
            if item is not None:
                pending.append(item)
            while not stop:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    pending.append(nxt)
            pending = self._flush(pending)
            if stop:
                return
            if pending:  # store down: retry later, keep the data
                time.sleep(1.0)

    def _flush(self, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        rets = [payload for kind, payload in items if kind == "ret"]
        try:
            try:
                for kind, payload in items:
                    if kind == "load":
                        self.cache.save_load(*payload)
                if rets:
                    self.cache.save_returns(rets)
            except StoreUnavailable:
                raise
            except (ValueError, StoreError):  # one item's fault (bad jid or id, a value too big
                self._flush_one_by_one(items)  # for etcd): drop that item, keep the rest
        except Exception as exc:
            if self.healthy:
                log.error("job cache write failed, keeping %d items in memory: %s", len(items), exc)
            self.healthy = False
            return items[-100000:]
        if not self.healthy:
            log.warning("job cache writable again")
        self.healthy = True
        return []


    def _flush_one_by_one(self, items: list[tuple[str, Any]]) -> None:
        """Write items singly, dropping (with one warning) those the cache refuses.

        Only an outage (``StoreUnavailable``) keeps the items for a retry; any other refusal is
        about one item (an invalid jid or id, a value over the backend's size limit) and would
        fail the same way forever.
        """
        dropped: list[str] = []
        for kind, payload in items:
            try:
                if kind == "load":
                    self.cache.save_load(*payload)
                else:
                    self.cache.save_return(*payload)
            except StoreUnavailable:
                raise
            except (ValueError, StoreError) as exc:
                dropped.append(str(exc))
        if dropped:
            log.warning("job cache: dropped %d invalid items (first: %s)", len(dropped),
                        dropped[0][:300])


class JobTracker:
    """Recent jobs in memory, and the CLIs waiting for their returns."""

    def __init__(self) -> None:
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self.waiters: dict[str, list[Any]] = {}
        self.returns_held = 0

    def add(self, jid: str, load: dict, minions: list[str]) -> JobRecord:
        """Remember a new job; publishing a known jid again (a batch run) adds its minions.

        The record's ``load["minions"]`` is then every minion the jid was published to.
        """
        rec = self.jobs.get(jid)
        if rec is not None:
            rec.minions = sorted(set(rec.minions) | set(minions))
            rec.load = {**load, "minions": rec.minions}
            return rec
        rec = JobRecord(jid=jid, load=load, minions=minions, published_at=time.time())
        self.jobs[jid] = rec
        self._evict()
        return rec

    def _evict(self) -> None:
        while len(self.jobs) > 1 and (len(self.jobs) > RECENT_JOBS
                                      or self.returns_held > MAX_RETURNS_IN_MEMORY):
            _, old = self.jobs.popitem(last=False)
            self.returns_held -= len(old.returns)

    def is_stale_return(self, jid: str, minion_id: str, ts: float | None) -> bool:
        """True when a return of ``minion_id`` for ``jid`` sent at a later ``ts`` is already
        here: an older copy (a replay) must not replace it. Records ``ts`` otherwise."""
        rec = self.jobs.get(jid)
        if rec is None or ts is None:
            return False
        if ts < rec.return_ts.get(minion_id, ts):
            return True
        rec.return_ts[minion_id] = ts
        return False

    def add_return(self, jid: str, minion_id: str, ret: dict) -> float | None:
        """Record a return and wake waiters; returns the latency when the job is known."""
        rec = self.jobs.get(jid)
        latency = None
        if rec is not None:
            if minion_id not in rec.returns:
                self.returns_held += 1
            rec.returns[minion_id] = ret
            latency = time.time() - rec.published_at
            if self.returns_held > MAX_RETURNS_IN_MEMORY:
                self._evict()
        for q in self.waiters.get(jid, ()):
            q.put_nowait((minion_id, ret))
        return latency

    def subscribe(self, jid: str, q: Any = None) -> Any:
        """A queue receiving ``(minion_id, ret)`` for ``jid`` (returns already in are put first).

        ``q`` may be any object with ``put_nowait``; a new :class:`asyncio.Queue` by default.
        """
        if q is None:
            q = asyncio.Queue()
        self.waiters.setdefault(jid, []).append(q)
        rec = self.jobs.get(jid)
        if rec is not None:
            for mid, ret in rec.returns.items():
                q.put_nowait((mid, ret))
        return q

    async def collect(
        self,
        jid: str,
        expected: set[str],
        timeout: float,
        on_return: Callable[[str, dict], Awaitable[None]] | None = None,
    ) -> set[str]:
        """Wait up to ``timeout`` for returns from ``expected``; returns the ids that answered.

        ``on_return(minion_id, ret)`` is awaited for each first return, as it arrives.
        """
        q = self.subscribe(jid)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        try:
            while expected - seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    mid, ret = await asyncio.wait_for(q.get(), timeout=left)
                except TimeoutError:
                    break
                if mid in seen:
                    continue
                seen.add(mid)
                if on_return is not None:
                    await on_return(mid, ret)
        finally:
            self.unsubscribe(jid, q)
        return seen

    def unsubscribe(self, jid: str, q: Any) -> None:
        """Stop delivering to ``q``."""
        lst = self.waiters.get(jid)
        if lst and q in lst:
            lst.remove(q)
            if not lst:
                del self.waiters[jid]

"""The leader campaign: every master of a cluster calls ``lease_acquire`` on a thread; the one
holding the lease runs the reactor and the master schedule (exactly once per cluster).

A master is leader while its last lease is valid on its own monotonic clock
(:attr:`hamaster.store.base.Lease.valid_until`); a store it cannot reach therefore ends its
leadership at the end of the TTL, before any other master can take the lease over. The holder
renews every ``ttl / 3``; candidates try every ``min(0.5, ttl / 5)`` seconds, so a dead leader is
replaced within about ``ttl + 0.5`` s (etcd expires the lease; on fs each observer counts
``ttl`` on its own clock from the last change of the holder's record it saw).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hamaster.store.base import Lease, LeaseUnsupported, Store, StoreError

log = logging.getLogger(__name__)

LEASE_NAME = "leader"
DEFAULT_TTL = 5.0

#: ``on_change(old, new)``: called on the campaign thread when leadership is gained or lost.
ChangeCallback = Callable[["Lease | None", "Lease | None"], None]


class LeaderElector:
    """Campaigns for lease ``name`` on ``store`` as ``member_id`` until :meth:`stop`."""

    def __init__(self, store: Store, member_id: str, ttl: float = DEFAULT_TTL,
                 metrics: Any = None, name: str = LEASE_NAME) -> None:
        """Check the backend has a lease (raises :class:`LeaseUnsupported` if not)."""
        reason = store.lease_unsupported()
        if reason:
            raise LeaseUnsupported(reason)
        self.store = store
        self.member_id = member_id
        self.ttl = float(ttl)
        self.name = name
        self.metrics = metrics
        self._lease: Lease | None = None
        self._callbacks: list[ChangeCallback] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen_held_at = time.monotonic()
        self.last_error = ""
        if metrics is not None:
            metrics.lease_ttl.labels(metrics.master_id).set(self.ttl)

    # -- state ------------------------------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(old, new)`` when this master becomes or stops being the leader."""
        self._callbacks.append(callback)

    def lease(self) -> Lease | None:
        """The lease while this master holds it and it is valid now, else None."""
        lease = self._lease
        if lease is None or time.monotonic() >= lease.valid_until:
            return None
        return lease

    def is_leader(self) -> bool:
        """True while this master holds a valid lease."""
        return self.lease() is not None

    # -- the campaign -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the campaign thread."""
        self._thread = threading.Thread(target=self._run, name="leader-campaign", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop campaigning; with ``release`` give the lease up so another master takes over."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        lease, self._lease = self._lease, None
        if lease is not None:
            self._notify(lease, None)
            if release:
                try:
                    self.store.lease_release(self.name, self.member_id, lease.epoch)
                except StoreError as exc:
                    log.warning("could not release the leader lease: %s", exc)

    def step_once(self) -> Lease | None:
        """One campaign call (renew or try to take); returns the lease if held."""
        old = self.lease()
        started = time.monotonic()
        try:
            got = self.store.lease_acquire(self.name, self.member_id, self.ttl)
            self.last_error = ""
        except StoreError as exc:
            got = old           # keep acting until valid_until: nobody can take it before
            if self.metrics is not None:
                self.metrics.lease_errors.labels(self.metrics.master_id).inc()
            if not self.last_error:
                log.error("leader lease: store unreachable (%s)", exc)
            self.last_error = str(exc)
        else:
            # Held by us, or by someone else (we got None but nothing failed): a leader exists.
            self._seen_held_at = started
            if got is None and old is not None:
                log.warning("%s lost the leader lease (epoch %d)", self.member_id, old.epoch)
        self._lease = got
        now = self.lease()
        if (old is None) != (now is None) or (old and now and old.epoch != now.epoch):
            if now is not None:
                log.warning("%s is the leader (epoch %d)", self.member_id, now.epoch)
            self._notify(old, now)
        if self.metrics is not None:
            mid = self.metrics.master_id
            self.metrics.leader.labels(mid).set(1 if now else 0)
            if now is not None:
                self.metrics.lease_epoch.labels(mid).set(now.epoch)
            self.metrics.lease_leaderless.labels(mid).set(
                0.0 if now else round(time.monotonic() - self._seen_held_at, 3))
        return now

    def _notify(self, old: Lease | None, new: Lease | None) -> None:
        if self.metrics is not None:
            self.metrics.leader_changes.labels(self.metrics.master_id).inc()
        for cb in list(self._callbacks):
            try:
                cb(old, new)
            except Exception:
                log.exception("leader change callback failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                held = self.step_once()
            except Exception:   # never let the campaign die
                log.exception("leader campaign step failed")
                held = None
            interval = self.ttl / 3 if held is not None else min(0.5, self.ttl / 5)
            if held is not None:   # never renew later than a third of the way to expiry
                interval = min(interval, max(0.05, (held.valid_until - time.monotonic()) / 3))
            self._wake.wait(interval)
            self._wake.clear()

    def status(self) -> dict:
        """``{"leader", "epoch", "this_master", "ttl"}`` as the store says now (blocking)."""
        info = self.store.lease_info(self.name)
        return {"leader": info.holder, "epoch": info.epoch, "ttl": self.ttl,
                "this_master_leads": self.is_leader()}


def elector_for(opts: dict, store: Store | None, master_id: str,
                metrics: Any = None) -> LeaderElector | None:
    """The campaign for a clustered master; None without a store or on a backend with no lease.

    The exactly-once features (``reactor``, ``schedule``) need a lease: with them configured
    on such a backend this raises :class:`LeaseUnsupported` (the master refuses to start).
    """
    if store is None:
        return None
    reason = store.lease_unsupported()
    if reason:
        wanted = [opt for opt in ("reactor", "schedule") if opts.get(opt)]
        if wanted:
            raise LeaseUnsupported(f"{' and '.join(wanted)} configured, but {reason}")
        log.info("no leader lease on this backend: %s", reason)
        return None
    return LeaderElector(store, master_id, float(opts.get("ha_lease_ttl") or DEFAULT_TTL),
                         metrics=metrics)

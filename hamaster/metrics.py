"""One Prometheus registry per daemon and the metric definitions hamaster exports.

Metric objects are created per :class:`MasterMetrics` instance (not at import time), so tests can
run several masters in one process without clashing registries.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

log = logging.getLogger(__name__)

# Label values created at start-up (value 0) so ``rate()`` and alerts see a counter's first
# increment and dashboards show 0 instead of "no data".
KNOWN_REJECT_REASONS = (
    "malformed", "version", "decrypt", "forged", "no_token", "bad_token", "replay",
    "unknown_minion", "no_session", "bad_key", "bad_jid", "unknown_clear_cmd", "internal", "busy",
    "too_large", "no_nonce", "stale_return",
)
KNOWN_AUTH_RESULTS = ("accepted", "pending", "rejected", "denied",
                      "bad_key", "bad_token", "bad_algo")
KEY_STATES = ("minions", "minions_pre", "minions_rejected", "minions_denied")
STORE_OPS = ("get", "get_keys", "put", "delete", "list", "compare_and_put")


class MasterMetrics:
    """The master's metrics, all labelled by ``master_id``."""

    def __init__(self, master_id: str) -> None:
        self.master_id = master_id
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["master_id"]
        r = self.registry
        ProcessCollector(registry=r)
        self.minions_connected = Gauge(
            "hamaster_minions_connected", "Minions seen on this master within the liveness window",
            labels, registry=r
        )
        self.keys = Gauge("hamaster_keys", "Minion keys by state", labels + ["state"], registry=r)
        self.auth_requests = Counter(
            "hamaster_auth_requests_total", "Minion _auth requests by result", labels + ["result"],
            registry=r
        )
        self.jobs_published = Counter("hamaster_jobs_published_total",
                                      "Jobs published", labels, registry=r)
        self.returns_received = Counter(
            "hamaster_returns_received_total", "Job returns received from minions", labels,
            registry=r
        )
        self.return_latency = Histogram(
            "hamaster_job_return_latency_seconds",
            "Time from publishing a job to receiving a minion's return",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.requests_rejected = Counter(
            "hamaster_requests_rejected_total", "Requests refused, by reason", labels + ["reason"],
            registry=r
        )
        self.keys_throttled = Counter(
            "hamaster_keys_throttled_total",
            "New minion keys not recorded as pending: over pending_keys_per_second (rate) or "
            "max_pending_keys (cap)",
            labels + ["reason"], registry=r,
        )
        self.auth_shed = Counter(
            "hamaster_auth_shed_total",
            "_auth requests dropped unanswered by the auth queue (hamaster/master/authqueue.py): "
            "duplicate (a newer one from the same minion came), full (oldest dropped), "
            "stale (waited longer than its minion waits)",
            labels + ["reason"], registry=r)
        self.auth_queue = Gauge("hamaster_auth_queue_length",
                                "_auth requests waiting for the master's CPU", labels, registry=r)
        self.requests = Counter("hamaster_requests_total", "Requests served, by command",
                                labels + ["cmd"], registry=r)
        self.store_up = Gauge("hamaster_store_up",
                              "1 when the shared-state backend answers", labels, registry=r)
        self.store_op_latency = Histogram(
            "hamaster_store_operation_seconds", "Latency of shared-state operations",
            labels + ["op"], registry=r
        )
        self.watch_events = Counter(
            "hamaster_store_watch_events_total", "Changes received from the store watch", labels,
            registry=r
        )
        self.loop_lag = Histogram(
            "hamaster_event_loop_lag_seconds",
            "How late the request loop ran a timer due now (the longest the loop was held)",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.sync_lag = Histogram(
            "hamaster_sync_lag_seconds",
            "Time from a change written by one master to its application here",
            labels,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.masters_alive = Gauge("hamaster_cluster_masters_alive",
                                   "Masters alive in the cluster", labels, registry=r)
        self.file_bytes_served = Counter(
            "hamaster_fileserver_bytes_served_total", "Bytes served by the file server", labels,
            registry=r
        )
        self.config_info = Info("hamaster_config",
                                "Hash of the effective master configuration", labels, registry=r)
        self.fileroots_info = Info("hamaster_fileroots",
                                   "Hash of the file_roots view", labels, registry=r)
        # -- cluster identity (the master keypair: hamaster/master/daemon.py, "identity") --
        self.master_key_mismatch = Gauge(
            "hamaster_master_key_mismatch",
            "1 when the master key this master serves differs from the store's or from another "
            "live master's", labels, registry=r)
        self.master_key_changes = Counter(
            "hamaster_master_key_changes_total",
            "Times this master adopted a different cluster master keypair while running",
            labels, registry=r)
        self.master_key_changes.labels(master_id)
        # -- leader lease, event bus, reactor, schedule (hamaster/master/leader.py, events/) --
        self.leader = Gauge("hamaster_leader", "1 while this master holds the leader lease",
                            labels, registry=r)
        self.lease_epoch = Gauge("hamaster_lease_epoch", "Epoch of the leader lease last seen",
                                 labels, registry=r)
        self.lease_ttl = Gauge("hamaster_lease_ttl_seconds", "The leader lease TTL (ha_lease_ttl)",
                               labels, registry=r)
        self.lease_leaderless = Gauge(
            "hamaster_lease_leaderless_seconds",
            "Seconds since this master last saw the lease held (by anyone); 0 while held",
            labels, registry=r)
        self.leader_changes = Counter("hamaster_leader_changes_total",
                                      "Times this master took or lost the leader lease",
                                      labels, registry=r)
        self.lease_errors = Counter("hamaster_lease_errors_total",
                                    "Lease calls that failed (store unreachable)", labels,
                                    registry=r)
        self.events_written = Counter("hamaster_events_written_total",
                                      "Events this master wrote to the cluster bus", labels,
                                      registry=r)
        self.events_merged = Counter(
            "hamaster_events_merged_total",
            "Copies of one minion event (sent to several masters) merged away", labels,
            registry=r)
        self.events_dropped = Counter("hamaster_events_dropped_total",
                                      "Events dropped (writer queue full, or a "
                                      "batch the store refused)", labels, registry=r)
        self.reactions = Counter("hamaster_reactions_total", "Reactor actions, by result",
                                 labels + ["result"], registry=r)
        self.schedule_runs = Counter("hamaster_schedule_runs_total",
                                     "Master schedule runs, by result", labels + ["result"],
                                     registry=r)
        for name in ("leader", "lease_epoch", "lease_leaderless", "leader_changes",
                     "lease_errors", "events_written", "events_merged", "events_dropped"):
            getattr(self, name).labels(master_id)
        for result in ("ok", "error", "duplicate", "retried"):
            self.reactions.labels(master_id, result)
        for result in ("ok", "error", "skipped", "duplicate"):
            self.schedule_runs.labels(master_id, result)
        for name in ("minions_connected", "store_up", "masters_alive", "master_key_mismatch"):
            getattr(self, name).labels(master_id)
        self.jobs_published.labels(master_id)
        self.returns_received.labels(master_id)
        self.return_latency.labels(master_id)
        self.watch_events.labels(master_id)
        self.sync_lag.labels(master_id)
        self.file_bytes_served.labels(master_id)
        for reason in KNOWN_REJECT_REASONS:
            self.requests_rejected.labels(master_id, reason)
        for result in KNOWN_AUTH_RESULTS:
            self.auth_requests.labels(master_id, result)
        for reason in ("rate", "cap"):
            self.keys_throttled.labels(master_id, reason)
        for reason in ("duplicate", "full", "stale"):
            self.auth_shed.labels(master_id, reason)
        self.auth_queue.labels(master_id)
        for state in KEY_STATES:
            self.keys.labels(master_id, state)

    def reject(self, reason: str) -> None:
        """Count one refused request."""
        self.requests_rejected.labels(self.master_id, reason).inc()

    def key_throttled(self, reason: str) -> None:
        """Count one new key held back by the new-key throttle (``rate`` or ``cap``)."""
        self.keys_throttled.labels(self.master_id, reason).inc()

    def auth(self, result: str) -> None:
        """Count one _auth request by its outcome."""
        self.auth_requests.labels(self.master_id, result).inc()

    def instrument_store(self, store: Any) -> Any:
        """Time ``store``'s operations and count its watch events.

        Wraps the instance's ``get/put/delete/list/compare_and_put`` (observed into
        ``hamaster_store_operation_seconds{op}``) and ``watch`` (every change delivered to a
        callback registered afterwards counts in ``hamaster_store_watch_events_total``), so call
        it before anything registers a watch (``keys.attach_watch()``). The sync lag
        (``hamaster_sync_lag_seconds``) is measured by the membership records' probe
        (:meth:`hamaster.master.membership.Membership.watch_lag`). Returns ``store``.
        """
        latency = self.store_op_latency
        mid = self.master_id
        for op in STORE_OPS:
            orig = getattr(store, op, None)
            if orig is None:
                continue
            child = latency.labels(mid, op)
            setattr(store, op, _timed(orig, child))
        orig_watch = store.watch
        events = self.watch_events.labels(mid)

        @functools.wraps(orig_watch)
        def watch(prefix: str, callback: Any) -> None:
            def counted(changes: list) -> None:
                events.inc(len(changes))
                callback(changes)

            orig_watch(prefix, counted)

        store.watch = watch
        return store


def _timed(fn: Any, child: Any) -> Any:
    """``fn`` with its duration observed into the histogram ``child`` (errors included)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            child.observe(time.perf_counter() - t0)

    return wrapper

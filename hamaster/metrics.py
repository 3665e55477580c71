"""One Prometheus registry per daemon and the metric definitions hamaster exports.

Metric objects are created per :class:`MasterMetrics` instance (not at import time), so tests can
run several masters in one process without clashing registries.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector


class MasterMetrics:
    """The master's metrics, all labelled by ``master_id``."""

    def __init__(self, master_id: str) -> None:
        self.master_id = master_id
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["master_id"]
        r = self.registry
        ProcessCollector(registry=r)
        self.minions_connected = Gauge(
            "hamaster_minions_connected", "Minions seen on this master within the liveness window", labels, registry=r
        )
        self.keys = Gauge("hamaster_keys", "Minion keys by state", labels + ["state"], registry=r)
        self.auth_requests = Counter(
            "hamaster_auth_requests_total", "Minion _auth requests by result", labels + ["result"], registry=r
        )
        self.jobs_published = Counter("hamaster_jobs_published_total", "Jobs published", labels, registry=r)
        self.returns_received = Counter(
            "hamaster_returns_received_total", "Job returns received from minions", labels, registry=r
        )
        self.return_latency = Histogram(
            "hamaster_job_return_latency_seconds",
            "Time from publishing a job to receiving a minion's return",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.requests_rejected = Counter(
            "hamaster_requests_rejected_total", "Requests refused, by reason", labels + ["reason"], registry=r
        )
        self.requests = Counter("hamaster_requests_total", "Requests served, by command", labels + ["cmd"], registry=r)
        self.store_up = Gauge("hamaster_store_up", "1 when the shared-state backend answers", labels, registry=r)
        self.store_op_latency = Histogram(
            "hamaster_store_operation_seconds", "Latency of shared-state operations", labels + ["op"], registry=r
        )
        self.watch_events = Counter(
            "hamaster_store_watch_events_total", "Changes received from the store watch", labels, registry=r
        )
        self.sync_lag = Histogram(
            "hamaster_sync_lag_seconds",
            "Time from a change written by one master to its application here",
            labels,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.masters_alive = Gauge("hamaster_cluster_masters_alive", "Masters alive in the cluster", labels, registry=r)
        self.file_bytes_served = Counter(
            "hamaster_fileserver_bytes_served_total", "Bytes served by the file server", labels, registry=r
        )
        self.config_info = Info("hamaster_config", "Hash of the effective master configuration", labels, registry=r)
        self.fileroots_info = Info("hamaster_fileroots", "Hash of the file_roots view", labels, registry=r)
        for name in ("minions_connected", "store_up", "masters_alive"):
            getattr(self, name).labels(master_id)
        self.jobs_published.labels(master_id)
        self.returns_received.labels(master_id)

    def reject(self, reason: str) -> None:
        """Count one refused request."""
        self.requests_rejected.labels(self.master_id, reason).inc()

    def auth(self, result: str) -> None:
        """Count one _auth request by its outcome."""
        self.auth_requests.labels(self.master_id, result).inc()

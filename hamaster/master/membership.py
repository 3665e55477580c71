"""Cluster membership: the master record, its heartbeat, and who is alive — on every backend.

Every master of a cluster keeps two things in the shared store, both written by
:meth:`Membership.beat` once a second:

- its **record** ``cluster/masters/<master_id>``: a JSON object (``master_id``, ``version``,
  ``ts`` — the writer's wall clock —, ``ttl``, ``started``, ``state``, ``config_hash``,
  ``fileroots_hash``, ``pillar_hash``, ``master_key_finger``, ``store_ok``,
  ``minions_connected``, ``address``, ``blob_address``, and ``stopped: true`` after a graceful
  stop). It outlives the master, so ``cluster.status`` still lists a dead master with how long
  ago it was last seen; every master rewrites it every second, which the sync-lag metric
  measures (:meth:`Membership.lag_probe`). :func:`parse_record` is the one parser of it.
- its **presence**, through the store's membership primitive (:meth:`Store.heartbeat
  <hamaster.store.base.Store.heartbeat>` / :meth:`~hamaster.store.base.Store.members`,
  ``cluster/members/<master_id>``), which each backend implements its own honest way: on etcd
  a key attached to an etcd lease of ``ttl`` seconds (``ha_member_ttl``) that the master renews
  with each beat and etcd expires when it stops (no clocks compared); on fs and rsync a file
  stamped with the writer's wall clock, present while ``now <= ts + ttl`` on the reader's clock
  (clocks in sync: NTP).

A master is **alive** when it is present and its record does not say ``stopped`` (a graceful
stop writes ``stopped: true``, so it is not alive at once, without waiting for its ttl).
:func:`read_masters` is the one place that decides it; the daemon, the runners
(``cluster.status``), the metrics (``hamaster_cluster_masters_alive``), the event service (master
down events), the blob service (peers), ``hamaster-key`` and its key-change barrier all read it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from hamaster.store.base import Change, Store, WatchCallback

log = logging.getLogger(__name__)

#: Where the master records live (``cluster/masters/<master_id>``).
MASTERS_PREFIX = "cluster/masters/"
#: Default ``ha_member_ttl``: a master not present for this long is taken as down.
DEFAULT_TTL = 5.0


def record_key(master_id: str) -> str:
    """The store key of ``master_id``'s record."""
    return f"{MASTERS_PREFIX}{master_id}"


def encode_record(record: dict[str, Any]) -> bytes:
    """A master record as stored (JSON)."""
    return json.dumps(record).encode()


def parse_record(raw: bytes | None) -> dict[str, Any] | None:
    """A stored master record as a dict with a float ``ts``; None if it is not one.

    The one parser of ``cluster/masters/<id>`` values: never raises on bad bytes (they come
    from other hosts).
    """
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(rec, dict):
        return None
    try:
        rec["ts"] = float(rec["ts"])
    except (KeyError, ValueError, TypeError):
        return None
    return rec


def read_masters(store: Store, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Every master that ever wrote its record, with ``alive`` and ``last_seen_s`` added.

    ``alive``: present in ``store.members()`` (the backend's liveness: an etcd lease, or a fresh
    heartbeat file) and not ``stopped``. ``last_seen_s``: seconds since the record's ``ts`` (the
    writer's clock). Malformed records are logged and left out. Raises
    :class:`~hamaster.store.base.StoreError` when the store cannot be read.
    """
    present = store.members()
    raws = store.get_many(MASTERS_PREFIX)
    now = time.time() if now is None else now
    out: dict[str, dict[str, Any]] = {}
    for key, raw in sorted(raws.items()):
        master_id = key.rsplit("/", 1)[-1]
        rec = parse_record(raw)
        if rec is None:
            log.warning("ignoring malformed cluster record %s", key)
            continue
        rec["alive"] = master_id in present and not rec.get("stopped")
        rec["last_seen_s"] = round(now - rec["ts"], 2)
        out[master_id] = rec
    return out


def alive_count(masters: dict[str, dict[str, Any]]) -> int:
    """How many of ``masters`` (as :func:`read_masters` returns them) are alive."""
    return sum(1 for rec in masters.values() if isinstance(rec, dict) and rec.get("alive"))


class Membership:
    """One master's membership in the cluster: writes its record and presence, reads everyone's."""

    def __init__(self, store: Store, master_id: str, ttl: float = DEFAULT_TTL) -> None:
        self.store = store
        self.master_id = master_id
        self.ttl = float(ttl)

    def _stamp(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "master_id": self.master_id, "ts": time.time(), "ttl": self.ttl}

    def beat(self, record: dict[str, Any]) -> None:
        """Write ``record`` (stamped with ``master_id``, ``ts`` and ``ttl``) and renew presence.

        Blocking (store I/O): call it from a thread. Raises
        :class:`~hamaster.store.base.StoreError` if the store refuses either write.
        """
        raw = encode_record(self._stamp(record))
        self.store.put(record_key(self.master_id), raw)
        self.store.heartbeat(self.master_id, raw, self.ttl)

    def leave(self, record: dict[str, Any]) -> None:
        """Say that this master stopped (graceful stop): no one counts it alive or waits on it."""
        rec = self._stamp(record)
        rec["stopped"] = True
        self.store.put(record_key(self.master_id), encode_record(rec))

    def masters(self) -> dict[str, dict[str, Any]]:
        """Every master's record with ``alive`` and ``last_seen_s`` (:func:`read_masters`)."""
        return read_masters(self.store)

    def lag_probe(self, observe: Callable[[float], None]) -> WatchCallback:
        """A watch callback for :data:`MASTERS_PREFIX` calling ``observe(now - ts)`` for every
        other master's record that arrives: the replication delay of the store (clocks in sync).
        """
        def probe(changes: list[Change]) -> None:
            now = time.time()
            for change in changes:
                rec = parse_record(change.value)
                if rec is None or rec.get("master_id") == self.master_id:
                    continue
                observe(max(0.0, now - rec["ts"]))

        return probe

    def watch_lag(self, observe: Callable[[float], None]) -> None:
        """Register :meth:`lag_probe` on the store (before ``store.start()``); never raises."""
        try:
            self.store.watch(MASTERS_PREFIX.rstrip("/"), self.lag_probe(observe))
        except Exception:  # a metric never breaks the master
            log.debug("sync-lag probe watch failed", exc_info=True)

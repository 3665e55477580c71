"""Where a master keeps its state: local directories (one master) or a shared store (a cluster).

Without ``ha_dir`` (and with the default ``ha_backend: fs``) a master keeps Salt's local layout:
keys in ``pki_dir``, jobs under ``cachedir``, files in ``file_roots``. With a shared backend,
every master of the cluster reads and writes the same store:
``pki/master/…`` (master keypair and minion keys), ``jobs/<jid>/…``, ``file_roots/<env>/…``,
``config/master.d/*.conf`` and ``cluster/masters/<master_id>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import yaml

from hamaster.jobs.cache import JOBS_PREFIX, JobCache, open_job_cache
from hamaster.pki_sync.keys import KeyRegistry, open_key_registry, throttle_from_opts
from hamaster.store.base import Store, StoreError

log = logging.getLogger(__name__)

KEYS_PREFIX = "pki/master/"
CONFIG_PREFIX = "config/master.d/"
MASTERS_PREFIX = "cluster/masters/"

# Options that describe one host, never taken from a shared fragment and left out of the
# cluster config hash (they legitimately differ between masters).
PER_HOST_OPTIONS = frozenset({
    "interface", "publish_port", "ret_port", "master_id", "root_dir", "pki_dir", "cachedir",
    "sock_dir", "log_file", "log_level", "log_level_logfile", "ha_dir", "ha_backend",
    "ha_etcd_endpoints", "ha_rsync_peers", "ha_etcd_ca", "ha_etcd_cert", "ha_etcd_key",
    "ha_rsync_password_file", "metrics_port", "metrics_interface", "conf_file", "config_dir",
    "__role", "user", "ha_poll_interval", "ha_etcd_prefix", "ha_etcd_timeout",
    "ha_rsync_interval", "ha_rsync_debounce", "ha_rsync_max_backoff", "ha_rsync_tombstone_ttl",
    "ha_rsync_ssh", "file_blob_port", "file_blob_interface", "ha_create_master_key",
})


def is_ha(opts: dict) -> bool:
    """True when this master shares its state with others."""
    return bool(opts.get("ha_dir")) or opts.get("ha_backend", "fs") != "fs"


def open_store(opts: dict) -> Store:
    """The shared store named by ``ha_backend``."""
    backend = opts.get("ha_backend", "fs")
    interval = float(opts.get("ha_poll_interval", 0.5))
    if backend == "fs":
        from hamaster.store.fs import FsStore

        if not opts.get("ha_dir"):
            raise StoreError("ha_backend fs needs ha_dir (the shared directory, e.g. an NFS mount)")
        return FsStore(opts["ha_dir"], poll_interval=interval)
    if backend == "etcd":
        from hamaster.store.etcd import EtcdStore

        endpoints = opts.get("ha_etcd_endpoints") or []
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.replace(",", " ").split() if e]
        if not endpoints:
            raise StoreError("ha_backend etcd needs ha_etcd_endpoints: [host:port, ...]")
        return EtcdStore(
            endpoints,
            prefix=opts.get("ha_etcd_prefix") or "/hamaster",
            ca=opts.get("ha_etcd_ca"),
            cert=opts.get("ha_etcd_cert"),
            key=opts.get("ha_etcd_key"),
            timeout=float(opts.get("ha_etcd_timeout", 5.0)),
            poll_interval=interval,
        )
    if backend == "rsync":
        from hamaster.store.rsync import DEFAULT_SSH, RsyncStore

        if not opts.get("ha_dir"):
            raise StoreError("ha_backend rsync needs ha_dir (this master's local tree)")
        peers = opts.get("ha_rsync_peers") or []
        if isinstance(peers, str):
            peers = peers.split()
        try:
            return RsyncStore(
                opts["ha_dir"],
                peers,
                password_file=opts.get("ha_rsync_password_file"),
                poll_interval=interval,
                interval=float(opts.get("ha_rsync_interval", 30.0)),
                debounce=float(opts.get("ha_rsync_debounce", 0.2)),
                max_backoff=float(opts.get("ha_rsync_max_backoff", 30.0)),
                tombstone_ttl=float(opts.get("ha_rsync_tombstone_ttl", 604800.0)),
                ssh=opts.get("ha_rsync_ssh") or DEFAULT_SSH,
                member_id=opts.get("master_id") or "",
            )
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
    raise StoreError(f"ha_backend {backend!r} is not known (supported: fs, etcd, rsync)")


@dataclass
class SharedState:
    """The store-backed parts of a master."""

    keys: KeyRegistry
    job_cache: JobCache
    store: Store | None  # the shared store, None for a single master

    @property
    def ha(self) -> bool:
        return self.store is not None


def open_shared_state(opts: dict, store: Store | None = None) -> SharedState:
    """Keys and jobs on the shared store when clustered, else Salt's local layout."""
    if store is None and not is_ha(opts):
        return SharedState(keys=open_key_registry(opts), job_cache=open_job_cache(opts), store=None)
    store = store or open_store(opts)
    keys = KeyRegistry(
        store,
        KEYS_PREFIX,
        auto_accept=bool(opts.get("auto_accept", False)),
        autosign_file=opts.get("autosign_file"),
        autoreject_file=opts.get("autoreject_file"),
        open_mode=bool(opts.get("open_mode", False)),
        throttle=throttle_from_opts(opts),
    )
    keys.load()
    return SharedState(keys=keys, job_cache=JobCache(store, JOBS_PREFIX), store=store)


def master_records(store: Store, default_ttl: float = 5.0) -> dict[str, dict]:
    """Every master that ever wrote ``cluster/masters/<id>``, with ``alive`` and ``last_seen_s``.

    A master is alive while its record is younger than its ``ttl`` (``ha_member_ttl``) and it
    has not marked itself ``stopped`` (a graceful stop does); clocks must be roughly in sync.
    """
    out: dict[str, dict] = {}
    now = time.time()
    for key in store.list(MASTERS_PREFIX):
        raw = store.get(key)
        if raw is None:
            continue
        try:
            rec = json.loads(raw)
            age = now - float(rec["ts"])
            ttl = float(rec.get("ttl", default_ttl))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed cluster record %s", key)
            continue
        if not isinstance(rec, dict):
            continue
        rec["alive"] = age <= ttl and not rec.get("stopped")
        rec["last_seen_s"] = round(age, 2)
        out[key.rsplit("/", 1)[-1]] = rec
    return out


def shared_config(store: Store) -> tuple[dict, list[str]]:
    """Merge the cluster's ``config/master.d/*.conf`` fragments (sorted by name)."""
    merged: dict[str, Any] = {}
    names: list[str] = []
    for key in sorted(store.list(CONFIG_PREFIX)):
        if not key.endswith(".conf"):
            continue
        raw = store.get(key)
        if raw is None:
            continue
        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            log.error("shared config fragment %s is not valid YAML, ignored: %s", key, exc)
            continue
        if not isinstance(data, dict):
            log.error("shared config fragment %s is not a mapping, ignored", key)
            continue
        for opt in sorted(set(data) & PER_HOST_OPTIONS):
            log.warning("shared config fragment %s sets per-host option %r; ignored", key, opt)
            data.pop(opt)
        merged.update(data)
        names.append(key)
    return merged, names


def config_hash(opts: dict) -> str:
    """Hash of the cluster-relevant effective config (per-host options left out)."""
    relevant = {k: v for k, v in opts.items() if k not in PER_HOST_OPTIONS}
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

"""Where a master keeps its state: local directories (one master) or a shared store (a cluster).

Without ``ha_dir`` (and with the default ``ha_backend: fs``) a master keeps Salt's local layout:
keys in ``pki_dir``, jobs under ``cachedir``, files in ``file_roots``. With a shared backend,
every master of the cluster reads and writes the same store:
``pki/master/…`` (master keypair and minion keys), ``jobs/<jid>/…``, ``file_roots/<env>/…``,
``config/master.d/*.conf`` and ``cluster/…`` (membership: :mod:`hamaster.master.membership`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from hamaster.config import master_options
from hamaster.jobs.cache import JOBS_PREFIX, JobCache, open_job_cache
from hamaster.options import HOST
from hamaster.pki_sync.keys import KeyRegistry, open_key_registry, throttle_from_opts
from hamaster.store.base import Store
from hamaster.store.registry import DEFAULT_BACKEND, open_backend

log = logging.getLogger(__name__)

KEYS_PREFIX = "pki/master/"
CONFIG_PREFIX = "config/master.d/"

#: Options that describe one host, never taken from a shared fragment and left out of the
#: cluster config hash (they legitimately differ between masters): the option table's
#: ``scope: host`` ones, and Salt's ``user`` (not honoured, still one host's).
PER_HOST_OPTIONS = frozenset(
    {name for name, o in master_options().items() if o.scope == HOST} | {"user"})


def is_ha(opts: dict) -> bool:
    """True when this master shares its state with others."""
    return bool(opts.get("ha_dir")) or opts.get("ha_backend", DEFAULT_BACKEND) != "fs"


def open_store(opts: dict) -> Store:
    """The shared store named by ``ha_backend`` (:mod:`hamaster.store.registry`)."""
    return open_backend(opts)


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

"""The job cache: each job's load and every minion's return, kept on a store under ``jobs/``.

Layout: ``jobs/<jid>/load`` and ``jobs/<jid>/returns/<minion_id>``, values msgpack. On a shared
store any master can answer ``jobs.lookup_jid`` for a job published by another.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Collection
from typing import Any

import msgpack

from hamaster import ids
from hamaster.jobs.jid import is_jid, start_time
from hamaster.options import opt
from hamaster.store.base import Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

#: Where the job cache lives in a store (the one definition; ``master/shared.py`` uses it).
JOBS_PREFIX = "jobs"
#: Single-master job cache directory, relative to ``cachedir``.
JOBS_STORE_DIRNAME = "jobs_store"


_check_jid = ids.check_jid
_check_minion = ids.check_minion_id


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        log.warning("job cache: %s is not valid msgpack (%s); ignoring it", what, exc)
        return None


class JobCache:
    """Job loads and returns on a :class:`Store`."""

    def __init__(self, store: Store, prefix: str = JOBS_PREFIX):
        """Use ``store`` with keys under ``prefix`` (default ``jobs``)."""
        self.store = store
        self.prefix = prefix.strip("/")
        self._skipped: set[str] = set()

    def _load_key(self, jid: str) -> str:
        return f"{self.prefix}/{_check_jid(jid)}/load"

    def _ret_key(self, jid: str, mid: str) -> str:
        return f"{self.prefix}/{_check_jid(jid)}/returns/{_check_minion(mid)}"

    def save_load(self, jid: str, load: dict[str, Any]) -> None:
        """Record the job's load (fun, arg, tgt, tgt_type, user, minions …)."""
        self.store.put(self._load_key(jid), _pack(load))

    def save_return(self, jid: str, minion_id: str, ret: dict[str, Any]) -> None:
        """Record one minion's return for ``jid`` (a later return replaces an earlier one)."""
        self.store.put(self._ret_key(jid, minion_id), _pack(ret))

    def save_returns(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Record a batch of ``(jid, minion_id, ret)`` returns (one ``put_many`` on the store)."""
        self.store.put_many([(self._ret_key(jid, mid), _pack(ret)) for jid, mid, ret in items])

    def get_load(self, jid: str) -> dict[str, Any] | None:
        """The job's load, or None if unknown."""
        key = self._load_key(jid)
        raw = self.store.get(key)
        return None if raw is None else _unpack(raw, key)

    def get_returns(self, jid: str) -> dict[str, dict[str, Any]]:
        """Minion id → return for ``jid``."""
        base = f"{self.prefix}/{_check_jid(jid)}/returns"
        out: dict[str, dict[str, Any]] = {}
        for key, raw in self.store.get_many(base).items():
            mid = key[len(base) + 1:]
            if not ids.valid_minion_id(mid):  # the rule every write was checked with
                continue
            ret = _unpack(raw, key)
            if ret is not None:
                out[mid] = ret
        return out

    def get_new_returns(self, jid: str, known: Collection[str]) -> dict[str, dict[str, Any]]:
        """Minion id → return for ``jid``, for the minions not in ``known`` only: a listing,
        then a read of the new ones (a waiter polling a job of thousands of minions must not
        re-read and unpack every return on each pass)."""
        base = f"{self.prefix}/{_check_jid(jid)}/returns"
        out: dict[str, dict[str, Any]] = {}
        for key in self.store.list(base):
            mid = key[len(base) + 1:]
            if mid in known or not ids.valid_minion_id(mid):
                continue
            raw = self.store.get(key)
            ret = _unpack(raw, key) if raw is not None else None
            if ret is not None:
                out[mid] = ret
        return out

    def _names(self) -> set[str]:
        """Every first-level name under the prefix (valid jids or not)."""
        return {k[len(self.prefix) + 1:].split("/", 1)[0] for k in self.store.list(self.prefix)}

    def list_jids(self) -> list[str]:
        """All valid jids with a load or a return, sorted (other names are ignored)."""
        return sorted(j for j in self._names() if is_jid(j))

    def list_jobs(self) -> dict[str, dict[str, Any]]:
        """jid → summary like Salt's ``jobs.list_jobs`` (Function, Arguments, Target …)."""
        out: dict[str, dict[str, Any]] = {}
        for jid in self.list_jids():
            load = self.get_load(jid)
            if not isinstance(load, dict):
                continue
            out[jid] = {
                "Function": load.get("fun", "unknown-function"),
                "Arguments": list(load.get("arg", [])),
                "Target": load.get("tgt", "unknown-target"),
                "Target-type": load.get("tgt_type", "glob"),
                "User": load.get("user", "root"),
                "StartTime": start_time(jid),
            }
        return out

    def clean_old(self, keep_hours: float) -> int:
        """Delete jobs whose jid is older than ``keep_hours``; returns how many jobs.

        A name that is not a valid jid (written by an older version or by hand), or a job that
        cannot be deleted for a reason other than an outage, is skipped with one warning per
        name and process: one bad entry never stops the others from expiring.
        ``StoreUnavailable`` ends the pass (the next pass retries).
        """
        cutoff = datetime.datetime.now() - datetime.timedelta(hours=keep_hours)
        removed = 0
        for name in sorted(self._names()):
            when = ids.jid_time(name)
            if when is None:
                self._skip_once(name, "its name is not a valid jid")
                continue
            if when >= cutoff:
                continue
            try:
                self.store.delete_tree(f"{self.prefix}/{name}")
            except StoreUnavailable:
                raise
            except (ValueError, OSError, StoreError) as exc:
                self._skip_once(name, f"cannot delete it: {exc}")
                continue
            removed += 1
        if removed:
            log.info("job cache: removed %d jobs older than %s hours", removed, keep_hours)
        return removed

    def _skip_once(self, name: str, why: str) -> None:
        if name in self._skipped:
            return
        if len(self._skipped) >= 10000:
            self._skipped.clear()
        self._skipped.add(name)
        log.warning("job cache: skipping %s/%s in expiry: %s", self.prefix, ids.shown(name), why)


def job_summary(load: dict[str, Any]) -> dict[str, Any]:
    """A job's load as the ``Function``/``Arguments``/``Target``… summary of Salt's
    ``jobs.print_job`` and the REST API's ``GET /jobs/<jid>`` (missing fields are None)."""
    return {
        "Function": load.get("fun"),
        "Arguments": load.get("arg", []),
        "Target": load.get("tgt"),
        "Target-type": load.get("tgt_type"),
        "User": load.get("user"),
        "StartTime": load.get("_stamp"),
    }


def open_job_cache(opts: dict[str, Any]) -> JobCache:
    """Single-master job cache: an FsStore at ``<cachedir>/jobs_store`` (keys ``jobs/<jid>/…``)."""
    from hamaster.store.fs import FsStore

    store = FsStore(os.path.join(opts["cachedir"], JOBS_STORE_DIRNAME),
                    poll_interval=opt(opts, "ha_poll_interval"))
    return JobCache(store)

"""Master-side runner functions for ``hamaster-run``: jobs.*, manage.*, cluster.*, fileroots.*,
pillar.* (and, registered by :mod:`hamaster.master.events`, state.event, schedule.list and
salt.execute).

Each runner is ``async def name(ctx: RunnerContext, *args, **kwargs)``, registered in
:data:`RUNNERS`. A runner gets a :class:`RunnerContext` — the parts of the master runners use,
nothing else — never the ``Master`` itself.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hamaster.jobs.cache import job_summary
from hamaster.jobs.jid import start_time

if TYPE_CHECKING:
    from hamaster.fileroots.manifest import BlobCache
    from hamaster.jobs.cache import JobCache
    from hamaster.master.daemon import Master
    from hamaster.master.events import EventServices
    from hamaster.master.jobs import JobTracker
    from hamaster.pki_sync.keys import KeyRegistry
    from hamaster.store.base import Store


class RunnerError(Exception):
    """A runner that does not exist or was called wrongly."""


@dataclass(frozen=True)
class RunnerContext:
    """What a runner may use of the master running it (built once by the master)."""

    #: The master's options (read-only by convention).
    opts: dict
    master_id: str
    #: The shared store; None for a single master.
    store: Store | None
    keys: KeyRegistry
    job_cache: JobCache
    #: Jobs in this master's memory (publications and returns seen here).
    tracker: JobTracker
    #: ``publish(tgt, fun, arg, tgt_type=, ret=, user=, jid=)`` → ``{"jid", "minions"}`` or
    #: ``{"jid": None, "error"}`` (call it on the master's event loop).
    publish: Callable[..., dict]
    #: Cached grains by minion id (the minion data cache; read-only).
    grains: Mapping[str, dict]
    #: ``compile_pillar(minion_id, grains, pillarenv)`` (blocking: call it from a thread).
    compile_pillar: Callable[[str, dict, str | None], dict]
    #: This master's file-blob cache (file_roots by manifest); None for a single master.
    blob_cache: BlobCache | None
    #: ``cluster.status``'s report, made by the master from its own state (its record, its
    #: store health, the membership view, the leader lease, its master-key checks).
    cluster_status: Callable[[], Awaitable[dict]]
    #: The event bus, reactor and schedule of this master (:mod:`hamaster.master.events`).
    events: EventServices | None = None


async def jobs_list_jobs(ctx: RunnerContext) -> dict:
    """All jobs in the job cache, newest last, as Salt's ``jobs.list_jobs``."""
    jobs = await asyncio.to_thread(ctx.job_cache.list_jobs)
    for jid, rec in ctx.tracker.jobs.items():
        if jid not in jobs:
            jobs[jid] = job_summary(rec.load)
    return dict(sorted(jobs.items()))


async def jobs_lookup_jid(ctx: RunnerContext, jid: str,
                          ext_source: str | None = None, missing: bool = False) -> dict:
    """Returns of job ``jid``: ``{minion_id: return}``, from every master's returns."""
    jid = str(jid)
    rets = await asyncio.to_thread(ctx.job_cache.get_returns, jid)
    rec = ctx.tracker.jobs.get(jid)
    if rec is not None:
        for mid, ret in rec.returns.items():
            rets.setdefault(mid, ret)
    out = {mid: r.get("return") if isinstance(r, dict) else r for mid, r in sorted(rets.items())}
    if missing and rec is not None:
        for mid in rec.minions:
            out.setdefault(mid, "Minion did not return. [No response]")
    return out


async def jobs_active(ctx: RunnerContext, display_progress: bool = False) -> dict:
    """Jobs running now, by jid, as Salt's ``jobs.active``: asks every minion
    (``saltutil.running``, through this master) and adds who has returned already.

    ``{jid: {Function, Arguments, Target, Target-type, User, StartTime,
    Running: [{minion: pid}], Returned: [minion]}}``.
    """
    pub = ctx.publish("*", "saltutil.running", [], tgt_type="glob")
    if not pub.get("jid"):
        return {}
    answers: dict[str, Any] = {}

    async def got(mid: str, ret: dict) -> None:
        answers[mid] = ret.get("return")

    timeout = float(ctx.opts.get("timeout", 5))
    await ctx.tracker.collect(pub["jid"], set(pub["minions"]), timeout, got)
    out: dict[str, dict] = {}
    for mid, jobs in sorted(answers.items()):
        if not isinstance(jobs, list):
            continue
        for job in jobs:
            if not isinstance(job, dict) or not job.get("jid"):
                continue
            jid = str(job["jid"])
            if jid not in out:
                out[jid] = {
                    "Function": job.get("fun", "unknown-function"),
                    "Arguments": list(job.get("arg") or []),
                    "Target": job.get("tgt", "unknown-target"),
                    "Target-type": job.get("tgt_type", "list"),
                    "User": job.get("user", "root"),
                    "StartTime": start_time(jid),
                    "Running": [],
                    "Returned": [],
                }
            out[jid]["Running"].append({mid: job.get("pid")})
    for jid, entry in out.items():
        returned = await asyncio.to_thread(ctx.job_cache.get_returns, jid)
        rec = ctx.tracker.jobs.get(jid)
        entry["Returned"] = sorted(set(returned) | set(rec.returns if rec else ()))
    return out


async def jobs_print_job(ctx: RunnerContext, jid: str) -> dict:
    """Load and returns of one job."""
    jid = str(jid)
    load = await asyncio.to_thread(ctx.job_cache.get_load, jid)
    if load is None and jid in ctx.tracker.jobs:
        load = ctx.tracker.jobs[jid].load
    if load is None:
        return {}
    summary = job_summary(load)
    summary["Result"] = await jobs_lookup_jid(ctx, jid)
    return {jid: summary}


async def _ping_all(ctx: RunnerContext, timeout: float) -> tuple[list[str], list[str]]:
    pub = ctx.publish("*", "test.ping", [], tgt_type="glob")
    expected = set(pub.get("minions") or [])
    if not pub.get("jid"):
        return [], sorted(ctx.keys.accepted_ids())
    seen = await ctx.tracker.collect(pub["jid"], expected, timeout)
    accepted = set(ctx.keys.accepted_ids())
    return sorted(seen & accepted), sorted(accepted - seen)


async def manage_status(ctx: RunnerContext, timeout: float | None = None) -> dict:
    """Ping every accepted minion: ``{"up": [...], "down": [...]}``."""
    up, down = await _ping_all(ctx, float(timeout or ctx.opts.get("timeout", 5)))
    return {"up": up, "down": down}


async def manage_up(ctx: RunnerContext, timeout: float | None = None) -> list[str]:
    """Accepted minions that answered a ping."""
    return (await manage_status(ctx, timeout))["up"]


async def manage_down(ctx: RunnerContext, timeout: float | None = None) -> list[str]:
    """Accepted minions that did not answer a ping."""
    return (await manage_status(ctx, timeout))["down"]


RUNNERS: dict[str, Callable[..., Awaitable[Any]]] = {
    "jobs.active": jobs_active,
    "jobs.list_jobs": jobs_list_jobs,
    "jobs.lookup_jid": jobs_lookup_jid,
    "jobs.print_job": jobs_print_job,
    "manage.status": manage_status,
    "manage.up": manage_up,
    "manage.down": manage_down,
}


def register(name: str, fn: Callable[..., Awaitable[Any]]) -> None:
    """Add a runner (used by the HA layer for ``cluster.*``)."""
    RUNNERS[name] = fn


async def run_runner(ctx: RunnerContext, fun: str, args: list, kwargs: dict) -> Any:
    """Call runner ``fun`` with CLI-style args and ``ctx``; raises :class:`RunnerError` on
    misuse."""
    fn = RUNNERS.get(fun)
    if fn is None:
        raise RunnerError(f"'{fun}' is not available. Available runners: "
                          f"{', '.join(sorted(RUNNERS))}")
    try:
        inspect.signature(fn).bind(ctx, *args, **kwargs)
    except TypeError as exc:
        raise RunnerError(f"Passed invalid arguments to {fun}: {exc}") from None
    return await fn(ctx, *args, **kwargs)


async def cluster_status(ctx: RunnerContext) -> dict:
    """Masters of the cluster: alive, last seen, version, config and file_roots hashes, master-key
    fingerprint, store health; drift flags for config, file_roots and the master key."""
    return await ctx.cluster_status()


async def cluster_status_report(master: Master) -> dict:
    """``cluster.status`` of ``master``: the daemon's own view (its record, store health flag,
    last membership view, leader lease, master-key checks), hence given the master; it is the
    :attr:`RunnerContext.cluster_status` the daemon builds, not a runner."""
    if not master.state.ha:
        return {
            "masters": {master.master_id: {**master.cluster_record(),
                                           "alive": True, "last_seen_s": 0.0}},
            "ha": False,
            "drift": {"config": False, "fileroots": False, "master_key": False,
                      "pillar": False},
        }
    store_ok = master.keys.store.healthy() and master._store_ok
    error = "the shared store is unreachable (see the master log)"
    if store_ok:
        try:
            masters = await asyncio.to_thread(master.cluster_masters)
            master.last_cluster_view = masters
        except Exception as exc:
            store_ok = False
            error = str(exc)
    if not store_ok:
        # Known down: answer at once from the last view instead of waiting for a store timeout.
        masters = dict(master.last_cluster_view)
        masters[master.master_id] = {**master.cluster_record(), "alive": True, "last_seen_s": 0.0}
        masters["_error"] = {"store": error}
    alive = [r for r in masters.values() if r.get("alive")]
    events = getattr(master, "events", None)   # the leader lease (hamaster/master/events.py)
    leader = await asyncio.to_thread(events.leader_status) if events and store_ok else {}
    return {
        "ha": True,
        "backend": master.opts.get("ha_backend", "fs"),
        "store_ok": store_ok,
        "leader": leader,
        "masters": masters,
        "drift": {
            "config": len({r.get("config_hash") for r in alive}) > 1,
            "fileroots": len({r.get("fileroots_hash") for r in alive}) > 1,
            "pillar": len({r.get("pillar_hash") for r in alive}) > 1,
            # every live master must serve the cluster's one master key (Salt's pem_finger)
            "master_key": len({r.get("master_key_finger") for r in alive
                               if r.get("master_key_finger")} | {master.master_finger}) > 1,
        },
        "master_key": {"finger": master.master_finger,
                       "mismatch": bool(master._key_mismatch_store or master._key_mismatch_peers)},
    }


RUNNERS["cluster.status"] = cluster_status


# -- fileroots.* (file_roots by manifest: hamaster/fileroots/manifest.py) ------------------------


async def fileroots_push(ctx: RunnerContext, src_dir: str, saltenv: str = "base") -> dict:
    """Publish the directory ``src_dir`` (on this master) as ``saltenv`` through the manifest.

    Files go into this master's blob cache, small ones inline into the shared store; the
    manifest then names them (files gone from ``src_dir`` are removed). Other masters fetch
    large blobs from this one by hash.
    """
    from hamaster.fileroots.manifest import publish

    store = ctx.store
    cache = ctx.blob_cache
    if store is None or cache is None:
        raise RunnerError("fileroots.push needs a clustered master (a shared store, ha_backend)")
    try:
        return await asyncio.to_thread(publish, store, cache, str(src_dir), str(saltenv))
    except ValueError as exc:
        raise RunnerError(f"fileroots.push: {exc}") from None


async def fileroots_list(ctx: RunnerContext, saltenv: str | None = None) -> dict:
    """The manifest: ``{env: {path: {sha256, size, mode, inline, present}}}``.

    ``present`` says whether this master can serve the file now (inline, or in its cache).
    """
    from hamaster.fileroots.manifest import load_manifest

    store = ctx.store
    if store is None:
        return {}
    cache = ctx.blob_cache
    try:
        entries = await asyncio.to_thread(load_manifest, store, str(saltenv) if saltenv else None)
    except ValueError as exc:
        raise RunnerError(f"fileroots.list: {exc}") from None
    out: dict[str, dict] = {}
    for (env, path), e in sorted(entries.items()):
        out.setdefault(env, {})[path] = {
            "sha256": e.sha256, "size": e.size, "mode": f"{e.mode:04o}", "inline": e.inline,
            "present": e.inline or (cache is not None and cache.has(e.sha256)),
        }
    return out


async def pillar_push(ctx: RunnerContext, src_dir: str, saltenv: str = "base") -> dict:
    """Publish the directory ``src_dir`` (on this master) as ``pillar_roots/<saltenv>/`` in the
    shared store (any backend); files gone from ``src_dir`` are removed from the store."""
    from hamaster.pillar.tree import push

    store = ctx.store
    if store is None:
        raise RunnerError("pillar.push needs a clustered master (a shared store, ha_backend)")
    try:
        return await asyncio.to_thread(push, store, str(src_dir), str(saltenv))
    except ValueError as exc:
        raise RunnerError(f"pillar.push: {exc}") from None


async def pillar_show(ctx: RunnerContext, minion: str, pillarenv: str | None = None) -> dict:
    """The pillar this master compiles for ``minion`` (with its cached grains), like Salt's
    ``pillar.show_pillar`` runner."""
    grains = ctx.grains.get(str(minion)) or {"id": str(minion)}
    return await asyncio.to_thread(ctx.compile_pillar, str(minion), grains,
                                   str(pillarenv) if pillarenv else None)


async def pillar_gpg_push(ctx: RunnerContext, keyfile: str) -> dict:
    """Store the cluster's pillar GPG key (an armored *secret* key export, e.g. from
    ``gpg --armor --export-secret-keys``) in the shared store; every master imports it."""
    import hashlib

    from hamaster.pillar.gpg import STORE_KEY

    store = ctx.store
    if store is None:
        raise RunnerError("pillar.gpg_push needs a clustered master; use gpg_keydir on one master")
    try:
        with open(str(keyfile), "rb") as fh:
            data = fh.read(1 << 20)
    except OSError as exc:
        raise RunnerError(f"pillar.gpg_push: {exc}") from None
    if b"-----BEGIN PGP PRIVATE KEY BLOCK-----" not in data:
        raise RunnerError("pillar.gpg_push: not an armored secret key export "
                          "(gpg --armor --export-secret-keys)")
    await asyncio.to_thread(store.put, STORE_KEY, data)
    return {"stored": STORE_KEY, "sha256": hashlib.sha256(data).hexdigest()}


register("pillar.gpg_push", pillar_gpg_push)
register("pillar.push", pillar_push)
register("pillar.show_pillar", pillar_show)
register("fileroots.push", fileroots_push)
register("fileroots.list", fileroots_list)

"""Wires the leader lease, the event bus, the reactor and the master schedule into a master.

The parts live in :mod:`hamaster.events` (which imports nothing of the master); this module is
the master's side of them. ``master/daemon.py`` calls :meth:`EventServices.for_master` once,
``start()`` when serving, ``close()`` when stopping, and ``emit(...)`` at the points where
Salt's master fires events.
Without a shared store (a single master) the bus, the lease, the reactor and the schedule use a
private fs store under ``cachedir/events`` (the master is then always the leader).
Also registers the runners ``state.event``, ``schedule.list`` and ``salt.execute``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from hamaster.events.bus import (
    DEFAULT_MEMORY,
    DEFAULT_MERGE_WINDOW,
    DEFAULT_RETENTION,
    EventBus,
    decode_position,
    encode_position,
)
from hamaster.events.reactor import Reactor, ReactorHost, parse_reactor_option, read_sls_file
from hamaster.events.schedule import Scheduler, parse_schedule_option
from hamaster.master import runners
from hamaster.master.leader import LeaderElector, elector_for
from hamaster.master.runners import RunnerContext
from hamaster.options import opt
from hamaster.store.base import Lease, StoreError
from hamaster.store.fs import FsStore

if TYPE_CHECKING:
    from hamaster.master.daemon import Master

log = logging.getLogger(__name__)

#: Every this many seconds the leader deletes reactor claims past their retention.
CLAIM_SWEEP_EVERY = 600.0
KEY_ACTS = {"accepted": "accept", "pending": "pend", "rejected": "reject", "denied": "denied"}


class _Host(ReactorHost):
    def __init__(self, master: Master, loop: asyncio.AbstractEventLoop) -> None:
        self.master = master
        self.loop = loop

    def _on_loop(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def read_sls(self, path: str) -> str:
        return read_sls_file(path, self._salt_file)

    def _salt_file(self, rel: str, env: str) -> bytes | None:
        chunks: list[bytes] = []
        offset = 0
        while True:
            ret = self.master.files.serve_file({"path": rel, "saltenv": env, "loc": offset})
            data = ret.get("data") if isinstance(ret, dict) else None
            if isinstance(data, str):
                data = data.encode()
            if not data:
                break
            chunks.append(data)
            offset += len(data)
        if not chunks and not (isinstance(ret, dict) and ret.get("dest")):
            return None
        return b"".join(chunks)

    def publish(self, tgt: Any, fun: str, arg: list, tgt_type: str, jid: str) -> dict:
        async def go() -> dict:
            return self.master.publish(tgt, fun, arg, tgt_type=tgt_type, jid=jid)

        return self._on_loop(go(), 30.0)

    def runner(self, fun: str, arg: list, kwarg: dict) -> Any:
        return self._on_loop(runners.run_runner(self.master.runner_ctx, fun, arg, kwarg))

    def wheel_key(self, fun: str, match: str) -> Any:
        keys = self.master.keys
        if fun == "key.accept":
            return keys.accept(match)
        if fun == "key.reject":
            return keys.reject(match, include_accepted=True)
        return keys.delete(match)


class EventServices:
    """The lease campaign, the bus, the reactor and the schedule of one master."""

    def __init__(self, master: Master) -> None:
        self.master = master
        opts = master.opts
        store = master.state.store
        self.rules = parse_reactor_option(opts.get("reactor"))
        self.jobs = parse_schedule_option(opts.get("schedule"))
        self._own_store: FsStore | None = None
        if store is None:   # a single master: a private store for the bus, lease and claims
            self._own_store = store = FsStore(
                os.path.join(opts["cachedir"], "events"),
                poll_interval=float(opt(opts, "ha_poll_interval")))
        self.store = store
        self.elector: LeaderElector | None = elector_for(opts, store, master.master_id,
                                                         master.metrics)
        self.bus: EventBus | None = None
        if store is not None:
            self.bus = EventBus(store, master.master_id, master.metrics,
                                retention=_option("event_retention", opts.get("event_retention"),
                                                  DEFAULT_RETENTION),
                                memory=int(_option("event_memory", opts.get("event_memory"),
                                                   DEFAULT_MEMORY)),
                                merge_window=_option("event_merge_window",
                                                     opts.get("event_merge_window"),
                                                     DEFAULT_MERGE_WINDOW, zero_ok=True))
        self.reactor: Reactor | None = None
        self.scheduler: Scheduler | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store_ok = True
        self._alive: set[str] | None = None
        if self.elector is not None:
            self.elector.on_change(self._on_leader_change)
        master.handler.on_auth = self._on_auth
        master.keys.on_change(self._on_key_change)

    @classmethod
    def for_master(cls, master: Master) -> EventServices:
        """The services of ``master`` (raises when reactor/schedule cannot run on its backend)."""
        return cls(master)

    # -- emitting -----------------------------------------------------------------------------

    def emit(self, tag: str, data: Any, merge_id: str | None = None) -> None:
        """Put an event on the cluster bus (no-op without one). Never blocks or raises."""
        if self.bus is not None:
            self.bus.emit(tag, data, merge_id)

    def minion_event(self, load: dict) -> None:
        """``_minion_event`` from a minion: each event on the bus, copies merged cluster-wide."""
        mid = str(load.get("id"))
        if isinstance(load.get("events"), list):
            for item in load["events"]:
                if isinstance(item, dict) and isinstance(item.get("tag"), str):
                    data = item.get("data", item)
                    self.emit(item["tag"], data if isinstance(data, dict) else {"data": data},
                              merge_id=mid)
            return
        tag = load.get("tag")
        if not isinstance(tag, str) or not tag:
            return
        data = {k: v for k, v in load.items() if k not in ("tok", "nonce")}
        if self.bus is not None:
            self.bus.emit(tag, data, merge_id=mid, merge_data=load.get("data"))

    def job_new(self, jid: str, load: dict, minions: list[str]) -> None:
        """``salt/job/<jid>/new``."""
        data = {"jid": jid, "tgt": load.get("tgt"), "tgt_type": load.get("tgt_type"),
                "minions": minions, "fun": load.get("fun"), "arg": load.get("arg", []),
                "user": load.get("user"), "master_id": self.master.master_id}
        self.emit(f"salt/job/{jid}/new", data)

    def job_ret(self, jid: str, mid: str, ret: dict) -> None:
        """``salt/job/<jid>/ret/<id>``."""
        self.emit(f"salt/job/{jid}/ret/{mid}", {"cmd": "_return", **ret})

    def _on_auth(self, mid: str, act: str, result: bool, pub: str) -> None:
        self.emit("salt/auth", {"id": mid, "act": act, "result": result, "pub": pub})

    def _on_key_change(self, mid: str, old: Any, new: Any) -> None:
        act = KEY_ACTS.get(new.value, str(new.value)) if new is not None else "delete"
        # Every master sees the change through its watch: merged into one event.
        self.emit("salt/key", {"id": mid, "act": act, "result": True}, merge_id=f"key:{mid}")

    def _on_leader_change(self, old: Lease | None, new: Lease | None) -> None:
        if new is not None:
            self.emit("hamaster/cluster/leader", {"leader": self.master.master_id,
                                                  "epoch": new.epoch})

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the bus, start the campaign, reactor and schedule (blocking parts off-loop)."""
        self._loop = asyncio.get_running_loop()
        master = self.master
        if self.bus is not None:
            await asyncio.to_thread(self.bus.attach)
            if self._own_store is not None:
                self._own_store.start()
            self.bus.start()
            self.emit(f"hamaster/cluster/master/{master.master_id}/up",
                      {"master_id": master.master_id})
        if self.elector is not None:
            assert self.bus is not None
            if self.rules:
                self.reactor = Reactor(self.rules, self.store, self.bus,
                                       self.elector.lease, _Host(master, self._loop),
                                       master.master_id, master.metrics)
                self.reactor.start()
            if self.jobs:
                self.scheduler = Scheduler(self.jobs, self.store, self.elector.lease,
                                           self._submit, master.master_id, master.metrics)
                self.scheduler.start()
            self.elector.start()
            self._tasks.append(asyncio.create_task(self._watch_cluster(), name="cluster-events"))

    def _submit(self, fun: str, args: list, kwargs: dict) -> concurrent.futures.Future:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(
            runners.run_runner(self.master.runner_ctx, fun, args, kwargs), self._loop)

    async def _watch_cluster(self) -> None:
        """Store down/up on this master; master down (seen by the leader, emitted once); the
        leader deletes reactor claims past their retention every ``CLAIM_SWEEP_EVERY`` s."""
        last_claim_sweep = time.monotonic()
        while True:
            await asyncio.sleep(2.0)
            ok = self.store.healthy() and (self.master._store_ok or not self.master.state.ha)
            if ok != self._store_ok:
                self._store_ok = ok
                self.emit(f"hamaster/cluster/store/{'up' if ok else 'down'}",
                          {"master_id": self.master.master_id})
            leading = self.elector is not None and self.elector.is_leader()
            if (leading and self.reactor is not None
                    and time.monotonic() - last_claim_sweep > CLAIM_SWEEP_EVERY):
                last_claim_sweep = time.monotonic()
                try:
                    gone = await asyncio.to_thread(self.reactor.sweep_claims)
                    if gone:
                        log.info("reactor: %d claims past their retention deleted", gone)
                except StoreError as exc:
                    log.warning("reactor: claim sweep failed: %s", exc)
            if not leading or not self.master.state.ha:
                self._alive = None
                continue
            try:
                recs = await asyncio.to_thread(self.master.cluster_masters)
            except Exception:
                continue
            alive = {mid for mid, r in recs.items() if r.get("alive")}
            if self._alive is not None:
                for mid in sorted(self._alive - alive):
                    self.emit(f"hamaster/cluster/master/{mid}/down", {"master_id": mid})
            self._alive = alive

    async def close(self) -> None:
        """Stop everything; release the lease so another master leads at once."""
        for t in self._tasks:
            t.cancel()
        if self.bus is not None:
            self.emit(f"hamaster/cluster/master/{self.master.master_id}/down",
                      {"master_id": self.master.master_id, "graceful": True})
        for part in (self.scheduler, self.reactor):
            if part is not None:
                await asyncio.to_thread(part.stop)
        if self.elector is not None:
            await asyncio.to_thread(self.elector.stop, True)
        if self.bus is not None:
            await asyncio.to_thread(self.bus.stop)
        if self._own_store is not None:
            await asyncio.to_thread(self._own_store.close)

    def leader_status(self) -> dict:
        """For ``cluster.status`` (blocking: reads the store)."""
        if self.elector is None:
            return {"leader": None, "epoch": 0, "lease": self.store.lease_unsupported()}
        try:
            return self.elector.status()
        except StoreError as exc:
            return {"leader": None, "epoch": 0, "error": str(exc),
                    "this_master_leads": self.elector.is_leader()}


# -- runners ---------------------------------------------------------------------------------


def _option(name: str, raw: Any, default: float, zero_ok: bool = False) -> float:
    """Option ``name``'s value ``raw``, a positive number (``zero_ok``: 0 allowed too); null
    means the default; anything else is a configuration error naming the option."""
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {raw!r}")
    return value


def _services(ctx: RunnerContext) -> EventServices:
    svc = ctx.events
    if svc is None or svc.bus is None:
        raise runners.RunnerError("this master has no event bus")
    return svc


async def state_event(ctx: RunnerContext, tagmatch: str = "*", count: int = -1,
                      pretty: bool = False, position: str | None = None, wait: float = 1.0,
                      limit: int = 1000) -> dict:
    """One read of the cluster event stream (``hamaster-run state.event`` loops over it).

    ``{"events": [{"tag", "data", "source", "position"}], "position": "<resume here>"}``;
    waits up to ``wait`` seconds for a first matching event. ``position`` from any master;
    ``start`` for every retained event; none for events from now on.
    """
    svc = _services(ctx)
    assert svc.bus is not None
    try:
        since = {} if position == "start" else decode_position(position)
    except ValueError as exc:
        raise runners.RunnerError(str(exc)) from None
    if since is None:
        since = svc.bus.position()
    limit = max(1, min(int(limit), 10000 if int(count) < 0 else int(count)))
    deadline = time.monotonic() + max(0.0, min(float(wait), 30.0))
    while True:
        events, pos = svc.bus.read(since, str(tagmatch), limit)
        if events or time.monotonic() >= deadline:
            return {"events": [e.as_dict() for e in events], "position": encode_position(pos)}
        since = pos
        await asyncio.sleep(0.05)


async def schedule_list(ctx: RunnerContext) -> dict:
    """The master schedule: every job with its next fire time and newest slot run."""
    svc = ctx.events
    if svc is None or not svc.jobs:
        return {}
    if svc.scheduler is not None:
        return await asyncio.to_thread(svc.scheduler.listing)
    return {j.name: j.describe() for j in svc.jobs}


async def salt_execute(ctx: RunnerContext, tgt: Any, fun: str, arg: Any = (), timeout: Any = None,
                       tgt_type: str = "glob", ret: str = "", jid: str = "",
                       kwarg: dict | None = None) -> dict:
    """Salt's ``salt.execute``: publish ``fun`` to ``tgt`` and return ``{minion: return}``."""
    args = list(arg) if isinstance(arg, list | tuple) else [arg]
    if kwarg:
        args.append({"__kwarg__": True, **kwarg})
    pub = ctx.publish(tgt, str(fun), args, tgt_type=str(tgt_type), ret=str(ret or ""),
                         jid=str(jid) if jid else None)
    if not pub.get("jid"):
        return {}
    out: dict[str, Any] = {}

    async def got(mid: str, r: dict) -> None:
        out[mid] = r.get("return")

    wait = float(timeout or ctx.opts.get("timeout", 5))
    await ctx.tracker.collect(pub["jid"], set(pub["minions"]), wait, got)
    return out


runners.register("state.event", state_event)
runners.register("schedule.list", schedule_list)
runners.register("salt.execute", salt_execute)

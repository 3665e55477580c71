"""The minion daemon: connects to every configured master at once and runs their jobs.

One :class:`Minion` per identity holds a :class:`MasterConnection` per master. Jobs run in a
thread pool so they never block a connection; a jid that arrives from several masters runs
once; the return goes back through the master that published the job, or through any other
live master when that one is gone (the return keeps the origin ``master_id``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import time
from collections import OrderedDict
from typing import Any

import zmq.asyncio

from hamaster import targeting
from hamaster.minion.connection import MasterConnection, RequestFailed
from hamaster.minion.executor import execute
from hamaster.minion.grains_core import collect_grains
from hamaster.minion.identity import MinionIdentity
from hamaster.minion.modules.context import ExecContext
from hamaster.minion.modules.registry import FunctionRegistry

log = logging.getLogger(__name__)

SEEN_JIDS = 10000
# Functions that return at once and touch nothing: run on the event loop, no thread hop.
INLINE_FUNCTIONS = frozenset({
    "test.ping", "test.echo", "test.version", "test.arg", "test.kwarg", "test.true", "test.false",
    "grains.items", "grains.get", "grains.item", "grains.ls", "sys.list_functions",
    "sys.list_modules",
    "pillar.get", "pillar.item", "pillar.raw", "pillar.ls",
    # Salt's CLI probes a long job with saltutil.find_job (modules/saltutil.py): answered at
    # once from ``self.running``, and never listed there themselves.
    "saltutil.find_job", "saltutil.running",
})
RETURN_RETRY_WINDOW = 60.0
# A return is handed to another master when its origin takes longer than this to accept the
# frame at all (no connection: the origin was killed or is unreachable).
RETURN_CONNECT_WAIT = 1.0


class Minion:
    """One minion identity connected to all of its masters."""

    def __init__(
        self,
        opts: dict,
        ident: MinionIdentity,
        ctx: zmq.asyncio.Context,
        pool: concurrent.futures.ThreadPoolExecutor,
        registry: FunctionRegistry | None = None,
        grains: dict | None = None,
    ) -> None:
        self.opts = opts
        self.ident = ident
        self.ctx = ctx
        self.pool = pool
        self.registry = registry or FunctionRegistry()
        self.grains = grains if grains is not None else collect_grains(
            dict(opts, id=ident.minion_id))
        self.grains["id"] = ident.minion_id
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.running: dict[str, dict] = {}  # jid -> job data, as saltutil.find_job shows it
        self.pillar: dict = {}
        self._mine_task: asyncio.Task | None = None  # mine.update at start and every mine_interval
        self.connections: list[MasterConnection] = []
        for host, port in opts.get("master_list") or [(opts.get("master", "salt"),
                                                       int(opts.get("master_port", 4506)))]:
            self.connections.append(
                MasterConnection(ident, ctx, host, int(port),
                                 self._on_publication, self._on_connected)
            )
        self.failover = opts.get("master_type") == "failover"
        self._tasks: set[asyncio.Task] = set()

    @property
    def minion_id(self) -> str:
        """This identity's id."""
        return self.ident.minion_id

    def start(self) -> None:
        """Connect to all masters (or, with ``master_type: failover``, the first one up)."""
        self._loop = asyncio.get_running_loop()
        if self.failover:
            self._spawn(self._failover_loop())
        else:
            for conn in self.connections:
                conn.start()

    async def stop(self) -> None:
        """Close every master connection."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*(c.stop() for c in self.connections), return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        """Forget a finished task and log its exception once (never "never retrieved")."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed: %r", self.minion_id, task.get_name(), task.exception())

    async def _failover_loop(self) -> None:
        """Use one master at a time, in order; move on when it stops answering."""
        interval = (float(self.opts.get("master_alive_interval") or 0)
                    or float(self.opts.get("master_heartbeat_interval", 2)))
        idx = 0
        while True:
            conn = self.connections[idx % len(self.connections)]
            conn._stop.clear()
            conn.start()
            try:
                await asyncio.wait_for(conn.connected_event.wait(),
                                       timeout=max(float(self.opts.get("auth_timeout", 5)) * 2, 5))
            except TimeoutError:
                await conn.stop()
                idx += 1
                continue
            while conn.state == "connected" or conn.connected_event.is_set():
                await asyncio.sleep(interval)
                if not conn.alive:
                    break
            log.warning("%s: failover: master %s is gone, trying the next one",
                        self.minion_id, conn.name)
            await conn.stop()
            idx += 1

    # -- start-up calls ----------------------------------------------------------------------------

    async def _on_connected(self, conn: MasterConnection) -> None:
        try:
            self.pillar = await conn.request_pillar(self.grains)
        except Exception as exc:
            log.warning("%s: _pillar from %s failed: %s", self.minion_id, conn.name, exc)
        if self.opts.get("mine_functions") and self._mine_task is None:
            self._mine_task = self._spawn(self._mine_loop())
        for tag in ("minion_start", f"salt/minion/{self.minion_id}/start"):
            try:
                await conn.request(
                    {
                        "cmd": "_minion_event",
                        "id": self.minion_id,
                        "pretag": None,
                        "data": f"Minion {self.minion_id} started at {time.ctime()}",
                        "tag": tag,
                    },
                    retry_auth=False,
                )
            except RequestFailed as exc:
                log.debug("%s: start event to %s failed: %s", self.minion_id, conn.name, exc)
                break

    # -- jobs --------------------------------------------------------------------------------------

    def _on_publication(self, conn: MasterConnection, load: dict) -> None:
        jid = str(load.get("jid"))
        if jid in self.seen:
            return
        try:
            targeted = targeting.matches(
                load["tgt"], str(load.get("tgt_type", "glob")), self.minion_id, self.grains,
                str(load.get("delimiter", ":")), pillar=self.pillar,
            )
        except (ValueError, TypeError) as exc:
            log.warning("%s: bad target in job %s: %s", self.minion_id, jid, exc)
            return
        if not targeted:
            return
        self.seen[jid] = time.time()
        while len(self.seen) > SEEN_JIDS:
            self.seen.popitem(last=False)
        self._spawn(self._run_job(conn, load))

    async def _run_job(self, origin: MasterConnection, load: dict) -> None:
        fun = str(load.get("fun"))
        arg = load.get("arg") or []
        jid = str(load["jid"])
        ctx = ExecContext(
            opts=self.opts, grains=self.grains, minion_id=self.minion_id, jid=jid,
            pillar=self.pillar, registry=self.registry, running_jobs=self.running,
        )
        ctx.fetch_file = self._fetch_file_sync
        ctx.refresh_pillar = self._refresh_pillar_sync
        ctx.master_request = self._master_request_sync
        ctx.fire_master = self._fire_master_sync
        log.debug("%s: running %s for job %s", self.minion_id, fun, jid)
        if fun in INLINE_FUNCTIONS:
            result = execute(self.registry, ctx, fun, list(arg), load)
        else:
            self.running[jid] = {
                **{k: load[k] for k in ("fun", "arg", "tgt", "tgt_type", "user", "ret")
                   if k in load},
                "jid": jid,
                "pid": os.getpid(),
            }
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(self.pool, execute, self.registry,
                                                    ctx, fun, list(arg), load)
            finally:
                self.running.pop(jid, None)
        ret = {
            "cmd": "_return",
            "id": self.minion_id,
            "success": result.success,
            "return": result.ret,
            "retcode": result.retcode,
            "jid": jid,
            "fun": fun,
            "fun_args": list(arg),
            "user": load.get("user", "root"),
            "_stamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if load.get("master_id"):
            ret["master_id"] = load["master_id"]
        out = self.registry.outputter(fun)
        if out:
            ret["out"] = out
        await self._send_return(origin, ret)

    async def _send_return(self, origin: MasterConnection, ret: dict) -> None:
        """Return through the origin master; when it is known dead, or dies while we wait on
        it, through another live hamaster master at once (the return keeps the origin
        ``master_id``). A stock salt-master only knows the jobs it published itself.

        Failures are logged once per return; retries go on quietly with jitter until one master
        takes it or ``RETURN_RETRY_WINDOW`` runs out.
        """
        deadline = time.monotonic() + RETURN_RETRY_WINDOW
        failed: list[str] = []
        first_error = ""
        warned = False
        while True:
            others = [c for c in self.connections
                      if c is not origin and c.alive and c.is_hamaster and c.session is not None]
            candidates = ([origin] if origin.alive else []) + others
            if not origin.alive and not others and origin.session is not None:
                candidates = [origin]  # nobody else: keep trying the origin
            for conn in candidates:
                try:
                    await self._request_unless_dead(conn, ret,
                                                    fail_fast=bool(others) and conn is origin)
                except RequestFailed as exc:
                    if not failed:
                        first_error = f"via {conn.name}: {exc}"
                    failed.append(conn.name)
                    continue
                if conn is not origin:
                    log.info("%s: returned job %s through %s (origin %s %s)", self.minion_id,
                             ret["jid"], conn.name, origin.name,
                             "dead" if origin.dead.is_set() else "unreachable")
                return
            if failed and not warned:
                warned = True       # once per return; the retries go on quietly
                log.warning("%s: return of job %s not delivered yet (%s); retrying", self.minion_id,
                            ret["jid"], first_error)
            if time.monotonic() > deadline:
                log.error("%s: could not deliver the return of job %s to any master (tried %s)",
                          self.minion_id, ret["jid"], ", ".join(dict.fromkeys(failed)) or "none")
                return
            await asyncio.sleep(0.5 + random.random())

    @staticmethod
    async def _request_unless_dead(conn: MasterConnection, load: dict, fail_fast: bool) -> Any:
        """``conn.request(load)``, abandoned as soon as ``conn``'s heartbeat declares it dead.

        With ``fail_fast`` (another master could take it), also abandoned when the request cannot
        even be sent within ``RETURN_CONNECT_WAIT`` (no connection to the master: it was killed).
        """
        wait = RETURN_CONNECT_WAIT if fail_fast else None
        req = asyncio.ensure_future(conn.request(load, connect_wait=wait))
        death = asyncio.ensure_future(conn.dead.wait())
        try:
            await asyncio.wait({req, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            death.cancel()
        if req.done():
            return req.result()
        req.cancel()
        await asyncio.gather(req, return_exceptions=True)
        raise RequestFailed(f"{conn.name} declared dead while the request was in flight")

    def _fetch_file_sync(self, path: str, saltenv: str) -> bytes | None:
        """File client for cp.*: ask a live master for ``salt://`` content (called from a
        worker thread)."""
        from hamaster.minion.fileclient import fetch_file

        conns = [c for c in self.connections if c.alive]
        if not conns:
            return None
        loop = self._loop
        fut = asyncio.run_coroutine_threadsafe(fetch_file(conns, path, saltenv), loop)
        return fut.result(timeout=300)

    async def refresh_pillar(self) -> dict:
        """Fetch the pillar from the first live master that answers; keep and return it."""
        from hamaster.minion.modules.context import CommandExecutionError

        errors = []
        for conn in [c for c in self.connections if c.alive and c.session is not None]:
            try:
                self.pillar = await conn.request_pillar(self.grains)
                return self.pillar
            except Exception as exc:
                errors.append(f"{conn.name}: {exc}")
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise CommandExecutionError(f"no master answered _pillar{detail}")

    async def master_request(self, load: dict) -> Any:
        """Send ``load`` to the first live master that answers (hamaster masters first: they
        share the minion data cache)."""
        from hamaster.minion.modules.context import CommandExecutionError

        conns = [c for c in self.connections if c.alive and c.session is not None]
        conns.sort(key=lambda c: not c.is_hamaster)
        errors = []
        for conn in conns:
            try:
                return await conn.request(load)
            except RequestFailed as exc:
                errors.append(f"{conn.name}: {exc}")
        raise CommandExecutionError(f"no master answered {load.get('cmd')} ({'; '.join(errors)})")

    def _master_request_sync(self, load: dict) -> Any:
        """``master_request`` for module functions (called from a worker thread)."""
        return asyncio.run_coroutine_threadsafe(self.master_request(load),
                                                self._loop).result(timeout=120)

    def _refresh_pillar_sync(self) -> dict:
        """``refresh_pillar`` for module functions (called from a worker thread)."""
        return asyncio.run_coroutine_threadsafe(self.refresh_pillar(),
                                                self._loop).result(timeout=120)

    async def _mine_loop(self) -> None:
        """``mine.update`` at start, then every ``mine_interval`` minutes (Salt's default 60)."""
        interval = max(float(self.opts.get("mine_interval") or 60), 1.0) * 60
        loop = asyncio.get_running_loop()
        while True:
            ctx = ExecContext(opts=self.opts, grains=self.grains, minion_id=self.minion_id,
                              pillar=self.pillar, registry=self.registry)
            ctx.master_request = self._master_request_sync
            ctx.fetch_file = self._fetch_file_sync
            res = await loop.run_in_executor(self.pool, execute,
                                             self.registry, ctx, "mine.update", [])
            if not res.success:
                log.warning("%s: mine.update failed: %s", self.minion_id, res.ret)
            await asyncio.sleep(interval)
    def _fire_master_sync(self, tag: str, data: Any) -> bool:
        """``event.send``: one ``_minion_event`` to every live master (called from a worker
        thread); True if at least one took it."""
        conns = [c for c in self.connections if c.alive and c.session is not None]
        load = {"cmd": "_minion_event", "id": self.minion_id, "tag": tag, "data": data,
                "pretag": None}

        async def one(conn: MasterConnection) -> bool:
            try:
                await conn.request(dict(load), retry_auth=False)
                return True
            except RequestFailed as exc:
                log.debug("%s: event %s to %s failed: %s", self.minion_id, tag, conn.name, exc)
                return False

        async def send() -> bool:
            return any(await asyncio.gather(*(one(c) for c in conns)))

        return bool(conns) and asyncio.run_coroutine_threadsafe(send(), self._loop).result(60)

    async def run_forever(self) -> None:
        """Start and serve until cancelled."""
        self.start()
        await asyncio.Event().wait()

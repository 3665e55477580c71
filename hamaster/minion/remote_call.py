"""``hamaster-call FUN`` without ``--local``: run a function here, backed by this minion's masters.

Like ``salt-call``: the minion authenticates with its masters using its own key (so a pending or
rejected key is refused here too), fetches its pillar, and runs the function locally with the
masters as file server (``cp.get_file salt://…``). The first master that answers is enough.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import zmq.asyncio

from hamaster.minion.connection import MasterConnection
from hamaster.minion.executor import ExecResult, execute
from hamaster.minion.fileclient import fetch_file
from hamaster.minion.grains_core import collect_grains
from hamaster.minion.identity import MinionIdentity, resolve_minion_id
from hamaster.minion.modules.context import ExecContext
from hamaster.minion.modules.registry import FunctionRegistry

log = logging.getLogger(__name__)


async def _call(opts: dict, fun: str, arg: list) -> ExecResult:
    mid = resolve_minion_id(opts)
    ident = MinionIdentity(opts, mid)
    ctx = zmq.asyncio.Context()
    conns = [
        MasterConnection(ident, ctx, host, int(port), lambda c, load: None)
        for host, port in opts.get("master_list") or []
    ]
    try:
        for c in conns:
            c.start()
        waits = [asyncio.create_task(c.connected_event.wait()) for c in conns]
        timeout = (float(opts.get("auth_timeout", 5)) * 2
                   + float(opts.get("acceptance_wait_time", 10)))
        done, pending = await asyncio.wait(waits, timeout=timeout,
                                           return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        live = [c for c in conns if c.state == "connected"]
        if not live:
            states = ", ".join(f"{c.name}: {c.state}" for c in conns) or "no master configured"
            return ExecResult(
                f"no master accepted this minion ({states}); use --local to run without a master",
                1, False, "unavailable",
            )
        grains = collect_grains(dict(opts, id=mid))
        grains["id"] = mid
        pillar: dict = {}
        try:
            pillar = await live[0].request_pillar(grains)
        except Exception as exc:  # pillar is optional for a call
            log.warning("pillar from %s failed: %s", live[0].name, exc)
        loop = asyncio.get_running_loop()

        def fetch(path: str, saltenv: str) -> bytes | None:
            return asyncio.run_coroutine_threadsafe(fetch_file(live, path, saltenv),
                                                    loop).result(timeout=300)

        def request(load: dict) -> object:  # e.g. _file_list for file.recurse
            return asyncio.run_coroutine_threadsafe(live[0].request(load), loop).result(timeout=120)

        ectx = ExecContext(opts=opts, grains=grains, minion_id=mid, jid=None, pillar=pillar,
                           fetch_file=fetch,
                           master_request=request)
        registry = FunctionRegistry()
        ectx.registry = registry
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return await loop.run_in_executor(pool, execute, registry, ectx, fun, arg, None)
    finally:
        await asyncio.gather(*(c.stop() for c in conns), return_exceptions=True)
        ctx.term()


def run(opts: dict, fun: str, arg: list) -> ExecResult:
    """Run ``fun`` with ``arg`` after authenticating with this minion's masters."""
    return asyncio.run(_call(opts, fun, arg))

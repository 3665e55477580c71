"""The master's side of the REST API's door (:class:`hamaster.api.bridge.MasterBridge`).

Each method wraps one short coroutine and runs it on the master's event loop; the API awaits
it from its own loop (see :mod:`hamaster.api.bridge`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from hamaster.api.bridge import MasterBridge, OnReturn, RunnerRefused, TargetCheck, TargetRefused
from hamaster.master.runners import RunnerError, jobs_lookup_jid, run_runner
from hamaster.master.waiting import wait_job

if TYPE_CHECKING:
    from hamaster.master.daemon import Master


class MasterApiBridge(MasterBridge):
    """:class:`MasterBridge` over a running :class:`~hamaster.master.daemon.Master`; ``loop``
    is the master's event loop."""

    def __init__(self, master: Master, loop: asyncio.AbstractEventLoop) -> None:
        services = getattr(master, "events", None)
        bus = getattr(services, "bus", None)
        super().__init__(opts=master.opts, master_id=master.master_id, keys=master.keys,
                         metrics_registry=master.metrics.registry, store=master.state.store,
                         event_bus=bus, emit=services.emit if bus is not None else None)
        self._master = master
        self._loop = loop

    async def _on_master(self, coro: Coroutine[Any, Any, Any]) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise

    async def run_job(self, tgt: Any, tgt_type: str, fun: str, arg: list, *, user: str,
                      check: TargetCheck, wait: bool, timeout: float = 5.0,
                      gather_job_timeout: float = 0.0, ret: str = "",
                      on_return: OnReturn | None = None) -> tuple[dict, dict[str, dict]]:
        """See :meth:`MasterBridge.run_job`."""
        m = self._master

        async def job() -> tuple[dict, dict[str, dict]]:
            targeted = m.resolve_targets(tgt, tgt_type)

            def matches(expr: str) -> set[str]:
                try:
                    return set(m.resolve_targets(expr, "compound"))
                except ValueError:
                    return set()

            if not check(targeted, matches):
                raise TargetRefused(f"{fun} on {tgt!r}")
            pub = m.publish(tgt, fun, arg, tgt_type=tgt_type, ret=ret, user=user)
            rets: dict[str, dict] = {}
            if not pub.get("jid") or not wait:
                return pub, rets

            async def got(mid: str, data: dict) -> None:
                rets[mid] = data
                if on_return is not None:
                    on_return(mid, data)

            await wait_job(m, pub["jid"], set(pub["minions"]), timeout, gather_job_timeout, got)
            return pub, rets

        return await self._on_master(job())

    async def runner(self, fun: str, args: list, kwargs: dict) -> Any:
        """See :meth:`MasterBridge.runner`."""
        try:
            return await self._on_master(run_runner(self._master.runner_ctx, fun, args, kwargs))
        except RunnerError as exc:
            raise RunnerRefused(str(exc)) from None

    async def job_info(self, jid: str) -> tuple[dict | None, dict]:
        """See :meth:`MasterBridge.job_info`."""
        m = self._master

        async def info() -> tuple[dict | None, dict]:
            load = await asyncio.to_thread(m.job_cache.get_load, jid)
            if load is None and jid in m.tracker.jobs:
                load = m.tracker.jobs[jid].load
            return load, await jobs_lookup_jid(m.runner_ctx, jid)

        return await self._on_master(info())

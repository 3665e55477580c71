"""The API's one door into the master: short coroutines run on the master's event loop.

The API serves HTTP on its own thread and event loop. Whatever needs the master's in-memory
state (targeting, publishing, waiting for returns, runners) is handed to the master's loop with
``asyncio.run_coroutine_threadsafe`` and awaited from the API loop; each such coroutine only
awaits (never blocks), so the master's request/publish loop is never held up by HTTP clients.
Anything that reads the store (keys, tokens, job cache) runs in the API's own worker threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hamaster.master.daemon import Master
    from hamaster.pki_sync.keys import KeyRegistry

#: ``allowed(targeted_ids, matches)``: the ACL check, run on the master loop between targeting
#: and publishing; ``matches(expr)`` gives the minions a compound/glob expression matches.
TargetCheck = Callable[[list[str], Callable[[str], set[str]]], bool]
OnReturn = Callable[[str, dict], None]


class TargetRefused(Exception):
    """The ACL does not allow the call on (all of) the targeted minions."""


class MasterBridge:
    """What the API may ask of the master; every method is awaited from the API loop."""

    def __init__(self, master: Master, loop: asyncio.AbstractEventLoop) -> None:
        self._master = master
        self._loop = loop

    @property
    def opts(self) -> dict:
        """The master's options (read-only by convention)."""
        return self._master.opts

    @property
    def master_id(self) -> str:
        """This master's id."""
        return self._master.master_id

    @property
    def keys(self) -> KeyRegistry:
        """The key registry (thread-safe; call its store-touching methods from a thread)."""
        return self._master.keys

    @property
    def metrics_registry(self) -> Any:
        """The master's Prometheus registry."""
        return self._master.metrics.registry

    @property
    def store(self) -> Any:
        """The shared store, or None for a single master."""
        return self._master.state.store

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
        """Target, check the ACL, publish, and (``wait``) collect returns by Salt's rule.

        Returns ``(publication, {minion_id: return})``; raises :class:`TargetRefused` when
        ``check`` refuses, ``ValueError`` for an invalid target.
        """
        m = self._master

        async def job() -> tuple[dict, dict[str, dict]]:
            from hamaster.master.waiting import wait_job

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
        """Run a master runner (``hamaster-run``'s functions); raises ``RunnerError``."""
        from hamaster.master.runners import run_runner

        return await self._on_master(run_runner(self._master, fun, args, kwargs))

    async def job_info(self, jid: str) -> tuple[dict | None, dict]:
        """``(load, {minion: return})`` of one job, from memory and the job cache."""
        from hamaster.master.runners import jobs_lookup_jid

        m = self._master

        async def info() -> tuple[dict | None, dict]:
            load = await asyncio.to_thread(m.job_cache.get_load, jid)
            if load is None and jid in m.tracker.jobs:
                load = m.tracker.jobs[jid].load
            return load, await jobs_lookup_jid(m, jid)

        return await self._on_master(info())

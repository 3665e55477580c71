"""The API's one door into the master: what the API may ask of it, as an interface.

The API serves HTTP on its own thread and event loop. Whatever needs the master's in-memory
state (targeting, publishing, waiting for returns, runners) is handed to the master's loop with
``asyncio.run_coroutine_threadsafe`` and awaited from the API loop; each such coroutine only
awaits (never blocks), so the master's request/publish loop is never held up by HTTP clients.
Anything that reads the store (keys, tokens, job cache) runs in the API's own worker threads.

This module only declares :class:`MasterBridge`; the master implements it
(:mod:`hamaster.master.apibridge`) and hands it to :class:`~hamaster.api.server.ApiService`, so
the API imports nothing of the master.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hamaster.events.bus import EventBus
    from hamaster.pki_sync.keys import KeyRegistry
    from hamaster.store.base import Store

#: ``allowed(targeted_ids, matches)``: the ACL check, run on the master loop between targeting
#: and publishing; ``matches(expr)`` gives the minions a compound/glob expression matches.
TargetCheck = Callable[[list[str], Callable[[str], set[str]]], bool]
OnReturn = Callable[[str, dict], None]


class TargetRefused(Exception):
    """The ACL does not allow the call on (all of) the targeted minions."""


class RunnerRefused(Exception):
    """A runner that does not exist or was called wrongly (the message says which)."""


class MasterBridge(abc.ABC):
    """What the API may ask of the master; every coroutine is awaited from the API loop.

    The plain attributes are the master's own objects: ``opts`` (read-only by convention),
    ``master_id``, ``keys`` (thread-safe; call its store-touching methods from a thread),
    ``metrics_registry`` (Prometheus), ``store`` (the shared store, None for a single master),
    ``event_bus`` (the cluster event bus, None without one) and ``emit(tag, data)`` (puts an
    event on that bus; None without one).
    """

    def __init__(self, *, opts: dict, master_id: str, keys: KeyRegistry, metrics_registry: Any,
                 store: Store | None, event_bus: EventBus | None = None,
                 emit: Callable[[str, Any], None] | None = None) -> None:
        self.opts = opts
        self.master_id = master_id
        self.keys = keys
        self.metrics_registry = metrics_registry
        self.store = store
        self.event_bus = event_bus
        self.emit = emit

    @abc.abstractmethod
    async def run_job(self, tgt: Any, tgt_type: str, fun: str, arg: list, *, user: str,
                      check: TargetCheck, wait: bool, timeout: float = 5.0,
                      gather_job_timeout: float = 0.0, ret: str = "",
                      on_return: OnReturn | None = None) -> tuple[dict, dict[str, dict]]:
        """Target, check the ACL, publish, and (``wait``) collect returns by Salt's rule.

        Returns ``(publication, {minion_id: return})``; raises :class:`TargetRefused` when
        ``check`` refuses, ``ValueError`` for an invalid target.
        """

    @abc.abstractmethod
    async def runner(self, fun: str, args: list, kwargs: dict) -> Any:
        """Run a master runner (``hamaster-run``'s functions); raises :class:`RunnerRefused`."""

    @abc.abstractmethod
    async def job_info(self, jid: str) -> tuple[dict | None, dict]:
        """``(load, {minion: return})`` of one job, from memory and the job cache."""

"""The master's pillar service: answers ``_pillar`` and reports the tree's hash.

``answer(minion_id, load)`` runs in the master's store pool (never on the event loop): it
compiles the pillar of the *authenticated* minion id (the caller passes the session's id, never
one from the request body) with the grains the minion sent, its ``pillarenv`` and its
``pillar_override``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from hamaster.pillar.compiler import PillarCompiler
from hamaster.store.base import Store

log = logging.getLogger(__name__)


class PillarService:
    """One per master: a :class:`PillarCompiler` over the cluster's (or local) pillar tree."""

    def __init__(self, opts: dict, shared_store: Store | None = None,
                 on_compiled: Callable[[str, dict, dict, bool], None] | None = None) -> None:
        self.compiler = PillarCompiler.from_opts(opts, shared_store)
        self.tree_hash = ""
        #: Called with ``(minion_id, grains, pillar, secret)`` after each compile (the data
        #: cache); ``secret`` when gpg values were decrypted into it.
        self.on_compiled = on_compiled

    def answer(self, minion_id: str, load: dict) -> dict[str, Any]:
        """The pillar for ``minion_id`` (authenticated) from a ``_pillar`` load."""
        grains = load.get("grains")
        grains = grains if isinstance(grains, dict) else {}
        env = load.get("pillarenv")
        pillarenv = env if isinstance(env, str) and env else None
        override = load.get("pillar_override")
        t0 = time.perf_counter()
        pillar = self.compiler.compile(minion_id, grains, pillarenv,
                                       override if isinstance(override, dict) else None)
        secret = bool(getattr(self.compiler.last_secret, "value", False))
        log.debug("pillar for %s compiled in %.1f ms", minion_id, (time.perf_counter() - t0) * 1e3)
        if self.on_compiled is not None:
            try:
                self.on_compiled(minion_id, grains, pillar, secret)
            except Exception:  # the cache never breaks serving
                log.exception("minion data cache update for %s failed", minion_id)
        return pillar

    def close(self) -> None:
        """Release what the compiler started (a gpg-agent); called when the master stops."""
        self.compiler.close()

    def refresh_hash(self) -> str:
        """Recompute :attr:`tree_hash` (reads the whole tree: call off the event loop)."""
        self.tree_hash = self.compiler.tree.tree_hash()
        return self.tree_hash

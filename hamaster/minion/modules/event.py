"""The ``event`` execution module: send events to the masters (Salt's ``event.send`` and
``event.fire_master``).

The event goes as one ``_minion_event`` to every master this minion is connected to (as a Salt
multi-master minion does); the masters put it on the cluster event bus and merge the copies
(``hamaster/events/bus.py``). Sent through ``ctx.fire_master(tag, data)``, supplied by the
minion daemon.
"""

from __future__ import annotations

from typing import Any

from hamaster.minion.modules.context import CommandExecutionError, ExecContext


def _fire(ctx: ExecContext, tag: str, data: Any) -> bool:
    if ctx.fire_master is None:
        raise CommandExecutionError("no master connection to send events to")
    return bool(ctx.fire_master(str(tag), data))


def send(ctx: ExecContext, tag: str, data: Any = None, preload: Any = None,
         with_env: Any = False, with_grains: Any = False, with_pillar: Any = False,
         **kwargs: Any) -> bool:
    """Send an event with ``tag`` to the masters. The data is ``kwargs`` (with the job's
    ``__pub_*`` keys, as Salt sends them) updated with ``data``; ``with_grains=True`` adds all
    grains, a list adds those grains, ``with_pillar`` the pillar likewise; ``preload`` and
    ``with_env`` are accepted and ignored.

    CLI Example: ``hamaster web1 event.send myapp/deploy '{"version": 2}'``
    """
    payload: dict[str, Any] = dict(kwargs)
    if with_grains:
        grains = ctx.grains
        if isinstance(with_grains, list):
            grains = {k: v for k, v in grains.items() if k in with_grains}
        payload["grains"] = dict(grains)
    if with_pillar:
        pillar = ctx.pillar
        if isinstance(with_pillar, list):
            pillar = {k: v for k, v in pillar.items() if k in with_pillar}
        payload["pillar"] = dict(pillar)
    if isinstance(data, dict):
        payload.update(data)
    elif data is not None:
        payload["data"] = data
    return _fire(ctx, tag, payload)


def fire_master(ctx: ExecContext, data: Any, tag: str, preload: Any = None) -> bool:
    """Send ``data`` with ``tag`` to the masters, as given (no ``__pub_*`` keys added).

    CLI Example: ``hamaster web1 event.fire_master '{"data": "my event data"}' 'tag'``
    """
    return _fire(ctx, tag, data)

"""The ``pillar`` execution module: this minion's pillar (Salt's ``pillar.*``).

``items`` fetches a fresh pillar from a master (as Salt's ``pillar.items`` does); ``get``,
``item``, ``raw``, ``ls`` read the pillar the minion holds (``ctx.pillar``, refreshed at
connect and by ``pillar.refresh``). ``pillar.refresh`` is ``saltutil.refresh_pillar``: it fetches
the pillar again and keeps it for the following jobs.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from hamaster.minion.modules.context import CommandExecutionError, ExecContext
from hamaster.traverse import traverse as _lookup

log = logging.getLogger(__name__)

_MISSING = object()



def _fresh(ctx: ExecContext) -> dict[str, Any]:
    if ctx.refresh_pillar is None:
        return ctx.pillar
    return ctx.refresh_pillar()


def items(ctx: ExecContext, *args: str, **kwargs: Any) -> dict[str, Any]:
    """Return the whole pillar, freshly compiled by a master (or the named keys only).

    CLI Example: ``hamaster '*' pillar.items``
    """
    pillar = _fresh(ctx)
    if args:
        return {key: _lookup(pillar, key, "", ":") for key in args}
    return pillar


def raw(ctx: ExecContext, key: str | None = None) -> Any:
    """Return the pillar this minion holds (no master round-trip), or one top-level key of it.

    CLI Example: ``hamaster '*' pillar.raw``
    """
    return ctx.pillar if key is None else ctx.pillar.get(key, {})


def get(ctx: ExecContext, key: str, default: Any = "", merge: bool = False,
        delimiter: str = ":", **kwargs: Any) -> Any:
    """Return pillar ``key``; nested values are reached with ``delimiter`` (``pkg:apache``).

    ``default`` (an empty string unless given) is returned when the key is missing; with
    ``merge=True`` and a dict (or list) default, the found value is merged over the default.

    CLI Example: ``hamaster '*' pillar.get pkg:apache default=nginx``
    """
    value = _lookup(ctx.pillar, key, _MISSING, delimiter)
    if value is _MISSING:
        return default
    if merge:
        if isinstance(default, dict) and isinstance(value, dict):
            from hamaster.pillar.merge import update

            return update(copy.deepcopy(default), value)
        if isinstance(default, list) and isinstance(value, list):
            return default + [v for v in value if v not in default]
    return value


def item(ctx: ExecContext, *keys: str, default: Any = "", delimiter: str = ":") -> dict[str, Any]:
    """Return ``{key: value}`` for the named pillar keys (``default`` for missing ones).

    CLI Example: ``hamaster '*' pillar.item roles users:admin``
    """
    return {key: _lookup(ctx.pillar, key, default, delimiter) for key in keys}


def ls(ctx: ExecContext) -> list[str]:
    """Return the sorted top-level pillar keys.

    CLI Example: ``hamaster '*' pillar.ls``
    """
    return sorted(ctx.pillar)


def refresh(ctx: ExecContext) -> bool:
    """Fetch the pillar again from a master and keep it for later jobs
    (``saltutil.refresh_pillar``).

    CLI Example: ``hamaster '*' pillar.refresh``
    """
    if ctx.refresh_pillar is None:
        raise CommandExecutionError("no master to refresh the pillar from")
    ctx.refresh_pillar()
    return True

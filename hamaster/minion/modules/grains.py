"""The ``grains`` execution module: read the minion's grains (Salt's ``grains.*``, read-only)."""

from __future__ import annotations

import logging
from typing import Any

from hamaster.minion.modules.context import ExecContext
from hamaster.traverse import traverse as _lookup

log = logging.getLogger(__name__)

_MISSING = object()



def items(ctx: ExecContext) -> dict[str, Any]:
    """Return all grains.

    CLI Example: ``hamaster '*' grains.items``
    """
    return ctx.grains


def get(ctx: ExecContext, key: str, default: Any = "", delimiter: str = ":") -> Any:
    """Return the grain ``key``; nested values are reached with ``delimiter`` (``pkg:apache``).

    Returns ``default`` (an empty string unless given) when the key does not exist.

    CLI Example: ``hamaster '*' grains.get os`` / ``hamaster '*' grains.get ip_interfaces:eth0``
    """
    return _lookup(ctx.grains, key, default, delimiter)


def item(ctx: ExecContext, *keys: str, delimiter: str = ":") -> dict[str, Any]:
    """Return ``{key: value}`` for the named grains; missing grains map to an empty string.

    CLI Example: ``hamaster '*' grains.item os osrelease``
    """
    return {key: _lookup(ctx.grains, key, "", delimiter) for key in keys}


def ls(ctx: ExecContext) -> list[str]:
    """Return the sorted names of the top-level grains.

    CLI Example: ``hamaster '*' grains.ls``
    """
    return sorted(ctx.grains)


def has_value(ctx: ExecContext, key: str, delimiter: str = ":") -> bool:
    """Return True if the (possibly nested, ``a:b``) grain ``key`` exists.

    CLI Example: ``hamaster '*' grains.has_value pkg:apache``
    """
    return _lookup(ctx.grains, key, _MISSING, delimiter) is not _MISSING

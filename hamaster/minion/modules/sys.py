"""The ``sys`` execution module: introspect the functions this minion offers (Salt's ``sys.*``).

Named after Salt's module; imports are absolute, so it never hides the standard library's
``sys`` (which this file does not need).
"""

from __future__ import annotations

import fnmatch
import logging

from hamaster.minion.modules.context import CommandExecutionError, ExecContext
from hamaster.minion.modules.registry import FunctionRegistry

log = logging.getLogger(__name__)


def _registry(ctx: ExecContext) -> FunctionRegistry:
    if ctx.registry is None:
        raise CommandExecutionError("no function registry in this execution context")
    return ctx.registry


def _select(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    """Salt's rules: a glob matches function names; a bare module name selects ``mod.*``."""
    if not patterns:
        return sorted(names)
    selected: set[str] = set()
    for pattern in patterns:
        pattern = str(pattern)
        if any(ch in pattern for ch in "*?["):
            selected.update(fnmatch.filter(names, pattern))
        elif pattern in names:
            selected.add(pattern)
        else:
            prefix = pattern if pattern.endswith(".") else pattern + "."
            selected.update(n for n in names if n.startswith(prefix))
    return sorted(selected)


def list_functions(ctx: ExecContext, *args: str) -> list[str]:
    """List the available functions, optionally only those of the given modules or globs.

    CLI Example: ``hamaster '*' sys.list_functions`` / ``hamaster '*' sys.list_functions cmd``
    / ``hamaster '*' sys.list_functions 'sys.list_*'``
    """
    return _select(_registry(ctx).names(), args)


def list_modules(ctx: ExecContext, *args: str) -> list[str]:
    """List the available execution modules, optionally filtered by globs.

    CLI Example: ``hamaster '*' sys.list_modules`` / ``hamaster '*' sys.list_modules 'c*'``
    """
    modules = sorted({name.split(".", 1)[0] for name in _registry(ctx).names()})
    if not args:
        return modules
    return sorted({m for m in modules for pattern in args if fnmatch.fnmatchcase(m, str(pattern))})


def doc(ctx: ExecContext, *args: str) -> dict[str, str]:
    """Return ``{function: docstring}`` for all functions, or those of the named modules/globs.

    CLI Example: ``hamaster '*' sys.doc`` / ``hamaster '*' sys.doc test`` /
    ``hamaster '*' sys.doc cmd.run``
    """
    registry = _registry(ctx)
    return {name: registry.doc(name) for name in _select(registry.names(), args)}

"""Maps Salt function names (``mod.fun``) to the execution-module functions that implement them."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Salt module name -> Python module implementing it.
DEFAULT_MODULES: tuple[tuple[str, str], ...] = (
    ("cmd", "hamaster.minion.modules.cmd"),
    ("cp", "hamaster.minion.modules.cp"),
    ("event", "hamaster.minion.modules.event"),
    ("grains", "hamaster.minion.modules.grains"),
    ("mine", "hamaster.minion.modules.mine"),
    ("pillar", "hamaster.minion.modules.pillar"),
    ("saltutil", "hamaster.minion.modules.saltutil"),
    ("state", "hamaster.minion.modules.state"),
    ("sys", "hamaster.minion.modules.sys"),
    ("test", "hamaster.minion.modules.test"),
)


def public_functions(module: ModuleType) -> dict[str, Callable[..., Any]]:
    """Return ``{salt_name: function}`` for the functions a module defines itself.

    Names starting with ``_`` are private; one trailing ``_`` is dropped (``true_`` → ``true``),
    which is how modules expose names that are Python keywords or builtins.
    """
    funcs: dict[str, Callable[..., Any]] = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(obj):
            continue
        if obj.__module__ != module.__name__:
            continue
        funcs[name[:-1] if name.endswith("_") else name] = obj
    return funcs


class FunctionRegistry:
    """The execution functions one minion offers, by Salt name (``test.ping``)."""

    def __init__(self, modules: Iterable[tuple[str, str]] = DEFAULT_MODULES) -> None:
        """Import each ``(salt_module_name, python_module_path)`` and register its functions.

        A module that fails to import is logged and skipped, so one broken module does not
        take the minion down.
        """
        self._functions: dict[str, Callable[..., Any]] = {}
        for salt_name, path in modules:
            try:
                module = importlib.import_module(path)
            except Exception:
                log.exception("execution module %s (%s) failed to load; skipped", salt_name, path)
                continue
            self.register_module(salt_name, module)

    def register_module(self, salt_name: str, module: ModuleType) -> None:
        """Register every public function of ``module`` as ``salt_name.<fun>``."""
        for fun, func in public_functions(module).items():
            self.register(f"{salt_name}.{fun}", func)

    def register(self, name: str, func: Callable[..., Any]) -> None:
        """Register one function under ``mod.fun``; it must take the ExecContext first."""
        if "." not in name:
            raise ValueError(f"function name {name!r} must look like 'module.function'")
        self._functions[name] = func

    def get(self, name: str) -> Callable[..., Any] | None:
        """Return the function registered as ``name`` or None."""
        return self._functions.get(name)

    def outputter(self, name: str) -> str | None:
        """The outputter a module declares for ``name`` (Salt's ``__outputter__``, e.g.
        ``highstate`` for ``state.apply``), sent as ``out`` in the job's return."""
        import sys

        func = self._functions.get(name)
        if func is None:
            return None
        table = getattr(sys.modules.get(func.__module__), "__outputter__", None)
        if not isinstance(table, dict):
            return None
        return table.get(name.split(".", 1)[1])

    def names(self) -> list[str]:
        """Return all registered ``mod.fun`` names, sorted."""
        return sorted(self._functions)

    def doc(self, name: str) -> str:
        """Return the cleaned docstring of ``name`` ("" if undocumented or unknown)."""
        func = self._functions.get(name)
        if func is None:
            return ""
        return inspect.getdoc(func) or ""

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __len__(self) -> int:
        return len(self._functions)

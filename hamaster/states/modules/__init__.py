"""State modules: ``<mod>.<fun>(run: StateRun, name, **kwargs) -> {name, changes, result,
comment}`` with Salt's names, arguments and return shape. ``mod_watch`` is the function a
``watch`` requisite calls when a watched state changed."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

STATE_MODULES = ("file", "cmd", "pkg", "service", "test", "user", "group", "cron", "module")


def load_state_functions() -> dict[str, Callable[..., dict[str, Any]]]:
    """``{"file.managed": func, ...}`` for every public function of the state modules."""
    funcs: dict[str, Callable[..., dict[str, Any]]] = {}
    for mod in STATE_MODULES:
        module = importlib.import_module(f"hamaster.states.modules.{mod}_state")
        for name, obj in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            if obj.__module__ != module.__name__:
                continue
            funcs[f"{mod}.{name.rstrip('_')}"] = obj
    return funcs

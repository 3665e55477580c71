"""CLI argument conventions shared by ``hamaster``, ``hamaster-run`` and the minion executor.

``parse_cli_args`` turns ``ARG...`` and ``key=value`` words into Salt's publication ``arg`` list;
``split_args`` undoes it on the minion. Kept tiny (no heavy imports) so the CLIs start fast.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Salt's rule for "key=value": key starts with a letter/underscore, then word chars, '.' or '-';
# "a==b" is not a keyword argument.
_KWARG_RE = re.compile(r"^([^\W\d][\w.-]*)=(?!=)(.*)$", re.DOTALL)

def yamlify_arg(arg: Any) -> Any:
    """Parse one CLI word as YAML the way Salt does, keeping the string when in doubt.

    Numbers, booleans, ``null``/``None`` and bracketed lists/braced dicts are converted;
    anything containing ``#`` (a YAML comment), unbracketed mappings/lists, dates and other
    exotic YAML types stay strings.
    """
    if not isinstance(arg, str) or not arg.strip() or "#" in arg:
        return arg
    if arg == "None":
        return None
    import yaml  # only when there is something to parse

    try:
        value = yaml.safe_load(arg)
    except yaml.YAMLError:
        return arg
    if isinstance(value, dict):
        return value if arg.lstrip().startswith("{") else arg
    if isinstance(value, list):
        return value if arg.lstrip().startswith("[") else arg
    if value is None:
        # "!" and "|" load as null/"" in YAML; only real nulls become None.
        return None if arg.strip() in ("null", "Null", "NULL", "~") else arg
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if value else arg
    return arg


def parse_cli_args(argv: list[str]) -> list[Any]:
    """Turn CLI words into a publication ``arg`` list.

    Positional words are YAML-parsed (``"1"`` → 1). ``key=value`` words (key like a Python
    identifier, ``.``/``-`` allowed after the first character as in Salt) are collected into
    one trailing ``{"__kwarg__": True, key: value, ...}`` dict with YAML-parsed values.
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in argv:
        m = _KWARG_RE.match(word) if isinstance(word, str) else None
        if m:
            kwargs[m.group(1)] = yamlify_arg(m.group(2))
        else:
            args.append(yamlify_arg(word))
    if kwargs:
        args.append({"__kwarg__": True, **kwargs})
    return args


def split_args(arg: list[Any] | None) -> tuple[list[Any], dict[str, Any]]:
    """Split a publication ``arg`` list into positional args and kwargs (``__kwarg__`` dicts)."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in arg or []:
        if isinstance(item, Mapping) and item.get("__kwarg__") is True:
            kwargs.update({k: v for k, v in item.items() if k != "__kwarg__"})
        else:
            args.append(item)
    return args, kwargs

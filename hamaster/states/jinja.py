"""What sls templates see beyond the shared renderer: Salt's extra Jinja filters and the
``salt`` mapping that calls this minion's execution modules (``salt['cmd.run'](...)``).

Built in on top of the registry: ``grains.filter_by``, ``slsutil.merge``, ``config.get``
(pillar, then grains, then options) and ``log.debug/info/warning/error``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from hamaster.pillar.merge import update
from hamaster.pillar.render import _filter_by
from hamaster.traverse import traverse as _lookup

log = logging.getLogger("hamaster.states.template")

_MISSING = object()


def to_bool(value: Any) -> bool:
    """Salt's ``to_bool``: 'true'/'yes'/'1'/'on' (any case) are True; numbers > 0 are True."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on", "y")
    return bool(value)


def regex_replace(value: str, regex: str, repl: str, ignorecase: bool = False,
                  multiline: bool = False) -> str:
    """``re.sub`` (Salt's ``regex_replace``)."""
    flags = (re.I if ignorecase else 0) | (re.M if multiline else 0)
    return re.sub(regex, repl, str(value), flags=flags)


def regex_search(value: str, regex: str, ignorecase: bool = False,
                 multiline: bool = False) -> tuple[Any, ...] | None:
    """The groups of ``re.search`` (Salt's ``regex_search``), or None."""
    flags = (re.I if ignorecase else 0) | (re.M if multiline else 0)
    m = re.search(regex, str(value), flags)
    return m.groups() if m else None


def regex_match(value: str, regex: str, ignorecase: bool = False,
                multiline: bool = False) -> tuple[Any, ...] | None:
    """The groups of ``re.match`` (Salt's ``regex_match``), or None."""
    flags = (re.I if ignorecase else 0) | (re.M if multiline else 0)
    m = re.match(regex, str(value), flags)
    return m.groups() if m else None


def unique(values: Iterable[Any]) -> list[Any]:
    """Items in first-seen order, duplicates dropped."""
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def traverse(data: Any, key: str, default: Any = None, delimiter: str = ":") -> Any:
    """``data['a']['b']`` for ``'a:b'``, ``default`` if any step is missing."""
    return _lookup(data, key, default, delimiter)


def _hash(algo: str, value: Any) -> str:
    return hashlib.new(algo, str(value).encode("utf-8")).hexdigest()


FILTERS: dict[str, Callable[..., Any]] = {
    "to_bool": to_bool, "regex_replace": regex_replace, "regex_search": regex_search,
    "regex_match": regex_match, "unique": unique, "traverse": traverse,
    "quote": lambda v: shlex.quote(str(v)), "md5": functools.partial(_hash, "md5"),
    "sha256": functools.partial(_hash, "sha256"), "sha1": functools.partial(_hash, "sha1"),
    "yaml_dquote": lambda v: '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"',
    "yaml_squote": lambda v: "'" + str(v).replace("'", "''") + "'",
    "is_list": lambda v: isinstance(v, list), "to_num": lambda v: float(v) if "." in str(v)
    else int(v), "sequence": lambda v: v if isinstance(v, list) else [v],
}


def _merge(dest: Mapping[str, Any], upd: Mapping[str, Any], strategy: str = "smart",
           merge_lists: bool = False, **kwargs: Any) -> Any:
    """Salt's ``slsutil.merge`` (recursive update; lists replaced unless ``merge_lists``)."""
    import copy

    out = copy.deepcopy(dict(dest))
    if merge_lists:
        return _merge_lists(out, upd)
    return update(out, upd)


def _merge_lists(dest: dict[str, Any], upd: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in upd.items():
        if isinstance(v, Mapping) and isinstance(dest.get(k), dict):
            dest[k] = _merge_lists(dest[k], v)
        elif isinstance(v, list) and isinstance(dest.get(k), list):
            dest[k] = dest[k] + [x for x in v if x not in dest[k]]
        else:
            dest[k] = v
    return dest


class SaltFunctions(Mapping[str, Callable[..., Any]]):
    """``salt['mod.fun']`` in templates: the minion's execution functions bound to its
    context, plus the template helpers listed in the module docstring."""

    def __init__(self, exec_ctx: Any) -> None:
        self._ctx = exec_ctx
        grains, pillar, opts = exec_ctx.grains, exec_ctx.pillar, exec_ctx.opts

        def config_get(key: str, default: Any = "", delimiter: str = ":", **kw: Any) -> Any:
            for src in (pillar, grains, opts):
                val = _lookup(src, key, _MISSING, delimiter)
                if val is not _MISSING:
                    return val
            return default

        self._builtin: dict[str, Callable[..., Any]] = {
            "grains.filter_by": lambda *a, **kw: _filter_by(grains, *a, **kw),
            "slsutil.merge": _merge,
            "config.get": config_get,
            "config.option": config_get,
            "log.debug": log.debug, "log.info": log.info, "log.warning": log.warning,
            "log.error": log.error, "log.critical": log.critical,
        }

    def __getitem__(self, name: str) -> Callable[..., Any]:
        func = self._builtin.get(name)
        if func is not None:
            return func
        registry = self._ctx.registry
        target = registry.get(name) if registry is not None else None
        if target is None or name.startswith("state."):
            raise KeyError(name)
        return functools.partial(target, self._ctx)

    def __contains__(self, name: object) -> bool:
        if name in self._builtin:
            return True
        registry = self._ctx.registry
        return registry is not None and isinstance(name, str) and name in registry

    def __iter__(self) -> Iterator[str]:
        names = set(self._builtin)
        if self._ctx.registry is not None:
            names.update(self._ctx.registry.names())
        return iter(sorted(names))

    def __len__(self) -> int:
        return len(list(iter(self)))

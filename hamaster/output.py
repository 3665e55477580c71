"""CLI outputters shaped like Salt's: ``nested``, ``json``, ``yaml``, ``txt``, ``raw``, ``quiet``,
``highstate`` (state runs; :mod:`hamaster.states.output`).

:func:`render` takes ``{minion_id: return}`` (one minion or many) and returns the text to print.
Values that JSON/YAML cannot represent are turned into strings; bytes are decoded as UTF-8.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import yaml

log = logging.getLogger(__name__)

FORMATS = ("nested", "json", "yaml", "txt", "raw", "quiet", "highstate")


class _Colors:
    """ANSI colour codes used by the nested outputter (all empty when colour is off)."""

    def __init__(self, enabled: bool) -> None:
        on = enabled
        self.value = "\033[1;33m" if on else ""   # light yellow: scalars
        self.text = "\033[0;32m" if on else ""    # green: strings and list items
        self.key = "\033[0;36m" if on else ""     # cyan: keys and separators
        self.error = "\033[0;31m" if on else ""   # red: keys of failed returns
        self.end = "\033[0m" if on else ""


def to_plain(value: Any) -> Any:
    """Return ``value`` made of dict/list/str/int/float/bool/None only.

    bytes → UTF-8 text (invalid bytes replaced), tuples/sets → lists, non-scalar dict keys →
    ``str(key)``, anything else → ``str(value)``.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, val in value.items():
            if isinstance(key, (bytes, bytearray)):
                key = bytes(key).decode("utf-8", errors="replace")
            elif not (key is None or isinstance(key, (bool, int, float, str))):
                key = str(key)
            out[key] = to_plain(val)
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [to_plain(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    return str(value)


def _sorted_keys(data: Mapping[Any, Any]) -> list[Any]:
    try:
        return sorted(data)
    except TypeError:
        return list(data)


def _nested_lines(value: Any, indent: int, prefix: str, out: list[str], c: _Colors,
                  key_color: str) -> None:
    """Salt's nested layout: scalars on their own line, lists as ``- item``, dicts as
    ``key:`` with the value indented by 4 under a ``----------`` separator."""
    pad = " " * indent
    if value is None or isinstance(value, (bool, int, float)):
        out.append(f"{pad}{c.value}{prefix}{value}{c.end}")
    elif isinstance(value, str):
        for n, line in enumerate(value.splitlines()):
            lead = prefix if n == 0 else " " * len(prefix)
            out.append(f"{pad}{c.text}{lead}{line}{c.end}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (list, dict)):
                out.append(f"{pad}{c.text}|_{c.end}")
                _nested_lines(item, indent + 2, "" if isinstance(item, dict) else "- ", out, c,
                              key_color)
            else:
                _nested_lines(item, indent, "- ", out, c, key_color)
    elif isinstance(value, dict):
        if indent:
            out.append(f"{pad}{key_color}----------{c.end}")
        for key in _sorted_keys(value):
            out.append(f"{pad}{key_color}{prefix}{key}{c.end}:")
            _nested_lines(value[key], indent + 4, "", out, c, key_color)
    else:
        _nested_lines(str(value), indent, prefix, out, c, key_color)


def render_nested(data: Mapping[str, Any], color: bool = False, retcode: int = 0) -> str:
    """Render ``{minion: return}`` like Salt's ``nested`` outputter (``retcode`` != 0 → red
    keys)."""
    colors = _Colors(color)
    key_color = colors.error if retcode else colors.key
    lines: list[str] = []
    _nested_lines(to_plain(dict(data)), 0, "", lines, colors, key_color)
    return "\n".join(lines)


def _render_txt(data: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for minion, value in to_plain(dict(data)).items():
        if isinstance(value, str):
            lines.extend(f"{minion}: {line}" for line in value.splitlines() or [""])
        else:
            lines.append(f"{minion}: {value}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    return json.dumps(value, indent=4, default=str)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, allow_unicode=True).rstrip("\n")


def render(data: Mapping[str, Any], fmt: str, *, static: bool = False, color: bool = False,
           retcode: int = 0) -> str:
    """Render ``{minion_id: return}`` in output format ``fmt``; no trailing newline.

    With ``static=False``, ``json`` and ``yaml`` emit one document per minion (as Salt does
    when printing returns as they arrive); ``static=True`` emits a single document.
    ``color`` and ``retcode`` only affect ``nested``. Unknown formats raise ValueError.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"render() expects a mapping of minion id to return, got {type(data)}")
    if fmt == "nested":
        return render_nested(data, color=color, retcode=retcode)
    if fmt == "json":
        plain = to_plain(dict(data))
        if static:
            return _json(plain)
        return "\n".join(_json({k: v}) for k, v in plain.items())
    if fmt == "yaml":
        plain = to_plain(dict(data))
        if static:
            return _yaml(plain)
        return "\n".join(_yaml({k: v}) for k, v in plain.items())
    if fmt == "txt":
        return _render_txt(data)
    if fmt == "raw":
        return repr(dict(data))
    if fmt == "quiet":
        return ""
    if fmt == "highstate":
        from hamaster.states.output import render_highstate

        return render_highstate(data, color=color)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def render_value(value: Any, fmt: str = "nested") -> str:
    """Render a single value (a runner's result) with no minion key around it."""
    if fmt == "nested":
        lines: list[str] = []
        _nested_lines(to_plain(value), 0, "", lines, _Colors(False), "")
        return "\n".join(lines)
    if fmt == "json":
        return _json(to_plain(value))
    if fmt == "yaml":
        return _yaml(to_plain(value))
    if fmt == "txt":
        return str(to_plain(value))
    return repr(value)

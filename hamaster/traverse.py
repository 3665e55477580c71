"""Salt's ``a:b:c`` lookup into nested data (``grains.get``, ``pillar.get``, the ``traverse``
Jinja filter): one rule for the minion's modules and the master's renderers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def traverse(data: Any, key: str, default: Any = None, delimiter: str = ":") -> Any:
    """``data['a']['b'][0]`` for ``'a:b:0'`` (lists by integer index, negative too), else
    ``default``; an empty ``delimiter`` takes ``key`` whole."""
    cur = data
    for part in str(key).split(delimiter) if delimiter else [str(key)]:
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif (isinstance(cur, list) and part.lstrip("-").isdigit()
              and -len(cur) <= int(part) < len(cur)):
            cur = cur[int(part)]
        else:
            return default
    return cur

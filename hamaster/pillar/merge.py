"""Salt's dictionary merge strategies for pillar (``salt.utils.dictupdate.merge``, same rules).

* ``recurse`` (and ``smart`` with a non-yamlex renderer, and ``none``): mappings merge key by key,
  recursively; any other value in the update replaces the old one; lists replace lists unless
  ``merge_lists``, which appends the update's items not already present.
* ``overwrite``: a top-level key of the update replaces the old value whole.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

STRATEGIES = ("smart", "recurse", "overwrite", "none")


def update(dest: dict, upd: Mapping, merge_lists: bool = False) -> dict:
    """Recursively merge ``upd`` into ``dest`` (``dest`` itself is updated) and return it.

    Nested dicts and lists of ``dest`` are copied before they change, never modified in place,
    so data shared with other results (a rendered sls reused by two includes) stays intact.
    """
    for key, val in upd.items():
        cur = dest.get(key)
        if isinstance(cur, dict) and isinstance(val, Mapping):
            dest[key] = update(dict(cur), val, merge_lists)
        elif merge_lists and isinstance(cur, list) and isinstance(val, list):
            merged = list(cur)
            for x in val:
                if x not in merged:
                    merged.append(x)
            dest[key] = merged
        else:
            dest[key] = val
    return dest


def merge(obj_a: dict, obj_b: Mapping, strategy: str = "smart", merge_lists: bool = False) -> dict:
    """A new dict: ``obj_a`` updated with ``obj_b`` by ``strategy`` (neither is modified)."""
    if strategy == "overwrite":
        out = copy.copy(obj_a)
        for key in obj_b:
            out[key] = obj_b[key]
        return out
    if strategy not in STRATEGIES:
        log.warning("unknown pillar_source_merging_strategy %r, merging as 'recurse'", strategy)
    return update(copy.copy(obj_a), obj_b, merge_lists)

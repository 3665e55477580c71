"""Salt's ``highstate`` outputter: one block per state, then a summary per minion.

The layout follows Salt's default (``state_verbose: True``, ``state_output: full``)::

              ID: first
        Function: test.succeed_without_changes
            Name: first
          Result: True
         Comment: Success!
         Started: 13:39:55.043956
        Duration: 0.08 ms
         Changes:

    Summary for web1
    ------------
    Succeeded: 3 (changed=1)
    Failed:    0
    ------------
    Total states run:     3
    Total run time:   5.123 ms

(widths grow with the counts, as in Salt).

A return that is not a state dict (compile errors are a list of strings) is printed as Salt
does: "Data failed to compile:" and the errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml


def _c(on: bool, code: str) -> str:
    return code if on else ""


def _changes(changes: Any, indent: str) -> list[str]:
    if not changes:
        return []
    text = yaml.safe_dump(json.loads(json.dumps(changes, default=str)),
                          default_flow_style=False, allow_unicode=True).rstrip("\n")
    return [indent + line for line in text.splitlines()]


def _is_state_ret(ret: Any) -> bool:
    return isinstance(ret, Mapping) and all(
        isinstance(v, Mapping) and "result" in v and "_|-" in str(k) for k, v in ret.items())


def render_minion(mid: str, ret: Any, color: bool = False) -> str:
    """One minion's state run as Salt's highstate outputter prints it."""
    red, green, cyan, yellow, end = (_c(color, "\033[0;31m"), _c(color, "\033[0;32m"),
                                     _c(color, "\033[0;36m"), _c(color, "\033[0;33m"),
                                     _c(color, "\033[0m"))
    lines = [f"{cyan}{mid}:{end}"]
    if not _is_state_ret(ret):
        if isinstance(ret, list):
            lines.append(f"{red}    Data failed to compile:{end}")
            for err in ret:
                lines.append(f"{red}----------{end}")
                lines.append(f"{red}    {err}{end}")
        else:
            lines.append(f"    {ret}")
        return "\n".join(lines)
    counts: dict[Any, int] = {}
    changed = 0
    total_ms = 0.0
    for tag, r in sorted(ret.items(), key=lambda kv: kv[1].get("__run_num__", 0)):
        state, id_, name, fun = (str(tag).split("_|-") + ["", "", "", ""])[:4]
        result = r.get("result")
        counts[result] = counts.get(result, 0) + 1
        if result is False:
            tone = red
        else:
            tone = yellow if result is None else (cyan if r.get("changes") else green)
        if r.get("changes"):
            changed += 1
        try:
            total_ms += float(r.get("duration") or 0)
        except (TypeError, ValueError):
            pass
        comment = str(r.get("comment", "")).replace("\n", "\n" + " " * 14)
        lines += [
            f"{tone}----------{end}",
            f"{tone}          ID: {r.get('__id__', id_)}{end}",
            f"{tone}    Function: {state}.{fun}{end}",
            f"{tone}        Name: {r.get('name', name)}{end}",
            f"{tone}      Result: {result}{end}",
            f"{tone}     Comment: {comment}{end}",
            f"{tone}     Started: {r.get('start_time', '')}{end}",
            f"{tone}    Duration: {r.get('duration', '')} ms{end}",
            f"{tone}     Changes:   {end}",
        ]
        lines += [f"{tone}{ln}{end}" for ln in _changes(r.get("changes"), "              ")]
    # Salt's summary layout: widths from the longest label ("Succeeded") and count
    width = len("Succeeded") + max([len(str(v)) for v in counts.values()] or [0]) + 2

    def count_line(label: str, n: int) -> str:
        return f"{label}: {n:>{width - len(label) - 2}}"

    ok, failed = counts.get(True, 0) + counts.get(None, 0), counts.get(False, 0)
    stats = []
    if counts.get(None):
        stats.append(f"{yellow}unchanged={counts[None]}{end}")
    if changed:
        stats.append(f"{green}changed={changed}{end}")
    unit, shown = ("s", total_ms / 1000) if total_ms > 999 else ("ms", total_ms)
    lines += [
        "", f"{cyan}Summary for {mid}{end}", f"{cyan}{'-' * width}{end}",
        f"{green}{count_line('Succeeded', ok)}{end}"
        + (f" ({', '.join(stats)})" if stats else ""),
        f"{red if failed else cyan}{count_line('Failed', failed)}{end}",
        f"{cyan}{'-' * width}{end}",
        f"{cyan}Total states run: {ok + failed:>{width - 7}}{end}",
        f"{cyan}Total run time: {f'{shown:.3f}'.rjust(width - 5)} {unit}{end}",
    ]
    return "\n".join(lines)


def render_highstate(data: Mapping[str, Any], color: bool = False) -> str:
    """``{minion_id: state return}`` for every minion, Salt's highstate layout."""
    return "\n".join(render_minion(str(mid), ret, color) for mid, ret in data.items())

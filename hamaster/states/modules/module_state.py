"""The ``module`` state module: ``module.run`` in Salt's new syntax, calling this minion's
execution modules::

    show-uptime:
      module.run:
        - cmd.run:
          - uptime
        - test.echo:
          - text: hi
"""

from __future__ import annotations

from typing import Any

from hamaster.states.runner import StateRun


def _ok(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("retcode", 0) == 0 and value.get("result", True) is not False
    return value is not False


def run(run: StateRun, **kwargs: Any) -> dict[str, Any]:
    """Call each ``mod.fun`` key with its list of arguments (dicts are keyword arguments)."""
    kwargs.pop("name", None)
    ret: dict[str, Any] = {"name": list(kwargs), "changes": {}, "comment": "", "result": None}
    functions = [f for f in kwargs if "." in f]
    if not functions:
        return {**ret, "result": False, "comment": "No function provided."}
    registry = run.exec_ctx.registry
    missing = [f.split(":")[0] for f in functions
               if registry is None or registry.get(f.split(":")[0]) is None]
    if missing or run.test:
        parts = []
        if missing:
            parts.append(f"Unavailable function{'s' if len(missing) > 1 else ''}: "
                         f"{', '.join(missing)}.")
        tests = [f.split(":")[0] for f in functions if f.split(":")[0] not in missing]
        if run.test and tests:
            parts.append(f"Function{'s' if len(tests) > 1 else ''} {', '.join(tests)} to be "
                         "executed.")
        return {**ret, "result": False if missing else None, "comment": " ".join(parts)}
    failures: list[str] = []
    success: list[str] = []
    for func in functions:
        fun = func.split(":")[0]
        spec = kwargs.get(func) or []
        args = [a for a in spec if not isinstance(a, dict)] if isinstance(spec, list) else [spec]
        kw: dict[str, Any] = {}
        for a in spec if isinstance(spec, list) else []:
            if isinstance(a, dict):
                kw.update(a)
        try:
            value = run.call(fun, *args, **kw)
        except TypeError as exc:
            failures.append(f"'{func}' failed: {exc}")
            continue
        if not _ok(value):
            if isinstance(value, dict):
                failures.append(f"'{func}' failed: {value.get('comment', '(error message N/A)')}")
            else:
                failures.append(f"'{func}': {value}")
            continue
        shown = value.get("comment", "Success") if isinstance(value, dict) else value
        success.append(f"{func}: {shown}")
        ret["changes"][func] = value
    return {**ret, "comment": ", ".join(failures + success), "result": not failures}

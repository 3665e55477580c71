"""Run one execution-module function for a job: argument parsing, binding, Salt-shaped errors.

CLI side: :func:`parse_cli_args` turns ``ARG...`` and ``key=value`` words into Salt's
publication ``arg`` list. Minion side: :func:`split_args` undoes that and :func:`execute`
calls the function, turning every failure into a Salt-shaped return instead of raising.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hamaster.cliargs import parse_cli_args, split_args, yamlify_arg
from hamaster.minion.modules.context import CommandExecutionError, ExecContext
from hamaster.minion.modules.registry import FunctionRegistry

__all__ = [
    "CommandExecutionError",
    "ExecResult",
    "execute",
    "parse_cli_args",
    "split_args",
    "yamlify_arg",
]

log = logging.getLogger(__name__)

_PUB_KEYS = ("fun", "jid", "tgt", "tgt_type", "arg", "user")

#: ``error`` values of an ExecResult that failed before or while running the function.
ERROR_UNAVAILABLE = "unavailable"
ERROR_INVALID_ARGS = "invalid_args"
ERROR_EXCEPTION = "exception"


@dataclass
class ExecResult:
    """The outcome of one function call, ready to be returned to the master.

    ``error`` is None when the function ran (even if it set a non-zero retcode); otherwise
    one of ``"unavailable"``, ``"invalid_args"`` or ``"exception"``.
    """

    ret: Any
    retcode: int
    success: bool
    error: str | None = None


def _accepts_var_kwargs(sig: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _usage(func: Any) -> str:
    return inspect.getdoc(func) or ""


def execute(registry: FunctionRegistry, ctx: ExecContext, fun: str, arg: list[Any] | None,
            pub: Mapping[str, Any] | None = None) -> ExecResult:
    """Call ``fun`` with the publication's ``arg`` and return a Salt-shaped result. Never raises.

    ``pub`` holds the publication (``fun``, ``jid``, ``tgt``, ``tgt_type``, ``arg``, ``user``);
    its fields are passed as ``__pub_<field>`` keyword arguments only to functions that take
    ``**kwargs``, like Salt. ``success`` is ``retcode == 0``.
    """
    func = registry.get(fun)
    if func is None:
        log.info("function %r is not available", fun)
        return ExecResult(f"'{fun}' is not available.", 1, False, ERROR_UNAVAILABLE)

    args, kwargs = split_args(arg)
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        sig = None
    if pub and sig is not None and _accepts_var_kwargs(sig):
        for key in _PUB_KEYS:
            if key in pub:
                kwargs[f"__pub_{key}"] = pub[key]
    if sig is not None:
        try:
            sig.bind(ctx, *args, **kwargs)
        except TypeError as exc:
            ret = f"Passed invalid arguments to {fun}: {exc}\n\nUsage:\n{_usage(func)}"
            return ExecResult(ret, 1, False, ERROR_INVALID_ARGS)

    ctx.retcode = 0
    try:
        ret = func(ctx, *args, **kwargs)
    except CommandExecutionError as exc:
        log.debug("%s raised CommandExecutionError", fun, exc_info=True)
        return ExecResult(f"ERROR: {exc}", 1, False, ERROR_EXCEPTION)
    except Exception as exc:
        log.debug("%s raised an exception", fun, exc_info=True)
        ret = f"The minion function caused an exception: {type(exc).__name__}: {exc}"
        return ExecResult(ret, 1, False, ERROR_EXCEPTION)
    retcode = ctx.retcode
    if not isinstance(retcode, int):
        try:
            retcode = int(retcode)
        except (TypeError, ValueError):
            log.warning("%s set a non-integer retcode %r; using 1", fun, retcode)
            retcode = 1
    return ExecResult(ret, retcode, retcode == 0)

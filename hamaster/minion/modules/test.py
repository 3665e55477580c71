"""The ``test`` execution module: connectivity and argument-passing checks (Salt's ``test.*``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import hamaster
from hamaster.minion.modules.context import ExecContext

log = logging.getLogger(__name__)


def ping(ctx: ExecContext) -> bool:
    """Return True: the minion is up and answering.

    CLI Example: ``hamaster '*' test.ping``
    """
    return True


def echo(ctx: ExecContext, text: Any) -> Any:
    """Return ``text`` unchanged.

    CLI Example: ``hamaster '*' test.echo 'foo bar baz quo qux'``
    """
    return text


def version(ctx: ExecContext) -> str:
    """Return the hamaster version running on the minion.

    CLI Example: ``hamaster '*' test.version``
    """
    return hamaster.__version__


def sleep(ctx: ExecContext, length: float | str) -> bool:
    """Sleep ``length`` seconds (fractions allowed), then return True.

    CLI Example: ``hamaster '*' test.sleep 20``
    """
    time.sleep(float(length))
    return True


def arg(ctx: ExecContext, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return the positional and keyword arguments received, including ``__pub_*`` keys.

    CLI Example: ``hamaster '*' test.arg 1 "two" 3.1 txt="hello" wow='{a: 1, b: "hello"}'``
    """
    return {"args": list(args), "kwargs": dict(kwargs)}


def kwarg(ctx: ExecContext, **kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments received, including ``__pub_*`` keys.

    CLI Example: ``hamaster '*' test.kwarg num=1 txt="two" env='{a: 1, b: "hello"}'``
    """
    return dict(kwargs)


def true_(ctx: ExecContext) -> bool:
    """Always return True (exposed as ``test.true``).

    CLI Example: ``hamaster '*' test.true``
    """
    return True


def false_(ctx: ExecContext) -> bool:
    """Always return False (exposed as ``test.false``); the job itself still succeeds.

    CLI Example: ``hamaster '*' test.false``
    """
    return False


def fib(ctx: ExecContext, num: int | str) -> list[Any]:
    """Return ``[F(num), seconds taken]``: the num-th Fibonacci number, for load tests.

    CLI Example: ``hamaster '*' test.fib 3``
    """
    n = int(num)
    if n < 0:
        raise ValueError(f"num must be a non-negative integer, got {n}")
    start = time.perf_counter()
    prev, curr = 0, 1
    for _ in range(n):
        prev, curr = curr, prev + curr
    return [prev, time.perf_counter() - start]


def exception(ctx: ExecContext, message: str = "Test Exception") -> None:
    """Raise an exception with ``message``, to test error reporting.

    CLI Example: ``hamaster '*' test.exception 'Oh noes!'``
    """
    raise Exception(message)


def retcode(ctx: ExecContext, code: int | str = 0) -> int:
    """Set the job's return code to ``code`` (a non-zero code fails the job) and return it.

    CLI Example: ``hamaster '*' test.retcode 42``
    """
    ctx.retcode = int(code)
    return ctx.retcode

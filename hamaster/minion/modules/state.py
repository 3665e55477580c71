"""The ``state`` execution module: Salt's ``state.apply``, ``state.sls``, ``state.highstate``,
``state.show_sls``, ``state.show_highstate``, ``state.show_lowstate``, ``state.show_top``,
``state.single``, ``state.test`` (see :mod:`hamaster.states`).

Sls files come from the masters' file server (``salt://``), or from local ``file_roots`` when
the minion runs masterless (``hamaster-call --local`` or ``file_client: local``). A failed state
sets the job's retcode to 2, an sls tree that does not compile to 1, as Salt does. One state run
at a time: a second one while a run is going is refused with Salt's "is running as PID" error.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from hamaster.minion.modules.context import ExecContext

#: Salt's ``__outputter__``: returns of these print with the highstate outputter.
__outputter__ = {"apply": "highstate", "sls": "highstate", "highstate": "highstate",
                 "test": "highstate", "single": "highstate"}


def _mods(mods: Any) -> list[str] | None:
    if mods is None or mods == "":
        return None
    if isinstance(mods, (list, tuple)):
        return [str(m).strip() for m in mods if str(m).strip()]
    return [m.strip() for m in str(mods).split(",") if m.strip()]


_RUN_LOCK = threading.Lock()
_RUNNING: dict[str, Any] = {}


@contextlib.contextmanager
def _one_run(ctx: ExecContext, fun: str) -> Iterator[str | None]:
    """One state run at a time per minion (Salt's rule); yields Salt's refusal text or None."""
    if not _RUN_LOCK.acquire(blocking=False):
        other = dict(_RUNNING)
        started = time.strftime("%Y, %b %d %H:%M:%S", time.localtime(other.get("t", 0)))
        yield (f'The function "{other.get("fun")}" is running as PID {os.getpid()} and was '
               f'started at {started} with jid {other.get("jid")}')
        return
    try:
        _RUNNING.update(fun=fun, jid=ctx.jid, t=time.time())
        yield None
    finally:
        _RUNNING.clear()
        _RUN_LOCK.release()


def _system(ctx: ExecContext, saltenv: str | None, test: Any, pillar: Any) -> Any:
    from hamaster.states.apply import StateSystem

    if pillar is not None and not isinstance(pillar, dict):
        raise ValueError("Pillar data must be formatted as a dictionary")
    return StateSystem(ctx, saltenv=saltenv, test=None if test is None else bool(test),
                       pillar=pillar)


def _finish(ctx: ExecContext, ret: Any, retcode: int) -> Any:
    ctx.retcode = retcode
    return ret


def apply(ctx: ExecContext, mods: Any = None, test: Any = None, saltenv: str | None = None,
          pillar: dict | None = None, **kwargs: Any) -> Any:
    """Apply the named sls files (comma-separated), or the highstate when none is named.

    CLI Example: ``hamaster '*' state.apply web,db test=True``
    """
    with _one_run(ctx, "state.apply") as busy:
        if busy:
            return _finish(ctx, [busy], 1)
        system = _system(ctx, saltenv, test, pillar)
        return _finish(ctx, *system.apply(_mods(mods)))


def sls(ctx: ExecContext, mods: Any, test: Any = None, saltenv: str | None = None,
        pillar: dict | None = None, **kwargs: Any) -> Any:
    """Apply the named sls files.

    CLI Example: ``hamaster '*' state.sls web``
    """
    names = _mods(mods)
    if not names:
        ctx.retcode = 1
        return ["No sls named"]
    return apply(ctx, names, test=test, saltenv=saltenv, pillar=pillar)


def highstate(ctx: ExecContext, test: Any = None, saltenv: str | None = None,
              pillar: dict | None = None, **kwargs: Any) -> Any:
    """Apply the states the top file assigns to this minion.

    CLI Example: ``hamaster '*' state.highstate``
    """
    return apply(ctx, None, test=test, saltenv=saltenv, pillar=pillar)


def test(ctx: ExecContext, mods: Any = None, saltenv: str | None = None,
         pillar: dict | None = None, **kwargs: Any) -> Any:
    """``state.apply`` with ``test=True``: report what would change, change nothing.

    CLI Example: ``hamaster '*' state.test web``
    """
    return apply(ctx, mods, test=True, saltenv=saltenv, pillar=pillar)


def single(ctx: ExecContext, fun: str, name: str, test: Any = None,
           saltenv: str | None = None, **kwargs: Any) -> Any:
    """Run one state function: ``state.single file.managed /etc/motd contents=hi``.

    CLI Example: ``hamaster '*' state.single pkg.installed name=vim``
    """
    kw = {k: v for k, v in kwargs.items() if not k.startswith("__pub_")}
    with _one_run(ctx, "state.single") as busy:
        if busy:
            return _finish(ctx, [busy], 1)
        system = _system(ctx, saltenv, test, None)
        return _finish(ctx, *system.single(fun, name, **kw))


def show_sls(ctx: ExecContext, mods: Any, saltenv: str | None = None, **kwargs: Any) -> Any:
    """Return the high data of the named sls files (rendered, not run).

    CLI Example: ``hamaster '*' state.show_sls web``
    """
    high, errors = _system(ctx, saltenv, None, None).high(_mods(mods))
    return _finish(ctx, errors, 1) if errors else high


def show_highstate(ctx: ExecContext, saltenv: str | None = None, **kwargs: Any) -> Any:
    """Return the high data of the highstate.

    CLI Example: ``hamaster '*' state.show_highstate``
    """
    high, errors = _system(ctx, saltenv, None, None).high(None)
    return _finish(ctx, errors, 1) if errors else high


def show_lowstate(ctx: ExecContext, mods: Any = None, saltenv: str | None = None,
                  **kwargs: Any) -> Any:
    """Return the ordered low chunks of the named sls files (or the highstate).

    CLI Example: ``hamaster '*' state.show_lowstate``
    """
    system = _system(ctx, saltenv, None, None)
    high, errors = system.high(_mods(mods))
    if errors:
        return _finish(ctx, errors, 1)
    chunks, errors, _graph = system.low(high)
    return _finish(ctx, errors, 1) if errors else chunks


def show_top(ctx: ExecContext, saltenv: str | None = None, **kwargs: Any) -> Any:
    """Return ``{saltenv: [sls, ...]}`` the top file assigns to this minion.

    CLI Example: ``hamaster '*' state.show_top``
    """
    matches, errors = _system(ctx, saltenv, None, None).compiler.top_matches()
    return _finish(ctx, errors, 1) if errors and not matches else matches

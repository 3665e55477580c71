"""The ``mine`` execution module: publish function results to the masters' mine, read others'.

The mine lives in the masters' shared minion data cache (``minion_data/<id>/mine``), so any
master answers ``mine.get`` the same way. ``mine_functions`` (minion option) names what
``mine.update`` collects: ``{name: [args…]}`` or ``{name: [{mine_function: fun}, args…]}``
(Salt's shapes; ``allow_tgt``/``allow_tgt_type`` items restrict who may read an entry).
"""

from __future__ import annotations

import logging
from typing import Any

from hamaster.minion.modules.context import CommandExecutionError, ExecContext

log = logging.getLogger(__name__)

ACL_ID = "__saltmine_acl__"
ACL_DATA = "__data__"


def _request(ctx: ExecContext, load: dict[str, Any]) -> Any:
    if ctx.master_request is None:
        raise CommandExecutionError("no master to reach the mine")
    return ctx.master_request({**load, "id": ctx.minion_id})


def _run(ctx: ExecContext, fun: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    from hamaster.minion.executor import execute

    if ctx.registry is None:
        raise CommandExecutionError("no function registry")
    arg: list[Any] = list(args)
    if kwargs:
        arg.append({**kwargs, "__kwarg__": True})
    sub = ExecContext(opts=ctx.opts, grains=ctx.grains, minion_id=ctx.minion_id, jid=ctx.jid,
                      pillar=ctx.pillar, fetch_file=ctx.fetch_file, registry=ctx.registry,
                      refresh_pillar=ctx.refresh_pillar, master_request=ctx.master_request)
    res = execute(ctx.registry, sub, fun, arg)
    if not res.success:
        raise CommandExecutionError(f"{fun} failed: {res.ret}")
    return res.ret


def _entry(ctx: ExecContext, name: str, spec: Any) -> Any:
    """Run one ``mine_functions`` entry; returns the value to store (with its ACL)."""
    fun, args, kwargs, acl = name, [], {}, {}
    items = spec if isinstance(spec, list) else ([] if spec is None else [spec])
    for item in items:
        if isinstance(item, dict):
            for k, v in item.items():
                if k == "mine_function":
                    fun = str(v)
                elif k in ("allow_tgt", "allow_tgt_type"):
                    acl[k] = v
                else:
                    kwargs[k] = v
        else:
            args.append(item)
    value = _run(ctx, fun, args, kwargs)
    return {ACL_ID: True, ACL_DATA: value, **acl} if acl else value


def update(ctx: ExecContext, clear: bool = False, mine_functions: dict | None = None) -> bool:
    """Run every ``mine_functions`` entry and send the results to the mine.

    CLI Example: ``hamaster '*' mine.update``
    """
    funcs = mine_functions if mine_functions is not None else ctx.opts.get("mine_functions")
    if not isinstance(funcs, dict) or not funcs:
        return True
    data: dict[str, Any] = {}
    for name, spec in funcs.items():
        try:
            data[str(name)] = _entry(ctx, str(name), spec)
        except CommandExecutionError as exc:
            log.warning("mine function %s failed: %s", name, exc)
    return bool(_request(ctx, {"cmd": "_mine", "data": data, "clear": bool(clear)}))


def send(ctx: ExecContext, name: str, *args: Any, **kwargs: Any) -> bool:
    """Run function ``name`` (or ``mine_function=``) with the arguments and store the result.

    CLI Example: ``hamaster '*' mine.send network.ip_addrs interface=eth0``
    """
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("__")}
    fun = str(kwargs.pop("mine_function", name))
    acl = {k: kwargs.pop(k) for k in ("allow_tgt", "allow_tgt_type") if k in kwargs}
    value = _run(ctx, fun, list(args), kwargs)
    if acl:
        value = {ACL_ID: True, ACL_DATA: value, **acl}
    return bool(_request(ctx, {"cmd": "_mine", "data": {name: value}, "clear": False}))


def get(ctx: ExecContext, tgt: str, fun: str, tgt_type: str = "glob") -> Any:
    """Mine data of ``fun`` from the minions ``tgt`` selects: ``{minion: data}``.

    CLI Example: ``hamaster '*' mine.get '*' network.ip_addrs``
    """
    return _request(ctx, {"cmd": "_mine_get", "tgt": tgt, "fun": fun, "tgt_type": tgt_type})


def delete(ctx: ExecContext, fun: str) -> bool:
    """Remove ``fun`` from this minion's mine.

    CLI Example: ``hamaster '*' mine.delete network.ip_addrs``
    """
    return bool(_request(ctx, {"cmd": "_mine_delete", "fun": fun}))


def flush(ctx: ExecContext) -> bool:
    """Remove all of this minion's mine data.

    CLI Example: ``hamaster '*' mine.flush``
    """
    return bool(_request(ctx, {"cmd": "_mine_flush"}))

"""Runs ordered low chunks with Salt's requisite semantics and Salt's return shape.

Each chunk's result is stored under :func:`~hamaster.states.compiler.gen_tag` with ``name``,
``changes``, ``result``, ``comment``, ``__sls__``, ``__run_num__``, ``start_time``, ``duration``
and ``__id__`` (what Salt 3008's ``State.call`` returns). Requisite statuses follow
``State._check_requisites``: a failed ``require``/``watch`` target fails the dependant with
"One or more requisite failed: sls.id"; ``onchanges`` runs only when a target changed (a failed
target counts as unchanged); ``onfail`` runs only when a target failed; ``watch`` with changes
calls the module's ``mod_watch`` after the state itself made no changes; ``listen`` calls it
once after the run. ``unless``, ``onlyif`` and ``creates`` are checked for every state call
(``mod_watch`` included), as Salt does. ``failhard`` (per state or the
``failhard`` option) stops the run after a failure, except in test mode.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hamaster.states.compiler import RequisiteGraph, gen_tag

log = logging.getLogger(__name__)

#: Low-chunk keys that are never passed to a state function.
INTERNAL_KEYS = frozenset({
    "state", "fun", "names", "__id__", "__sls__", "__env__", "order", "failhard", "onlyif",
    "unless", "creates", "check_cmd", "reload_modules", "reload_grains", "reload_pillar",
    "fire_event", "parallel", "retry", "saltenv", "__prereq__", "aggregate", "listen",
    "listen_in", "prereq", "prereq_in", "use", "use_in", "require", "require_in",
    "require_any", "watch", "watch_in", "watch_any", "onchanges", "onchanges_in",
    "onchanges_any", "onfail", "onfail_in", "onfail_any", "onfail_all", "sfun", "__reqs__",
    "name_order", "__sls_included_from__", "test", "umask", "runas_password", "cmd_opts_exclude",
})


#: Salt's ``STATE_REQUISITE_KEYWORDS`` (dropped from a ``listen`` mod_watch chunk).
REQUISITE_KEYWORDS = frozenset({
    "onchanges", "onchanges_any", "onfail", "onfail_any", "onfail_all", "onfail_stop",
    "prereq", "prerequired", "watch", "watch_any", "require", "require_any", "listen",
})


@dataclass
class StateRun:
    """What a state function sees: the minion's execution context, test mode and the files."""

    exec_ctx: Any
    test: bool
    saltenv: str
    read: Callable[[str, str], bytes | None]
    render: Callable[[bytes, str, str, str, Mapping[str, Any] | None], Any]
    low: dict[str, Any] = field(default_factory=dict)
    #: ``(salt://dir, saltenv) -> [relative file paths]`` (file.recurse).
    list_files: Callable[[str, str], list[str]] | None = None

    def call(self, fun: str, *args: Any, **kwargs: Any) -> Any:
        """Call an execution-module function of this minion (``salt['mod.fun']``)."""
        registry = self.exec_ctx.registry
        func = registry.get(fun) if registry is not None else None
        if func is None:
            raise KeyError(f"execution function {fun!r} is not available")
        return func(self.exec_ctx, *args, **kwargs)


def rtype_is_pre(req: Mapping[str, Any], low: Mapping[str, Any], graph: RequisiteGraph) -> bool:
    """Whether ``req`` is one of the chunks ``low`` prereqs (its result is a test run)."""
    return gen_tag(req) in graph.prereqs.get(gen_tag(low), [])


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def _timing(start: datetime.datetime) -> tuple[str, float]:
    delta = _now() - start
    return (start.astimezone().time().isoformat(),
            (delta.seconds * 1000000 + delta.microseconds) / 1000.0)


class Runner:
    """Executes one ordered chunk list; ``functions`` maps ``mod.fun`` to state functions."""

    def __init__(self, chunks: list[dict[str, Any]], graph: RequisiteGraph,
                 functions: Mapping[str, Callable[..., dict[str, Any]]], base: StateRun,
                 failhard: bool = False) -> None:
        self.chunks = chunks
        self.graph = graph
        self.functions = functions
        self.base = base
        self.failhard = failhard
        self.run_num = 0
        self.running: dict[str, dict[str, Any]] = {}
        #: test-mode results of prereq'd states, by tag
        self.pre: dict[str, dict[str, Any]] = {}

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, Any]]:
        """Run every chunk in order (requisites first); stop early on failhard."""
        for low in self.chunks:
            tag = gen_tag(low)
            if tag in self.running:
                continue
            if self._call_chunk(low, 0):
                break
            if self._check_failhard(low):
                break
        self.run_listen()
        return self.running

    def run_listen(self) -> None:
        """Salt's ``listen``/``listen_in``: after the run, call ``mod_watch`` of each listening
        state whose targets changed, as ``listener_<id>`` (once each)."""
        crefs = {(c["state"], c["__id__"], c["name"]): c for c in self.chunks}
        listeners: list[tuple[tuple[str, str, str], list[Any]]] = []
        for c in self.chunks:
            if c.get("listen"):
                listeners.append(((c["state"], c["__id__"], c["name"]), list(c["listen"])))
            for l_in in c.get("listen_in") or []:
                if isinstance(l_in, dict):
                    for k, v in l_in.items():
                        listeners.append(((k, v, "lookup"), [{c["state"]: c["__id__"]}]))
        errors: dict[str, dict[str, Any]] = {}

        def error(state: str, id_: str) -> None:
            errors[f"Listen_Error_|-listen_{id_}_|-listen_{state}_|-Listen_Error"] = {
                "comment": f"Referenced state {state}: {id_} does not exist",
                "name": f"listen_{state}:{id_}", "result": False, "changes": {}}

        watchers: list[dict[str, Any]] = []
        for key, refs in listeners:
            for ref in refs:
                if not isinstance(ref, dict):
                    hit = [c for c in self.chunks if ref in (c["__id__"], c["name"])]
                    if not hit:
                        continue
                    ref = {hit[-1]["state"]: hit[-1]["__id__"]}
                for lkey, lval in ref.items():
                    targets = [c for cref, c in crefs.items() if cref[0] == lkey and lval in cref]
                    if not targets:
                        error(lkey, lval)
                        continue
                    for target in targets:
                        tret = self.running.get(gen_tag(target))
                        if not tret or not tret["changes"]:
                            continue
                        mine = [c for cref, c in crefs.items()
                                if cref[0] == key[0] and key[1] in cref]
                        if not mine:
                            error(key[0], key[1])
                            continue
                        for chunk in mine:
                            low = {k: v for k, v in chunk.items()
                                   if k not in REQUISITE_KEYWORDS}
                            low.update(sfun=chunk["fun"], fun="mod_watch",
                                       __id__=f"listener_{chunk['__id__']}")
                            watchers.append(low)
        for low in watchers:
            tag = gen_tag(low)
            if tag not in self.running:
                self.running[tag] = self._call(low)
        for tag, err in errors.items():
            err["__run_num__"] = self.run_num
            self.run_num += 1
            self.running[tag] = err

    def _check_failhard(self, low: Mapping[str, Any]) -> bool:
        if self.base.test:
            return False
        tag = gen_tag(low)
        if low.get("failhard", self.failhard) and tag in self.running:
            res = self.running[tag]["result"]
            return res is not None and not res
        return False

    def _call_chunk(self, low: dict[str, Any], depth: int) -> bool:
        """Run one chunk; True when failhard stopped the run."""
        tag = gen_tag(low)
        status, reqs = self._check_requisites(low)
        if status == "unmet":
            for _rtype, dep in self.graph.dependencies(low):
                if gen_tag(dep) not in self.running:
                    if depth >= 20 or self._call_chunk(dep, depth + 1):
                        return True
                    if self._check_failhard(dep):
                        return True
            status, reqs = self._check_requisites(low)
            if status == "unmet":  # cannot happen on an acyclic graph; be safe
                self._not_run(low, False, "Recursive requisite found")
                return False
        if status == "met":
            self.running[tag] = self._call(low)
        elif status == "fail":
            failed = []
            for req_lows in reqs.values():
                for rl in req_lows:
                    rret = self.pre.get(gen_tag(rl)) if rtype_is_pre(rl, low, self.graph) \
                        else self.running.get(gen_tag(rl))
                    if rret is not None and rret["result"] is False:
                        key = f"{rl.get('__sls__')}.{rl['__id__']}"
                        if key not in failed:
                            failed.append(key)
            self._not_run(low, False, "One or more requisite failed: " + ", ".join(failed))
        elif status == "skip_req":
            self._not_run(low, True, "State was not run because requisites were skipped by "
                                     "another state")
        elif status == "skip_watch":
            ret = self._call(low)
            ret["comment"] += (" mod_watch was not run because requisites were skipped by "
                               "another state")
            self.running[tag] = ret
        elif status == "change":
            ret = self._call(low)
            if not ret["changes"] and not ret.get("skip_watch", False):
                wlow = dict(low)
                wlow["sfun"] = low["fun"]
                wlow["fun"] = "mod_watch"
                wlow["__reqs__"] = reqs
                ret = self._call(wlow, tag_low=low)
            self.running[tag] = ret
        elif status == "pre":
            self._not_run(low, True, "No changes detected")
        elif status == "onfail":
            self._not_run(low, True, "State was not run because onfail req did not change")
        elif status == "onchanges":
            self._not_run(low, True, "State was not run because none of the onchanges reqs "
                                     "changed")
        else:
            self.running[tag] = self._call(low)
        return False

    def _check_requisites(self, low: Mapping[str, Any]) -> tuple[str, dict[str, list]]:
        reqs: dict[str, list[dict[str, Any]]] = {}
        for rtype, chunk in self.graph.dependencies(low):
            if rtype == "prerequired":  # ordering only
                if gen_tag(chunk) not in self.running:
                    return "unmet", reqs
                continue
            reqs.setdefault(rtype, []).append(chunk)
        fun_stats: set[str] = set()
        for req_tag in self.graph.prereqs.get(gen_tag(low), []):
            req_low = self.graph.nodes[req_tag]
            reqs.setdefault("prereq", []).append(req_low)
            if req_tag not in self.pre:
                self.pre[req_tag] = self._call(req_low, force_test=True, count=False)
            result = self.pre[req_tag]["result"]
            fun_stats.add("fail" if result is False else "premet" if result is None else "pre")
        for r_type, chunks in reqs.items():
            if r_type == "prereq":
                continue
            stats: set[str] = set()
            base = re.sub(r"_any$|_all$", "", r_type)
            for chunk in chunks:
                ret = self.running.get(gen_tag(chunk))
                if ret is None:
                    stats.add("unmet")
                    continue
                if ret.get("skip_req"):
                    stats.add("skip_req")
                if base == "onfail":
                    if ret["result"] is True:
                        stats.add("onfail")
                        continue
                elif base == "onchanges":
                    if ret["result"] is False or not ret["changes"]:
                        stats.add("onchanges")
                    else:
                        stats.add("onchangesmet")
                    continue
                elif ret["result"] is False:
                    stats.add("fail")
                    continue
                if base == "watch" and ret["changes"]:
                    stats.add("change")
                    continue
                if ret.get("__state_ran__", True):
                    stats.add("met")
            if r_type.endswith("_any") or r_type == "onfail":
                if "met" in stats or "change" in stats:
                    stats.discard("fail")
                if "onchangesmet" in stats:
                    stats.discard("onchanges")
                    stats.discard("fail")
                if "onfail" in stats and "met" in stats:
                    stats.discard("onfail")
            if r_type.endswith("_all") and "onfail" in stats:
                stats.discard("met")
            fun_stats.update(stats)
        if "unmet" in fun_stats:
            status = "unmet"
        elif "fail" in fun_stats:
            status = "fail"
        elif "skip_req" in fun_stats and "onchangesmet" in fun_stats:
            status = "skip_req"
        elif "skip_req" in fun_stats and "change" in fun_stats:
            status = "skip_watch"
        elif "pre" in fun_stats:
            status = "met" if "premet" in fun_stats else "pre"
        elif "onfail" in fun_stats and "onchangesmet" not in fun_stats:
            status = "onfail"
        elif "onchanges" in fun_stats and "onchangesmet" not in fun_stats:
            status = "onchanges"
        elif "change" in fun_stats:
            status = "change"
        elif "onfail" in fun_stats:
            status = "onfail"
        else:
            status = "met"
        return status, reqs

    def _not_run(self, low: Mapping[str, Any], result: bool, comment: str) -> None:
        start_time, duration = _timing(_now())
        ret: dict[str, Any] = {"changes": {}, "result": result, "duration": duration,
                               "start_time": start_time, "comment": comment,
                               "__state_ran__": False, "__run_num__": self.run_num}
        for key in ("__sls__", "__id__", "name"):
            ret[key] = low.get(key)
        self.running[gen_tag(low)] = ret
        self.run_num += 1

    # -- one call ----------------------------------------------------------------------------

    def _run_check(self, low: Mapping[str, Any]) -> dict[str, Any] | None:
        """Salt's ``unless``/``onlyif``/``creates``: a result dict when the state is skipped."""
        opts = {k: low.get(k) for k in ("cwd", "runas", "env", "timeout", "shell")
                if low.get(k) is not None}

        def rc(cmd: Any) -> int:
            if isinstance(cmd, bool):
                return 0 if cmd else 1
            if isinstance(cmd, dict):  # the function form: {fun: mod.fun, args...}
                fun = cmd.get("fun")
                args = cmd.get("args", [])
                kw = {k: v for k, v in cmd.items() if k not in ("fun", "args")}
                try:
                    res = self.base.call(str(fun), *args, **kw)
                except Exception:
                    return 1
                return 0 if res else 1
            return int(self.base.call("cmd.retcode", cmd, ignore_retcode=True,
                                      python_shell=True, output_loglevel="quiet", **opts))

        if "onlyif" in low:
            conds = low["onlyif"] if isinstance(low["onlyif"], list) else [low["onlyif"]]
            for cond in conds:
                if rc(cond) != 0:
                    return {"comment": "onlyif condition is false", "skip_watch": True,
                            "result": True}
        if "unless" in low:
            conds = low["unless"] if isinstance(low["unless"], list) else [low["unless"]]
            if all(rc(cond) == 0 for cond in conds):
                return {"comment": "unless condition is true", "skip_watch": True,
                        "result": True}
        if "creates" in low:
            creates = low["creates"]
            if isinstance(creates, str) and os.path.exists(creates):
                return {"comment": f"{creates} exists", "skip_watch": True, "result": True}
            if isinstance(creates, list) and all(os.path.exists(str(p)) for p in creates):
                return {"comment": "All files in creates exist", "skip_watch": True,
                        "result": True}
        return None

    def _call(self, low: dict[str, Any], tag_low: Mapping[str, Any] | None = None,
              force_test: bool = False, count: bool = True) -> dict[str, Any]:
        start = _now()
        full = f"{low['state']}.{low['fun']}"
        func = self.functions.get(full)
        ret: dict[str, Any]
        if func is None:
            ret = {"result": False, "name": low["name"], "changes": {},
                   "comment": f"State '{full}' was not found in SLS '{low.get('__sls__')}'\n"}
        else:
            try:
                ret = self._invoke(func, full, low, force_test)
            except Exception as exc:
                log.debug("state %s raised", full, exc_info=True)
                ret = {"result": False, "name": low["name"], "changes": {},
                       "comment": "An exception occurred in this state: "
                                  f"{traceback.format_exc() or exc}"}
        if not isinstance(ret, dict):
            ret = {"result": False, "name": low["name"], "changes": {},
                   "comment": f"State '{full}' returned {type(ret).__name__}, not a dict"}
        for key, default in (("name", low["name"]), ("changes", {}), ("result", False),
                             ("comment", "")):
            ret.setdefault(key, default)
        if isinstance(ret["comment"], list):
            ret["comment"] = "\n".join(str(c) for c in ret["comment"])
        src = tag_low or low
        if not count:  # a prereq's test-mode check: not part of the run's output
            return ret
        ret["__sls__"] = src.get("__sls__")
        ret["__run_num__"] = self.run_num
        self.run_num += 1
        ret["start_time"], ret["duration"] = _timing(start)
        ret["__id__"] = src["__id__"]
        return ret

    def _invoke(self, func: Callable[..., dict[str, Any]], full: str,
                low: dict[str, Any], force_test: bool = False) -> dict[str, Any]:
        if any(k in low for k in ("onlyif", "unless", "creates")):  # mod_watch too, as Salt
            skipped = self._run_check(low)
            if skipped is not None:
                skipped.update({"name": low["name"], "changes": {}})
                return skipped
        sig = inspect.signature(func)
        params = list(sig.parameters.values())[1:]  # after the StateRun
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        names = {p.name for p in params}
        kwargs: dict[str, Any] = {}
        for key, val in low.items():
            if key in ("sfun", "__reqs__") and low["fun"] == "mod_watch":
                kwargs[key] = val
                continue
            if key in INTERNAL_KEYS or key.startswith("__"):
                continue
            if key in names or var_kw:
                kwargs[key] = val
        missing = [p.name for p in params
                   if p.default is inspect.Parameter.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and p.name not in kwargs]
        if missing:
            return {"result": False, "name": low["name"], "changes": {},
                    "comment": f"Missing parameter {missing[0]} for state {full}"}
        test = force_test or bool(low.get("test", self.base.test))
        run = StateRun(exec_ctx=self.base.exec_ctx, test=test,
                       saltenv=str(low.get("__env__") or self.base.saltenv),
                       read=self.base.read, render=self.base.render, low=low,
                       list_files=self.base.list_files)
        return func(run, **kwargs)

"""The state compiler: sls files → high data → low chunks in Salt 3008's execution order.

Rendering goes through the renderer shared with pillar (:class:`hamaster.pillar.render.Renderer`,
``jinja|yaml`` and shebangs, sandboxed Jinja2) with the state context on top (``salt`` calling the
minion's execution modules, ``grains``, ``pillar``, ``opts``, ``saltenv``, ``sls``, and extra
filters from :mod:`hamaster.states.jinja`). Templates import other files (``map.jinja``,
``defaults.yaml``) from the same saltenv through :mod:`hamaster.states.source`.

High data follows Salt: ``mod.fun`` keys are split into ``{mod: [fun, args...]}``; ``include:``
renders the named sls first (relative ``.x`` names too); ``extend:`` replaces arguments and
appends requisites; each state declaration gets an auto ``order`` (10000, 10001, … in render
order, includes before the including file). Low chunks are one per (ID, module, name) with
``names:`` expanded; ``*_in`` requisites become requisites on their targets; the chunks are then
sorted topologically over the requisite graph, ties broken by ``order`` and
``state+name+fun`` exactly as Salt's ``DependencyGraph.aggregate_and_order_chunks`` does.
"""

from __future__ import annotations

import copy
import fnmatch
import heapq
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from hamaster.pillar.render import RenderContext, Renderer, RenderError, safe_opts
from hamaster.states.source import Source

log = logging.getLogger(__name__)

#: Requisite types with their weight (Salt's ``RequisiteType`` order of precedence).
REQUISITE_WEIGHTS: dict[str, int] = {
    "onfail": 0, "onfail_any": 1, "onfail_all": 2, "require": 3, "require_any": 4,
    "onchanges": 5, "onchanges_any": 6, "watch": 7, "watch_any": 8, "prereq": 9,
    "prerequired": 10, "listen": 11,
}
#: Requisites that order and gate execution (``listen`` runs after the run; ``prereq`` is
#: added by :meth:`RequisiteGraph.add_prereqs`).
DAG_REQUISITES = ("require", "require_any", "watch", "watch_any", "onfail", "onfail_any",
                  "onfail_all", "onchanges", "onchanges_any")
REQUISITE_IN = {f"{r}_in": r for r in ("require", "watch", "onchanges", "onfail", "prereq")}
REQUISITE_KEYS = frozenset(REQUISITE_WEIGHTS) | frozenset(REQUISITE_IN) | {
    "prereq_in", "listen_in", "use", "use_in"}

AUTO_ORDER_START = 10000


def gen_tag(low: Mapping[str, Any]) -> str:
    """Salt's return key: ``<state>_|-<id>_|-<name>_|-<fun>``."""
    return f"{low['state']}_|-{low['__id__']}_|-{low['name']}_|-{low['fun']}"


def sls_paths(sls: str) -> tuple[str, str]:
    """``a.b`` → (``a/b.sls``, ``a/b/init.sls``)."""
    base = sls.replace(".", "/")
    return f"{base}.sls", f"{base}/init.sls"


class StateCompiler:
    """Renders and compiles sls trees for one minion and one run (not shared across runs)."""

    def __init__(self, source: Source, renderer: Renderer, opts: Mapping[str, Any],
                 grains: Mapping[str, Any], pillar: Mapping[str, Any], minion_id: str,
                 salt_funcs: Mapping[str, Callable[..., Any]] | None = None,
                 filters: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.source = source
        self.renderer = renderer
        self.opts = opts
        self.grains = grains
        self.pillar = pillar
        self.minion_id = minion_id
        self.salt_funcs = salt_funcs or {}
        self.filters = dict(filters or {})
        self._envs: dict[str, Any] = {}
        self.iorder = AUTO_ORDER_START

    # -- rendering ---------------------------------------------------------------------------

    def jinja_env(self, saltenv: str) -> Any:
        """The sandboxed Jinja environment loading from ``saltenv`` (cached per run)."""
        env = self._envs.get(saltenv)
        if env is None:
            env = self.renderer.environment(lambda name: self.source.read(name, saltenv))
            env.filters.update(self.filters)
            self._envs[saltenv] = env
        return env

    def render_ctx(self, saltenv: str, sls: str, path: str,
                   extra: Mapping[str, Any] | None = None) -> RenderContext:
        """The render context of one file (also used by ``file.managed`` templates)."""
        more: dict[str, Any] = {"salt": self.salt_funcs}
        if extra:
            more.update(extra)
        opts = dict(safe_opts(self.opts))
        opts.setdefault("id", self.minion_id)
        return RenderContext(saltenv=saltenv, sls=sls, path=path, grains=self.grains, opts=opts,
                             pillar=self.pillar, minion_id=self.minion_id, extra=more)

    def render_file(self, data: bytes, saltenv: str, sls: str, path: str,
                    extra: Mapping[str, Any] | None = None) -> Any:
        """Render file bytes through their pipeline (raises :class:`RenderError`)."""
        ctx = self.render_ctx(saltenv, sls, path, extra)
        return self.renderer.render(data, ctx, self.jinja_env(saltenv))

    def find_sls(self, sls: str, saltenv: str) -> tuple[str, bytes] | None:
        """``(path, content)`` of sls ``sls`` in ``saltenv`` or None."""
        for path in sls_paths(sls):
            data = self.source.read(path, saltenv)
            if data is not None:
                return path, data
        return None

    # -- top ---------------------------------------------------------------------------------

    def top_matches(self) -> tuple[dict[str, list[str]], list[str]]:
        """``{saltenv: [sls, ...]}`` this minion gets from the top files, and errors."""
        from hamaster import targeting

        top_name = str(self.opts.get("state_top") or "top.sls").removeprefix("salt://")
        errors: list[str] = []
        matches: dict[str, list[str]] = {}
        for env in self.source.envs():
            data = self.source.read(top_name, env)
            if data is None:
                continue
            try:
                top = self.render_file(data, env, "top", top_name) or {}
            except RenderError as exc:
                errors.append(f"Rendering SLS '{env}:top' failed: {exc}")
                continue
            if not isinstance(top, dict):
                errors.append(f"Top file {top_name} in saltenv {env} is not a dictionary")
                continue
            for saltenv, body in top.items():
                if not isinstance(body, dict):
                    continue
                for tgt, items in body.items():
                    items = items if isinstance(items, list) else [items]
                    kind = "compound"
                    for item in items:
                        if isinstance(item, dict) and "match" in item:
                            kind = str(item["match"])
                    try:
                        ok = targeting.matches(str(tgt), kind, self.minion_id, self.grains)
                    except (ValueError, TypeError) as exc:
                        log.warning("top: target %r (%s) is invalid: %s", tgt, kind, exc)
                        ok = False
                    if not ok:
                        continue
                    env_list = matches.setdefault(str(saltenv), [])
                    for item in items:
                        if isinstance(item, str) and item not in env_list:
                            env_list.append(item)
        if not matches and not errors:
            errors.append("No Top file or master_tops data matches found. Please see master "
                          "log for details.")
        return matches, errors

    # -- high data ---------------------------------------------------------------------------

    def build_high(self, matches: Mapping[str, list[str]]) -> tuple[dict[str, Any], list[str]]:
        """Render the named sls files (and their includes) into high data."""
        high: dict[str, Any] = {}
        errors: list[str] = []
        done: set[str] = set()
        extends: list[tuple[dict, str, str]] = []
        for saltenv, mods in matches.items():
            for sls in mods:
                if f"{saltenv}:{sls}" in done:
                    continue
                found = self.find_sls(sls, saltenv)
                if found is None:
                    errors.append(f"No matching sls found for '{sls}' in env '{saltenv}'")
                    continue
                self._render_state(sls, saltenv, found, high, errors, done, extends)
        for ext, sls, saltenv in extends:
            self._reconcile_extend(high, ext, sls, saltenv, errors)
        return high, errors

    def _render_state(self, sls: str, saltenv: str, found: tuple[str, bytes],
                      high: dict[str, Any], errors: list[str], done: set[str],
                      extends: list[tuple[dict, str, str]]) -> None:
        done.add(f"{saltenv}:{sls}")
        path, data = found
        try:
            state = self.render_file(data, saltenv, sls, path)
        except RenderError as exc:
            errors.append(f"Rendering SLS '{saltenv}:{sls}' failed: {exc}")
            return
        if not state:
            return
        if not isinstance(state, dict):
            errors.append(f"SLS {sls} does not render to a dictionary")
            return
        state = dict(state)
        include: list[Any] = []
        if "include" in state:
            if not isinstance(state["include"], list):
                errors.append(f"Include Declaration in SLS {sls} is not formed as a list")
                state.pop("include")
            else:
                include = state.pop("include")
        if "extend" in state:
            ext = state.pop("extend")
            if not isinstance(ext, dict):
                errors.append(f"Extension value in SLS '{sls}' is not a dictionary")
            else:
                extends.append((ext, sls, saltenv))
        state.pop("exclude", None)
        self._handle_decls(state, sls, saltenv, errors)
        for inc in include:
            env_key = saltenv
            if isinstance(inc, dict) and len(inc) == 1:
                env_key, inc = next(iter(inc.items()))
            if not isinstance(inc, str):
                errors.append(f"Include Declaration in SLS {sls} has an invalid entry {inc!r}")
                continue
            if inc.startswith("."):
                m = re.match(r"^(\.+)(.*)$", inc)
                levels, rest = m.groups() if m else ("", inc)
                parts = sls.split(".")
                if path.endswith("/init.sls"):
                    parts.append("init")
                if len(levels) > len(parts):
                    errors.append(f"Attempted relative include of '{inc}' within SLS "
                                  f"'{saltenv}:{sls}' goes beyond top level package ")
                    continue
                inc = ".".join(parts[:-len(levels)] + [rest])
            if f"{env_key}:{inc}" in done:
                continue
            inc_found = self.find_sls(inc, env_key)
            if inc_found is None:
                errors.append(f"Specified SLS {inc} in saltenv {env_key} is not available on "
                              "the salt master or through a configured fileserver")
                continue
            self._render_state(inc, env_key, inc_found, high, errors, done, extends)
        self._handle_iorder(state)
        for id_, body in state.items():
            if id_ in high and isinstance(body, dict):
                other = high[id_].get("__sls__")
                if other != body.get("__sls__") or high[id_].get("__env__") != saltenv:
                    errors.append(
                        "Detected conflicting IDs, SLS IDs need to be globally unique.\n    The "
                        f"conflicting ID is '{id_}' and is found in SLS '{high[id_]['__env__']}:"
                        f"{other}' and SLS '{saltenv}:{sls}'")
                    continue
            high[id_] = body

    def _handle_decls(self, state: dict[str, Any], sls: str, saltenv: str,
                      errors: list[str]) -> None:
        """Salt's ``_handle_state_decls``: split ``mod.fun`` keys, add ``__sls__``/``__env__``."""
        for id_ in list(state):
            body = state[id_]
            if not isinstance(body, dict):
                if isinstance(body, str) and "." in body:
                    mod, fun = body.split(".", 1)
                    state[id_] = {"__sls__": sls, "__env__": saltenv, mod: [fun]}
                    continue
                errors.append(f"ID {id_} in SLS {sls} is not a dictionary")
                state.pop(id_)
                continue
            body = dict(body)
            seen: set[str] = set()
            for key in list(body):
                if not isinstance(key, str) or key.startswith("_"):
                    continue
                if body[key] is None:
                    body[key] = []
                if not isinstance(body[key], list):
                    continue
                if "." in key:
                    mod, fun = key.split(".", 1)
                    if mod in seen:
                        errors.append(f"ID '{id_}' in SLS '{sls}' contains multiple state "
                                      "declarations of the same type")
                        continue
                    body[mod] = list(body.pop(key)) + [fun]
                    seen.add(mod)
                    continue
                seen.add(key)
            body.setdefault("__sls__", sls)
            body.setdefault("__env__", saltenv)
            state[id_] = body

    def _handle_iorder(self, state: dict[str, Any]) -> None:
        for body in state.values():
            if not isinstance(body, dict):
                continue
            for dec, run in body.items():
                if not isinstance(dec, str) or dec.startswith("_") or not isinstance(run, list):
                    continue
                if any(isinstance(a, dict) and a and next(iter(a)) == "order" for a in run):
                    continue
                run.append({"order": self.iorder})
                self.iorder += 1

    def _reconcile_extend(self, high: dict[str, Any], ext: dict[str, Any], sls: str,
                          saltenv: str, errors: list[str]) -> None:
        for id_, body in ext.items():
            if id_ not in high:
                errors.append(
                    f"Cannot extend ID '{id_}' in '{saltenv}:{sls}'. It is not part of the high "
                    "state.\nThis is likely due to a missing include statement or an "
                    f"incorrectly typed ID.\nEnsure that a state with an ID of '{id_}' is "
                    f"included\nin '{saltenv}:{sls}' via the include statement")
                continue
            if not isinstance(body, dict):
                errors.append(f"Extension of ID '{id_}' in SLS '{sls}' is not a dictionary")
                continue
            target = high[id_]
            for dec, run in body.items():
                if not isinstance(dec, str) or dec.startswith("_"):
                    continue
                if "." in dec:
                    dec, fun = dec.split(".", 1)
                    run = list(run or []) + [fun]
                if not isinstance(run, list):
                    continue
                cur = target.setdefault(dec, [])
                for arg in run:
                    if isinstance(arg, str):
                        cur[:] = [a for a in cur if not isinstance(a, str)] + [arg]
                    elif isinstance(arg, dict) and len(arg) == 1:
                        key, val = next(iter(arg.items()))
                        idx = next((i for i, a in enumerate(cur)
                                    if isinstance(a, dict) and key in a), None)
                        if idx is None:
                            cur.append({key: copy.deepcopy(val)})
                        elif key in REQUISITE_KEYS:
                            old = cur[idx][key]
                            old = old if isinstance(old, list) else [old]
                            new = val if isinstance(val, list) else [val]
                            cur[idx] = {key: old + new}
                        else:
                            cur[idx] = {key: copy.deepcopy(val)}

    # -- low data ----------------------------------------------------------------------------

    def verify_high(self, high: Mapping[str, Any]) -> list[str]:
        """Salt's structural checks of high data (function count, list forms, requisites)."""
        errors: list[str] = []
        for id_, body in high.items():
            if not isinstance(id_, str):
                errors.append(f"ID '{id_}' in SLS '{body.get('__sls__')}' is not formed as a "
                              f"string, but is type {type(id_).__name__}. It may need to be "
                              "quoted.")
                continue
            if id_.startswith("__") or not isinstance(body, dict):
                continue
            sls = body.get("__sls__")
            for dec, run in body.items():
                if dec.startswith("__"):
                    continue
                if not isinstance(run, list):
                    errors.append(f"State '{id_}' in SLS '{sls}' is not formed as a list")
                    continue
                funs = [a for a in run if isinstance(a, str)]
                for arg in run:
                    if isinstance(arg, dict) and len(arg) > 1:
                        errors.append(f"Multiple dictionaries defined in argument of state "
                                      f"'{id_}' in SLS '{sls}'")
                    if not isinstance(arg, dict) or len(arg) != 1:
                        continue
                    key, val = next(iter(arg.items()))
                    if key == "names" and not isinstance(val, list):
                        errors.append(f"The 'names' argument in state '{id_}' in SLS '{sls}' "
                                      "needs to be formed as a list")
                    if key in REQUISITE_KEYS and not isinstance(val, list):
                        errors.append(f"The {key} statement in state '{id_}' in SLS '{sls}' "
                                      "needs to be formed as a list")
                    elif key in REQUISITE_KEYS:
                        for req in val:
                            if isinstance(req, dict) and len(req) != 1:
                                errors.append(f"Requisite declaration {req} in state {id_} in "
                                              f"SLS {sls} is not formed as a single key "
                                              "dictionary")
                if not funs:
                    errors.append(f"No function declared in state '{id_}' in SLS '{sls}'")
                elif len(funs) > 1:
                    errors.append(f"Too many functions declared in state '{id_}' in SLS "
                                  f"'{sls}'. Please choose one of the following: "
                                  + ", ".join(funs))
        return errors

    @staticmethod
    def compile_low(high: Mapping[str, Any]) -> list[dict[str, Any]]:
        """High data → low chunks (Salt's ``compile_high_data``, unordered)."""
        chunks: list[dict[str, Any]] = []
        for id_, body in high.items():
            if not isinstance(id_, str) or id_.startswith("__") or not isinstance(body, dict):
                continue
            for state, run in body.items():
                if state.startswith("__") or not isinstance(run, list):
                    continue
                funcs: list[str] = []
                names: list[Any] = []
                chunk: dict[str, Any] = {"state": state, "name": id_}
                for key in ("__sls__", "__env__"):
                    if key in body:
                        chunk[key] = body[key]
                chunk["__id__"] = id_
                for arg in run:
                    if isinstance(arg, str):
                        if arg not in funcs:
                            funcs.append(arg)
                        continue
                    if isinstance(arg, dict):
                        for key, val in arg.items():
                            if key == "names":
                                for n in val or []:
                                    if n not in names:
                                        names.append(n)
                            elif key == "state":
                                continue
                            elif key == "name" and not isinstance(val, str):
                                chunk[key] = id_
                            else:
                                chunk[key] = val
                if not funcs:
                    continue
                lives: list[dict[str, Any]] = []
                if names:
                    for order, entry in enumerate(names, 1):
                        live = copy.deepcopy(chunk)
                        if isinstance(entry, dict):
                            low_name = next(iter(entry))
                            live["name"] = low_name
                            for upd in entry[low_name] or []:
                                if isinstance(upd, dict):
                                    live.update(upd)
                        else:
                            live["name"] = entry
                        live["name_order"] = order
                        lives.append(live)
                else:
                    lives.append(copy.deepcopy(chunk))
                for live in lives:
                    live["fun"] = funcs[0]
                    if not isinstance(live["name"], str):
                        live["name"] = str(live["name"])
                    chunks.append(live)
        return chunks

    @staticmethod
    def order_chunks(chunks: list[dict[str, Any]],
                     has_mod_watch: Callable[[str], bool]) -> tuple[list[dict[str, Any]],
                                                                      list[str], RequisiteGraph]:
        """Resolve requisites into a graph and sort the chunks (Salt 3008's order)."""
        graph = RequisiteGraph()
        for chunk in chunks:
            graph.add_chunk(chunk)
        graph.apply_requisite_in(chunks)
        errors: list[str] = []
        cap = 1
        for chunk in chunks:
            if "watch" in chunk and not has_mod_watch(chunk["state"]):
                chunk.setdefault("require", []).extend(chunk.pop("watch"))
            if "watch_any" in chunk and not has_mod_watch(chunk["state"]):
                chunk.setdefault("require_any", []).extend(chunk.pop("watch_any"))
            error = graph.add_requisites(chunk)
            if error:
                errors.append(error)
            elif isinstance(chunk.get("order"), int) and not isinstance(chunk["order"], bool):
                if chunk["order"] > cap - 1 and chunk["order"] > 0:
                    cap = chunk["order"] + 100
        if not errors:
            for chunk in chunks:
                error = graph.add_prereqs(chunk)
                if error:
                    errors.append(error)
        if errors:
            return [], errors, graph
        ordered = graph.topo_order(cap)
        if ordered is None:
            return [], [f"Recursive requisites were found: {graph.cycle_str()}"], graph
        return ordered, [], graph


class RequisiteGraph:
    """Chunks as nodes, requisites as edges ``required → dependant`` (a multigraph)."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.out_edges: dict[str, list[tuple[str, str]]] = {}
        self.in_edges: dict[str, list[tuple[str, str]]] = {}
        self.lookup: dict[tuple[str, str], list[str]] = {}
        self.sls_nodes: dict[str, list[str]] = {}
        self._child_min: dict[str, float] = {}
        #: prerequiring chunk tag -> tags of the chunks it prereqs (checked in test mode first)
        self.prereqs: dict[str, list[str]] = {}

    def add_chunk(self, low: dict[str, Any]) -> None:
        """Add one chunk as a node, indexed by (state, name/id), (id, name/id) and sls."""
        tag = gen_tag(low)
        self.nodes[tag] = low
        self.out_edges.setdefault(tag, [])
        self.in_edges.setdefault(tag, [])
        for key in ((low["state"], low["name"]), (low["state"], low["__id__"]),
                    ("id", low["__id__"]), ("id", low["name"])):
            lst = self.lookup.setdefault(key, [])
            if tag not in lst:
                lst.append(tag)
        if low.get("__sls__"):
            self.sls_nodes.setdefault(low["__sls__"], []).append(tag)

    def _targets(self, key: str, val: str) -> list[str]:
        if key == "sls":
            if any(c in val for c in "*?[]"):
                return [t for sls, tags in self.sls_nodes.items() if fnmatch.fnmatch(sls, val)
                        for t in tags]
            return list(self.sls_nodes.get(val, []))
        if any(c in val for c in "*?[]"):
            return [t for (st, n), tags in self.lookup.items()
                    if st == key and fnmatch.fnmatch(n, val) for t in tags]
        return list(self.lookup.get((key, val), []))

    @staticmethod
    def _ref(ref: Any) -> tuple[str, Any]:
        if isinstance(ref, str):
            return "id", ref
        if isinstance(ref, dict) and len(ref) == 1:
            key, val = next(iter(ref.items()))
            return str(key).split(".", 1)[0], val
        return "", None

    def apply_requisite_in(self, chunks: list[dict[str, Any]]) -> None:
        """``X_in: [ref]`` on chunk C adds ``X: [{C.state: C.__id__}]`` to each target."""
        for chunk in chunks:
            for rin, req in REQUISITE_IN.items():
                refs = chunk.get(rin)
                if not refs:
                    continue
                for ref in refs if isinstance(refs, list) else [refs]:
                    key, val = self._ref(ref)
                    if not isinstance(val, str):
                        continue
                    for tag in self._targets(key, val):
                        target = self.nodes[tag]
                        entry = {chunk["state"]: chunk["__id__"]}
                        lst = target.setdefault(req, [])
                        if entry not in lst:
                            lst.append(entry)

    def add_requisites(self, low: dict[str, Any]) -> str | None:
        """Add the edges of ``low``'s requisites; an error string when one has no target."""
        tag = gen_tag(low)
        for rtype in DAG_REQUISITES:
            refs = low.get(rtype)
            if not refs:
                continue
            for ref in refs if isinstance(refs, list) else [refs]:
                key, val = self._ref(ref)
                if val is None:
                    continue
                if not isinstance(val, str):
                    return (f"Requisite [{rtype}: {key}] in state [{low['name']}] in SLS "
                            f"[{low.get('__sls__')}] must have a string as the value")
                targets = self._targets(key, val)
                if not targets:
                    return ("Referenced state does not exist for requisite "
                            f"[{rtype}: ({key}: {val})] in state [{low['name']}] in SLS "
                            f"[{low.get('__sls__')}]")
                for req_tag in targets:
                    self.out_edges[req_tag].append((tag, rtype))
                    self.in_edges[tag].append((req_tag, rtype))
        return None

    def add_prereqs(self, low: dict[str, Any]) -> str | None:
        """``prereq: [Y]`` on X: X runs before Y (Y requires X) and after Y's own
        requisites (``prerequired`` ordering edges); the runner checks Y in test mode first."""
        refs = low.get("prereq")
        if not refs:
            return None
        tag = gen_tag(low)
        for ref in refs if isinstance(refs, list) else [refs]:
            key, val = self._ref(ref)
            if not isinstance(val, str):
                continue
            targets = self._targets(key, val)
            if not targets:
                return ("Referenced state does not exist for requisite "
                        f"[prereq: ({key}: {val})] in state [{low['name']}] in SLS "
                        f"[{low.get('__sls__')}]")
            for req_tag in targets:
                for src, _rtype in list(self.in_edges[req_tag]):
                    if src != tag:
                        self.out_edges[src].append((tag, "prerequired"))
                        self.in_edges[tag].append((src, "prerequired"))
                self.out_edges[tag].append((req_tag, "require"))
                self.in_edges[req_tag].append((tag, "require"))
                self.prereqs.setdefault(tag, []).append(req_tag)
        return None

    def dependencies(self, low: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """``[(requisite type, required chunk)]`` of ``low``."""
        return [(rtype, self.nodes[src]) for src, rtype in self.in_edges.get(gen_tag(low), [])]

    @staticmethod
    def _norm_order(order: Any, cap: int) -> float:
        if isinstance(order, bool) or not isinstance(order, (int, float)):
            if order == "last":
                return cap + 1000000
            if order == "first":
                return 0
            return cap
        return order

    def _chunk_order(self, cap: int, node: str) -> tuple[float, float]:
        chunk = self.nodes[node]
        order = self._norm_order(chunk.get("order"), cap)
        name_order = chunk.pop("name_order", 0)
        if name_order:
            order += name_order / 10000.0
        if order < 0:
            order += cap + 1000000
        chunk["order"] = order
        own = order
        child_min = self._child_min.get(node)
        if child_min is None:
            child_min = float("inf")
            req_order = float("-inf")
            for child, rtype in self.out_edges.get(node, []):
                weight = REQUISITE_WEIGHTS[rtype]
                if req_order <= weight:
                    req_order = weight
                    cchunk = self.nodes[child]
                    corder = cchunk.get("order", float("inf"))
                    if isinstance(corder, bool) or not isinstance(corder, (int, float)):
                        corder = self._norm_order(corder, cap)
                        cchunk["order"] = corder
                    child_min = min(child_min, corder)
            self._child_min[node] = child_min
        if order > child_min:
            order = child_min
        return order, own

    def topo_order(self, cap: int) -> list[dict[str, Any]] | None:
        """Kahn's algorithm with Salt's priority key; None on a cycle."""
        indeg = {n: len(self.in_edges[n]) for n in self.nodes}

        def key(node: str) -> tuple[Any, str]:
            c = self.nodes[node]
            return self._chunk_order(cap, node), f"{c['state']}{c['name']}{c['fun']}"

        heap = [(key(n), n) for n, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        out: list[dict[str, Any]] = []
        while heap:
            _, node = heapq.heappop(heap)
            out.append(self.nodes[node])
            for child, _rtype in self.out_edges[node]:
                indeg[child] -= 1
                if indeg[child] == 0:
                    heapq.heappush(heap, (key(child), child))
        if len(out) != len(self.nodes):
            return None
        return out

    def _find_cycle(self) -> list[tuple[str, str, str]]:
        """A cycle as ``[(required, dependant, type)]`` (Salt's DFS with back edges)."""
        white, gray, black = 0, 1, 2
        color = dict.fromkeys(self.nodes, white)
        parent: dict[str, tuple[str, str]] = {}

        def visit(node: str) -> list[tuple[str, str, str]] | None:
            color[node] = gray
            by_target: dict[str, list[str]] = {}
            for child, rtype in self.out_edges[node]:
                by_target.setdefault(child, []).append(rtype)
            for target, rtypes in by_target.items():
                for rtype in rtypes:
                    if color[target] == gray:
                        cycle = [(node, target, rtype)]
                        cur = node
                        while cur != target:
                            prev, key = parent[cur]
                            cycle.append((prev, cur, key))
                            cur = prev
                        return list(reversed(cycle))
                    if color[target] == white:
                        parent[target] = (node, rtype)
                        found = visit(target)
                        if found:
                            return found
            color[node] = black
            return None

        for node in self.nodes:
            if color[node] == white:
                found = visit(node)
                if found:
                    return found
        return []

    @staticmethod
    def _chunk_str(chunk: Mapping[str, Any]) -> str:
        d = {"SLS": chunk.get("__sls__"), "ID": chunk["__id__"]}
        if chunk["__id__"] != chunk["name"]:
            d["NAME"] = chunk["name"]
        return str(d)

    def cycle_str(self) -> str:
        """The requisites of one cycle, in Salt's wording."""
        return ", ".join(
            f"({self._chunk_str(self.nodes[dst])}, '{rtype}', {self._chunk_str(self.nodes[src])})"
            for src, dst, rtype in self._find_cycle())

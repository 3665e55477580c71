"""One state run on a minion: source → compile → order → run → Salt's return and retcode.

Retcodes follow Salt: 0 when every state succeeded (or would, in test mode), 2 when a state
failed (``EX_STATE_FAILURE``), 1 when the sls tree did not compile (the return is then the list
of error strings, as Salt returns it).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from hamaster.pillar.render import Renderer
from hamaster.states.compiler import StateCompiler
from hamaster.states.jinja import FILTERS, SaltFunctions
from hamaster.states.modules import load_state_functions
from hamaster.states.runner import Runner, StateRun
from hamaster.states.source import source_for

log = logging.getLogger(__name__)

EX_STATE_COMPILER_ERROR = 1
EX_STATE_FAILURE = 2

_RENDERER: Renderer | None = None
_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] | None = None
_LOCK = threading.Lock()


def shared_renderer() -> Renderer:
    """The renderer all state runs of this process share (its compiled-template cache)."""
    global _RENDERER
    with _LOCK:
        if _RENDERER is None:
            _RENDERER = Renderer("jinja|yaml")
        return _RENDERER


def state_functions() -> dict[str, Callable[..., dict[str, Any]]]:
    """``{"file.managed": func, ...}`` (loaded once)."""
    global _FUNCTIONS
    with _LOCK:
        if _FUNCTIONS is None:
            _FUNCTIONS = load_state_functions()
        return _FUNCTIONS


def _local_pillar(opts: Mapping[str, Any], minion_id: str, grains: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """Masterless: compile the pillar from the minion's own ``pillar_roots``."""
    if not opts.get("pillar_roots"):
        return {}
    try:
        from hamaster.pillar.compiler import PillarCompiler

        return dict(PillarCompiler.from_opts(dict(opts)).compile(minion_id, grains))
    except Exception as exc:
        log.warning("local pillar compile failed: %s", exc)
        return {"_errors": [f"local pillar compile failed: {exc}"]}


class StateSystem:
    """Compiles and runs states for one execution context (one job)."""

    def __init__(self, exec_ctx: Any, saltenv: str | None = None, test: bool | None = None,
                 pillar: Mapping[str, Any] | None = None, local: bool | None = None) -> None:
        opts = exec_ctx.opts
        if local is None:
            local = opts.get("file_client") == "local" or exec_ctx.fetch_file is None
        self.ctx = exec_ctx
        self.local = local
        self.saltenv = saltenv or opts.get("saltenv") or "base"
        self.test = bool(opts.get("test", False)) if test is None else bool(test)
        self.source = source_for(opts, exec_ctx.fetch_file, local,
                                 getattr(exec_ctx, "master_request", None))
        base_pillar = exec_ctx.pillar
        if local and not base_pillar:
            base_pillar = _local_pillar(opts, exec_ctx.minion_id, exec_ctx.grains)
            exec_ctx.pillar = base_pillar
        if pillar:
            from hamaster.pillar.merge import update

            base_pillar = update(copy.deepcopy(dict(base_pillar)), pillar)
            exec_ctx.pillar = base_pillar
        self.compiler = StateCompiler(self.source, shared_renderer(), opts, exec_ctx.grains,
                                      base_pillar, exec_ctx.minion_id, SaltFunctions(exec_ctx),
                                      FILTERS)

    # -- compile -----------------------------------------------------------------------------

    def matches(self, mods: list[str] | None) -> tuple[dict[str, list[str]], list[str]]:
        """What to render: the named sls files, or the top file's matches (highstate)."""
        if mods:
            return {self.saltenv: list(mods)}, []
        return self.compiler.top_matches()

    def high(self, mods: list[str] | None) -> tuple[dict[str, Any], list[str]]:
        """High data of ``mods`` (or the highstate) and compile errors."""
        matches, errors = self.matches(mods)
        if errors:
            return {}, errors
        high, errors = self.compiler.build_high(matches)
        errors += self.compiler.verify_high(high)
        return high, errors

    def low(self, high: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str], Any]:
        """Ordered low chunks of ``high``."""
        funcs = state_functions()
        chunks = self.compiler.compile_low(high)
        return StateCompiler.order_chunks(chunks, lambda st: f"{st}.mod_watch" in funcs)

    # -- run ---------------------------------------------------------------------------------

    def _render_template(self, data: bytes, saltenv: str, sls: str, path: str,
                         extra: Mapping[str, Any] | None) -> str:
        ctx = self.compiler.render_ctx(saltenv, sls, path, extra)
        return shared_renderer().render_jinja(data.decode("utf-8"), ctx,
                                              self.compiler.jinja_env(saltenv))

    def base_run(self) -> StateRun:
        """The StateRun template handed to each state function."""
        return StateRun(exec_ctx=self.ctx, test=self.test, saltenv=self.saltenv,
                        read=self.source.read, render=self._render_template,
                        list_files=self.source.list_files)

    def run_chunks(self, chunks: list[dict[str, Any]], graph: Any) -> tuple[dict[str, Any], int]:
        """Run ordered chunks; the Salt return and its retcode."""
        failhard = bool(self.ctx.opts.get("failhard", False))
        runner = Runner(chunks, graph, state_functions(), self.base_run(), failhard)
        ret = runner.run()
        retcode = 0
        if any(r.get("result") is False for r in ret.values()):
            retcode = EX_STATE_FAILURE
        return ret, retcode

    def apply(self, mods: list[str] | None) -> tuple[Any, int]:
        """Compile and run ``mods`` (None: highstate). ``(return, retcode)``."""
        high, errors = self.high(mods)
        if errors:
            return errors, EX_STATE_COMPILER_ERROR
        chunks, errors, graph = self.low(high)
        if errors:
            return errors, EX_STATE_COMPILER_ERROR
        return self.run_chunks(chunks, graph)

    def single(self, fun: str, name: str, **kwargs: Any) -> tuple[Any, int]:
        """One state function outside any sls (``state.single file.managed /x ...``)."""
        if "." not in fun:
            return [f"Invalid function passed: {fun}"], EX_STATE_COMPILER_ERROR
        mod, f = fun.split(".", 1)
        low = {"state": mod, "fun": f, "name": name, "__id__": name, "__sls__": None,
               "__env__": self.saltenv, **kwargs}
        from hamaster.states.compiler import RequisiteGraph

        graph = RequisiteGraph()
        graph.add_chunk(low)
        return self.run_chunks([low], graph)

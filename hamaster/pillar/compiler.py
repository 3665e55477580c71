"""Compile one minion's pillar: Salt's ``top.sls`` matching, ``include:``, merging and ``_errors``.

The order and rules are Salt's (``salt/pillar/__init__.py``):

1. **Tops.** Each saltenv's ``top.sls`` (``state_top``) is rendered, ``base`` first then the
   ``pillar_roots`` order; a top's ``include:`` pulls in further top files of that saltenv (one
   level). Tops merge per ``saltenv → target``: a later top's entry for the same target replaces
   an earlier one; targets are then ordered by their ``order:`` (default 0, stable).
2. **Matches.** A target matches with ``compound`` unless a ``- match: <type>`` item says
   otherwise (``glob``, ``list``, ``pcre``, ``grain``, ``grain_pcre``, ``ipcidr``, ``compound``,
   ``nodegroup``; ``pillar*`` never matches: pillar is what is being compiled). With
   ``pillarenv`` only that saltenv's targets count. The sls names of matching targets are
   collected per saltenv in order, without duplicates; ``- ignore_missing: True`` tolerates
   missing ones.
3. **Render.** Each sls name (a glob over the saltenv's sls files) is rendered in turn and merged
   into the pillar with ``pillar_source_merging_strategy`` and ``pillar_merge_lists``. An sls's
   ``include:`` (names, ``.relative`` names, or ``{name: {defaults: …, key: a:b}}``) renders the
   included files first and merges the including file last (unless
   ``pillar_includes_override_sls``).
4. **Errors** go to the pillar's ``_errors`` list (Salt's wording) with one log line per
   compile; the rest of the pillar is still served. Recursive includes, over-deep includes and a
   pillar larger than ``pillar_max_size`` (bytes, msgpack-encoded; default 10 MiB) are errors.
   An oversized pillar is replaced by ``{"_errors": [...]}``.

Output is deterministic: the same tree and grains give the same pillar, byte for byte, on every
master (listings are sorted; nothing depends on hash order or time).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hamaster import targeting
from hamaster.bus import codec
from hamaster.fileroots.server import FileTooLarge
from hamaster.pillar.merge import merge
from hamaster.pillar.render import RenderContext, Renderer, RenderError, safe_opts
from hamaster.pillar.tree import PillarTree, TreeSnapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
CACHE_ENTRIES = 4096
#: Pillars larger than this (encoded bytes) are not kept in the result cache.
CACHE_MAX_PILLAR = 256 * 1024
MAX_INCLUDE_DEPTH = 64
_MATCHER_TYPES = frozenset({"glob", "list", "pcre", "grain", "grain_pcre", "ipcidr", "compound"})


@dataclass
class PillarSettings:
    """The options that shape a compile (Salt's names; see :meth:`from_opts`)."""

    renderer: str = "jinja|yaml"
    merge_strategy: str = "smart"
    merge_lists: bool = False
    max_size: int = DEFAULT_MAX_SIZE
    nodegroups: dict[str, Any] = field(default_factory=dict)
    safe_render_error: bool = True
    includes_override_sls: bool = False
    state_top: str = "top.sls"
    pillarenv: str | None = None
    max_include_depth: int = MAX_INCLUDE_DEPTH

    @classmethod
    def from_opts(cls, opts: Mapping[str, Any]) -> PillarSettings:
        """``renderer``, ``pillar_source_merging_strategy``, ``pillar_merge_lists``,
        ``pillar_max_size``, ``nodegroups``, ``pillar_safe_render_error``,
        ``pillar_includes_override_sls``, ``state_top``, ``pillarenv``."""
        nodegroups = opts.get("nodegroups") or {}
        return cls(
            renderer=str(opts.get("renderer") or "jinja|yaml"),
            merge_strategy=str(opts.get("pillar_source_merging_strategy") or "smart"),
            merge_lists=bool(opts.get("pillar_merge_lists", False)),
            max_size=int(opts.get("pillar_max_size") or DEFAULT_MAX_SIZE),
            nodegroups=dict(nodegroups) if isinstance(nodegroups, dict) else {},
            safe_render_error=bool(opts.get("pillar_safe_render_error", True)),
            includes_override_sls=bool(opts.get("pillar_includes_override_sls", False)),
            state_top=str(opts.get("state_top") or "top.sls"),
            pillarenv=opts.get("pillarenv") or None,
        )


class PillarCompiler:
    """Compiles pillar for any minion from one :class:`PillarTree` (thread-safe)."""

    def __init__(self, tree: PillarTree, settings: PillarSettings | None = None,
                 opts: Mapping[str, Any] | None = None, renderer: Renderer | None = None) -> None:
        self.tree = tree
        self.settings = settings or PillarSettings()
        self.opts = safe_opts(opts or {})
        self.renderer = renderer or Renderer(self.settings.renderer)
        #: ``.value``: whether this thread's last compile decrypted gpg values (keep them out of
        #: the store).
        self.last_secret = threading.local()
        #: Compiled pillars by (tree fingerprint, inputs); ``pillar_cache_entries`` (0 = off).
        self.cache_entries = CACHE_ENTRIES
        self._cache: OrderedDict[tuple, tuple[dict, bool]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.gpg_decrypter: Any = None   # set by from_opts: the cluster key's decrypter

    @classmethod
    def from_opts(cls, opts: dict, shared_store: Any = None, renderer: Renderer | None = None
                  ) -> PillarCompiler:
        """A compiler over ``pillar_roots`` (the shared store's first) for a master's options.

        ``gpg_keydir`` (a GnuPG home directory) enables the ``gpg`` renderer."""
        settings = PillarSettings.from_opts(opts)
        entries = opts.get("pillar_cache_entries", CACHE_ENTRIES)
        decrypter = None
        if renderer is None:
            gpg = None
            keydir = opts.get("gpg_keydir")
            if isinstance(keydir, str) and keydir:
                from hamaster.pillar.gpg import GpgDecrypter

                gpg = GpgDecrypter(os.path.expanduser(keydir)).decrypt
            elif shared_store is not None:
                from hamaster.pillar.gpg import STORE_KEY, GpgDecrypter

                home = os.path.join(opts.get("cachedir") or ".", "pillar_gpg")
                decrypter = GpgDecrypter(home, key_source=lambda: shared_store.get(STORE_KEY))
                gpg = decrypter.decrypt
            renderer = Renderer(settings.renderer, gpg)
        compiler = cls(PillarTree.from_opts(opts, shared_store), settings, opts, renderer)
        compiler.cache_entries = int(entries) if isinstance(entries, int) else CACHE_ENTRIES
        compiler.gpg_decrypter = decrypter
        return compiler

    def close(self) -> None:
        """Stop what compiling started outside this process (the gpg-agent of our key dir)."""
        if self.gpg_decrypter is not None:
            self.gpg_decrypter.close()

    def compile(self, minion_id: str, grains: Mapping[str, Any] | None,
                pillarenv: str | None = None, override: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
        """The pillar of ``minion_id`` with ``grains`` (``_errors`` listed in it, if any).

        The result is shared with a cache: callers must not modify it. A compile depends only
        on the tree's content, the minion id, its grains, ``pillarenv`` and ``override`` (the
        templates see nothing else), so an unchanged tree gives the cached result again.
        """
        snap = self.tree.snapshot()
        key = self._cache_key(snap, minion_id, grains, pillarenv, override)
        if key is not None:
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                self.last_secret.value = hit[1]
                return hit[0]
        pillar, size, secret = self._compile(snap, minion_id, grains, pillarenv, override)
        self.last_secret.value = secret
        if key is not None and size <= CACHE_MAX_PILLAR:
            with self._cache_lock:
                self._cache[key] = (pillar, secret)
                while len(self._cache) > self.cache_entries:
                    self._cache.popitem(last=False)
        return pillar

    def _cache_key(self, snap: TreeSnapshot, minion_id: str, grains: Any, pillarenv: Any,
                   override: Any) -> tuple | None:
        if self.cache_entries <= 0:
            return None
        try:
            inputs = codec.dumps([minion_id, grains or {}, pillarenv or self.settings.pillarenv,
                                  override or {}])
            fingerprint = snap.fingerprint()
        except Exception:  # unencodable grains, an unreadable tree: just compile
            return None
        return (fingerprint, hashlib.sha256(inputs).digest())

    def _compile(self, snap: TreeSnapshot, minion_id: str, grains: Mapping[str, Any] | None,
                 pillarenv: str | None, override: Mapping[str, Any] | None
                 ) -> tuple[dict[str, Any], int, bool]:
        """``(pillar, encoded size, holds gpg-decrypted values)``."""
        run = _Compile(self, snap, minion_id, dict(grains or {}))
        try:
            pillar = run.compile(pillarenv or self.settings.pillarenv)
        except RecursionError:
            run.errors.append("Pillar compilation failed: recursion too deep")
            pillar = {}
        if isinstance(override, Mapping) and override:
            pillar = merge(pillar, override, self.settings.merge_strategy,
                           self.settings.merge_lists)
        if run.errors:
            pillar["_errors"] = list(run.errors)
        pillar, size = self._bounded(minion_id, pillar, run.errors, run.details)
        return pillar, size, bool(run.secret)

    def _bounded(self, minion_id: str, pillar: dict, errors: list[str], details: list[str]
                 ) -> tuple[dict, int]:
        """``(pillar, encoded size)``, the pillar replaced by ``_errors`` when it cannot be sent;
        one log line per compile that has errors."""
        size = 0
        extra = None
        try:
            size = len(codec.dumps(pillar))
        except (TypeError, ValueError, OverflowError) as exc:
            extra = f"Pillar for {minion_id} cannot be encoded: {exc}"
        else:
            if size > self.settings.max_size:
                extra = (f"Pillar for {minion_id} is {size} bytes, over the limit of "
                         f"{self.settings.max_size} (pillar_max_size); no pillar data was sent")
        if extra is not None:
            errors, details = errors + [extra], details + [extra]
            pillar, size = {"_errors": errors}, 0
        if errors:
            text = "; ".join(details).replace("\n", " ")
            log.error("pillar for %s: %d error(s): %s", minion_id, len(errors),
                      text if len(text) <= 2000 else text[:2000] + " ...")
        return pillar, size


class _Compile:
    """One compile: the snapshot, the minion and the errors found so far."""

    def __init__(self, owner: PillarCompiler, snap: TreeSnapshot, minion_id: str,
                 grains: dict[str, Any]) -> None:
        self.owner = owner
        self.settings = owner.settings
        self.snap = snap
        self.minion_id = minion_id
        self.grains = grains
        self.errors: list[str] = []
        #: What the master log says about each error (the render detail ``_errors`` may hide).
        self.details: list[str] = []
        self.secret: list[bool] = []
        self.ignored: dict[str, set[str]] = {}
        self._envs: dict[str, Any] = {}

    # -- helpers ----------------------------------------------------------------------------

    def _error(self, public: str, detail: str | None = None) -> None:
        """Record an ``_errors`` entry; ``detail`` (default: the same) goes to the log line."""
        self.errors.append(public)
        self.details.append(detail or public)

    def _jinja_env(self, saltenv: str) -> Any:
        env = self._envs.get(saltenv)
        if env is None:
            env = self.owner.renderer.environment(lambda rel: self.snap.read(saltenv, rel))
            self._envs[saltenv] = env
        return env

    def _render(self, saltenv: str, rel: str, sls: str, pillar: Mapping[str, Any],
                extra: dict[str, Any] | None = None) -> Any:
        data = self.snap.read(saltenv, rel)
        if data is None:
            raise RenderError(f"{rel} vanished from saltenv {saltenv}")
        opts = dict(self.owner.opts, id=self.minion_id, saltenv=saltenv)
        # A shallow copy: merges never modify their inputs (hamaster.pillar.merge), so what a
        # template could change in nested data stays within this one compile (as in Salt, where
        # templates get the pillar by reference); a deep copy per file cost 60% of a compile.
        ctx = RenderContext(saltenv=saltenv, sls=sls, path=rel, grains=self.grains, opts=opts,
                            pillar=dict(pillar), minion_id=self.minion_id,
                            extra=dict(extra or {}), secret=self.secret)
        return self.owner.renderer.render(data, ctx, self._jinja_env(saltenv))

    def _merge(self, a: dict, b: Mapping) -> dict:
        return merge(a, b, self.settings.merge_strategy, self.settings.merge_lists)

    # -- 1. tops ----------------------------------------------------------------------------

    def compile(self, pillarenv: str | None) -> dict[str, Any]:
        tops = self._get_tops()
        top = self._merge_tops(tops)
        matches = self._top_matches(top, pillarenv)
        return self._render_pillar(matches)

    def _render_top(self, saltenv: str, rel: str, what: str) -> dict | None:
        try:
            data = self._render(saltenv, rel, rel[:-4].replace("/", "."), {})
        except (RenderError, FileTooLarge) as exc:
            self._error(f"Rendering {what} failed, render error:\n{exc}",
                        f"{what} {rel} (saltenv {saltenv}): {exc}")
            return None
        if data is None:
            return None
        if not isinstance(data, dict):
            self._error(f"{what} {rel} in environment '{saltenv}' does not render "
                               "to a dictionary")
            return None
        return data

    def _get_tops(self) -> list[tuple[str, dict]]:
        tops: list[tuple[str, dict]] = []
        state_top = self.settings.state_top
        for saltenv in self.snap.envs:
            if not self.snap.has(saltenv, state_top):
                continue
            top = self._render_top(saltenv, state_top, "Primary Top file")
            if top is not None:
                tops.append((saltenv, top))
        # A top's ``include:`` adds that saltenv's named top files (one level, as Salt).
        extra: list[tuple[str, dict]] = []
        done: dict[str, set[str]] = {}
        for saltenv, top in tops:
            inc = top.pop("include", None)
            if inc is None:
                continue
            for sls in inc if isinstance(inc, list) else [inc]:
                sls = str(sls)
                if sls in done.setdefault(saltenv, set()):
                    continue
                done[saltenv].add(sls)
                rel = self.snap.sls_path(saltenv, sls)
                if rel is None:
                    self._error(f"Rendering Top file {sls} failed, render error:\n"
                                       f"top file '{sls}' not found in environment '{saltenv}'")
                    continue
                sub = self._render_top(saltenv, rel, f"Top file {sls}")
                if sub is not None:
                    sub.pop("include", None)
                    extra.append((saltenv, sub))
        return tops + extra

    def _merge_tops(self, tops: list[tuple[str, dict]]) -> dict[str, dict[str, list]]:
        top: dict[str, dict[str, list]] = {}
        orders: dict[str, dict[str, float]] = {}
        for _src, ctop in tops:
            for saltenv, targets in ctop.items():
                saltenv = str(saltenv)
                if not isinstance(targets, dict):
                    self._error(f"Top file saltenv '{saltenv}' is not formed as a mapping "
                                       "of targets to lists of sls")
                    continue
                for tgt, comps in targets.items():
                    tgt = str(tgt)
                    if isinstance(comps, str):
                        comps = [comps]
                    if not isinstance(comps, list):
                        self._error(f"Top file target '{tgt}' in saltenv '{saltenv}' is "
                                           "not formed as a list")
                        continue
                    matches: list[Any] = []
                    states: dict[str, None] = {}
                    order: float = 0
                    ignore_missing = False
                    for comp in comps:
                        if isinstance(comp, dict):
                            if "match" in comp:
                                matches.append(comp)
                            if "order" in comp:
                                try:
                                    order = int(comp["order"])
                                except (TypeError, ValueError):
                                    order = 0
                            if comp.get("ignore_missing"):
                                ignore_missing = True
                        elif isinstance(comp, str):
                            states[comp] = None
                    if ignore_missing:
                        self.ignored.setdefault(saltenv, set()).update(states)
                    top.setdefault(saltenv, {})[tgt] = matches + list(states)
                    orders.setdefault(saltenv, {})[tgt] = order
        return {env: dict(sorted(targets.items(), key=lambda kv: orders[env][kv[0]]))
                for env, targets in top.items()}

    # -- 2. matches ---------------------------------------------------------------------------

    def _confirm_top(self, tgt: str, data: list) -> bool:
        kind = "compound"
        for item in data:
            if isinstance(item, dict) and "match" in item:
                kind = str(item["match"])
        try:
            if kind == "nodegroup":
                group = self.settings.nodegroups.get(tgt)
                if group is None:
                    log.warning("pillar top: nodegroup %r is not defined", tgt)
                    return False
                if isinstance(group, list):
                    return targeting.matches(group, "list", self.minion_id, self.grains)
                return targeting.matches(str(group), "compound", self.minion_id, self.grains)
            if kind in _MATCHER_TYPES:
                return targeting.matches(tgt, kind, self.minion_id, self.grains)
            if kind.startswith("pillar"):
                return False
            log.warning("pillar top: unknown match type %r for target %r", kind, tgt)
            return False
        except (ValueError, TypeError) as exc:
            log.warning("pillar top: target %r (%s) is invalid: %s", tgt, kind, exc)
            return False

    def _top_matches(self, top: dict[str, dict[str, list]], pillarenv: str | None
                     ) -> dict[str, list[str]]:
        matches: dict[str, list[str]] = {}
        for saltenv, body in top.items():
            if pillarenv and saltenv != pillarenv:
                continue
            for tgt, data in body.items():
                if self._confirm_top(tgt, data):
                    env_matches = matches.setdefault(saltenv, [])
                    for item in data:
                        if isinstance(item, str) and item not in env_matches:
                            env_matches.append(item)
        return matches

    # -- 3. render ----------------------------------------------------------------------------

    def _render_pillar(self, matches: dict[str, list[str]]) -> dict[str, Any]:
        pillar: dict[str, Any] = {}
        for saltenv, pstates in matches.items():
            avail = self.snap.avail(saltenv)
            if saltenv not in self.snap.envs:
                self._error(f"No matching pillar environment for environment "
                                   f"'{saltenv}' found")
            pstatefiles: list[str] = []
            for sls_match in pstates:
                found = fnmatch.filter(avail, sls_match)
                pstatefiles.extend(found if found else [sls_match])
            mods: dict[str, Any] = {}
            for sls in pstatefiles:
                pstate = self._render_pstate(sls, saltenv, mods, pillar, (), None)
                if pstate is None:
                    continue
                if not isinstance(pstate, dict):
                    log.debug("pillar sls %s of %s did not render to a dictionary", sls, saltenv)
                    continue
                pillar = self._merge(pillar, pstate)
        return pillar

    def _render_pstate(self, sls: str, saltenv: str, mods: dict[str, Any], pillar: dict,
                       stack: tuple[str, ...], defaults: dict | None) -> Any:
        rel = self.snap.sls_path(saltenv, sls)
        if rel is None:
            if sls in self.ignored.get(saltenv, ()):
                return None
            if saltenv in self.snap.envs:
                msg = (f"Specified SLS '{sls}' in environment '{saltenv}' is not available on "
                       "the salt master")
                self._error(msg)
            return None
        state: Any = None
        try:
            state = self._render(saltenv, rel, sls, pillar, defaults)
        except (RenderError, FileTooLarge) as exc:
            detail = f"SLS '{sls}' ({saltenv}:{rel}): {exc}"
            if self.settings.safe_render_error:
                self._error(f"Rendering SLS '{sls}' failed. Please see master log for "
                            "details.", detail)
            else:
                self._error(f"Rendering SLS '{sls}' failed, render error:\n{exc}", detail)
        mods[sls] = state
        if not state:
            return state
        if not isinstance(state, dict):
            self._error(f"SLS '{sls}' does not render to a dictionary")
            return None
        if "include" not in state:
            return state
        includes = state.pop("include")
        if not isinstance(includes, list):
            self._error(f"Include Declaration in SLS '{sls}' is not formed as a list")
            return state
        merged = self._includes(sls, rel, saltenv, state, includes, mods, pillar, stack + (sls,))
        mods[sls] = merged
        return merged

    def _includes(self, sls: str, rel: str, saltenv: str, state: dict, includes: list,
                  mods: dict[str, Any], pillar: dict, stack: tuple[str, ...]) -> Any:
        if len(stack) > self.settings.max_include_depth:
            self._error(f"Include depth of SLS '{sls}' in environment '{saltenv}' is over "
                               f"{self.settings.max_include_depth} ({' -> '.join(stack[:5])} ...)")
            return state
        include_states: list[dict] = []
        avail = self.snap.avail(saltenv)
        for sub in includes:
            defaults: dict | None = None
            key = None
            if isinstance(sub, dict) and sub:
                sub, inc_opts = next(iter(sub.items()))
                if isinstance(inc_opts, dict):
                    given = inc_opts.get("defaults")
                    defaults = given if isinstance(given, dict) else None
                    key = inc_opts.get("key")
            if not isinstance(sub, str) or not sub:
                self._error(f"Include Declaration in SLS '{sls}' has an invalid entry "
                                   f"{sub!r}")
                continue
            name = sub
            if sub.startswith("."):
                parts = sls.split(".") if rel.endswith("init.sls") else sls.split(".")[:-1]
                level = len(sub) - len(sub.lstrip("."))
                if level > 1:
                    parts = parts[:len(parts) - (level - 1)] if level - 1 <= len(parts) else []
                name = ".".join(parts + [sub.lstrip(".")])
            matched = fnmatch.filter(avail, name.replace("/", "."))
            if not matched:
                if name not in self.ignored.get(saltenv, ()):
                    self._error(f"Specified SLS '{name}' in environment '{saltenv}' is "
                                       f"not available on the salt master (included from "
                                       f"'{sls}')")
                continue
            for m_sub in matched:
                if m_sub in stack:
                    msg = (f"Recursive include of SLS '{m_sub}' in environment '{saltenv}': "
                           f"{' -> '.join(stack + (m_sub,))}")
                    self._error(msg)
                    continue
                if m_sub not in mods:
                    nstate = self._render_pstate(m_sub, saltenv, mods, pillar, stack, defaults)
                else:
                    nstate = mods[m_sub]
                if not nstate or not isinstance(nstate, dict):
                    continue
                if isinstance(key, str) and key:
                    for fragment in reversed(key.split(":")):
                        nstate = {fragment: nstate}
                if self.settings.includes_override_sls:
                    state = self._merge(state, nstate)
                else:
                    include_states.append(nstate)
        if self.settings.includes_override_sls:
            return state
        include_states.append(state)
        merged: dict = {}
        for s in include_states:
            merged = self._merge(merged, s)
        return merged

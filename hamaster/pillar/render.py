"""The renderer pipeline for sls files: ``jinja|yaml`` (Salt's default), ``yaml``, ``json``,
``gpg``.

A file may choose its pipeline with a shebang first line (``#!jinja|yaml``, ``#!yaml``,
``#!yaml|gpg``); otherwise the ``renderer`` option applies. ``py``, ``pydsl`` and other renderers
that run code on the master are refused.

Jinja2 runs in a :class:`jinja2.sandbox.SandboxedEnvironment` (no attribute access to ``_``
names, no unsafe callables). Templates load (``{% import %}``, ``{% include %}``, ``{% from %}``,
Salt's ``{% import_yaml %}``/``{% import_json %}``/``{% import_text %}``) only from the tree being
rendered, through :class:`TreeLoader`: a name is a path inside the saltenv's root (``./`` and
``../`` are relative to the importing template) and never resolves above it. Compiled template
code is cached by content hash, so a 50-file tree renders without re-parsing.

The context a template sees: ``grains``, ``opts`` (a safe subset: no keys, passwords or paths to
them), ``saltenv``, ``sls``, ``slspath``, ``tpldir``, ``tplfile``, ``pillar`` (what is compiled so
far), ``minion_id`` and a small ``salt`` mapping (``grains.get``, ``grains.filter_by``,
``pillar.get``), plus Salt's filters ``load_yaml``, ``load_json``, ``json``, ``yaml``,
``yaml_encode``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import posixpath
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
import yaml
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import SandboxedEnvironment

from hamaster.traverse import traverse as _lookup

log = logging.getLogger(__name__)

#: Renderers that run code on the master; never allowed.
UNSAFE_RENDERERS = frozenset({"py", "pydsl", "pyobjects", "mako", "wempy", "cheetah", "genshi"})
KNOWN_RENDERERS = frozenset({"jinja", "yaml", "json", "gpg", "text"})
_CODE_CACHE_MAX = 4096
#: Options a template may read through ``opts`` (nothing secret, nothing naming key files).
SAFE_OPTS = ("id", "saltenv", "pillarenv", "renderer", "state_top", "master_id", "file_roots",
             "pillar_roots", "nodegroups", "pillar_source_merging_strategy", "pillar_merge_lists",
             "hash_type", "ha_backend", "cluster_id", "timeout", "environment")


class RenderError(Exception):
    """An sls file could not be rendered; the message says where and why."""


# --------------------------------------------------------------------------- YAML


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML that refuses duplicate keys (as Salt's loader does) and keeps timestamps as
    strings (they would not survive the msgpack wire)."""

    def construct_scalar(self, node: yaml.Node) -> Any:
        """Integers with leading zeros are decimal, as in Salt's loader (``mode: 0644`` is
        644, not octal 420)."""
        if (node.tag == "tag:yaml.org,2002:int" and isinstance(node.value, str)
                and node.value.startswith("0") and node.value != "0"
                and not node.value.startswith(("0b", "0x", "0o"))):
            node.value = node.value.lstrip("0") or "0"
        return super().construct_scalar(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping node, but found {node.id}", node.start_mark)
        self.flatten_mapping(node)
        mapping: dict = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found unhashable key", key_node.start_mark) from None
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found conflicting ID {key!r}", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _YamlLoader.construct_mapping)
_YamlLoader.add_constructor(
    "tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML the way sls files are parsed (raises :class:`RenderError`)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RenderError(f"YAML error: {exc}") from None


def _load_json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RenderError(f"JSON error: {exc}") from None


def _dump_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip().removesuffix(
        "\n...").strip()


# --------------------------------------------------------------------------- Jinja


class _SerializerExtension(Extension):
    """Salt's ``{% import_yaml "f.yaml" as x %}`` (also ``import_json``, ``import_text``):
    render ``f.yaml`` as a template from the tree, then parse it into ``x``."""

    tags = {"import_yaml", "import_json", "import_text"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        kind = parser.stream.current.value.split("_", 1)[1]
        import_node = parser.parse_import()  # consumes the tag name, then `"source" as name`
        target, lineno = import_node.target, import_node.lineno
        load = nodes.Filter(nodes.Name(target, "load", lineno=lineno), f"load_{kind}", [], [],
                            None, None, lineno=lineno)
        return [import_node, nodes.Assign(nodes.Name(target, "store", lineno=lineno), load,
                                          lineno=lineno)]


def _filter_load_yaml(value: Any) -> Any:
    return load_yaml(str(value))


def _filter_load_json(value: Any) -> Any:
    return _load_json(str(value))


def _filter_load_text(value: Any) -> str:
    return str(value)



def _filter_by(grains: Mapping, lookup_dict: Mapping, grain: str = "os_family",
               merge: Mapping | None = None, default: str = "default", base: str | None = None
               ) -> Any:
    """Salt's ``grains.filter_by``: the entry of ``lookup_dict`` named by the grain's value."""
    from hamaster.pillar.merge import update

    value = _lookup(grains, grain, None)
    keys = value if isinstance(value, list) else [value]
    ret = None
    for k in keys:
        if k is not None and str(k) in lookup_dict:
            ret = lookup_dict[str(k)]
            break
    if ret is None:
        ret = lookup_dict.get(default)
    if base and base in lookup_dict:
        base_values = dict(lookup_dict[base])
        ret = update(base_values, ret or {}) if isinstance(ret, Mapping) or ret is None else ret
    if merge:
        if not isinstance(ret, dict):
            ret = {}
        ret = update(dict(ret), merge)
    return ret


class TreeLoader(jinja2.BaseLoader):
    """Loads templates from one saltenv of a pillar tree (``read(path) -> bytes | None``)."""

    def __init__(self, read: Callable[[str], bytes | None], code_cache: CodeCache) -> None:
        self._read = read
        self._cache = code_cache

    def get_source(self, environment: jinja2.Environment, template: str
                   ) -> tuple[str, str, Callable[[], bool]]:
        name = _clean_name(template)
        if name is None:
            raise jinja2.TemplateNotFound(template)
        data = self._read(name)
        if data is None:
            raise jinja2.TemplateNotFound(template)
        try:
            return data.decode("utf-8"), name, lambda: False
        except UnicodeDecodeError:
            raise jinja2.TemplateNotFound(f"{template} (not UTF-8)") from None

    def load(self, environment: jinja2.Environment, name: str,
             globals: Any = None) -> jinja2.Template:
        source, filename, uptodate = self.get_source(environment, name)
        code = self._cache.code(environment, source, filename)
        return environment.template_class.from_code(
            environment, code, environment.make_globals(globals), uptodate)


def _clean_name(name: str) -> str | None:
    """A template name inside the tree, or None for one that leaves it."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return None
    if name.startswith("salt://"):
        name = name[len("salt://"):]
    if name.startswith("/"):
        return None
    parts: list[str] = []
    for seg in name.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(seg)
    return "/".join(parts) or None


class _TreeEnvironment(SandboxedEnvironment):
    """``./x`` and ``../x`` names resolve relative to the importing template."""

    def join_path(self, template: str, parent: str) -> str:
        if template.startswith(("./", "../")):
            return posixpath.join(posixpath.dirname(parent), template)
        return template


class CodeCache:
    """Compiled template code by ``(name, sha256(source))`` (thread-safe, bounded)."""

    def __init__(self, max_entries: int = _CODE_CACHE_MAX) -> None:
        self._code: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def code(self, environment: jinja2.Environment, source: str, name: str) -> Any:
        key = (name, hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest())
        with self._lock:
            code = self._code.get(key)
        if code is None:
            code = environment.compile(source, name, name)
            with self._lock:
                if len(self._code) >= self._max:
                    self._code.clear()
                self._code[key] = code
        return code


def safe_opts(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of the master's options a template may see."""
    return {k: opts[k] for k in SAFE_OPTS if k in opts}


@dataclass
class RenderContext:
    """What one sls render may see (see the module docstring)."""

    saltenv: str
    sls: str
    path: str
    grains: Mapping[str, Any]
    opts: Mapping[str, Any]
    pillar: Mapping[str, Any]
    minion_id: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: Set by the gpg step when it decrypted something (the result holds secrets).
    secret: list[bool] = field(default_factory=list)


class Renderer:
    """Renders sls files of a tree; one instance serves many compiles (thread-safe)."""

    def __init__(self, default_pipeline: str = "jinja|yaml",
                 gpg_decrypt: Callable[[Any, list[bool]], Any] | None = None) -> None:
        self.default_pipeline = parse_pipeline(default_pipeline)
        self.code_cache = CodeCache()
        self.gpg_decrypt = gpg_decrypt

    def environment(self, read: Callable[[str], bytes | None]) -> jinja2.Environment:
        """A sandboxed Jinja environment loading from ``read`` (one saltenv of one compile)."""
        env = _TreeEnvironment(
            loader=TreeLoader(read, self.code_cache),
            extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols", _SerializerExtension],
            keep_trailing_newline=True,
            cache_size=0,
        )
        env.filters.update({
            "load_yaml": _filter_load_yaml, "load_json": _filter_load_json,
            "load_text": _filter_load_text, "json": _tojson, "yaml": _dump_yaml,
            "yaml_encode": _dump_yaml, "tojson": _tojson,
        })
        return env

    def render(self, data: bytes, ctx: RenderContext, env: jinja2.Environment) -> Any:
        """Render one file's bytes through its pipeline; raises :class:`RenderError`."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RenderError(f"not UTF-8: {exc}") from None
        pipeline = self.default_pipeline
        if text.startswith("#!"):
            first, nl, rest = text.partition("\n")
            pipeline = parse_pipeline(first[2:])
            text = nl + rest  # keep line numbers
        value: Any = text
        for name in pipeline:
            value = self._step(name, value, ctx, env)
        return value

    def render_jinja(self, text: str, ctx: RenderContext, env: jinja2.Environment) -> str:
        """Render ``text`` as one Jinja template (``file.managed`` with ``template: jinja``);
        raises :class:`RenderError`."""
        return self._jinja(text, ctx, env)

    def _step(self, name: str, value: Any, ctx: RenderContext, env: jinja2.Environment) -> Any:
        if name == "jinja":
            if not isinstance(value, str):
                raise RenderError("the jinja renderer needs text input")
            return self._jinja(value, ctx, env)
        if name == "yaml":
            return load_yaml(value) if isinstance(value, str) else value
        if name == "json":
            return _load_json(value) if isinstance(value, str) else value
        if name == "text":
            return value
        if name == "gpg":
            if self.gpg_decrypt is None:
                raise RenderError("the gpg renderer is not configured (no gpg_keydir)")
            return self.gpg_decrypt(value, ctx.secret)
        raise RenderError(f"renderer {name!r} is not available")

    def _jinja(self, text: str, ctx: RenderContext, env: jinja2.Environment) -> str:
        slspath = posixpath.dirname(ctx.path)
        grains, pillar = ctx.grains, ctx.pillar
        def grains_get(key: str, default: Any = "", delimiter: str = ":") -> Any:
            return _lookup(grains, key, default, delimiter)

        def pillar_get(key: str, default: Any = "", delimiter: str = ":") -> Any:
            return _lookup(pillar, key, default, delimiter)

        salt = {
            "grains.get": grains_get,
            "grains.filter_by": lambda *a, **kw: _filter_by(grains, *a, **kw),
            "pillar.get": pillar_get,
        }
        variables = {
            "grains": grains, "opts": ctx.opts, "saltenv": ctx.saltenv, "pillarenv": ctx.saltenv,
            "sls": ctx.sls, "slspath": slspath, "tpldir": slspath,
            "tplfile": ctx.path, "tplpath": ctx.path, "pillar": pillar,
            "minion_id": ctx.minion_id, "salt": salt, **ctx.extra,
        }
        try:
            code = self.code_cache.code(env, text, ctx.path)
            template = env.template_class.from_code(env, code, env.make_globals(None))
            return template.render(variables)
        except RenderError:
            raise
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"Jinja syntax error: {exc.message}; line {exc.lineno}") from None
        except jinja2.TemplateNotFound as exc:
            raise RenderError(f"Jinja error: template {exc.name!r} not found in the "
                              "tree") from None
        except jinja2.exceptions.SecurityError as exc:
            raise RenderError(f"Jinja sandbox refused: {exc}") from None
        except RecursionError:
            raise RenderError("Jinja error: recursion too deep") from None
        except Exception as exc:
            raise RenderError(f"Jinja error: {type(exc).__name__}: {exc}") from None


def _default(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _tojson(value: Any, sort_keys: bool = True, indent: int | None = None) -> str:
    return json.dumps(value, sort_keys=sort_keys, indent=indent, default=_default)


def parse_pipeline(spec: str) -> tuple[str, ...]:
    """``"jinja | yaml"`` → ``("jinja", "yaml")``; raises :class:`RenderError` for an unknown or
    unsafe renderer."""
    names = tuple(p.strip() for p in str(spec).split("|") if p.strip())
    if not names:
        raise RenderError(f"empty renderer pipeline {spec!r}")
    for name in names:
        if name in UNSAFE_RENDERERS:
            raise RenderError(f"renderer {name!r} runs code on the master and is not allowed")
        if name not in KNOWN_RENDERERS:
            raise RenderError(f"renderer {name!r} is not available (known: "
                              f"{', '.join(sorted(KNOWN_RENDERERS))})")
    return names

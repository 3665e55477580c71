"""The option table against the code: every option read is declared, every declared one is read,
the defaults fit their types, and the operator guide's reference is the table's."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamaster import config, options
from hamaster.master.daemon import MASTER_OPTS_FOR_MINIONS
from hamaster.options import HOST, MASTER, MINION, Option

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hamaster"

#: Options read through a name held in a variable (a loop over names, a table of names), which
#: the scan cannot see: option → the file that reads it (the name must appear there).
INDIRECT = {
    "rest_cherrypy": "hamaster/api/__init__.py",   # api_options: for name in (...)
    "rest_api": "hamaster/api/__init__.py",
    # Master._master_opts: for key in MASTER_OPTS_FOR_MINIONS (checked below)
    **{name: "hamaster/master/daemon.py" for name in MASTER_OPTS_FOR_MINIONS},
}
#: Where only one role's options may be read.
ROLE_DIRS = {"hamaster/master/": MASTER, "hamaster/minion/": MINION, "hamaster/api/": MASTER,
             "hamaster/events/": MASTER}


def _is_opts(node: ast.AST) -> bool:
    """``opts``, ``<anything>.opts`` or ``load_master_config(...)``: a loaded configuration."""
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        return name in ("load_master_config", "load_minion_config")
    return ((isinstance(node, ast.Name) and node.id == "opts")
            or (isinstance(node, ast.Attribute) and node.attr == "opts"))


def _const(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def option_reads(source: str) -> Iterator[tuple[str, int]]:
    """``(option, line)`` of every ``opts["x"]``, ``opts.get("x")`` (also ``.pop``,
    ``.setdefault``, on any ``.opts`` or a config just loaded) and ``opt(..., "x")`` in
    ``source``."""
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Subscript) and _is_opts(node.value):
            name = _const(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in ("get", "pop", "setdefault")
                    and _is_opts(f.value)):
                name = _const(node.args[0])
            elif isinstance(f, ast.Name) and f.id == "opt" and len(node.args) >= 2:
                name = _const(node.args[1])
        if name is not None:
            yield name, node.lineno


@functools.cache
def scan(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Option → ``file:line`` of each read in ``package`` (the table module left out)."""
    out: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        if rel == "hamaster/options.py":
            continue
        for name, line in option_reads(path.read_text(encoding="utf-8")):
            out.setdefault(name, []).append(f"{rel}:{line}")
    return out


def _declared(role: str | None = None) -> dict[str, Option]:
    roles = (MASTER, MINION) if role is None else (role,)
    out: dict[str, Option] = {}
    for r in roles:
        out.update(config.master_options() if r == MASTER else config.minion_options())
    return out


def test_scan_finds_each_read_pattern() -> None:
    src = ('a = opts["one"]\nb = self.opts.get("two", 1)\nc = ctx.opts.pop("three")\n'
           'd = opt(o, "four")\ne = other["five"]\nf = opts.get(name)\n'
           'g = load_master_config(d)["six"]\n')
    assert sorted(n for n, _ in option_reads(src)) == ["four", "one", "six", "three", "two"]


def test_every_option_read_is_declared() -> None:
    declared = _declared()
    undeclared = {name: where for name, where in scan().items() if name not in declared}
    assert not undeclared, f"options read but not in hamaster/options.py (or a backend's " \
                           f"OPTIONS): {undeclared}"


def test_options_read_in_one_roles_code_are_that_roles() -> None:
    wrong = []
    tables = {MASTER: _declared(MASTER), MINION: _declared(MINION)}
    for name, where in scan().items():
        for loc in where:
            for prefix, role in ROLE_DIRS.items():
                if loc.startswith(prefix) and name not in tables[role]:
                    wrong.append(f"{loc}: {name!r} is not a {role} option")
    assert not wrong, wrong


def test_every_declared_option_is_read() -> None:
    reads = scan()
    for name, path in INDIRECT.items():
        assert f'"{name}"' in (ROOT / path).read_text(encoding="utf-8"), (name, path)
    unused = sorted(name for name, o in _declared().items()
                    if name not in reads and name not in INDIRECT and not o.computed)
    assert not unused, f"declared options nothing reads (remove them): {unused}"


@pytest.mark.parametrize("role", [MASTER, MINION])
def test_defaults_fit_their_types(role: str) -> None:
    for name, o in _declared(role).items():
        if o.computed or o.default is None:
            continue
        assert o.type.check(o.default), f"{role} {name}: default {o.default!r} is not {o.type.name}"


def test_a_backend_option_is_in_the_master_table_with_its_default(tmp_path: Path) -> None:
    from hamaster.store.rsync import RsyncStore

    declared = {o.name for o in RsyncStore.OPTIONS}
    assert {"ha_dir", "ha_rsync_interval", "ha_create_master_key"} <= declared
    opts = config.load_master_config(tmp_path)
    assert opts["ha_rsync_interval"] == 30.0 and opts["ha_etcd_prefix"] == "/hamaster"
    with pytest.raises(config.ConfigError, match="'ha_etcd_timeout' must be a number"):
        config.load_master_config(tmp_path, {"ha_etcd_timeout": "soon"})


def test_per_host_options_are_the_table_host_scope() -> None:
    from hamaster.master.shared import PER_HOST_OPTIONS

    # The set as it was written out by hand before the table: a shared fragment must keep
    # ignoring exactly these, and the config hash must keep leaving them out.
    assert PER_HOST_OPTIONS == {
        "interface", "publish_port", "ret_port", "master_id", "root_dir", "pki_dir", "cachedir",
        "sock_dir", "log_file", "log_level", "log_level_logfile", "ha_dir", "ha_backend",
        "ha_etcd_endpoints", "ha_rsync_peers", "ha_etcd_ca", "ha_etcd_cert", "ha_etcd_key",
        "ha_rsync_password_file", "metrics_port", "metrics_interface", "conf_file", "config_dir",
        "__role", "user", "ha_poll_interval", "ha_etcd_prefix", "ha_etcd_timeout",
        "ha_rsync_interval", "ha_rsync_debounce", "ha_rsync_max_backoff",
        "ha_rsync_tombstone_ttl", "ha_rsync_ssh", "file_blob_port", "file_blob_interface",
        "ha_create_master_key", "zmq_io_threads"}
    assert all(config.master_options()[n].scope == HOST for n in PER_HOST_OPTIONS - {"user"})


def test_code_fallbacks_agree_with_the_table() -> None:
    """Constants the code falls back on for a partial mapping are the table's defaults."""
    from hamaster.api.server import DEFAULT_TOKEN_EXPIRE
    from hamaster.bus.messages import CLEAR_REQUEST_MAX, REQUEST_MAX
    from hamaster.events.bus import DEFAULT_MEMORY, DEFAULT_MERGE_WINDOW, DEFAULT_RETENTION
    from hamaster.fileroots.server import DEFAULT_CHUNK_SIZE
    from hamaster.master.datacache import DEFAULT_MAX_RECORD
    from hamaster.master.leader import DEFAULT_TTL
    from hamaster.master.reqhandler import REQUEST_TTL_DEFAULT
    from hamaster.minion.connection import BACKOFF_MAX
    from hamaster.pillar.compiler import CACHE_ENTRIES, DEFAULT_MAX_SIZE
    from hamaster.pillar.tree import DEFAULT_PILLAR_ROOTS

    d = options.default
    assert d("token_expire") == DEFAULT_TOKEN_EXPIRE
    assert (d("max_request_size"), d("max_clear_request_size")) == (REQUEST_MAX,
                                                                    CLEAR_REQUEST_MAX)
    assert (d("event_memory"), d("event_merge_window"), d("event_retention")) == (
        DEFAULT_MEMORY, DEFAULT_MERGE_WINDOW, DEFAULT_RETENTION)
    assert d("file_buffer_size") == DEFAULT_CHUNK_SIZE
    assert d("minion_data_max_size") == DEFAULT_MAX_RECORD
    assert d("ha_lease_ttl") == DEFAULT_TTL
    assert d("request_server_ttl") == REQUEST_TTL_DEFAULT
    assert d("master_retry_max", MINION) == BACKOFF_MAX
    assert (d("pillar_cache_entries"), d("pillar_max_size")) == (CACHE_ENTRIES, DEFAULT_MAX_SIZE)
    assert d("pillar_roots") == DEFAULT_PILLAR_ROOTS
    assert {k: d(k) for k in MASTER_OPTS_FOR_MINIONS} == MASTER_OPTS_FOR_MINIONS
    from hamaster.store.registry import DEFAULT_BACKEND

    assert d("ha_backend") == DEFAULT_BACKEND


#: ``opts.get("x", literal)`` whose literal is deliberately not the table's default.
FALLBACK_EXCEPTIONS = {
    # a master handed options without ``interface`` (a test double) serves blobs on loopback
    ("hamaster/fileroots/blobs.py", "interface"),
}


def test_literal_fallbacks_are_the_tables_defaults() -> None:
    """``opts.get("x", 5)`` in the code falls back on what the table says (no drift)."""
    wrong = []
    tables = {MASTER: _declared(MASTER), MINION: _declared(MINION)}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        role = next((r for prefix, r in ROLE_DIRS.items() if rel.startswith(prefix)), None)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and _is_opts(node.func.value)
                    and len(node.args) == 2 and _const(node.args[0]) is not None):
                continue
            name = _const(node.args[0])
            try:
                value = ast.literal_eval(node.args[1])
            except ValueError:
                continue            # a named constant: test_code_fallbacks_agree_with_the_table
            defaults = [t[name].default for r, t in tables.items()
                        if name in t and role in (None, r)]
            if value not in defaults and (rel, name) not in FALLBACK_EXCEPTIONS:
                wrong.append(f"{rel}:{node.lineno}: {name} falls back on {value!r}, the table "
                             f"says {defaults}")
    assert not wrong, wrong


def test_operator_guide_reference_is_the_tables() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text(encoding="utf-8")
    begin, end = guide.index(config.DOC_BEGIN), guide.index(config.DOC_END)
    assert guide[begin:end + len(config.DOC_END)] == config.options_doc(), \
        "docs/operator-guide.md's option reference is stale: run scripts/gen-options-doc"
    for name, o in _declared().items():
        if not o.computed:
            assert f"| `{name}` |" in guide, name


def test_pillar_tree_ttl_unset_follows_ha_poll_interval(tmp_path: Path) -> None:
    """``pillar_tree_ttl`` defaults to null in the table: the tree then caches for
    ``ha_poll_interval``, and an explicit 0 still means no caching."""
    from hamaster.pillar.tree import PillarTree

    opts = config.load_master_config(tmp_path, {"ha_poll_interval": 0.25,
                                         "pillar_roots": {"base": [str(tmp_path)]}})
    assert opts["pillar_tree_ttl"] is None
    assert PillarTree.from_opts(opts).ttl == 0.25
    assert PillarTree.from_opts({**opts, "pillar_tree_ttl": 0}).ttl == 0.0
    assert PillarTree.from_opts({"pillar_roots": {"base": [str(tmp_path)]}}).ttl == 0.5

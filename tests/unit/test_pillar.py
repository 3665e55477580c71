"""The pillar compiler: top matching, includes, merge strategies, renderers, errors, limits.

Trees are real directories (a local ``pillar_roots`` or an ``fs`` store's ``pillar_roots/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hamaster.bus import codec
from hamaster.pillar.compiler import PillarCompiler
from hamaster.pillar.merge import merge
from hamaster.pillar.render import RenderError, parse_pipeline
from hamaster.pillar.tree import PILLAR_PREFIX, push
from hamaster.store.fs import FsStore

DEBIAN = {"id": "web1", "os": "Debian", "os_family": "Debian", "roles": ["web", "db"]}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def compiler(tmp_path: Path, files: dict[str, str], **opts) -> PillarCompiler:
    base = tmp_path / "pillar"
    write(base, files)
    return PillarCompiler.from_opts({"pillar_roots": {"base": [str(base)]}, "pillar_tree_ttl": 0,
                                     **opts})


# --------------------------------------------------------------------------- merge


def test_merge_recurse_and_lists() -> None:
    a = {"x": {"y": 1, "l": [1, 2]}, "k": 1}
    b = {"x": {"z": 2, "l": [2, 3, 3]}, "k": {"n": 1}}
    assert merge(a, b, "smart") == {"x": {"y": 1, "z": 2, "l": [2, 3, 3]}, "k": {"n": 1}}
    assert merge(a, b, "recurse", merge_lists=True)["x"]["l"] == [1, 2, 3]
    assert merge(a, b, "overwrite") == {"x": {"z": 2, "l": [2, 3, 3]}, "k": {"n": 1}}
    assert a == {"x": {"y": 1, "l": [1, 2]}, "k": 1}  # inputs untouched


def test_merge_does_not_modify_shared_nested_data() -> None:
    shared = {"x": {"y": 1}}
    merged = merge(shared, {"x": {"z": 2}})
    assert shared == {"x": {"y": 1}} and merged == {"x": {"y": 1, "z": 2}}


# --------------------------------------------------------------------------- top and matchers


TOP = """
base:
  '*':
    - common
  'os:Debian':
    - match: grain
    - debian
  'web*':
    - web
  'db1,web1':
    - match: list
    - listed
  '^web\\d$':
    - match: pcre
    - regex
  'G@os:RedHat or web1':
    - compound
  'os:Deb.*':
    - match: grain_pcre
    - grainre
  'webgroup':
    - match: nodegroup
    - grouped
"""


@pytest.fixture
def matched(tmp_path: Path) -> PillarCompiler:
    files = {"top.sls": TOP}
    for name in ("common", "debian", "web", "listed", "regex", "compound", "grainre", "grouped"):
        files[f"{name}.sls"] = f"{name}: true\n"
    return compiler(tmp_path, files, nodegroups={"webgroup": "web*"})


def test_top_matchers_select_sls(matched: PillarCompiler) -> None:
    p = matched.compile("web1", DEBIAN)
    assert p == {k: True for k in ("common", "debian", "web", "listed", "regex", "compound",
                                   "grainre", "grouped")}
    assert list(p) == ["common", "debian", "web", "listed", "regex", "compound", "grainre",
                       "grouped"]


def test_top_matchers_reject_other_minion(matched: PillarCompiler) -> None:
    assert matched.compile("db2", {"id": "db2", "os": "Arch"}) == {"common": True}
    assert matched.compile("db1", {"id": "db1", "os": "RedHat"}) == {
        "common": True, "listed": True, "compound": True}


def test_default_top_matcher_is_compound(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  'G@os:Debian and not db*':\n    - a\n",
                            "a.sls": "a: 1\n"})
    assert c.compile("web1", DEBIAN) == {"a": 1}
    assert c.compile("db1", {**DEBIAN, "id": "db1"}) == {}


def test_later_target_wins_and_order(tmp_path: Path) -> None:
    top = ("base:\n  'web*':\n    - b\n  '*':\n    - order: -1\n    - a\n")
    c = compiler(tmp_path, {"top.sls": top, "a.sls": "k: a\n", "b.sls": "k: b\n"})
    # '*' is ordered first by `order: -1`, so b (web*) merges last
    assert c.compile("web1", DEBIAN) == {"k": "b"}


def test_sls_glob_in_top(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*':\n    - apps.*\n",
                            "apps/a.sls": "a: 1\n", "apps/b/init.sls": "b: 2\n"})
    assert c.compile("m", {}) == {"a": 1, "b": 2}


def test_saltenvs_and_pillarenv(tmp_path: Path) -> None:
    write(tmp_path / "base", {"top.sls": "base:\n  '*': [a]\n", "a.sls": "k: base\nb: 1\n"})
    write(tmp_path / "dev", {"top.sls": "dev:\n  '*': [a]\n", "a.sls": "k: dev\n"})
    opts = {"pillar_roots": {"base": [str(tmp_path / "base")], "dev": [str(tmp_path / "dev")]},
            "pillar_tree_ttl": 0}
    c = PillarCompiler.from_opts(opts)
    assert c.compile("m", {}) == {"k": "dev", "b": 1}
    assert c.compile("m", {}, pillarenv="base") == {"k": "base", "b": 1}


# --------------------------------------------------------------------------- includes


def test_include_merges_included_first(tmp_path: Path) -> None:
    c = compiler(tmp_path, {
        "top.sls": "base:\n  '*':\n    - app\n",
        "app/init.sls": "include:\n  - .defaults\n  - shared\nk: app\napp: {port: 81}\n",
        "app/defaults.sls": "k: defaults\napp: {port: 80, user: www}\n",
        "shared.sls": "shared: yes\n",
    })
    assert c.compile("m", {}) == {"k": "app", "app": {"port": 81, "user": "www"}, "shared": True}


def test_include_with_key_and_defaults(tmp_path: Path) -> None:
    c = compiler(tmp_path, {
        "top.sls": "base:\n  '*':\n    - a\n",
        "a.sls": "include:\n  - b:\n      key: x:y\n      defaults: {name: bob}\n",
        "b.sls": "who: {{ name }}\n",
    })
    assert c.compile("m", {}) == {"x": {"y": {"who": "bob"}}}


def test_includes_override_sls(tmp_path: Path) -> None:
    files = {"top.sls": "base:\n  '*': [a]\n", "a.sls": "include: [b]\nk: a\n", "b.sls": "k: b\n"}
    assert compiler(tmp_path, files).compile("m", {}) == {"k": "a"}
    c = compiler(tmp_path, files, pillar_includes_override_sls=True)
    assert c.compile("m", {}) == {"k": "b"}


def test_recursive_include_is_an_error(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*': [a]\n",
                            "a.sls": "include: [b]\na: 1\n", "b.sls": "include: [a]\nb: 1\n"})
    p = c.compile("m", {})
    assert p["a"] == 1 and p["b"] == 1
    assert len(p["_errors"]) == 1 and "Recursive include of SLS 'a'" in p["_errors"][0]
    assert "a -> b -> a" in p["_errors"][0]


def test_diamond_include_is_not_an_error(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*': [a]\n",
                            "a.sls": "include: [b, c]\n", "b.sls": "include: [d]\nb: 1\n",
                            "c.sls": "include: [d]\nc: 1\n", "d.sls": "d: {x: 1}\n"})
    assert c.compile("m", {}) == {"d": {"x": 1}, "b": 1, "c": 1}


# --------------------------------------------------------------------------- rendering


def test_jinja_context_and_imports(tmp_path: Path) -> None:
    c = compiler(tmp_path, {
        "top.sls": "base:\n  '*': [first, second]\n",
        "first.sls": "first: {{ grains.os }}\n",
        "second.sls": (
            "{% import_yaml 'data/defaults.yaml' as d %}\n"
            "{% import_json './data/x.json' as j %}\n"
            "{% from 'map.jinja' import m with context %}\n"
            "second:\n  saw: {{ pillar.first }}\n  env: {{ saltenv }}\n  d: {{ d.port }}\n"
            "  j: {{ j.n }}\n  m: {{ m }}\n  id: {{ opts.id }}\n"
            "  get: {{ salt['pillar.get']('first', 'none') }}\n"),
        "data/defaults.yaml": "port: 8080\n",
        "data/x.json": '{"n": 7}',
        "map.jinja":
            "{% set m = salt['grains.filter_by']({'Debian': 'apt', 'default': 'yum'}) %}\n",
    })
    assert c.compile("web1", DEBIAN)["second"] == {
        "saw": "Debian", "env": "base", "d": 8080, "j": 7, "m": "apt", "id": "web1",
        "get": "Debian"}


def test_shebang_yaml_skips_jinja(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*': [a]\n", "a.sls": "#!yaml\nk: '{{ x }}'\n"})
    assert c.compile("m", {}) == {"k": "{{ x }}"}


def test_unsafe_renderer_refused() -> None:
    with pytest.raises(RenderError, match="runs code"):
        parse_pipeline("py")
    assert parse_pipeline(" jinja | yaml ") == ("jinja", "yaml")


def test_template_cannot_read_outside_the_tree(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    os.makedirs(tmp_path / "pillar", exist_ok=True)
    os.symlink(tmp_path / "secret.txt", tmp_path / "pillar" / "link.txt")
    c = compiler(tmp_path, {
        "top.sls": "base:\n  '*': [a, b, c, d]\n",
        "a.sls": "a: {% include '../secret.txt' %}\n",
        "b.sls": "b: {% include '/etc/hostname' %}\n",
        "c.sls": "c: {% include 'link.txt' %}\n",
        "d.sls": "d: {{ ''.__class__.__mro__ }}\n",
    }, pillar_safe_render_error=False)
    p = c.compile("m", {})
    assert "TOPSECRET" not in repr(p)
    assert set(p) == {"_errors"} and len(p["_errors"]) == 4
    assert any("sandbox" in e for e in p["_errors"])


def test_render_errors_become_errors_list(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    c = compiler(tmp_path, {
        "top.sls": "base:\n  '*': [good, badyaml, badjinja, notdict, missing, dup]\n",
        "good.sls": "good: 1\n", "badyaml": "", "badyaml.sls": "a: [1\n",
        "badjinja.sls": "{% if %}\n", "notdict.sls": "- 1\n", "dup.sls": "a: 1\na: 2\n",
    })
    with caplog.at_level("DEBUG", logger="hamaster.pillar"):
        p = c.compile("m", {})
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1  # one line per compile, with the detail _errors leaves out
    assert "5 error(s)" in logged[0].getMessage() and "YAML error" in logged[0].getMessage()
    assert "conflicting ID" in logged[0].getMessage()
    assert p["good"] == 1
    assert p["_errors"] == [
        "Rendering SLS 'badyaml' failed. Please see master log for details.",
        "Rendering SLS 'badjinja' failed. Please see master log for details.",
        "SLS 'notdict' does not render to a dictionary",
        "Specified SLS 'missing' in environment 'base' is not available on the salt master",
        "Rendering SLS 'dup' failed. Please see master log for details.",
    ]


def test_bad_top_is_an_error(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base: [\n"})
    p = c.compile("m", {})
    assert p["_errors"][0].startswith("Rendering Primary Top file failed, render error:")


def test_size_limit(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*': [big]\n",
                            "big.sls": "big: '{{ 'x' * 5000 }}'\n"}, pillar_max_size=4096)
    p = c.compile("web1", {})
    assert set(p) == {"_errors"} and "over the limit of 4096" in p["_errors"][0]


def test_override_merged_last(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*': [a]\n", "a.sls": "a: {x: 1, y: 2}\n"})
    assert c.compile("m", {}, override={"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}}


def test_deterministic_bytes(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": TOP, **{f"{n}.sls": f"{n}: {{z: 1, a: 2}}\n" for n in
                                               ("common", "debian", "web")}})
    first = codec.dumps(c.compile("web1", DEBIAN))
    again = PillarCompiler.from_opts(dict(c.opts, pillar_roots={"base": [str(tmp_path / "pillar")]},
                                          pillar_tree_ttl=0))
    assert codec.dumps(again.compile("web1", DEBIAN)) == first


# --------------------------------------------------------------------------- store tree


def test_store_tree_first_local_fallback_and_push(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "ha")
    local = tmp_path / "local"
    write(local, {"top.sls": "base:\n  '*': [a, b]\n", "a.sls": "a: local\n",
                  "b.sls": "b: local\n"})
    src = tmp_path / "src"
    write(src, {"a.sls": "a: store\n", "gone.sls": "x: 1\n"})
    assert push(store, str(src), "base")["files"] == 2
    (src / "gone.sls").unlink()
    assert push(store, str(src), "base") == {"saltenv": "base", "files": 1, "removed": 1,
                                              "bytes": 9}
    assert store.list(PILLAR_PREFIX.rstrip("/")) == ["pillar_roots/base/a.sls"]
    c = PillarCompiler.from_opts({"pillar_roots": {"base": [str(local)]}, "pillar_tree_ttl": 0},
                                 store)
    assert c.compile("m", {}) == {"a": "store", "b": "local"}
    h1 = c.tree.tree_hash()
    (tmp_path / "ha" / "pillar_roots" / "base" / "a.sls").write_text("a: edited\n")
    assert c.compile("m", {}) == {"a": "edited", "b": "local"}
    assert c.tree.tree_hash() != h1


# --------------------------------------------------------------------------- minion module


def test_minion_pillar_module() -> None:
    from hamaster.minion.modules import pillar as mod
    from hamaster.minion.modules.context import CommandExecutionError, ExecContext

    ctx = ExecContext(opts={}, grains={}, minion_id="m",
                      pillar={"a": {"b": {"c": 1}}, "l": [{"x": 2}], "s": "v"})
    assert mod.get(ctx, "a:b:c") == 1
    assert mod.get(ctx, "l:0:x") == 2
    assert mod.get(ctx, "a:nope", default="d") == "d"
    assert mod.get(ctx, "nope") == ""
    assert mod.get(ctx, "a.b.c", delimiter=".") == 1
    assert mod.get(ctx, "a", default={"z": 0}, merge=True) == {"z": 0, "b": {"c": 1}}
    assert mod.item(ctx, "s", "a:b") == {"s": "v", "a:b": {"c": 1}}
    assert mod.raw(ctx, "s") == "v" and mod.ls(ctx) == ["a", "l", "s"]
    assert mod.items(ctx) is ctx.pillar  # no master: the pillar held
    with pytest.raises(CommandExecutionError):
        mod.refresh(ctx)
    fresh = {"new": 1}
    ctx.refresh_pillar = lambda: fresh
    assert mod.items(ctx) == fresh and mod.items(ctx, "new") == {"new": 1}
    assert mod.refresh(ctx) is True


# --------------------------------------------------------------------------- targeting, mine


def test_pillar_targets_and_nodegroups() -> None:
    from hamaster.targeting import check_minions, expand_nodegroups, matches

    pillar = {"role": "web", "web": {"port": 80, "vhosts": ["a", "b"]}}
    assert matches("web:port:80", "pillar", "m", {}, pillar=pillar)
    assert matches("web:vhosts:a", "pillar", "m", {}, pillar=pillar)
    assert not matches("web:port:81", "pillar", "m", {}, pillar=pillar)
    assert not matches("web:port:80", "pillar", "m", {})  # no pillar known: no match
    assert matches("role:w.b", "pillar_pcre", "m", {}, pillar=pillar)
    assert matches("web:port:80", "pillar_exact", "m", {}, pillar=pillar)
    assert not matches("web:port:8*", "pillar_exact", "m", {}, pillar=pillar)
    assert matches("I@role:web and m*", "compound", "m", {}, pillar=pillar)
    assert not matches("J@role:^d", "compound", "m", {}, pillar=pillar)
    groups = {"webs": "I@role:web or L@x", "both": "N@webs or db*", "ids": ["a", "b"]}
    assert expand_nodegroups("both", "nodegroup", groups) == (
        "( ( I@role:web or L@x ) or db* )", "compound")
    assert expand_nodegroups("(N@ids and b)", "compound", groups) == ("(L@a,b and b)", "compound")
    with pytest.raises(ValueError, match="not defined"):
        expand_nodegroups("nope", "nodegroup", groups)
    with pytest.raises(ValueError, match="nest"):
        expand_nodegroups("loop", "nodegroup", {"loop": "N@loop"})
    cached = {"m1": pillar, "m2": {"role": "db"}}
    assert check_minions("role:web", "pillar", ["m1", "m2", "m3"], lambda _m: None,
                         pillar_of=cached.get) == ["m1"]


def test_mine_store_get_delete_flush_and_acl() -> None:
    from hamaster.master.datacache import MINE_ACL_DATA, MINE_ACL_ID, MinionDataCache

    cache = MinionDataCache(None)
    ids = ["a", "b", "c"]

    def check(tgt: object, tgt_type: str) -> list[str]:
        from hamaster.targeting import check_minions
        return check_minions(tgt, tgt_type, ids, lambda _m: {})

    assert cache.mine_store("a", {"ip": "1.1.1.1", "os": "x"})
    assert cache.mine_store("b", {"ip": "2.2.2.2"})
    assert cache.mine_store("b", {"os": "y"})  # merged, not replaced
    assert cache.mine_store("c", {"ip": {MINE_ACL_ID: True, MINE_ACL_DATA: "3.3.3.3",
                                         "allow_tgt": "a"}})
    assert cache.mine_get("a", "*", "glob", "ip", check) == {
        "a": "1.1.1.1", "b": "2.2.2.2", "c": "3.3.3.3"}
    assert cache.mine_get("b", "*", "glob", "ip", check) == {"a": "1.1.1.1", "b": "2.2.2.2"}
    assert cache.mine_get("a", "a,b", "list", "ip,os", check) == {
        "ip": {"a": "1.1.1.1", "b": "2.2.2.2"}, "os": {"a": "x", "b": "y"}}
    assert cache.mine_store("b", {"new": 1}, clear=True)
    assert cache.get("b", "mine") == {"new": 1}
    assert cache.mine_delete("a", "ip") and cache.get("a", "mine") == {"os": "x"}
    assert cache.mine_flush("a") and cache.get("a", "mine") is None
    assert cache.mine_get("a", "[bad", "pcre", "ip", check) == {}


def test_data_cache_shared_through_the_store(tmp_path: Path) -> None:
    from hamaster.master.datacache import MinionDataCache
    from tests.kit import wait_until

    a_store, b_store = FsStore(tmp_path / "ha", poll_interval=0.05), FsStore(tmp_path / "ha",
                                                                            poll_interval=0.05)
    a, b = MinionDataCache(a_store), MinionDataCache(b_store)
    seen: dict[str, dict] = {}
    b.on_grains = seen.__setitem__
    try:
        for s, c in ((a_store, a), (b_store, b)):
            c.start()
            s.start()
        a.put("m1", "grains", {"os": "Debian"})
        a.put("m1", "pillar", {"role": "web"})
        a.mine_store("m1", {"ip": "1.2.3.4"})
        wait_until(lambda: b.get("m1", "mine") == {"ip": "1.2.3.4"}, 10, what="mine on B")
        assert b.pillar_of("m1") == {"role": "web"} and seen == {"m1": {"os": "Debian"}}
        a.mine_flush("m1")
        wait_until(lambda: b.get("m1", "mine") is None, 10, what="flush seen on B")
        c2 = MinionDataCache(FsStore(tmp_path / "ha"))  # a master started later loads it all
        c2.start()
        assert c2.pillar_of("m1") == {"role": "web"}
        c2.stop()
    finally:
        for s, c in ((a_store, a), (b_store, b)):
            c.stop()
            s.close()


# --------------------------------------------------------------------------- gpg


@pytest.fixture(autouse=True)
def _stop_gpg_agents(tmp_path: Path):
    """gpg starts an agent per home directory; stop every one this test's directories got."""
    yield
    import shutil
    import subprocess

    gpgconf = shutil.which("gpgconf")
    if gpgconf is None:
        return
    for sock in tmp_path.rglob("S.gpg-agent"):
        subprocess.run([gpgconf, "--homedir", str(sock.parent), "--kill", "all"],
                       capture_output=True, timeout=30, check=False)


def _gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    import subprocess

    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode",
                           "loopback", "--passphrase", "", *args], input=data,
                          capture_output=True, check=True, timeout=60).stdout


@pytest.mark.skipif(not __import__("shutil").which("gpg"), reason="gpg is not installed")
def test_gpg_renderer_decrypts_in_memory(tmp_path: Path) -> None:
    from hamaster.master.datacache import MinionDataCache
    from hamaster.pillar.service import PillarService

    home = tmp_path / "gpgkeys"
    home.mkdir(mode=0o700)
    _gpg(home, "--quick-generate-key", "pillar@cluster", "default", "default", "never")
    cipher = _gpg(home, "--trust-model", "always", "--armor", "--encrypt", "-r",
                  "pillar@cluster", data=b"hunter2").decode()
    indented = "\n".join("    " + line for line in cipher.strip().splitlines())
    files = {"top.sls": "base:\n  '*': [secret, plain]\n",
             "secret.sls": f"#!yaml|gpg\ndb:\n  password: |-\n{indented}\n  user: app\n",
             "plain.sls": "plain: 1\n",
             "bad.sls": "#!yaml|gpg\nx: |\n  -----BEGIN PGP MESSAGE-----\n  junk\n"
                        "  -----END PGP MESSAGE-----\n"}
    write(tmp_path / "pillar", files)
    store = FsStore(tmp_path / "ha")
    opts = {"pillar_roots": {"base": [str(tmp_path / "pillar")]}, "pillar_tree_ttl": 0,
            "gpg_keydir": str(home)}
    cache = MinionDataCache(store)
    cache.start()
    svc = PillarService(opts, None, on_compiled=lambda m, g, p, s: cache.put(
        m, "pillar", p, memory_only=s))
    pillar = svc.answer("m1", {"grains": {}})
    assert pillar == {"db": {"password": "hunter2", "user": "app"}, "plain": 1}
    cache.stop()
    assert cache.pillar_of("m1") == pillar  # in memory for targeting on this master...
    assert store.get("minion_data/m1/pillar") is None  # ...never in the store
    assert b"hunter2" not in b"".join(p.read_bytes() for p in (tmp_path / "ha").rglob("*")
                                      if p.is_file())
    # an undecryptable block is an _errors entry; without gpg_keydir the renderer is an error
    (tmp_path / "pillar" / "top.sls").write_text("base:\n  '*': [bad, plain]\n")
    assert svc.answer("m1", {})["_errors"] == [
        "Rendering SLS 'bad' failed. Please see master log for details."]
    nogpg = PillarCompiler.from_opts({**opts, "gpg_keydir": None, "pillar_safe_render_error":
                                      False})
    (tmp_path / "pillar" / "top.sls").write_text("base:\n  '*': [secret]\n")
    assert "gpg renderer is not configured" in nogpg.compile("m1", {})["_errors"][0]


@pytest.mark.skipif(not __import__("shutil").which("gpg"), reason="gpg is not installed")
def test_gpg_cluster_key_from_the_store(tmp_path: Path) -> None:
    from hamaster.pillar.gpg import STORE_KEY

    home = tmp_path / "operator-gpg"
    home.mkdir(mode=0o700)
    _gpg(home, "--quick-generate-key", "cluster@pillar", "default", "default", "never")
    cipher = _gpg(home, "--trust-model", "always", "--armor", "--encrypt", "-r",
                  "cluster@pillar", data=b"s3cret").decode()
    indented = "\n".join("    " + line for line in cipher.strip().splitlines())
    store = FsStore(tmp_path / "ha")
    push(store, str(_tree(tmp_path / "src", {
        "top.sls": "base:\n  '*': [s]\n",
        "s.sls": f"#!yaml|gpg\npw: |-\n{indented}\n"})), "base")
    opts = {"pillar_roots": {"base": []}, "pillar_tree_ttl": 0,
            "cachedir": str(tmp_path / "cache")}
    c = PillarCompiler.from_opts(opts, store)
    assert "_errors" in c.compile("m", {})  # no key in the store yet
    store.put(STORE_KEY, _gpg(home, "--armor", "--export-secret-keys", "cluster@pillar"))
    c2 = PillarCompiler.from_opts(opts, store)  # another master
    assert c2.compile("m", {}) == {"pw": "s3cret"}
    assert (tmp_path / "cache" / "pillar_gpg").stat().st_mode & 0o077 == 0


def _tree(root: Path, files: dict[str, str]) -> Path:
    write(root, files)
    return root


def test_result_cache_follows_tree_and_inputs(tmp_path: Path) -> None:
    c = compiler(tmp_path, {"top.sls": "base:\n  '*': [a]\n", "a.sls": "a: {{ grains.x }}\n"})
    first = c.compile("m", {"x": 1})
    assert c.compile("m", {"x": 1}) is first  # same tree, same inputs: the cached result
    assert c.compile("m", {"x": 2}) == {"a": 2}
    assert c.compile("other", {"x": 1}) is not first
    (tmp_path / "pillar" / "a.sls").write_text("a: changed\n")
    assert c.compile("m", {"x": 1}) == {"a": "changed"}
    off = compiler(tmp_path, {}, pillar_cache_entries=0)
    assert off.compile("m", {"x": 1}) is not off.compile("m", {"x": 1})


def test_mine_commands_survive_bad_input() -> None:
    from hamaster.master.datacache import MinionDataCache

    cache = MinionDataCache(None)

    def check(tgt: object, tgt_type: str) -> list[str]:
        from hamaster.targeting import check_minions
        return check_minions(tgt, tgt_type, ["a"], lambda _m: {})

    cache.mine_store("a", {"f": 1})
    for data in (None, [], "x", 3):
        assert cache.mine_store("a", data) is False
    for fun in (None, ["f"], {"f": 1}, 3):
        assert cache.mine_delete("a", fun) is False
    for fun in (None, {"f": 1}, 3):
        assert cache.mine_get("a", "*", "glob", fun, check) == {}
    assert cache.mine_get("a", "*", "glob", ["f", 3], check) == {"f": {"a": 1}}
    for tgt, tgt_type in ((None, "glob"), ({"x": 1}, "compound"), ("*", "nope"), ("(", "compound")):
        assert cache.mine_get("a", tgt, tgt_type, "f", check) in ({}, {"a": 1})
    assert cache.mine_store("../x", {"f": 1}) is True and cache.get("../x", "mine") is None


def test_data_cache_writes_a_storm_in_batches(tmp_path) -> None:
    """Records queued while the writer is busy go out together (``put_many``, one etcd
    transaction per batch), and every one of them lands in the store."""
    import threading

    from hamaster.master.datacache import MinionDataCache
    from hamaster.store.fs import FsStore

    class CountingStore(FsStore):
        """A real fs store that counts the writer's calls and holds the first one."""

        def __init__(self, root) -> None:
            super().__init__(root)
            self.calls: list[int] = []
            self.gate = threading.Event()

        def put_many(self, items) -> None:
            self.calls.append(len(items))
            self.gate.wait(10)          # the first batch is slow: the rest queue behind it
            super().put_many(items)

    store = CountingStore(tmp_path / "ha")
    cache = MinionDataCache(store)
    cache.start()
    try:
        for i in range(300):
            cache.put(f"m{i:03d}", "grains", {"n": i})
        store.gate.set()
    finally:
        cache.stop()
    assert sum(store.calls) == 300 and len(store.calls) <= 3, store.calls
    assert all(store.get(f"minion_data/m{i:03d}/grains") for i in (0, 150, 299))

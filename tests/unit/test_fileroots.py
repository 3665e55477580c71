"""The master's file server (hamaster.fileroots.server): listing, hashing, serving, security."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

from hamaster.fileroots import open_file_server
from hamaster.fileroots import server as server_mod
from hamaster.fileroots.server import FileServer
from hamaster.store.base import Change, Store, StoreUnavailable, validate_key, validate_prefix
from hamaster.store.fs import FsStore
from hamaster.store.readonly import ReadOnlyDirStore


class MemStore(Store):
    """A minimal in-memory store: the generic (non-directory) root path of the file server."""

    def __init__(self, data: dict[str, bytes] | None = None):
        self.data = dict(data or {})
        self.down = False
        self.gets = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("mem store down")

    def get(self, key):
        self._check()
        validate_key(key)
        self.gets += 1
        return self.data.get(key)

    def put(self, key, value):
        self._check()
        self.data[validate_key(key)] = bytes(value)

    def delete(self, key):
        self._check()
        return self.data.pop(key, None) is not None

    def list(self, prefix):
        self._check()
        prefix = validate_prefix(prefix)
        return sorted(k for k in self.data
                      if not prefix or k == prefix or k.startswith(prefix + "/"))

    def compare_and_put(self, key, expected, value):
        raise NotImplementedError

    def watch(self, prefix, callback):
        pass

    def start(self):
        pass

    def poll_now(self) -> list[Change]:
        return []

    def heartbeat(self, member_id, info, ttl):
        pass

    def members(self):
        return {}

    def healthy(self):
        return not self.down

    def close(self):
        pass


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def fetch(fs: FileServer, path: str, saltenv: str = "base", **extra) -> bytes | None:
    """What a minion does: hash, then chunks until an empty one, then check the hash."""
    info = fs.file_hash({"path": path, "saltenv": saltenv})
    if not info:
        return None
    chunks, loc = [], 0
    while True:
        rep = fs.serve_file({"path": path, "loc": loc, "saltenv": saltenv, **extra})
        data = rep["data"]
        if not data:
            break
        if rep.get("gzip"):
            data = gzip.decompress(data)
        chunks.append(data)
        loc += len(data)
    content = b"".join(chunks)
    assert hashlib.sha256(content).hexdigest() == info["hsum"]
    assert info["hash_type"] == "sha256"
    return content


BIG = os.urandom(10_000) + b"tail"


def make_tree(base: Path) -> None:
    write(base / "top.sls", "top")
    write(base / "web/init.sls", "web: pkg.installed")
    write(base / "web/files/nginx.conf", BIG)
    write(base / "empty.txt", b"")


@pytest.fixture(params=["dir", "fsstore", "mem"])
def served(request, tmp_path):
    """A FileServer over the same tree held in each kind of root."""
    if request.param == "dir":
        make_tree(tmp_path / "srv")
        store = ReadOnlyDirStore(tmp_path / "srv")
        prefix = ""
    elif request.param == "fsstore":
        store = FsStore(tmp_path / "store")
        for rel, data in [("top.sls", b"top"), ("web/init.sls", b"web: pkg.installed"),
                          ("web/files/nginx.conf", BIG), ("empty.txt", b"")]:
            store.put(f"file_roots/base/{rel}", data)
        prefix = "file_roots/base/"
    else:
        store = MemStore({"file_roots/base/top.sls": b"top",
                          "file_roots/base/web/init.sls": b"web: pkg.installed",
                          "file_roots/base/web/files/nginx.conf": BIG,
                          "file_roots/base/empty.txt": b""})
        prefix = "file_roots/base/"
    return FileServer({"base": [(store, prefix)]}, chunk_size=999)


# ------------------------------------------------------------------ basics


def test_list_hash_serve_round_trip(served):
    fs = served
    assert fs.file_list({"saltenv": "base"}) == [
        "empty.txt", "top.sls", "web/files/nginx.conf", "web/init.sls"]
    assert fs.file_list({"saltenv": "base", "prefix": "web/"}) == [
        "web/files/nginx.conf", "web/init.sls"]
    assert fs.dir_list({"saltenv": "base"}) == ["web", "web/files"]
    assert fs.dir_list({"saltenv": "base", "prefix": "web/files"}) == ["web/files"]
    assert fs.file_list_emptydirs({"saltenv": "base"}) == []
    assert fs.symlink_list({"saltenv": "base"}) == {}
    assert fs.envs() == ["base"]

    assert fetch(fs, "salt://web/files/nginx.conf") == BIG  # 11 chunks of 999
    assert fetch(fs, "web/init.sls") == b"web: pkg.installed"
    assert fetch(fs, "salt://web/files/nginx.conf", gzip=5) == BIG
    assert fs.file_hash({"path": "salt://web/files/nginx.conf", "saltenv": "base"}) == {
        "hsum": hashlib.sha256(BIG).hexdigest(), "hash_type": "sha256"}
    assert fs.file_hash_and_stat({"path": "top.sls", "saltenv": "base"}) == (
        {"hsum": hashlib.sha256(b"top").hexdigest(), "hash_type": "sha256"}, None)
    assert fs.file_find({"path": "salt://top.sls", "saltenv": "base"}) == {
        "path": "top.sls", "rel": "top.sls"}

    # A chunk is chunk_size bytes from loc; past the end it is empty but names the file.
    rep = fs.serve_file({"path": "salt://web/files/nginx.conf", "loc": 1000, "saltenv": "base"})
    assert rep == {"data": BIG[1000:1999], "dest": "web/files/nginx.conf"}
    assert fs.serve_file({"path": "top.sls", "loc": 50, "saltenv": "base"}) == {
        "data": b"", "dest": "top.sls"}
    # An empty file exists: a hash and a first (empty) chunk with dest, as Salt minions expect.
    assert (fs.file_hash({"path": "empty.txt", "saltenv": "base"})["hsum"]
            == hashlib.sha256().hexdigest())
    assert fs.serve_file({"path": "empty.txt", "loc": 0, "saltenv": "base"}) == {
        "data": b"", "dest": "empty.txt"}
    assert fetch(fs, "empty.txt") == b""


def test_missing_and_defaults(served):
    fs = served
    assert fs.file_hash({"path": "nope.sls", "saltenv": "base"}) == ""
    assert fs.file_hash_and_stat({"path": "nope.sls", "saltenv": "base"}) == ("", None)
    assert fs.file_find({"path": "nope.sls", "saltenv": "base"}) == {}
    assert fs.serve_file({"path": "nope.sls", "loc": 0, "saltenv": "base"}) == {"data": b"",
                                                                                "dest": ""}
    assert fs.file_hash({"path": "web", "saltenv": "base"}) == ""  # a directory is not a file
    assert fs.file_hash({"path": "top.sls", "saltenv": "dev"}) == ""
    assert fs.file_list({"saltenv": "dev"}) == []
    # saltenv defaults to base; older minions send ``env``; a ?saltenv= query wins.
    assert fs.file_hash({"path": "top.sls"})
    assert fs.file_hash({"path": "top.sls", "env": "base"})
    assert fs.file_hash({"path": "salt://top.sls?saltenv=base", "saltenv": "dev"})
    assert fs.file_hash({"path": "salt://top.sls?saltenv=dev", "saltenv": "base"}) == ""
    # Odd but harmless spellings normalise.
    assert fs.file_find({"path": "salt://web//./init.sls"})["rel"] == "web/init.sls"
    # A bad loc is a missing chunk, not an exception.
    for loc in (-1, "0", 1.5, True):
        assert fs.serve_file({"path": "top.sls", "loc": loc}) == {"data": b"", "dest": ""}


# ------------------------------------------------------------------ roots and environments


def test_multiple_roots_first_wins_and_union(tmp_path):
    write(tmp_path / "a/common.sls", "from a")
    write(tmp_path / "a/only_a.sls", "a")
    write(tmp_path / "b/common.sls", "from b")
    write(tmp_path / "b/sub/only_b.sls", "b")
    mem = MemStore({"x/dev/common.sls": b"from mem", "x/dev/m.sls": b"m"})
    fs = FileServer({
        "base": [(ReadOnlyDirStore(tmp_path / "a"), ""), (ReadOnlyDirStore(tmp_path / "b"), "")],
        "dev": [(mem, "x/dev/"), (ReadOnlyDirStore(tmp_path / "b"), "")],
    })
    assert fetch(fs, "salt://common.sls") == b"from a"
    assert fetch(fs, "salt://sub/only_b.sls") == b"b"
    assert fs.file_list({"saltenv": "base"}) == ["common.sls", "only_a.sls", "sub/only_b.sls"]
    assert fetch(fs, "salt://common.sls", "dev") == b"from mem"
    assert fetch(fs, "salt://sub/only_b.sls", "dev") == b"b"
    assert fetch(fs, "salt://only_a.sls", "dev") is None
    assert fs.file_list({"saltenv": "dev"}) == ["common.sls", "m.sls", "sub/only_b.sls"]
    assert fs.envs() == ["base", "dev"]


def test_from_opts_single_master_is_read_only(tmp_path):
    srv = tmp_path / "srv"
    write(srv / "a.sls", "a")
    before = sorted(os.listdir(srv))
    mode = os.stat(srv).st_mode
    fs = FileServer.from_opts({"file_roots": {"base": [str(srv), str(tmp_path / "missing")],
                                              "dev": [str(tmp_path / "nodev")]}})
    assert fs.envs() == ["base", "dev"]
    assert fetch(fs, "salt://a.sls") == b"a"
    assert fs.file_list({"saltenv": "dev"}) == []
    assert fs.file_hash({"path": "a.sls", "saltenv": "dev"}) == ""
    assert fs.manifest_hash()
    # Nothing created, written or chmod'ed in operator directories.
    assert sorted(os.listdir(srv)) == before
    assert os.stat(srv).st_mode == mode
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "nodev").exists()
    assert isinstance(open_file_server({"file_roots": {}}), FileServer)
    # Malformed file_roots never raise.
    assert FileServer.from_opts({"file_roots": "bad"}).envs() == []
    assert FileServer.from_opts({"file_roots": {"base": str(srv), 3: ["x"], "../e": [str(srv)],
                                                "q": [None]}}).envs() == ["base", "q"]


def test_from_opts_ha_shared_first_then_local(tmp_path):
    local = tmp_path / "srv"
    write(local / "common.sls", "local")
    write(local / "local_only.sls", "local only")
    write(tmp_path / "prodsrv/p.sls", "p")
    shared = FsStore(tmp_path / "shared")
    shared.put("file_roots/base/common.sls", b"shared")
    shared.put("file_roots/dev/d.sls", b"dev shared")
    fs = FileServer.from_opts(
        {"file_roots": {"base": [str(local)], "prod": [str(tmp_path / "prodsrv")]}}, shared)
    assert fs.envs() == ["base", "dev", "prod"]
    assert fetch(fs, "salt://common.sls") == b"shared"
    assert fetch(fs, "salt://local_only.sls") == b"local only"
    assert fetch(fs, "salt://d.sls", "dev") == b"dev shared"
    assert fetch(fs, "salt://p.sls", "prod") == b"p"
    assert fs.file_list({"saltenv": "base"}) == ["common.sls", "local_only.sls"]
    # An environment created in the shared store later is served without a restart.
    shared.put("file_roots/qa/q.sls", b"qa")
    assert "qa" in fs.envs()
    assert fetch(fs, "salt://q.sls", "qa") == b"qa"
    # Deleting from the shared store falls back to the local copy.
    shared.delete("file_roots/base/common.sls")
    assert fetch(fs, "salt://common.sls") == b"local"


def test_shared_store_down_falls_back_to_local(tmp_path, caplog):
    write(tmp_path / "srv/a.sls", "local a")
    mem = MemStore({"file_roots/base/a.sls": b"shared a", "file_roots/base/s.sls": b"s"})
    fs = FileServer.from_opts({"file_roots": {"base": [str(tmp_path / "srv")]}}, mem)
    assert fetch(fs, "salt://a.sls") == b"shared a"
    mem.down = True
    with caplog.at_level(logging.WARNING, logger="hamaster.fileroots.server"):
        assert fetch(fs, "salt://a.sls") == b"local a"
        assert fs.file_hash({"path": "s.sls"}) == ""
        assert fs.file_list({"saltenv": "base"}) == ["a.sls"]
        assert fs.envs() == ["base"]
        fs.manifest_hash()
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    mem.down = False
    assert fetch(fs, "salt://a.sls") == b"shared a"


def test_fsstore_root_hides_dot_names(tmp_path):
    store = FsStore(tmp_path / "st")
    store.put("file_roots/base/a.sls", b"a")
    write(tmp_path / "st/file_roots/base/.tmp-123", "partial")
    write(tmp_path / "st/file_roots/base/.hidden/x", "x")
    fs = FileServer({"base": [(store, "file_roots/base/")]})
    assert fs.file_list({"saltenv": "base"}) == ["a.sls"]
    assert fs.file_hash({"path": ".tmp-123"}) == ""
    assert fs.file_hash({"path": ".hidden/x"}) == ""
    # A store over its own root never lists its marker.
    assert FileServer({"base": [(store, "")]}).file_list({}) == ["file_roots/base/a.sls"]


def test_local_dir_serves_dotfiles_like_salt(tmp_path):
    write(tmp_path / "srv/users/.bashrc", "alias ll='ls -l'")
    fs = FileServer({"base": [(ReadOnlyDirStore(tmp_path / "srv"), "")]})
    assert fs.file_list({}) == ["users/.bashrc"]
    assert fetch(fs, "salt://users/.bashrc") == b"alias ll='ls -l'"


# ------------------------------------------------------------------ security


SECRET = b"root:secret"


@pytest.fixture
def jail(tmp_path):
    """A root at tmp/env/srv with secrets next to it and above it."""
    write(tmp_path / "secret.txt", SECRET)
    write(tmp_path / "env/secret.txt", SECRET)
    write(tmp_path / "outside/s.txt", SECRET)
    srv = tmp_path / "env/srv"
    write(srv / "ok.sls", "ok")
    write(srv / "sub/real.txt", "real")
    return tmp_path, srv


def assert_refused(fs: FileServer, load: dict) -> None:
    full = {"loc": 0, **load}
    assert fs.file_hash(load) == ""
    assert fs.file_hash_and_stat(load) == ("", None)
    assert fs.file_find(load) == {}
    rep = fs.serve_file(full)
    assert rep["data"] == b"" and rep["dest"] == ""
    assert SECRET.decode() not in repr(rep)


@pytest.mark.parametrize("path", [
    "../secret.txt", "salt://../secret.txt", "sub/../../secret.txt",
    "salt://sub/../../../secret.txt",
    "..", "salt://..", "/etc/passwd", "salt:///etc/passwd", "//etc/passwd",
    "ok.sls\0", "ok\0.sls", "salt://ok.sls\0/../x",
    "..\\secret.txt", "sub\\..\\..\\secret.txt", "salt://..\\..\\secret.txt", "ok.sls\\",
    "", "salt://", "?saltenv=base",
])
@pytest.mark.parametrize("kind", ["dir", "fsstore-files", "mem"])
def test_traversal_refused(jail, path, kind):
    tmp, srv = jail
    if kind == "dir":
        fs = FileServer({"base": [(ReadOnlyDirStore(srv), "")]})
    elif kind == "fsstore-files":
        fs = FileServer({"base": [(FsStore(tmp / "env", create=False), "srv/")]})
    else:
        fs = FileServer({"base": [(MemStore({"srv/ok.sls": b"ok", "secret.txt": SECRET}), "srv/")]})
    assert fetch(fs, "salt://ok.sls") == b"ok"
    assert_refused(fs, {"path": path, "saltenv": "base"})


@pytest.mark.parametrize("load", [
    {"path": 123}, {"path": None}, {"path": ["ok.sls"]}, {"path": b"ok.sls"},
    {"path": {"a": 1}}, {},
    {"path": "ok.sls", "saltenv": 1}, {"path": "ok.sls", "saltenv": ["base"]},
    {"path": "ok.sls", "saltenv": b"base"}, {"path": "ok.sls", "env": 3},
    {"path": "ok.sls", "saltenv": "../env"}, {"path": "ok.sls", "saltenv": ".."},
    {"path": "ok.sls", "saltenv": "base/../base"}, {"path": "ok.sls", "saltenv": "base\0"},
    {"path": "salt://ok.sls?saltenv=../base"},
])
def test_bad_types_and_envs_are_missing(jail, load):
    tmp, srv = jail
    shared = MemStore({"file_roots/base/ok.sls": b"ok"})
    fs = FileServer({"base": [(ReadOnlyDirStore(srv), "")]}, discover=shared)
    assert_refused(fs, load)
    assert fs.file_list({**load, "prefix": ""}) in ([], ["ok.sls", "sub/real.txt"])
    assert fs.dir_list(load) in ([], ["sub"])
    for bad in (None, "x", 3, []):
        assert fs.file_list(bad) == [] and fs.dir_list(bad) == []
        assert fs.file_hash(bad) == "" and fs.file_find(bad) == {}
        assert fs.serve_file(bad) == {"data": b"", "dest": ""}
    assert fs.file_list({"saltenv": "base", "prefix": 3}) == []


def test_symlinks_escaping_root_refused_inside_allowed(jail, caplog):
    tmp, srv = jail
    os.symlink(tmp / "secret.txt", srv / "abs_escape")
    os.symlink("../secret.txt", srv / "rel_escape")
    os.symlink(tmp / "outside", srv / "dir_escape")
    os.symlink("../../secret.txt", srv / "sub/deep_escape")
    os.symlink("hop", srv / "chain")  # chain -> hop -> outside
    os.symlink(tmp / "outside/s.txt", srv / "hop")
    os.symlink(".", srv / "self")  # resolves to the root itself: not a file
    os.symlink("sub/real.txt", srv / "inside_link")
    os.symlink("sub", srv / "inside_dir")
    os.symlink("..", srv / "sub/loop")  # a loop inside the root: listing must terminate
    fs = FileServer({"base": [(ReadOnlyDirStore(srv), "")]}, chunk_size=3)
    with caplog.at_level(logging.WARNING, logger="hamaster.fileroots.server"):
        for path in ["abs_escape", "rel_escape", "dir_escape/s.txt", "sub/deep_escape", "chain",
                     "hop", "self", "salt://dir_escape/s.txt", "inside_dir/deep_escape"]:
            assert_refused(fs, {"path": path})
        assert_refused(fs, {"path": "abs_escape"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("abs_escape" in m for m in warnings) == 1  # logged once, not per request
    assert fetch(fs, "salt://inside_link") == b"real"
    assert fetch(fs, "salt://inside_dir/real.txt") == b"real"
    assert fetch(fs, "salt://sub/loop/ok.sls") == b"ok"
    files = fs.file_list({})
    assert "inside_link" in files and "inside_dir/real.txt" in files
    assert not any("escape" in f or f in ("chain", "hop") for f in files)
    assert "ok.sls" in files and "sub/real.txt" in files
    assert all(f.count("loop") <= 1 for f in files)
    assert SECRET not in b"".join(fetch(fs, f) or b"" for f in files)


def test_symlinked_root_dir_itself_is_fine(tmp_path):
    write(tmp_path / "real/a.sls", "a")
    os.symlink(tmp_path / "real", tmp_path / "link")
    fs = FileServer.from_opts({"file_roots": {"base": [str(tmp_path / "link")]}})
    assert fs.file_list({}) == ["a.sls"]
    assert fetch(fs, "salt://a.sls") == b"a"


def test_fsstore_symlink_escape_refused(tmp_path):
    write(tmp_path / "secret.txt", SECRET)
    store = FsStore(tmp_path / "st")
    store.put("file_roots/base/a.sls", b"a")
    os.symlink(tmp_path / "secret.txt", tmp_path / "st/file_roots/base/evil")
    fs = FileServer({"base": [(store, "file_roots/base/")]})
    assert fs.file_list({}) == ["a.sls"]
    assert_refused(fs, {"path": "evil"})


# ------------------------------------------------------------------ freshness and drift


@pytest.mark.parametrize("settle", [True, False])
def test_updated_file_is_served_new(tmp_path, monkeypatch, settle):
    if not settle:  # cache even brand-new files: the (inode, size, times) key must still hold
        monkeypatch.setattr(server_mod, "_SETTLE_NS", -(10**18))
    store = FsStore(tmp_path / "st")
    mem = MemStore()
    srv = tmp_path / "srv"
    fss = {
        "fsstore": (FileServer({"base": [(store, "file_roots/base/")]}), store.put),
        "mem": (FileServer({"base": [(mem, "file_roots/base/")]}), mem.put),
        "dir": (FileServer({"base": [(ReadOnlyDirStore(srv), "")]}),
                lambda k, v: write(srv / k.removeprefix("file_roots/base/"), v)),
    }
    for name, (fs, put) in fss.items():
        # Same-size rewrites (v1 → v3) within one timestamp tick are only safe while files
        # are too fresh to be cached; with the settle window off, sizes differ.
        contents = [b"v1", b"version two", b"v3", b"v4" * 1000] if settle else [
            b"v1", b"version two", b"v33", b"v4" * 1000]
        for i, content in enumerate(contents):
            put("file_roots/base/f.sls", content)
            assert fetch(fs, "salt://f.sls") == content, (name, i)


def test_manifest_hash(tmp_path):
    for d in ("one", "two"):
        make_tree(tmp_path / d)
    write(tmp_path / "one/web/files/nginx.conf", BIG)
    write(tmp_path / "two/web/files/nginx.conf", BIG)
    one = FileServer.from_opts({"file_roots": {"base": [str(tmp_path / "one")]}})
    two = FileServer.from_opts({"file_roots": {"base": [str(tmp_path / "two")]}})
    h = one.manifest_hash()
    assert h == two.manifest_hash() and len(h) == 64
    # The same tree in a shared store hashes the same.
    shared = FsStore(tmp_path / "shared")
    for rel in one.file_list({}):
        shared.put(f"file_roots/base/{rel}", (tmp_path / "one" / rel).read_bytes())
    assert FileServer({"base": [(shared, "file_roots/base/")]}).manifest_hash() == h
    mem = MemStore({f"file_roots/base/{k}": (tmp_path / "one" / k).read_bytes()
                    for k in one.file_list({})})
    assert FileServer.from_opts({"file_roots": {}}, mem).manifest_hash() == h
    # Content, path and environment changes all show.
    write(tmp_path / "one/top.sls", "top2")
    h2 = one.manifest_hash()
    assert h2 != h
    write(tmp_path / "one/top.sls", "top")
    assert one.manifest_hash() == h
    os.rename(tmp_path / "one/top.sls", tmp_path / "one/top2.sls")
    assert one.manifest_hash() not in (h, h2)
    os.rename(tmp_path / "one/top2.sls", tmp_path / "one/top.sls")
    assert one.manifest_hash() == h
    assert FileServer.from_opts(
        {"file_roots": {"dev": [str(tmp_path / "one")]}}).manifest_hash() != h


def test_concurrent_serving(tmp_path):
    make_tree(tmp_path / "srv")
    fs = FileServer({"base": [(ReadOnlyDirStore(tmp_path / "srv"), "")]}, chunk_size=512)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                assert fetch(fs, "salt://web/files/nginx.conf") == BIG
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_chunk_size_validated():
    with pytest.raises(ValueError):
        FileServer({}, chunk_size=0)


def test_in_root_symlinks_resolved_beneath_the_root(jail, caplog):
    """Links are walked by the server (readlinkat), not by the kernel: absolute links naming the
    root are followed inside it, loops and long chains are refused, nothing is read outside."""
    tmp, srv = jail
    os.symlink(srv / "sub/real.txt", srv / "abs_inside")       # absolute, names the root
    os.symlink(srv / "sub", srv / "abs_dir")
    os.symlink("loop_b", srv / "loop_a")                       # a -> b -> a
    os.symlink("loop_a", srv / "loop_b")
    os.symlink("sub/../sub/./real.txt", srv / "dotted")        # '..' pops back inside
    os.symlink("../../srv/sub/real.txt", srv / "sub/via_parent")  # leaves, re-enters: refused
    prev = "sub/real.txt"
    for i in range(server_mod.beneath.MAX_HOPS + 2):           # a chain longer than MAX_HOPS
        os.symlink(prev, srv / f"chain{i}")
        prev = f"chain{i}"
    fs = FileServer({"base": [(ReadOnlyDirStore(srv), "")]})
    assert fetch(fs, "abs_inside") == b"real"
    assert fetch(fs, "abs_dir/real.txt") == b"real"
    assert fetch(fs, "dotted") == b"real"
    assert fetch(fs, "chain3") == b"real"
    with caplog.at_level(logging.WARNING, logger="hamaster.fileroots.server"):
        for path in ["loop_a", "loop_b", "sub/via_parent",
                     f"chain{server_mod.beneath.MAX_HOPS + 1}"]:
            assert_refused(fs, {"path": path})
    files = fs.file_list({})
    assert "abs_inside" in files and "abs_dir/real.txt" in files and "dotted" in files
    assert not {"loop_a", "loop_b", "sub/via_parent"} & set(files)


def test_store_prefix_components_are_never_symlinks(tmp_path):
    """Under an FsStore (ha_dir) the ``file_roots/<env>`` components must be real directories:
    a group that can write ``file_roots/`` cannot point ``base`` at ``pki/master``."""
    store = FsStore(tmp_path / "ha")
    store.put("pki/master/master.pem", SECRET)
    store.put("file_roots/dev/a.sls", b"a")
    os.symlink(tmp_path / "ha/pki/master", tmp_path / "ha/file_roots/base")
    fs = FileServer.from_opts({"file_roots": {}}, store)
    assert fetch(fs, "a.sls", "dev") == b"a"
    assert_refused(fs, {"path": "master.pem", "saltenv": "base"})
    assert fs.file_list({"saltenv": "base"}) == []


def test_file_descriptors_are_not_leaked(jail):
    tmp, srv = jail
    os.symlink("sub", srv / "inside_dir")
    os.symlink("..", srv / "sub/loop")
    fs = FileServer({"base": [(ReadOnlyDirStore(srv), "")]}, chunk_size=2)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert fetch(fs, "inside_dir/real.txt") == b"real"
        assert fetch(fs, "sub/loop/sub/loop/ok.sls") == b"ok"
        fs.file_list({})
        assert_refused(fs, {"path": "../secret.txt"})
    assert len(os.listdir("/proc/self/fd")) == before


def test_file_roots_holding_the_keys_are_ignored(tmp_path, caplog):
    write(tmp_path / "etc/pki/master/master.pem", SECRET)
    write(tmp_path / "srv/a.sls", "a")
    opts = {"pki_dir": str(tmp_path / "etc/pki/master"), "ha_dir": str(tmp_path / "ha"),
            "file_roots": {"base": [str(tmp_path / "srv"), str(tmp_path / "etc")],
                           "all": [str(tmp_path)], "ha": [str(tmp_path / "ha")]}}
    (tmp_path / "ha").mkdir()
    with caplog.at_level(logging.ERROR, logger="hamaster.fileroots.server"):
        fs = FileServer.from_opts(opts)
    assert fs.file_list({"saltenv": "base"}) == ["a.sls"]
    assert fs.file_list({"saltenv": "all"}) == [] and fs.file_list({"saltenv": "ha"}) == []
    assert_refused(fs, {"path": "pki/master/master.pem", "saltenv": "base"})
    assert sum("must never be under a file root" in r.getMessage() for r in caplog.records) == 3


def test_symlink_fan_out_and_long_chains_are_bounded(tmp_path, monkeypatch, caplog):
    """Links that double the tree at every level (2**30 paths) or expand a path without end
    cost a bounded walk, not the master's CPU."""
    srv = tmp_path / "srv"
    for i in range(30):
        write(srv / f"d{i}" / "f.sls", "f")
        if i:
            os.symlink(f"../d{i}", srv / f"d{i - 1}" / "a")
            os.symlink(f"../d{i}", srv / f"d{i - 1}" / "b")
    os.symlink("x/" * 1500 + ".", srv / "x")  # x -> x/x/x/...: grows at every hop
    monkeypatch.setattr(server_mod.beneath, "MAX_ENTRIES", 5000)
    fs = FileServer({"base": [(ReadOnlyDirStore(srv), "")]})
    with caplog.at_level(logging.WARNING):
        files = fs.file_list({})
    assert 1000 < len(files) < 5000
    assert any("stopped after 5000 entries" in r.getMessage() for r in caplog.records)
    assert fetch(fs, "d0/a/a/b/f.sls") == b"f"
    assert_refused(fs, {"path": "x/f.sls"})

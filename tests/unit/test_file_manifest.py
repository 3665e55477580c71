"""file_roots by manifest (hamaster.fileroots.manifest) and blobs between masters (.blobs)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from hamaster import crypto
from hamaster.fileroots import blobs
from hamaster.fileroots.manifest import (
    INLINE_MAX,
    BlobCache,
    Entry,
    blob_key,
    load_manifest,
    manifest_key,
    publish,
)
from hamaster.fileroots.server import FileServer
from hamaster.store.fs import FsStore

SMALL = b"small file\n"
BIG = os.urandom(INLINE_MAX + 1)


@pytest.fixture(scope="module")
def keypair():
    priv, _pub = crypto.generate_keypair(1024)
    return crypto.load_private_key(priv)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir/small.txt").write_bytes(SMALL)
    (src / "big.bin").write_bytes(BIG)
    (src / "big.bin").chmod(0o640)
    return src


def fetch(fs: FileServer, path: str, env: str = "base") -> bytes | None:
    if not fs.file_hash({"path": path, "saltenv": env}):
        return None
    out, loc = b"", 0
    while True:
        chunk = fs.serve_file({"path": path, "saltenv": env, "loc": loc})["data"]
        if not chunk:
            return out
        out += chunk
        loc += len(chunk)


def test_entry_round_trip_and_malformed():
    e = Entry("a" * 64, 10, 0o644, True)
    assert Entry.from_json(e.to_json()) == e
    assert json.loads(e.to_json()) == {"sha256": "a" * 64, "size": 10,
                                       "mode": 0o644, "inline": True}
    for bad in (None, b"", b"[]", b"{", b'{"sha256": "xyz", "size": 1}',
                json.dumps({"sha256": "A" * 64, "size": 1}).encode(),
                json.dumps({"sha256": "a" * 64, "size": -1}).encode(),
                json.dumps({"sha256": "a" * 64, "size": True}).encode(),
                json.dumps({"sha256": "a" * 64, "size": 1, "inline": "yes"}).encode(),
                json.dumps({"sha256": "a" * 64, "size": INLINE_MAX + 1, "inline": True}).encode()):
        assert Entry.from_json(bad) is None, bad


def test_publish_inline_vs_large_and_serving(tmp_path, tree):
    store = FsStore(tmp_path / "shared")
    cache_a = BlobCache(tmp_path / "a-cache")
    summary = publish(store, cache_a, tree, "base")
    assert summary["files"] == 2 and summary["inline"] == 1
    assert summary["added"] == ["big.bin", "dir/small.txt"]
    small_sha, big_sha = hashlib.sha256(SMALL).hexdigest(), hashlib.sha256(BIG).hexdigest()
    m = load_manifest(store)
    assert m == {("base", "dir/small.txt"): Entry(small_sha, len(SMALL), 0o666 & ~_umask(), True),
                 ("base", "big.bin"): Entry(big_sha, len(BIG), 0o640, False)}
    # small inline in the store; big only in the local cache, never a store value
    assert store.get(blob_key(small_sha)) == SMALL
    assert store.get(blob_key(big_sha)) is None
    assert all(len(store.get(k) or b"") <= INLINE_MAX for k in store.list(""))
    assert cache_a.read(big_sha) == BIG
    # master A (has the cache) serves both, hashes come from the manifest
    fs_a = FileServer.from_opts({"file_roots": {}, "cachedir": str(tmp_path / "a")}, store)
    fs_a.blob_cache = cache_a
    assert fs_a.envs() == ["base"]
    assert fs_a.file_list({"saltenv": "base"}) == ["big.bin", "dir/small.txt"]
    assert fs_a.file_hash({"path": "salt://big.bin"}) == {"hsum": big_sha, "hash_type": "sha256"}
    assert fetch(fs_a, "salt://big.bin") == BIG
    assert fetch(fs_a, "dir/small.txt") == SMALL
    assert fs_a.file_hash({"path": "salt://../big.bin"}) == ""
    assert fs_a.serve_file({"path": "salt://dir/../../big.bin"})["data"] == b""
    # master B (empty cache): small served inline, big "missing" until its blob arrives
    fs_b = FileServer.from_opts({"file_roots": {}, "cachedir": str(tmp_path / "b")}, store)
    misses: list[str] = []
    fs_b.set_blob_missing(misses.append)
    assert fetch(fs_b, "dir/small.txt") == SMALL
    assert fs_b.file_list({}) == ["big.bin", "dir/small.txt"]
    assert fs_b.file_hash({"path": "big.bin"}) == "" and misses == [big_sha]
    assert fs_b.serve_file({"path": "big.bin"}) == {"data": b"", "dest": ""}
    assert fs_b.manifest_hash() != fs_a.manifest_hash()
    assert fs_b.blob_cache is not None
    fs_b.blob_cache.put_bytes(BIG)
    assert fetch(fs_b, "big.bin") == BIG
    assert fs_b.manifest_hash() == fs_a.manifest_hash()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_republish_updates_removes_and_collects_inline(tmp_path, tree):
    store = FsStore(tmp_path / "shared")
    cache = BlobCache(tmp_path / "cache")
    publish(store, cache, tree)
    fs = FileServer.from_opts({"file_roots": {}, "cachedir": str(tmp_path)}, store)
    h1 = fs.manifest_hash()
    old_small = hashlib.sha256(SMALL).hexdigest()
    (tree / "dir/small.txt").write_bytes(b"changed")
    (tree / "new.sls").write_bytes(b"new")
    (tree / "big.bin").unlink()
    again = publish(store, cache, tree)
    assert (again["added"], again["updated"], again["removed"]) == (["new.sls"], ["dir/small.txt"],
                                                                    ["big.bin"])
    assert store.get(manifest_key("base", "big.bin")) is None
    assert store.get(blob_key(old_small)) is None  # no entry names it any more
    assert fetch(fs, "dir/small.txt") == b"changed"
    assert fs.manifest_hash() != h1
    # an unchanged tree writes nothing
    assert (publish(store, cache, tree)["added"] == []
            and publish(store, cache, tree)["updated"] == [])
    # another env sharing a blob keeps it alive
    publish(store, cache, tree, "dev")
    (tree / "new.sls").unlink()
    publish(store, cache, tree, "base")
    assert store.get(blob_key(hashlib.sha256(b"new").hexdigest())) == b"new"
    with pytest.raises(ValueError):
        publish(store, cache, tree, "../x")
    with pytest.raises(ValueError):
        publish(store, cache, tmp_path / "nope")


def test_direct_layout_still_served_without_manifest(tmp_path):
    store = FsStore(tmp_path / "shared")
    store.put("file_roots/base/a.sls", b"direct")
    fs = FileServer.from_opts({"file_roots": {}, "cachedir": str(tmp_path)}, store)
    assert fetch(fs, "a.sls") == b"direct"
    # a manifest entry for the same path wins
    cache = BlobCache(tmp_path / "c")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.sls").write_bytes(b"manifest")
    publish(store, cache, src)
    assert fetch(fs, "a.sls") == b"manifest"


# --------------------------------------------------------------------------- blob transfer


def test_request_signature_checks(keypair):
    pub = keypair.public_key()
    sha = hashlib.sha256(b"x").hexdigest()
    now = time.time()
    assert blobs.check_request(blobs.make_request(keypair, sha, now), pub, now) == sha
    # too old / too far in the future
    for skew in (-61, 61):
        with pytest.raises(blobs.BlobAuthError, match="more than"):
            blobs.check_request(blobs.make_request(keypair, sha, now + skew), pub, now)
    # forged: another key, or a valid signature for another hash/time
    other = crypto.load_private_key(crypto.generate_keypair(1024)[0])
    with pytest.raises(blobs.BlobAuthError, match="signature"):
        blobs.check_request(blobs.make_request(other, sha, now), pub, now)
    verb, _sha, ts, sig = blobs.make_request(keypair, sha, now).decode().split()
    for forged in (f"GET {'0' * 64} {ts} {sig}\n", f"GET {sha} {float(ts) + 1:.3f} {sig}\n"):
        with pytest.raises(blobs.BlobAuthError, match="signature"):
            blobs.check_request(forged.encode(), pub, now)
    for junk in (b"", b"GET\n", b"PUT " + sha.encode() + b" 1 AA==\n", b"GET ../x 1 AA==\n",
                 f"GET {sha} nan AA==\n".encode(), f"GET {sha} 1 !!\n".encode(), b"\xff\n"):
        with pytest.raises(blobs.BlobAuthError):
            blobs.check_request(junk, pub, now)


def test_fetch_between_masters(tmp_path, keypair):
    data = os.urandom(3 * 1024 * 1024 + 17)
    sha = hashlib.sha256(data).hexdigest()
    src = BlobCache(tmp_path / "a")
    src.put_bytes(data)
    dst = BlobCache(tmp_path / "b")
    other = crypto.load_private_key(crypto.generate_keypair(1024)[0])

    async def scenario() -> None:
        server = blobs.BlobServer(src, keypair.public_key(), "127.0.0.1", 0)
        await server.start()
        addr = f"127.0.0.1:{server.port}"
        try:
            assert await blobs.fetch(addr, sha, keypair, dst, len(data)) == len(data)
            assert dst.read(sha) == data
            # a forged request (not the cluster key) is refused
            with pytest.raises(blobs.BlobFetchError, match="signature"):
                await blobs.fetch(addr, sha, other, BlobCache(tmp_path / "c"))
            assert server.refused == 1
            # absent blob; wrong expected size
            with pytest.raises(blobs.BlobFetchError, match="missing"):
                await blobs.fetch(addr, "0" * 64, keypair, dst)
            with pytest.raises(blobs.BlobFetchError, match="manifest says"):
                await blobs.fetch(addr, sha, keypair, BlobCache(tmp_path / "c"), 5)
            # a peer whose copy does not hash to what was asked: refused, nothing cached
            bad = "f" * 64
            src.path(bad).write_bytes(b"not the content of f*64")
            with pytest.raises(blobs.BlobFetchError, match="hash mismatch"):
                await blobs.fetch(addr, bad, keypair, dst)
            assert not dst.has(bad)
            assert [p.name for p in dst.root.iterdir()] == [sha]  # no temp file left
        finally:
            await server.close()
        with pytest.raises(blobs.BlobFetchError, match="connect"):
            await blobs.fetch(addr, sha, keypair, dst)

    asyncio.run(scenario())


def test_blob_service_with_explicit_dependencies(tmp_path, tree, keypair):
    """Two services over one store, built from their parts (no master): a file server's cache
    miss wakes B's fetcher, which gets the blob from A through ``peers()``; a rekey on A
    refuses B until B is rekeyed too."""
    store = FsStore(tmp_path / "store", poll_interval=0.05)
    cache_a, cache_b = BlobCache(tmp_path / "a"), BlobCache(tmp_path / "b")
    publish(store, cache_a, tree)
    big_sha = hashlib.sha256(BIG).hexdigest()
    opts = {"cachedir": str(tmp_path), "ha_backend": "fs", "file_blob_port": 0}
    assert blobs.BlobService.from_opts(opts, None, cache_a, keypair, list) is None  # lone master
    assert blobs.BlobService.from_opts(opts, store, cache_a, keypair, list).port is None
    a = blobs.BlobService.from_opts({**opts, "file_blob_port": -1, "interface": "127.0.0.1"},
                                    store, cache_a, keypair, list)
    assert a is not None and a.port is None
    a.port = 0  # serve on a free port
    fs_b = FileServer.from_opts({"file_roots": {}, "cachedir": str(tmp_path / "b")}, store)
    fs_b.blob_cache = cache_b
    asked: list[int] = []

    def peers() -> list[str]:
        asked.append(1)
        return [a.address]

    b = blobs.BlobService(store, cache_b, keypair, peers)
    other = crypto.load_private_key(crypto.generate_keypair(1024)[0])

    async def scenario() -> None:
        await a.start()
        await b.start()
        stop = asyncio.Event()
        fs_b.set_blob_missing(b.request_sync)
        try:
            assert a.address.endswith(f":{a.server.port}") and b.server is None
            assert await b.sync_once() == {"fetched": [big_sha], "missing": []}
            assert fetch(fs_b, "big.bin") == BIG and asked
            cache_b.prune(set(), 0)  # B lost its copy: the next miss wakes its fetcher
            assert not cache_b.has(big_sha)
            a.rekey(other)  # A now accepts only the new key: B (old key) is refused
            assert (await b.sync_once())["missing"] == [big_sha]
            b.rekey(other)
            task = asyncio.create_task(b.sync_forever(stop))
            assert fetch(fs_b, "big.bin") is None  # missing now; reported to b.request_sync
            deadline = time.monotonic() + 10
            while not cache_b.has(big_sha):
                assert time.monotonic() < deadline, "the cache miss did not wake the fetcher"
                await asyncio.sleep(0.02)
            assert fetch(fs_b, "big.bin") == BIG
            stop.set()
            b.request_sync()
            await asyncio.wait_for(task, 5)
        finally:
            fs_b.set_blob_missing(None)
            await a.close()
            await b.close()
            store.close()

    asyncio.run(scenario())


def test_split_address():
    assert blobs.split_address("10.0.0.1:4510") == ("10.0.0.1", 4510)
    assert blobs.split_address("[::1]:4510") == ("::1", 4510)
    for bad in ("host", ":1", "host:", "host:x"):
        with pytest.raises(ValueError):
            blobs.split_address(bad)


def test_prune_keeps_named_and_recent_blobs(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    named = cache.put_bytes(b"still in the manifest")
    old_unnamed = cache.put_bytes(b"replaced an hour ago")
    new_unnamed = cache.put_bytes(b"pushed a moment ago, manifest entry not written yet")
    stale_tmp = cache.root / ".tmp-crashed"
    stale_tmp.write_bytes(b"half a download")
    (cache.root / "not-a-blob.txt").write_bytes(b"someone else's file")
    now = time.time()
    for path in (cache.path(named), cache.path(old_unnamed), stale_tmp,
                 cache.root / "not-a-blob.txt"):
        os.utime(path, (now - 7200, now - 7200))

    removed = cache.prune({named}, older_than=3600, now=now)

    assert sorted(removed) == sorted([old_unnamed, ".tmp-crashed"])
    assert cache.has(named) and cache.has(new_unnamed) and not cache.has(old_unnamed)
    assert not stale_tmp.exists() and (cache.root / "not-a-blob.txt").exists()
    assert BlobCache(tmp_path / "missing").prune(set(), older_than=0) == []


def test_push_never_copies_a_file_swapped_in_from_outside(tmp_path: Path) -> None:
    """fileroots.push walks src_dir with openat: a concurrent symlink swap of ``d`` to a secret
    directory never puts the secret in the cache or the store (the old realpath walk did)."""
    from tests.flipper import flipping

    secret_dir = tmp_path / "pki"
    secret_dir.mkdir()
    secret = b"-----BEGIN RSA PRIVATE KEY-----\nnot really\n"
    (secret_dir / "master.pem").write_bytes(secret)
    src = tmp_path / "src"
    (src / "d.real").mkdir(parents=True)
    (src / "d.real" / "master.pem").write_bytes(b"decoy\n")
    (src / "top.sls").write_bytes(b"top\n")
    store, cache = FsStore(tmp_path / "store"), BlobCache(tmp_path / "cache")
    bad = hashlib.sha256(secret).hexdigest()
    pushes, seen_decoy, errors = 0, 0, []
    with flipping(src, secret_dir):
        deadline = time.monotonic() + 5
        while pushes < 150 and time.monotonic() < deadline:
            pushes += 1
            try:
                publish(store, cache, src, "base")
            except OSError as exc:  # the old walk tripped over the renames now and then
                errors.append(exc)
                continue
            entries = load_manifest(store, "base")
            assert all(e.sha256 != bad for e in entries.values()), f"secret pushed ({pushes})"
            assert not cache.has(bad), f"secret copied into the cache after {pushes} pushes"
            seen_decoy += ("base", "d/master.pem") in entries
    assert entries[("base", "top.sls")].sha256 == hashlib.sha256(b"top\n").hexdigest()
    assert seen_decoy > 0  # the swap really raced the walk
    assert errors == []  # a file that vanishes mid-walk is skipped, never an error


def test_blob_server_admission_and_close(tmp_path, keypair, caplog):
    """Over the per-peer limit a connection is told ``busy`` at once; an idle connection is
    closed after the request deadline; close() ends the idle connections still open."""
    cache = BlobCache(tmp_path / "a")
    sha = cache.put_bytes(b"x" * 100)

    async def scenario() -> None:
        server = blobs.BlobServer(cache, keypair.public_key(), "127.0.0.1", 0, max_per_peer=3,
                                  request_timeout=0.5)
        await server.start()
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        extra_r, extra_w = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(extra_r.readline(), 2) == b"ERR busy\n"
        extra_w.close()
        # the idle ones are closed after request_timeout, then a fetch gets through
        t0 = time.monotonic()
        for r, _w in conns:
            assert await asyncio.wait_for(r.read(), 3) == b""
        assert time.monotonic() - t0 < 2
        assert await blobs.fetch(f"127.0.0.1:{server.port}", sha, keypair,
                                 BlobCache(tmp_path / "b")) == 100
        # close() ends connections that are still idle, promptly
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.wait_for(server.close(), 3)
        for r, _w in idle:
            try:
                assert await asyncio.wait_for(r.read(), 2) == b""
            except ConnectionResetError:  # closed before the server accepted it: also ended
                pass
        for _r, w in conns + idle:
            w.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert not any("Exception in callback" in r.getMessage() for r in caplog.records)

"""Tests for the filesystem store: atomic writes, polling watch, CAS, outages, membership."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from hamaster.store.base import Change, InvalidKey, StoreUnavailable
from hamaster.store.fs import MARKER_NAME, STAT_RESCAN_EVERY, FsStore
from tests.kit import wait_until


@pytest.fixture
def pair(tmp_path):
    a = FsStore(tmp_path / "s", poll_interval=0.05)
    b = FsStore(tmp_path / "s", poll_interval=0.05)
    yield a, b
    a.close()
    b.close()


def test_put_get_delete_list(tmp_path):
    s = FsStore(tmp_path / "s")
    assert s.get("a/b") is None
    s.put("a/b", b"1")
    s.put("a/c/d", b"2")
    s.put("z", b"3")
    assert s.get("a/b") == b"1"
    assert s.list("a") == ["a/b", "a/c/d"]
    assert s.list("a/") == ["a/b", "a/c/d"]
    assert s.list("") == ["a/b", "a/c/d", "z"]
    assert s.list("nope") == []
    assert s.delete("a/b") is True
    assert s.delete("a/b") is False
    assert s.get("a/b") is None
    mode = stat.S_IMODE(os.stat(tmp_path / "s" / "a" / "c" / "d").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "a" / "c").st_mode) == 0o700
    assert not [n for n in os.listdir(tmp_path / "s" / "a") if n.startswith(".tmp-")]
    assert s.healthy()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", "a/", "a/.hidden"])
def test_invalid_keys(tmp_path, key):
    s = FsStore(tmp_path / "s")
    with pytest.raises(ValueError):
        s.put(key, b"x")


def test_name_too_long_is_a_caller_error_not_an_outage(tmp_path, caplog):
    """A key segment over the file system's 255-byte name limit (an id within 255 characters
    but over 255 UTF-8 bytes) is refused as InvalidKey (a ValueError); the store stays up."""
    s = FsStore(tmp_path / "s")
    s.put("pki/minions/web1", b"k")
    key = "pki/minions_pre/" + "é" * 200
    caplog.set_level("ERROR", logger="hamaster.store.fs")
    for op in (lambda: s.put(key, b"x"), lambda: s.get(key), lambda: s.delete(key),
               lambda: s.compare_and_put(key, None, b"x"), lambda: s.list(key),
               lambda: s.put_many([(f"pki/m{i}", b"x") for i in range(4)] + [(key, b"x")])):
        with pytest.raises(InvalidKey) as info:
            op()
        assert isinstance(info.value, ValueError) and not isinstance(info.value, StoreUnavailable)
        assert "too long" in str(info.value) and len(str(info.value)) < 600
        assert s.healthy()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert s.get("pki/minions/web1") == b"k"
    assert [k for k in s.list("pki") if k.startswith("pki/m")] == ["pki/minions/web1"]
    assert not [n for n in os.listdir(tmp_path / "s" / "pki") if n.startswith(".tmp-")]
    # a path over PATH_MAX made of short names: the kernel's ENAMETOOLONG is classified the same
    deep = "/".join(["d" * 200] * 25)
    for op in (lambda: s.put(deep, b"x"), lambda: s.get(deep), lambda: s.delete(deep)):
        with pytest.raises(InvalidKey):
            op()
    assert s.healthy()


def test_delete_tree(tmp_path):
    s = FsStore(tmp_path / "s")
    for i in range(3):
        s.put(f"jobs/1/returns/m{i}", b"x")
    s.put("jobs/2/load", b"y")
    assert s.delete_tree("jobs/1") == 3
    assert s.list("jobs") == ["jobs/2/load"]
    assert not (tmp_path / "s" / "jobs" / "1").exists()


def test_other_instance_sees_put_and_delete(pair):
    a, b = pair
    seen: list[Change] = []
    b.watch("pki", seen.extend)
    a.put("pki/minions/web1", b"k1")
    changes = b.poll_now()
    assert Change("pki/minions/web1", b"k1") in changes
    assert seen == changes
    assert b.poll_now() == []
    a.put("pki/minions/web1", b"k2")
    assert Change("pki/minions/web1", b"k2") in b.poll_now()
    a.delete("pki/minions/web1")
    assert b.poll_now() == [Change("pki/minions/web1", None)]


def test_own_write_deleted_elsewhere_before_a_pass_is_reported(pair):
    """A key this store wrote (a master's auto-accept) and another process deleted (the CLI's
    `hamaster-key -d`) before the next watch pass: the pass reports the deletion; it used to
    report nothing, leaving the key accepted in that master's memory."""
    a, b = pair
    seen: list[Change] = []
    a.watch("pki", seen.extend)
    for how in (lambda k: a.put(k, b"k1"), lambda k: a.compare_and_put(k, None, b"k1"),
                lambda k: a.put_many([(k, b"k1")] + [(f"pki/other/{i}", b"x") for i in range(4)])):
        seen.clear()
        how("pki/minions/web1")
        b.delete("pki/minions/web1")
        a.poll_now()
        assert Change("pki/minions/web1", None) in seen, seen
        assert Change("pki/minions/web1", b"k1") not in seen
        seen.clear()
        assert a.poll_now() == []          # reported once
    a.put("pki/minions/web2", b"k2")       # an own write that stays: reported as before
    assert a.poll_now() == [Change("pki/minions/web2", b"k2")]


def test_watch_outside_prefix_not_reported(pair):
    a, b = pair
    b.watch("pki", lambda c: None)
    a.put("jobs/1/load", b"x")
    assert b.poll_now() == []


def test_watch_prefix_created_later_and_dir_removed(pair, tmp_path):
    a, b = pair
    b.watch("jobs", lambda c: None)
    a.put("jobs/1/returns/m1", b"r")
    assert b.poll_now() == [Change("jobs/1/returns/m1", b"r")]
    a.delete_tree("jobs/1")
    assert b.poll_now() == [Change("jobs/1/returns/m1", None)]


def test_watcher_thread_delivers(pair):
    a, b = pair
    seen: list[Change] = []
    b.watch("", seen.extend)
    b.start()
    b.start()  # idempotent
    a.put("x/y", b"v")
    wait_until(lambda: Change("x/y", b"v") in seen, 5, 0.01, "the watcher delivering x/y")
    b.close()
    assert b._thread is None


def test_in_place_edit_found_by_full_rescan(pair, tmp_path):
    a, b = pair
    a.put("k/v", b"old")
    path = tmp_path / "s" / "k" / "v"
    old_ns = time.time_ns() - 3600 * 10**9
    os.utime(path.parent, ns=(old_ns, old_ns))  # not recently changed: not re-listed
    b.watch("k", lambda c: None)
    assert b.poll_now() == []
    with open(path, "r+b") as fh:  # a non-atomic writer: same dir, same inode
        fh.write(b"new")
    os.utime(path.parent, ns=(old_ns, old_ns))
    assert b.poll_now() == []  # an incremental pass only stats the directory
    assert b._passes < STAT_RESCAN_EVERY - 1
    found: list[Change] = []
    for _ in range(STAT_RESCAN_EVERY):
        found += b.poll_now()
    assert found == [Change("k/v", b"new")]


def test_temp_and_dot_files_ignored(pair, tmp_path):
    a, b = pair
    b.watch("d", lambda c: None)
    a.put("d/real", b"1")
    b.poll_now()
    (tmp_path / "s" / "d" / ".tmp-abc").write_bytes(b"partial")
    (tmp_path / "s" / "d" / ".real.XyZ123").write_bytes(b"rsync temp")
    assert b.poll_now() == []
    assert a.list("d") == ["d/real"]


def test_garbage_and_special_files_never_crash(pair, tmp_path):
    a, b = pair
    b.watch("d", lambda c: None)
    d = tmp_path / "s" / "d"
    d.mkdir()
    (d / "garbage").write_bytes(os.urandom(64))
    os.mkfifo(d / "fifo")  # opening it for read would block: must be skipped
    changes = b.poll_now()
    assert [c.key for c in changes] == ["d/garbage"]
    assert a.list("d") == ["d/garbage"]


def test_unreadable_file_skipped_then_read(pair, tmp_path, monkeypatch):
    a, b = pair
    b.watch("d", lambda c: None)
    a.put("d/f", b"v")
    real_open = open
    import builtins

    def failing_open(path, *args, **kw):
        if str(path).endswith("/d/f"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(builtins, "open", failing_open)
    assert b.poll_now() == []
    assert b.healthy()
    monkeypatch.setattr(builtins, "open", real_open)
    assert b.poll_now() == [Change("d/f", b"v")]


def test_callback_error_does_not_break_watch(pair):
    a, b = pair

    def boom(changes):
        raise RuntimeError("callback bug")

    seen: list[Change] = []
    b.watch("d", boom)
    b.watch("d", seen.extend)
    a.put("d/1", b"x")
    assert b.poll_now() == [Change("d/1", b"x")]
    assert seen == [Change("d/1", b"x")]


def test_compare_and_put_create_if_absent_race(pair):
    a, b = pair
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        store = a if i % 2 else b
        barrier.wait()
        results.append(store.compare_and_put("lock/k", None, f"v{i}".encode()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert a.get("lock/k") in {f"v{i}".encode() for i in range(8)}


def test_compare_and_put_replace_race(pair):
    a, b = pair
    a.put("c", b"0")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        results.append((a if i % 2 else b).compare_and_put("c", b"0", f"n{i}".encode()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_compare_and_put_semantics(tmp_path):
    s = FsStore(tmp_path / "s")
    assert s.compare_and_put("k", None, b"1") is True
    assert s.compare_and_put("k", None, b"2") is False
    assert s.compare_and_put("k", b"wrong", b"2") is False
    assert s.compare_and_put("k", b"1", b"2") is True
    assert s.get("k") == b"2"
    assert s.compare_and_put("k", b"2", None) is True
    assert s.get("k") is None
    assert s.compare_and_put("k", None, None) is True
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700


def test_root_removed_unhealthy_then_recovers(pair, tmp_path, caplog):
    a, b = pair
    seen: list[Change] = []
    b.watch("pki", seen.extend)
    a.put("pki/minions/web1", b"k")
    b.poll_now()
    root = tmp_path / "s"
    os.rename(root, tmp_path / "away")  # share unmounted / gone
    assert b.poll_now() == []  # no false deletions
    assert not b.healthy()
    b.poll_now()
    outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_logs) == 1
    with pytest.raises(StoreUnavailable):
        b.get("pki/minions/web1")
    with pytest.raises(StoreUnavailable):
        b.put("pki/minions/web2", b"k2")
    assert not root.exists()  # put did not recreate the root
    os.rename(tmp_path / "away", root)
    # meanwhile changes happen (the share came back with other content)
    (root / "pki" / "minions" / "web1").unlink()
    a.put("pki/minions/web3", b"k3")
    changes = b.poll_now()
    assert b.healthy()
    assert set(changes) == {Change("pki/minions/web1", None), Change("pki/minions/web3", b"k3")}


def test_empty_mountpoint_is_unavailable(pair, tmp_path):
    a, b = pair
    b.watch("pki", lambda c: None)
    a.put("pki/minions/web1", b"k")
    b.poll_now()
    root = tmp_path / "s"
    os.rename(root, tmp_path / "away")
    root.mkdir()  # an empty mountpoint, no marker
    assert b.poll_now() == []
    assert not b.healthy()
    with pytest.raises(StoreUnavailable):
        b.get("pki/minions/web1")
    os.rmdir(root)
    os.rename(tmp_path / "away", root)
    assert b.poll_now() == []
    assert b.healthy()
    assert (root / MARKER_NAME).exists()


def test_membership_ttl(pair, monkeypatch):
    a, b = pair
    a.heartbeat("m1", b"info1", ttl=10)
    b.heartbeat("m2", b"info2", ttl=1)
    assert b.members() == {"m1": b"info1", "m2": b"info2"}
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 5)
    assert a.members() == {"m1": b"info1"}
    a.put("cluster/members/bad", b"not json")
    assert a.members() == {"m1": b"info1"}


def test_put_many_batch_is_visible_and_leaves_no_temp_files(tmp_path):
    a, b = FsStore(tmp_path / "s"), FsStore(tmp_path / "s")
    items = [(f"jobs/1/returns/m{i}", f"v{i}".encode()) for i in range(50)]
    a.put_many(items)
    assert b.get_many("jobs/1/returns") == dict(items)
    leftovers = [p for p in (tmp_path / "s").rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


def test_keys_are_0600_in_0700_directories_whatever_the_umask(tmp_path) -> None:
    """The master key and everything else the store writes are private to the master's user,
    intermediate directories (``pki/``, ``jobs/``) included, even under umask 000."""
    from hamaster.pki_sync.keys import load_or_create_master_keypair

    old = os.umask(0)
    try:
        store = FsStore(tmp_path / "ha")
        load_or_create_master_keypair(store, "pki/master/", 1024)
        store.put("pki/master/minions/web1", b"pub")
        store.put_many([("jobs/20261206/abc/return", b"x")])
        store.compare_and_put("cluster/masters/m1", None, b"{}")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.lstat().st_mode)
             for p in (tmp_path / "ha").rglob("*")}
    modes[Path("ha")] = stat.S_IMODE((tmp_path / "ha").lstat().st_mode)
    assert modes[Path("ha/pki/master/master.pem")] == 0o600
    bad = {str(p): oct(m) for p, m in modes.items()
           if m != (0o700 if (tmp_path / p).is_dir() else 0o600)}
    assert bad == {}

"""Tests for jid generation and the job cache."""

from __future__ import annotations

import datetime
import threading

import msgpack
import pytest

from hamaster.jobs.cache import JobCache, open_job_cache
from hamaster.jobs.jid import gen_jid, is_jid, jid_to_time
from hamaster.store.fs import FsStore


def test_jid_format_and_local_time():
    before = datetime.datetime.now().replace(microsecond=0)
    jid = gen_jid()
    assert is_jid(jid) and len(jid) == 20
    assert before <= jid_to_time(jid) <= datetime.datetime.now() + datetime.timedelta(seconds=1)


def test_jid_strictly_increasing_across_threads():
    out: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        local = [gen_jid() for _ in range(500)]
        assert local == sorted(local)
        with lock:
            out.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 2000
    seq = [gen_jid() for _ in range(1000)]
    assert all(a < b for a, b in zip(seq, seq[1:], strict=False))


def test_jid_to_time_rejects_garbage():
    with pytest.raises(ValueError, match="20 digits"):
        jid_to_time("123")


@pytest.fixture
def cache(tmp_path):
    return JobCache(FsStore(tmp_path / "s"))


def test_load_and_returns_roundtrip(cache, tmp_path):
    jid = gen_jid()
    load = {"fun": "test.ping", "arg": [], "tgt": "*", "tgt_type": "glob", "user": "root"}
    cache.save_load(jid, load)
    cache.save_return(jid, "web1", {"return": True, "success": True, "blob": b"\x00\x01"})
    cache.save_returns([(jid, "web2", {"return": False}), (jid, "web3", {"return": 3})])
    assert cache.get_load(jid) == load
    rets = cache.get_returns(jid)
    assert set(rets) == {"web1", "web2", "web3"}
    assert rets["web1"]["blob"] == b"\x00\x01"
    raw = (tmp_path / "s" / "jobs" / jid / "returns" / "web3").read_bytes()
    assert msgpack.unpackb(raw) == {"return": 3}
    assert cache.get_load(gen_jid()) is None
    assert cache.get_returns(gen_jid()) == {}


def test_list_jobs_like_salt(cache):
    jid = gen_jid()
    cache.save_load(jid, {"fun": "cmd.run", "arg": ["uptime"], "tgt": "web*",
                          "tgt_type": "glob", "user": "alice"})
    cache.save_return(gen_jid(), "web1", {"return": 1})  # return without load: not listed
    jobs = cache.list_jobs()
    assert list(jobs) == [jid]
    j = jobs[jid]
    assert j["Function"] == "cmd.run" and j["Arguments"] == ["uptime"]
    assert j["Target"] == "web*" and j["Target-type"] == "glob" and j["User"] == "alice"
    assert j["StartTime"] == jid_to_time(jid).strftime("%Y, %b %d %H:%M:%S.%f")  # C locale


@pytest.mark.parametrize("jid", ["", "123", "2024010112000000000x", "../../etc/passwd0000",
                                 "00000000000000000000", "20241399000000000000"])
def test_bad_jid_rejected(cache, jid):
    with pytest.raises(ValueError):
        cache.save_load(jid, {})


@pytest.mark.parametrize("mid", ["", "a/b", "..", ".x", "a\\b", " web1", "a\nb", "é" * 200])
def test_bad_minion_rejected(cache, mid):
    with pytest.raises(ValueError):
        cache.save_return(gen_jid(), mid, {})


def test_clean_old(cache, tmp_path):
    old = (datetime.datetime.now() - datetime.timedelta(hours=48)).strftime("%Y%m%d%H%M%S%f")
    new = gen_jid()
    cache.save_load(old, {"fun": "test.ping"})
    cache.save_return(old, "web1", {"return": True})
    cache.save_load(new, {"fun": "test.ping"})
    assert cache.clean_old(24) == 1
    assert cache.get_load(old) is None and cache.get_returns(old) == {}
    assert cache.get_load(new) is not None
    assert not (tmp_path / "s" / "jobs" / old).exists()


def test_clean_old_skips_a_poisoned_entry(cache, tmp_path, caplog):
    """One entry whose name is 20 digits but no time (or junk) must not stop expiry."""
    old = (datetime.datetime.now() - datetime.timedelta(hours=48)).strftime("%Y%m%d%H%M%S%f")
    cache.save_load(old, {"fun": "test.ping"})
    for junk in ("00000000000000000000", "20241399000000000000", "notajid"):
        cache.store.put(f"jobs/{junk}/returns/web1", b"\x80")
    caplog.set_level("WARNING", logger="hamaster.jobs.cache")
    assert cache.clean_old(24) == 1
    assert cache.get_load(old) is None
    skipped = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 3
    cache.save_load(old, {"fun": "test.ping"})
    assert cache.clean_old(24) == 1  # again, and the bad names are not logged a second time
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 3
    assert cache.list_jids() == []


def test_corrupt_return_skipped(cache):
    jid = gen_jid()
    cache.save_return(jid, "good", {"return": 1})
    cache.store.put(f"jobs/{jid}/returns/bad", b"\xc1")  # 0xc1 is never valid msgpack
    assert cache.get_returns(jid) == {"good": {"return": 1}}


def test_open_job_cache(tmp_path):
    jc = open_job_cache({"cachedir": str(tmp_path / "cache")})
    jid = gen_jid()
    jc.save_load(jid, {"fun": "x"})
    assert (tmp_path / "cache" / "jobs_store" / "jobs" / jid / "load").exists()


def test_job_writer_drops_an_item_the_cache_refuses_and_keeps_the_rest(tmp_path, caplog):
    """A refused item (invalid id, a key that is a directory) must not keep its whole batch
    retrying forever: the rest is written and the writer stays healthy."""
    from hamaster.master.jobs import JobWriter

    cache = JobCache(FsStore(tmp_path / "s"))
    jid = gen_jid()
    (tmp_path / "s" / "jobs" / jid / "returns" / "dir1").mkdir(parents=True)
    writer = JobWriter(cache)
    writer.start()
    writer.put_load(jid, {"fun": "test.ping"})
    writer.put_return(jid, "good1", {"return": True})
    writer.put_return(jid, "bad\nid", {"return": True})
    writer.put_return(jid, "dir1", {"return": True})
    writer.put_return(jid, "good2", {"return": True})
    writer.put_return(jid, "good3", {"return": True})
    writer.stop()
    assert not writer.is_alive() and writer.healthy
    assert set(cache.get_returns(jid)) == {"good1", "good2", "good3"}
    assert cache.get_load(jid) == {"fun": "test.ping"}
    assert any("dropped 2 invalid items" in r.getMessage() for r in caplog.records)


def test_new_returns_reads_only_the_minions_not_yet_known(cache):
    jid = gen_jid()
    cache.save_returns([(jid, f"m{i}", {"return": i}) for i in range(5)])
    reads: list[str] = []
    real_get = cache.store.get
    cache.store.get = lambda key: reads.append(key) or real_get(key)  # count the reads
    assert cache.get_new_returns(jid, {"m0", "m1", "m2"}) == {"m3": {"return": 3},
                                                              "m4": {"return": 4}}
    assert sorted(k.rsplit("/", 1)[1] for k in reads) == ["m3", "m4"]
    assert cache.get_new_returns(jid, {f"m{i}" for i in range(5)}) == {}
    assert cache.get_new_returns(gen_jid(), set()) == {}


def test_returns_read_back_follow_the_minion_id_rule(cache):
    """A return filed by hand (or an older version) under a name that is not a valid minion id
    is not reported as a minion's: reads use the rule writes are checked with (hamaster.ids)."""
    jid = gen_jid()
    cache.save_return(jid, "good", {"return": 1})
    for name in (" spaced ", "bad\x1bname", "a" * 241):
        cache.store.put(f"jobs/{jid}/returns/{name}", msgpack.packb({"return": 2}))
    with pytest.raises(ValueError):
        cache.save_return(jid, " spaced ", {"return": 2})
    assert cache.get_returns(jid) == {"good": {"return": 1}}

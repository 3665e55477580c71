"""Cluster membership (hamaster/master/membership.py): the master record, presence and liveness,
on a real fs store (two instances on one directory, as two NFS clients) and a real etcd."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamaster.master.membership import (
    MASTERS_PREFIX,
    Membership,
    alive_count,
    encode_record,
    parse_record,
    read_masters,
    record_key,
)
from hamaster.store.base import Change, Store
from hamaster.store.fs import FsStore
from tests.kit import wait_until

RECORD = {"version": "1.0", "state": "serving", "config_hash": "abc", "blob_address": "h:1"}


# ------------------------------------------------------------------------------ the record


def test_record_round_trip() -> None:
    rec = {"master_id": "m1", "ts": 12.5, "ttl": 5.0, **RECORD, "stopped": True}
    assert parse_record(encode_record(rec)) == rec
    assert record_key("m1") == "cluster/masters/m1" and record_key("m1").startswith(MASTERS_PREFIX)


@pytest.mark.parametrize("raw", [
    None, b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"{}", b'{"ts": "soon"}',
    b'{"ts": null}', b'{"ts": [1]}',
])
def test_parse_record_refuses_what_is_not_a_record(raw: bytes | None) -> None:
    assert parse_record(raw) is None


def test_parse_record_takes_a_numeric_string_ts() -> None:
    assert parse_record(b'{"ts": "17.5"}') == {"ts": 17.5}


def test_beat_stamps_id_time_and_ttl(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    before = time.time()
    Membership(store, "m1", ttl=7).beat({**RECORD, "master_id": "forged", "ttl": 1})
    rec = parse_record(store.get(record_key("m1")))
    assert rec is not None
    assert rec["master_id"] == "m1" and rec["ttl"] == 7.0 and rec["ts"] >= before
    assert rec["state"] == "serving" and rec["blob_address"] == "h:1"
    assert parse_record(store.members()["m1"]) == rec     # the presence carries the record too


# ------------------------------------------------------------------------------ fs (and rsync)


@pytest.fixture
def fs_pair(tmp_path: Path) -> tuple[FsStore, FsStore]:
    root = tmp_path / "shared"
    return FsStore(root), FsStore(root)


def test_fs_beat_is_alive_on_the_other_instance(fs_pair) -> None:
    a, b = fs_pair
    Membership(a, "m1").beat(RECORD)
    Membership(b, "m2").beat(RECORD)
    seen = read_masters(b)
    assert set(seen) == {"m1", "m2"} and alive_count(seen) == 2
    assert seen["m1"]["alive"] is True and seen["m1"]["state"] == "serving"
    assert 0 <= seen["m1"]["last_seen_s"] < 5


def test_fs_presence_expires_by_the_writers_timestamp(fs_pair, monkeypatch) -> None:
    a, b = fs_pair
    Membership(a, "m1", ttl=5).beat(RECORD)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 4)
    assert read_masters(b)["m1"]["alive"] is True
    monkeypatch.setattr(time, "time", lambda: now + 6)
    rec = read_masters(b)["m1"]              # a dead master stays listed, with its last-seen age
    assert rec["alive"] is False and 5.5 < rec["last_seen_s"] < 7


def test_leave_is_not_alive_at_once_although_still_present(fs_pair) -> None:
    a, b = fs_pair
    m1 = Membership(a, "m1")
    m1.beat(RECORD)
    m1.leave(RECORD)
    assert "m1" in b.members()               # its presence has not expired yet
    rec = read_masters(b)["m1"]
    assert rec["alive"] is False and rec["stopped"] is True
    m1.beat(RECORD)                          # restarted: serving again
    assert read_masters(b)["m1"]["alive"] is True


def test_liveness_is_presence_not_a_fresh_record(fs_pair) -> None:
    """A record alone (no heartbeat) is listed but not alive: presence is the backend's."""
    a, b = fs_pair
    a.put(record_key("m9"), encode_record({"master_id": "m9", "ts": time.time(), "ttl": 5}))
    rec = read_masters(b)["m9"]
    assert rec["alive"] is False and rec["last_seen_s"] < 5


def test_malformed_records_are_left_out(fs_pair) -> None:
    a, b = fs_pair
    Membership(a, "m1").beat(RECORD)
    a.put(record_key("junk"), b"\x00not json")
    a.put(record_key("list"), b"[1]")
    a.put(record_key("nots"), b'{"master_id": "nots"}')
    assert set(read_masters(b)) == {"m1"}


def test_lag_probe_observes_other_masters_records_only() -> None:
    class _Nowhere(FsStore):
        def __init__(self) -> None:  # the probe never touches the store
            pass

    seen: list[float] = []
    probe = Membership(_Nowhere(), "me").lag_probe(seen.append)
    now = time.time()
    probe([
        Change(record_key("me"), encode_record({"master_id": "me", "ts": now - 9})),
        Change(record_key("other"), encode_record({"master_id": "other", "ts": now - 2})),
        Change(record_key("gone"), None),
        Change(record_key("junk"), b"junk"),
        Change(record_key("future"), encode_record({"master_id": "future", "ts": now + 60})),
    ])
    assert len(seen) == 2 and 1.9 < seen[0] < 3 and seen[1] == 0.0


def test_watch_lag_sees_another_masters_beat(fs_pair) -> None:
    a, b = fs_pair
    seen: list[float] = []
    Membership(b, "m2").watch_lag(seen.append)
    b.poll_now()                             # baseline
    Membership(a, "m1").beat(RECORD)
    Membership(b, "m2").beat(RECORD)         # its own beat is not a lag
    b.poll_now()
    assert len(seen) == 1 and 0 <= seen[0] < 5


# ------------------------------------------------------------------------------ etcd (leases)


@pytest.fixture(scope="module")
def etcd_endpoints() -> Iterator[list[str]]:
    from tests.integration.services import etcd_server

    with etcd_server() as cluster:
        yield cluster.endpoints


@pytest.fixture
def etcd_pair(etcd_endpoints: list[str]) -> Iterator[tuple[Store, Store]]:
    from hamaster.store.etcd import EtcdStore

    prefix = f"/membership-{uuid.uuid4().hex[:8]}"
    stores = [EtcdStore(etcd_endpoints, prefix=prefix, timeout=2.0) for _ in range(2)]
    try:
        yield stores[0], stores[1]
    finally:
        for s in stores:
            s.close()


def test_etcd_alive_is_the_lease_not_the_clock(etcd_pair) -> None:
    """A live master whose clock is an hour behind is alive on etcd: its lease says so."""
    a, b = etcd_pair
    m1 = Membership(a, "m1", ttl=2)
    m1.beat(RECORD)
    skewed = {"master_id": "m1", "ts": time.time() - 3600, "ttl": 2.0, **RECORD}
    a.put(record_key("m1"), encode_record(skewed))
    rec = read_masters(b)["m1"]
    assert rec["alive"] is True and rec["last_seen_s"] > 3500


def test_etcd_master_is_gone_when_its_lease_expires(etcd_pair) -> None:
    a, b = etcd_pair
    m1, m2 = Membership(a, "m1", ttl=1), Membership(b, "m2", ttl=1)
    m1.beat(RECORD)
    m2.beat(RECORD)
    last_beat = time.monotonic()
    assert alive_count(read_masters(b)) == 2
    # m1 stops beating (killed); m2 keeps going. etcd expires m1's lease by itself.
    def m1_gone() -> bool:
        m2.beat(RECORD)
        return not read_masters(b)["m1"]["alive"]

    wait_until(m1_gone, timeout=10, interval=0.2, what="m1's lease to expire")
    assert time.monotonic() - last_beat >= 0.5          # not dropped before its ttl
    assert "m1" not in a.members()                      # the presence key itself is gone
    seen = read_masters(a)
    assert seen["m1"]["alive"] is False and seen["m2"]["alive"] is True   # record kept, listed
    m1.beat(RECORD)                                     # back: a new lease
    assert read_masters(b)["m1"]["alive"] is True


def test_etcd_leave_is_not_alive_at_once(etcd_pair) -> None:
    a, b = etcd_pair
    m1 = Membership(a, "m1", ttl=5)
    m1.beat(RECORD)
    m1.leave(RECORD)
    assert "m1" in b.members()
    assert read_masters(b)["m1"]["alive"] is False

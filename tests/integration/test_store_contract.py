"""One behaviour suite for the store contract, run against every backend: fs, rsync and etcd.

Each test gets two store instances on one backend — "two masters":
- fs: two FsStore objects on one directory (what two NFS clients of one export see);
- rsync: two local trees, each served by its own authenticated ``rsync --daemon``, each store
  pushing to the other's daemon;
- etcd: two EtcdStore objects on a real single-node etcd (a 3-member cluster for the quorum
  test), each test under its own key prefix.
Services are real processes on free loopback ports, stopped by PID at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from hamaster.jobs.cache import JobCache
from hamaster.store import registry
from hamaster.store.base import Change, InvalidKey, LeaseUnsupported, Store, StoreUnavailable
from hamaster.store.fs import FsStore
from tests.integration.services import EtcdCluster, etcd_cluster, etcd_server, rsync_daemon
from tests.kit import wait_until

POLL = 0.1
BACKENDS = ["fs", "rsync", "etcd"]     # each has its Backend class and a branch in `backend`


def eventually(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """``wait_until`` where a store outage (StoreUnavailable) counts as "not yet"."""
    return wait_until(cond, timeout, 0.05, what, ignore=(StoreUnavailable,))


class Backend:
    """Two stores ("masters") on one backend, and a way to take the backend away."""

    name = ""
    cross_master_cas = True

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.stores: list[Store] = []
        self.stack = ExitStack()

    def open(self) -> tuple[Store, Store]:
        raise NotImplementedError

    def break_backend(self, victim: Store) -> None:
        raise NotImplementedError

    def restore_backend(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for s in self.stores:
            try:
                s.close()
            except Exception:
                pass
        self.stack.close()


class FsBackend(Backend):
    name = "fs"

    def open(self) -> tuple[Store, Store]:
        self.root = self.tmp / "shared"
        self.stores = [FsStore(self.root, poll_interval=POLL),
                       FsStore(self.root, poll_interval=POLL)]
        return self.stores[0], self.stores[1]

    def break_backend(self, victim: Store) -> None:
        self.moved = self.tmp / "moved-away"
        os.rename(self.root, self.moved)       # like an unmounted / unreachable share

    def restore_backend(self) -> None:
        os.rename(self.moved, self.root)


def _rsync_store(root: Path, peer: Any, **options: Any) -> Store:
    """An rsync store on ``root`` pushing to ``peer`` (an rsync daemon from ``rsync_daemon``)."""
    from hamaster.store.rsync import RsyncStore

    return RsyncStore(root, [peer.url], password_file=str(peer.password_file), poll_interval=POLL,
                      **options)


@contextmanager
def _manual_rsync_pair(tmp: Path) -> Iterator[tuple[Any, Any]]:
    """Two rsync stores pushing to each other's daemon, with no background threads: every sync
    in a test using them is explicit (``put``, ``push_now``, ``poll_now``)."""
    with rsync_daemon(tmp / "a") as da, rsync_daemon(tmp / "b") as db:
        a, b = _rsync_store(tmp / "a", db), _rsync_store(tmp / "b", da)
        try:
            yield a, b
        finally:
            a.close()
            b.close()


class RsyncBackend(Backend):
    name = "rsync"
    cross_master_cas = False    # documented: transitions are atomic per master, newer wins

    def open(self) -> tuple[Store, Store]:
        self.da = self.stack.enter_context(rsync_daemon(self.tmp / "a"))
        self.db = self.stack.enter_context(rsync_daemon(self.tmp / "b"))
        fast = {"debounce": 0.05, "max_backoff": 1.0, "interval": 5.0}
        a = _rsync_store(self.tmp / "a", self.db, member_id="a", **fast)
        b = _rsync_store(self.tmp / "b", self.da, member_id="b", **fast)
        self.stores = [a, b]
        return a, b

    def break_backend(self, victim: Store) -> None:
        self.db.stop()      # the peer daemon of master A goes away

    def restore_backend(self) -> None:
        self.db.start()


class EtcdBackend(Backend):
    name = "etcd"

    def __init__(self, tmp: Path, cluster: EtcdCluster):
        super().__init__(tmp)
        self.cluster = cluster

    def open(self) -> tuple[Store, Store]:
        from hamaster.store.etcd import EtcdStore

        prefix = f"/test-{uuid.uuid4().hex[:8]}"
        self.stores = [EtcdStore(self.cluster.endpoints, prefix=prefix, timeout=2.0,
                                 poll_interval=POLL) for _ in range(2)]
        return self.stores[0], self.stores[1]

    def break_backend(self, victim: Store) -> None:
        self.cluster.members[0].stop()

    def restore_backend(self) -> None:
        self.cluster.members[0].start()
        self.cluster.wait_healthy()


@pytest.fixture(scope="module")
def etcd_single() -> Iterator[EtcdCluster]:
    with etcd_server() as cluster:
        yield cluster


@pytest.fixture(params=BACKENDS)
def backend(request) -> Iterator[Backend]:
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="hm-contract-", dir=shm))
    if request.param == "fs":
        b: Backend = FsBackend(tmp)
    elif request.param == "rsync":
        b = RsyncBackend(tmp)
    else:
        b = EtcdBackend(tmp, request.getfixturevalue("etcd_single"))
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_every_registered_backend_is_in_this_suite() -> None:
    assert sorted(BACKENDS) == sorted(registry.names())


@pytest.fixture
def pair(backend: Backend) -> tuple[Store, Store]:
    a, b = backend.open()
    a.start()
    b.start()
    return a, b


# ------------------------------------------------------------------------------ basic ops


def test_put_get_delete_list_from_other_master(backend: Backend, pair) -> None:
    a, b = pair
    a.put("pki/master/minions/web1", b"PUB1\n")
    a.put("pki/master/minions_pre/web2", b"PUB2\n")
    a.put("jobsX/not-under-jobs", b"x")
    a.put("jobs/1/load", b"L")
    assert a.get("pki/master/minions/web1") == b"PUB1\n"
    eventually(lambda: b.get("pki/master/minions/web1") == b"PUB1\n", what="value on B")
    eventually(lambda: b.list("pki/master") == ["pki/master/minions/web1",
                                                "pki/master/minions_pre/web2"], what="list on B")
    eventually(lambda: b.list("jobs") == ["jobs/1/load"], what="whole-segment prefix")
    assert b.get("pki/master/minions/nobody") is None
    a.put("pki/master/minions/web1", b"PUB1-new\n")
    eventually(lambda: b.get("pki/master/minions/web1") == b"PUB1-new\n", what="update on B")
    assert a.delete("pki/master/minions/web1") is True
    assert a.delete("pki/master/minions/web1") is False
    eventually(lambda: b.get("pki/master/minions/web1") is None, what="delete on B")
    eventually(lambda: b.list("pki/master") == ["pki/master/minions_pre/web2"], what="list")
    with pytest.raises(ValueError):
        a.put("../escape", b"x")
    with pytest.raises(ValueError):
        a.get("/abs")


def test_a_key_the_backend_cannot_hold_is_a_caller_error(backend: Backend, pair) -> None:
    """A name over 255 bytes (an id of 200 'é'): stored, or refused as InvalidKey (a ValueError);
    either way the store stays healthy and keeps working (#18: it used to go "unavailable")."""
    a, b = pair
    key = "pki/master/minions_pre/" + "é" * 200
    try:
        a.put(key, b"PUB\n")
    except InvalidKey as exc:
        assert isinstance(exc, ValueError)
        with pytest.raises(InvalidKey):
            a.get(key)
    else:
        assert a.get(key) == b"PUB\n"
    assert a.healthy() and b.healthy()
    a.put("pki/master/minions_pre/web9", b"P9\n")
    eventually(lambda: b.get("pki/master/minions_pre/web9") == b"P9\n", what="store still works")
    assert a.healthy() and b.healthy()


def test_put_many_and_delete_tree(backend: Backend, pair) -> None:
    a, b = pair
    cache_a, cache_b = JobCache(a), JobCache(b)
    jid = "20240101120000123456"
    n = 300
    t0 = time.perf_counter()
    cache_a.save_returns([(jid, f"m{i:04d}", {"return": True, "retcode": 0}) for i in range(n)])
    elapsed = time.perf_counter() - t0
    print(f"\n[{backend.name}] save_returns of {n} returns: {elapsed * 1000:.1f} ms")
    eventually(lambda: len(cache_b.get_returns(jid)) == n, what="all returns on B")
    assert cache_b.get_returns(jid)["m0007"] == {"return": True, "retcode": 0}
    assert a.delete_tree(f"jobs/{jid}") == n
    eventually(lambda: b.list(f"jobs/{jid}") == [], timeout=15, what="tree deleted on B")


def test_get_keys_reads_several_keys_at_once(backend: Backend, pair) -> None:
    """``get_keys``: the values of the keys asked for, by name, None for an absent one (a key
    state refresh reads a minion's four key states this way: one etcd transaction)."""
    a, b = pair
    a.put("pki/master/minions/gk1", b"A\n")
    a.put("pki/master/minions_pre/gk2", b"P\n")
    keys = ["pki/master/minions/gk1", "pki/master/minions_pre/gk2",
            "pki/master/minions_rejected/gk1"]
    eventually(lambda: b.get_keys(keys) == {keys[0]: b"A\n", keys[1]: b"P\n", keys[2]: None},
               what="both values and one absent key on B")
    assert a.get_keys([]) == {}


# ------------------------------------------------------------------------------ watch


def test_watch_sees_changes_made_by_other_master(backend: Backend, pair) -> None:
    a, b = pair
    a.put("pki/master/minions/old", b"o")
    eventually(lambda: b.get("pki/master/minions/old") == b"o", what="baseline on B")
    seen: list[Change] = []
    other: list[Change] = []
    b.watch("pki/master", seen.extend)
    b.watch("file_roots", other.extend)
    a.put("pki/master/minions_pre/m1", b"k1")
    a.put("pki/master/minions/m2", b"k2")
    a.delete("pki/master/minions/old")
    a.put("jobs/2/load", b"not watched")

    def state() -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for c in list(seen):
            out[c.key] = c.value
        return out

    want = {"pki/master/minions_pre/m1": b"k1", "pki/master/minions/m2": b"k2",
            "pki/master/minions/old": None}
    eventually(lambda: state() == want, what=f"watch batches on B (have {state()})")
    assert not any(c.key.startswith("jobs/") for c in seen)
    assert other == []
    # Baseline: what existed before watch() is not reported as new.
    assert not any(c.key == "pki/master/minions/old" and c.value for c in seen)
    # poll_now is safe to call any time and reports nothing new once settled.
    seen.clear()
    b.poll_now()
    assert [c for c in seen if c.value is not None] == []


# ------------------------------------------------------------------------------ races


def test_compare_and_put_races_exactly_one_winner(backend: Backend, pair) -> None:
    a, b = pair
    # Across masters where the backend supports it; within one master on rsync (documented).
    stores = [a, b] if backend.cross_master_cas else [a, a]
    barrier = threading.Barrier(8)
    wins: list[int] = []
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            barrier.wait()
            if stores[i % 2].compare_and_put("pki/master/minions/race", None, f"v{i}".encode()):
                wins.append(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert len(wins) == 1, wins
    winner = f"v{wins[0]}".encode()
    assert a.get("pki/master/minions/race") == winner

    # Replace race: everyone expects the winner's value; exactly one transition happens.
    eventually(lambda: stores[1].get("pki/master/minions/race") == winner, what="winner on B")
    barrier2 = threading.Barrier(8)
    wins2: list[int] = []

    def replace(i: int) -> None:
        barrier2.wait()
        if stores[i % 2].compare_and_put("pki/master/minions/race", winner, f"r{i}".encode()):
            wins2.append(i)

    threads = [threading.Thread(target=replace, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(wins2) == 1, wins2
    final = f"r{wins2[0]}".encode()
    assert a.compare_and_put("pki/master/minions/race", b"wrong", None) is False
    assert a.compare_and_put("pki/master/minions/race", final, None) is True
    assert a.get("pki/master/minions/race") is None
    eventually(lambda: b.get("pki/master/minions/race") is None, what="CAS delete on B")


# ------------------------------------------------------------------------------ membership


def test_membership_ttl_expiry(backend: Backend, pair) -> None:
    a, b = pair
    ttl = 2.0
    end = time.monotonic() + 1.5
    while time.monotonic() < end:          # a live master heartbeats more often than its ttl
        a.heartbeat("master-a", b'{"id": "a"}', ttl)
        b.heartbeat("master-b", b'{"id": "b"}', ttl)
        time.sleep(0.3)
    eventually(lambda: set(b.members()) == {"master-a", "master-b"}, what="both members on B")
    assert b.members()["master-a"] == b'{"id": "a"}'
    # master-a dies (stops heartbeating); master-b keeps going.
    died = time.monotonic()
    deadline = died + ttl + 4.0
    gone = False
    while time.monotonic() < deadline:
        b.heartbeat("master-b", b'{"id": "b"}', ttl)
        if "master-a" not in b.members():
            gone = True
            break
        time.sleep(0.2)
    assert gone, "master-a still listed after its ttl"
    assert time.monotonic() - died >= ttl - 1.0     # not dropped early
    assert "master-b" in a.members() or eventually(lambda: "master-b" in a.members())
    # master-a comes back (etcd: its old lease expired, a new one is granted).
    a.heartbeat("master-a", b'{"id": "a2"}', ttl)
    eventually(lambda: b.members().get("master-a") == b'{"id": "a2"}', what="master-a back on B")


def test_membership_module_on_the_backend(backend: Backend, pair) -> None:
    """hamaster.master.membership over this backend: a beat on A is an alive master on B with
    its record; a graceful leave is not alive at once (before the presence expires)."""
    from hamaster.master.membership import Membership, read_masters

    a, b = pair
    ma = Membership(a, "master-a", ttl=30)
    ma.beat({"state": "serving", "blob_address": "127.0.0.1:1"})
    rec = eventually(lambda: read_masters(b).get("master-a", {}).get("alive") and
                     read_masters(b)["master-a"], what="master-a alive on B")
    assert rec["state"] == "serving" and rec["blob_address"] == "127.0.0.1:1"
    assert rec["ttl"] == 30.0 and rec["master_id"] == "master-a"
    ma.leave({"state": "serving"})
    eventually(lambda: read_masters(b)["master-a"].get("stopped"), what="stopped on B")
    assert read_masters(b)["master-a"]["alive"] is False
    assert "master-a" in b.members()        # still present: the stop flag decides


# ------------------------------------------------------------------------------ leader lease


def _campaign(store: Store, member: str, ttl: float, until: Callable[[Any], bool],
              timeout: float) -> Any:
    """Call ``lease_acquire`` every 0.1 s (as a candidate does) until ``until(result)``."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = store.lease_acquire("leader", member, ttl)
        if until(got):
            return got
        time.sleep(0.1)
    raise AssertionError(f"{member}: lease_acquire never gave what was waited for (last {got})")


def test_lease_one_holder_fencing_epoch_and_expiry(backend: Backend, pair) -> None:
    a, b = pair
    if not type(a).LEASES:
        # No mutual exclusion during a partition: the lease refuses, naming the backends that
        # have one, and the exactly-once features refuse to start on rsync.
        with pytest.raises(LeaseUnsupported, match="etcd or fs"):
            a.lease_acquire("leader", "a", 1.0)
        assert "etcd or fs" in (a.lease_unsupported() or "")
        return
    assert a.lease_unsupported() is None
    ttl = 1.0
    la = a.lease_acquire("leader", "a", ttl)
    assert la is not None and la.holder == "a" and la.epoch >= 1
    assert la.valid_until > time.monotonic()
    # While A renews, B never gets it (B keeps campaigning for 2.5 TTLs).
    end = time.monotonic() + 2.5 * ttl
    while time.monotonic() < end:
        assert b.lease_acquire("leader", "b", ttl) is None
        renewed = a.lease_acquire("leader", "a", ttl)
        assert renewed is not None and renewed.epoch == la.epoch
        time.sleep(0.15)
    info = b.lease_info("leader")
    assert (info.holder, info.epoch) == ("a", la.epoch)
    assert a.fenced_create("reactions/one", b"a", renewed) is True
    assert a.fenced_create("reactions/one", b"again", renewed) is False   # create-if-absent
    # A stops renewing (frozen or dead): B takes over with a higher epoch, not before a TTL.
    stopped = time.monotonic()
    lb = _campaign(b, "b", ttl, lambda got: got is not None, timeout=ttl + 5.0)
    assert time.monotonic() - stopped >= ttl * 0.9
    assert lb.epoch == la.epoch + 1 and lb.holder == "b"
    # A resumes: its lease is past valid_until, its fenced writes fail, it does not get it back.
    assert time.monotonic() > renewed.valid_until
    assert a.fenced_create("reactions/two", b"stale", renewed) is False
    assert a.lease_acquire("leader", "a", ttl) is None
    assert b.fenced_create("reactions/two", b"b", lb) is True
    assert a.get("reactions/two") == b"b" or eventually(lambda: a.get("reactions/two") == b"b")
    info = a.lease_info("leader")
    assert (info.holder, info.epoch) == ("b", lb.epoch)
    # A graceful release hands over at the next call, well within a TTL.
    b.lease_release("leader", "b", lb.epoch)
    released = time.monotonic()
    lc = _campaign(a, "a", ttl, lambda got: got is not None, timeout=5.0)
    assert lc.epoch == lb.epoch + 1
    assert time.monotonic() - released < ttl


def test_lease_race_has_exactly_one_winner(backend: Backend, pair) -> None:
    a, b = pair
    if not type(a).LEASES:
        pytest.skip(f"{backend.name} has no lease (asserted in the test above)")
    barrier = threading.Barrier(6)
    wins: list[Any] = []
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            barrier.wait()
            got = (a, b)[i % 2].lease_acquire("race", f"m{i}", 5.0)
            if got is not None:
                wins.append(got)
        except BaseException as exc:
            errors.append(exc)

    # Six candidates on two stores ("masters"), three per store object.
    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert len(wins) == 1, wins
    assert wins[0].epoch == 1


# ------------------------------------------------------------------------------ outages


def test_unreachable_backend_fails_loudly_and_catches_up(backend: Backend, pair) -> None:
    a, b = pair
    seen: list[Change] = []
    b.watch("pki/master", seen.extend)
    a.put("pki/master/minions/before", b"1")
    eventually(lambda: b.get("pki/master/minions/before") == b"1", what="value before outage")

    backend.break_backend(a)
    try:
        if backend.name == "rsync":
            # Local writes keep working (that is the design); replication is degraded.
            a.put("pki/master/minions/during", b"2")
            eventually(lambda: not a.healthy(), what="A unhealthy while its peer is down")
            assert b.get("pki/master/minions/during") is None
        else:
            with pytest.raises(StoreUnavailable) as err:
                a.put("pki/master/minions/during", b"2")
            assert str(err.value)           # a clear message, not a bare exception
            assert not a.healthy()
            with pytest.raises(StoreUnavailable):
                b.get("pki/master/minions/before")
            eventually(lambda: not b.healthy(), what="B unhealthy")
            if backend.name == "fs":    # the server side still changes while we are cut off
                (backend.moved / "pki/master/minions/during").write_bytes(b"2")
    finally:
        backend.restore_backend()

    if backend.name == "etcd":
        eventually(lambda: a.put("pki/master/minions/during", b"2") is None,
                   what="write after restart")
    a.put("pki/master/minions/after", b"3")
    eventually(lambda: b.get("pki/master/minions/after") == b"3", timeout=15, what="after")
    eventually(lambda: b.get("pki/master/minions/during") == b"2", timeout=15, what="during")
    eventually(lambda: {c.key for c in seen if c.value} >= {"pki/master/minions/during",
                                                            "pki/master/minions/after"},
               timeout=15, what="B's watch caught up")
    eventually(lambda: a.healthy() and b.healthy(), what="healthy again")


def test_rsync_local_tree_gone_raises(tmp_path: Path) -> None:
    """The rsync backend's own storage (the local tree) going away fails loudly too."""
    from hamaster.store.rsync import RsyncStore

    s = RsyncStore(tmp_path / "tree", [], poll_interval=POLL)
    try:
        s.put("k", b"v")
        os.rename(tmp_path / "tree", tmp_path / "gone")
        with pytest.raises(StoreUnavailable):
            s.put("k", b"w")
        assert not s.healthy()
        os.rename(tmp_path / "gone", tmp_path / "tree")
        s.put("k", b"w")
        assert s.get("k") == b"w" and s.healthy()
    finally:
        s.close()


# ------------------------------------------------------------------------------ tombstones


def test_deleted_and_rejected_keys_are_never_resurrected(backend: Backend, pair) -> None:
    a, b = pair
    a.put("pki/master/minions_pre/evil", b"E")
    a.put("pki/master/minions/gone", b"G")
    eventually(lambda: b.get("pki/master/minions_pre/evil") == b"E"
               and b.get("pki/master/minions/gone") == b"G", what="keys on B")
    # Reject on A (pending -> rejected), delete another key on A.
    a.put("pki/master/minions_rejected/evil", b"E")
    a.delete("pki/master/minions_pre/evil")
    a.delete("pki/master/minions/gone")
    for s in (a, b):
        eventually(lambda s=s: s.get("pki/master/minions_pre/evil") is None
                   and s.get("pki/master/minions/gone") is None
                   and s.get("pki/master/minions_rejected/evil") == b"E", what="converged")
    time.sleep(0.5)      # several sync rounds in both directions
    for s in (a, b):
        s.poll_now()
        assert s.get("pki/master/minions_pre/evil") is None
        assert s.get("pki/master/minions/gone") is None


def test_rsync_tombstone_beats_a_stale_push_and_newer_put_wins(tmp_path: Path) -> None:
    """Deterministic: B pushes its old copy to A *after* A deleted the key."""
    with _manual_rsync_pair(tmp_path) as (a, b):
        seen_a: list[Change] = []
        a.watch("pki", seen_a.extend)
        a.put("pki/master/minions_pre/k", b"old")
        assert a.push_now(force=True)
        assert b.get("pki/master/minions_pre/k") == b"old"
        a.poll_now()
        seen_a.clear()
        time.sleep(0.01)
        a.delete("pki/master/minions_pre/k")        # A rejects/deletes; B has not heard
        assert b.push_now(force=True)               # B pushes its stale copy back to A
        assert (tmp_path / "a/pki/master/minions_pre/k").exists()   # it did arrive …
        a.poll_now()                                 # … and the tombstone wins
        assert a.get("pki/master/minions_pre/k") is None
        assert [c for c in seen_a if c.value is not None] == []     # never reported
        assert a.push_now(force=True)
        b.poll_now()
        assert b.get("pki/master/minions_pre/k") is None
        assert b.push_now(force=True)
        a.poll_now()
        assert a.get("pki/master/minions_pre/k") is None

        # Newer change wins: re-created on B after the delete → comes back everywhere.
        time.sleep(0.01)
        b.put("pki/master/minions_pre/k", b"new")
        assert b.push_now(force=True)
        a.poll_now()
        assert a.get("pki/master/minions_pre/k") == b"new"
        assert a.push_now(force=True)
        b.poll_now()
        assert b.get("pki/master/minions_pre/k") == b"new"
        # Concurrent puts: the later one wins on both sides after a sync both ways.
        a.put("conflict", b"from-a")
        time.sleep(0.01)
        b.put("conflict", b"from-b")
        assert a.push_now(force=True)       # B's newer value is replaced, kept aside …
        b.poll_now()                        # … and restored by B's next pass
        assert b.get("conflict") == b"from-b"
        assert b.push_now(force=True)
        a.poll_now()
        assert a.get("conflict") == b.get("conflict") == b"from-b"
        # rsync's temp files in the tree are never keys.
        (tmp_path / "a/pki/.k.AbC123").write_bytes(b"partial")
        assert "pki/.k.AbC123" not in a.list("pki")


def test_rsync_newer_value_restored_over_a_stale_push_goes_back_out(tmp_path: Path) -> None:
    """Deterministic: B's older copy lands on A before A pushed its newer one.

    A keeps its newer value (restored from rsync's backup) and must push it to B on its own:
    the restored file has the same name, size and mtime as before, so no change is seen.
    """
    with _manual_rsync_pair(tmp_path) as (a, b):
        a.put("pki/master/minions/web1", b"PUB1\n")
        assert a.push_now(force=True)
        b.poll_now()
        a.poll_now()
        time.sleep(0.01)                    # a later mtime (file timestamps are coarse), not a wait
        a.put("pki/master/minions/web1", b"PUB1-new\n")
        assert b.push_now(force=True)       # B's old copy replaces A's newer one …
        a.push_now(force=True)              # … just as A sends its (now old) tree
        assert b.get("pki/master/minions/web1") == b"PUB1\n"
        a.poll_now()                        # A restores its newer value …
        assert a.get("pki/master/minions/web1") == b"PUB1-new\n"
        assert a.push_now()                 # … and has it queued for B without a force
        b.poll_now()
        assert b.get("pki/master/minions/web1") == b"PUB1-new\n"


def test_rsync_restore_newer_without_a_watch(tmp_path: Path) -> None:
    """A reader with no watch running (``hamaster-key`` beside a stopped master) gets the
    newer local value back from rsync's backup with ``restore_newer``, and it goes out."""
    with _manual_rsync_pair(tmp_path) as (a, b):
        a.put("cluster/masters/m0", b"alive")
        assert a.push_now(force=True)
        b.poll_now()
        time.sleep(0.01)                    # a later mtime (file timestamps are coarse), not a wait
        a.put("cluster/masters/m0", b"stopped")
        assert b.push_now(force=True)       # B's older copy replaces A's newer one
        assert (tmp_path / "a/cluster/masters/m0").read_bytes() == b"alive"
        assert a.restore_newer() == 1
        assert a.get("cluster/masters/m0") == b"stopped"
        assert a.push_now()                 # queued for B without a force
        b.poll_now()
        assert b.get("cluster/masters/m0") == b"stopped"


# ------------------------------------------------------------------------------ etcd only


def test_etcd_quorum_loss_fails_writes_and_converges() -> None:
    from hamaster.store.etcd import EtcdStore

    # The request deadline must cover an election (500 ms election timeout here, up to twice
    # that randomised, then the vote) with room for a loaded CI machine: 3 s (production: 5 s).
    with etcd_cluster(3) as cluster:
        a = EtcdStore(cluster.endpoints, prefix="/q", timeout=3.0, poll_interval=POLL)
        b = EtcdStore(cluster.endpoints, prefix="/q", timeout=3.0, poll_interval=POLL)
        try:
            seen: list[Change] = []
            b.watch("pki", seen.extend)
            a.start()
            b.start()
            a.put("pki/k0", b"0")
            # One member of three killed: no error visible to users.
            cluster.members[0].kill()
            for i in range(1, 6):
                a.put(f"pki/k{i}", str(i).encode())
                assert b.get(f"pki/k{i}") == str(i).encode()
            assert a.compare_and_put("pki/cas", None, b"x") is True
            eventually(lambda: {c.key for c in seen} >= {f"pki/k{i}" for i in range(6)},
                       what="watch through a member loss")
            # Two of three killed: quorum lost, writes fail loudly.
            cluster.members[1].kill()
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no quorum|no endpoint reachable|no leader"):
                a.put("pki/lost", b"x")
            assert time.monotonic() - t0 < 10
            assert not a.healthy()
            with pytest.raises(StoreUnavailable):
                a.compare_and_put("pki/cas2", None, b"y")
            # Quorum returns: writes work and B's watch converges.
            cluster.members[0].start()
            cluster.members[1].start()
            cluster.wait_healthy(timeout=20)
            eventually(lambda: a.put("pki/back", b"b") is None, timeout=15, what="write")
            # A timed-out write has an unknown outcome (etcd may commit it once quorum is
            # back); whichever it is, both masters agree.
            assert a.get("pki/lost") == b.get("pki/lost")
            eventually(lambda: any(c.key == "pki/back" for c in seen), timeout=15,
                       what="watch after quorum returned")
            assert b.get("pki/k5") == b"5"
            eventually(lambda: a.healthy() and b.healthy(), what="healthy")
        finally:
            a.close()
            b.close()


def test_etcd_burst_of_1000_returns(etcd_single: EtcdCluster) -> None:
    from hamaster.store.etcd import EtcdStore

    a = EtcdStore(etcd_single.endpoints, prefix=f"/burst-{uuid.uuid4().hex[:6]}", timeout=5)
    b = EtcdStore(etcd_single.endpoints, prefix=a.base.rstrip("/"), timeout=5)
    try:
        jid = "20240101120000999999"
        items = [(jid, f"minion{i:04d}", {"return": {"os": "Debian"}, "retcode": 0,
                                           "jid": jid, "fun": "grains.items"})
                 for i in range(1000)]
        t0 = time.perf_counter()
        JobCache(a).save_returns(items)
        write_s = time.perf_counter() - t0
        got = JobCache(b).get_returns(jid)
        total_s = time.perf_counter() - t0
        print(f"\n[etcd] 1,000 returns: save_returns {write_s * 1000:.0f} ms, "
              f"visible from B (list + get) after {total_s * 1000:.0f} ms")
        assert len(got) == 1000
        assert write_s < 1.0
    finally:
        a.close()
        b.close()

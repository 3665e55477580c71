"""The key-change barrier (pki_sync/confirm.py) on a real FsStore: two "masters" (a key registry
and a responder each, with their own store watcher thread) and a requester, as hamaster-key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hamaster.master.membership import Membership, encode_record, read_masters, record_key
from hamaster.master.shared import KEYS_PREFIX
from hamaster.pki_sync.confirm import (
    KEYSYNC_PREFIX,
    Expect,
    KeyChangeRequest,
    KeyChangeResponder,
    ack_prefix,
    confirm_key_change,
    expect_for,
    request_key,
)
from hamaster.pki_sync.keys import KeyRegistry, KeyState, generate_keypair
from hamaster.store.base import MEMBERS_PREFIX
from hamaster.store.fs import FsStore
from tests.kit import wait_until

POLL = 0.05


@pytest.fixture(scope="module")
def pub() -> str:
    return generate_keypair(2048)[1].decode()


@dataclass
class FakeMaster:
    """A master's key-handling parts: registry, responder, and what its callbacks did."""

    master_id: str
    store: FsStore
    keys: KeyRegistry
    responder: KeyChangeResponder
    log: list[tuple[str, str]] = field(default_factory=list)   # (event, minion id), in order
    gate: threading.Event = field(default_factory=threading.Event)

    def heartbeat(self, stopped: bool = False, ts: float | None = None) -> None:
        """Beat as a master does (or stop gracefully); ``ts``: a record last written then, with
        no presence since (a master that died then)."""
        member = Membership(self.store, self.master_id, 5.0)
        if stopped:
            member.leave({})
        elif ts is not None:
            rec = {"master_id": self.master_id, "ts": ts, "ttl": 5.0}
            self.store.put(record_key(self.master_id), encode_record(rec))
            self.store.delete(f"{MEMBERS_PREFIX}/{self.master_id}")   # its presence expired
        else:
            member.beat({})


def _master(root: Path, master_id: str, start: bool = True) -> FakeMaster:
    store = FsStore(root, poll_interval=POLL)
    keys = KeyRegistry(store, KEYS_PREFIX)
    keys.load()
    box: list[FakeMaster] = []

    def on_change(mid: str, old: KeyState | None, new: KeyState | None) -> None:
        m = box[0]
        if old is KeyState.ACCEPTED and new is not KeyState.ACCEPTED:
            m.gate.wait(10)             # the test may hold the "rotation" to see the ack wait
            m.log.append(("rotated", mid))

    def fence(ids: list[str]) -> int:
        box[0].log.append(("fence", ",".join(ids)))
        return 7

    keys.on_change(on_change)
    responder = KeyChangeResponder(store, keys, master_id, fence=fence, poll=POLL)
    m = FakeMaster(master_id, store, keys, responder)
    m.gate.set()
    box.append(m)
    keys.attach_watch()
    responder.attach()
    if start:
        store.start()
        responder.start()
    m.heartbeat()
    return m


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, list[FakeMaster]]]:
    root = tmp_path / "shared"
    masters = [_master(root, "m1"), _master(root, "m2")]
    try:
        yield root, masters
    finally:
        for m in masters:
            m.gate.set()
            m.responder.close()
            m.store.close()


def _cli(root: Path) -> tuple[FsStore, KeyRegistry]:
    store = FsStore(root, poll_interval=POLL)
    reg = KeyRegistry(store, KEYS_PREFIX)
    reg.load()
    return store, reg


def _members(store: FsStore):
    return lambda: read_masters(store)


def _accepted_everywhere(masters: list[FakeMaster], mid: str, timeout: float = 10) -> None:
    wait_until(lambda: all(m.keys.state_of(mid) is KeyState.ACCEPTED for m in masters),
               timeout, 0.01, f"{mid} accepted on every master")


def test_delete_returns_after_every_master_rotated(cluster, pub) -> None:
    root, masters = cluster
    store, reg = _cli(root)
    reg.authorize("n1", pub)
    reg.accept("n1")
    _accepted_everywhere(masters, "n1")
    assert reg.delete("n1")
    res = confirm_key_change(store, expect_for(["n1"], False), _members(store), timeout=5)
    assert res.ok, res
    assert sorted(res.confirmed) == ["m1", "m2"] and res.waited_on == ["m1", "m2"]
    # When the requester returns, both masters' views dropped n1 and their rotation ran first.
    for m in masters:
        assert m.keys.state_of("n1") is None
        assert m.log.index(("rotated", "n1")) < m.log.index(("fence", "n1"))
    # The request and its acks are gone.
    assert store.list(KEYSYNC_PREFIX) == []


def test_ack_waits_until_the_key_change_callbacks_returned(tmp_path, pub) -> None:
    """m2 applies the deletion on another thread (as an ``_auth`` in the store pool does) and
    sits in its callback; its view already says "deleted", but it must not ack before the
    callback (the publish-key rotation) has returned."""
    root = tmp_path / "shared"
    m1 = _master(root, "m1")
    slow = _master(root, "m2", start=False)
    slow.keys.store = FsStore(root, poll_interval=POLL)   # keys: no watcher, refreshed below
    slow.responder.registry = slow.keys
    slow.store.start()
    slow.responder.start()
    try:
        store, reg = _cli(root)
        reg.authorize("n2", pub)
        reg.accept("n2")
        slow.keys.refresh(["n2"])
        _accepted_everywhere([m1, slow], "n2")
        slow.gate.clear()                                 # m2's "rotation" blocks when it runs
        reg.delete("n2")
        applier = threading.Thread(target=slow.keys.refresh, args=(["n2"],))
        applier.start()
        wait_until(lambda: slow.keys.state_of("n2") is None, 5, 0.01, "n2 gone from m2's registry")
        assert not slow.keys.settled("n2")
        res = confirm_key_change(store, expect_for(["n2"], False), _members(store), timeout=2.0)
        assert list(res.missing) == ["m2"], res          # held in its callback: not confirmed
        assert "still being applied" in res.missing["m2"]
        assert ("fence", "n2") not in slow.log
        slow.gate.set()
        applier.join()
        res = confirm_key_change(store, expect_for(["n2"], False), _members(store), timeout=5)
        assert res.ok, res
        rotated = slow.log.index(("rotated", "n2"))
        assert ("fence", "n2") in slow.log[rotated:] and ("fence", "n2") not in slow.log[:rotated]
    finally:
        slow.gate.set()
        for m in (m1, slow):
            m.responder.close()
            m.store.close()


def test_master_not_answering_is_named_within_the_wait(tmp_path, pub) -> None:
    root = tmp_path / "shared"
    live = _master(root, "m1")
    frozen = _master(root, "m2", start=False)   # a heartbeat but no responder: "frozen"
    try:
        store, reg = _cli(root)
        reg.authorize("n3", pub)
        reg.delete("n3")
        t0 = time.monotonic()
        res = confirm_key_change(store, expect_for(["n3"], False), _members(store), timeout=1.0)
        took = time.monotonic() - t0
        assert not res.ok
        assert list(res.missing) == ["m2"] and "m2" not in res.confirmed and "m1" in res.confirmed
        assert "no confirmation within 1 s" in res.missing["m2"]
        assert 1.0 <= took < 2.0
        assert store.list(KEYSYNC_PREFIX) == []
    finally:
        for m in (live, frozen):
            m.responder.close()
            m.store.close()


def test_stopped_and_stale_masters_are_not_waited_on(cluster) -> None:
    root, masters = cluster
    store, _ = _cli(root)
    gone = _master(root, "m3", start=False)
    gone.heartbeat(stopped=True)
    stale = _master(root, "m4", start=False)
    stale.heartbeat(ts=time.time() - 60)
    try:
        res = confirm_key_change(store, expect_for(["nobody"], False), _members(store), timeout=3)
        assert res.ok, res
        assert res.waited_on == ["m1", "m2"]
        assert res.skipped["m3"] == "stopped" and res.skipped["m4"].startswith("not alive")
    finally:
        for m in (gone, stale):
            m.store.close()


def test_master_stopping_during_the_wait_is_dropped(tmp_path) -> None:
    root = tmp_path / "shared"
    m1 = _master(root, "m1")
    m2 = _master(root, "m2", start=False)
    try:
        store, _ = _cli(root)
        timer = threading.Timer(0.3, lambda: m2.heartbeat(stopped=True))
        timer.start()
        res = confirm_key_change(store, expect_for(["x"], False), _members(store), timeout=5)
        timer.join()
        assert res.ok and res.skipped == {"m2": "stopped during the wait"}
        assert res.elapsed < 2.0
    finally:
        for m in (m1, m2):
            m.responder.close()
            m.store.close()


def test_accept_waits_for_accepted_everywhere_and_reports_why_not(cluster, pub) -> None:
    root, masters = cluster
    store, reg = _cli(root)
    reg.authorize("n4", pub)
    reg.accept("n4")
    res = confirm_key_change(store, expect_for(["n4"], True), _members(store), timeout=5)
    assert res.ok and all(m.keys.state_of("n4") is KeyState.ACCEPTED for m in masters)
    # An expectation that cannot hold (n5 never accepted): named with the reason.
    res = confirm_key_change(store, {"n5": Expect.ACCEPTED}, _members(store), timeout=1.5)
    assert set(res.missing) == {"m1", "m2"}
    assert "n5 is absent here" in res.missing["m1"]


def test_bad_requests_do_not_break_the_responder(cluster, pub) -> None:
    root, masters = cluster
    store, reg = _cli(root)
    store.put(request_key("junk1"), b"\xff not json")
    store.put(request_key("junk2"), json.dumps({"expect": {"../x": "accepted"}, "created": 1,
                                                 "deadline": 2}).encode())
    store.put(f"{KEYSYNC_PREFIX}/junk3/request/deeper", b"{}")
    reg.authorize("n6", pub)
    reg.delete("n6")
    res = confirm_key_change(store, expect_for(["n6"], False), _members(store), timeout=5)
    assert res.ok, res


def test_sweep_removes_abandoned_requests_and_orphan_acks(tmp_path) -> None:
    root = tmp_path / "shared"
    sweeper = _master(root, "m1", start=False)
    store, _ = _cli(root)
    old = time.time() - 3600
    req = KeyChangeRequest("1-dead", {"a": Expect.NOT_ACCEPTED}, "test", old, old + 5)
    store.put(request_key("1-dead"), req.to_bytes())
    store.put(f"{ack_prefix('1-dead')}/m1", b"{}")
    store.put(f"{ack_prefix('2-orphan')}/m1", b"{}")         # nonce time 0x2 ms: ancient
    fresh = KeyChangeRequest("ffffffffffff-live", {"a": Expect.NOT_ACCEPTED}, "test",
                             time.time(), time.time() + 5)
    store.put(request_key(fresh.nonce), fresh.to_bytes())
    assert sweeper.responder.sweep() == 2
    assert store.list(KEYSYNC_PREFIX) == [request_key(fresh.nonce)]
    sweeper.store.close()


def test_cli_names_the_master_that_did_not_confirm_and_exits_3(tmp_path, pub, capsys) -> None:
    from hamaster.cli.key import main

    shared = tmp_path / "shared"
    confdir = tmp_path / "conf"
    confdir.mkdir()
    (confdir / "master").write_text(f"root_dir: {tmp_path / 'root'}\nha_dir: {shared}\n"
                                    "master_id: here\nlog_level: warning\n")
    live = _master(shared, "m1")
    mute = _master(shared, "m2", start=False)       # alive by its record, never answers
    try:
        _, reg = _cli(shared)
        reg.authorize("n7", pub)
        reg.accept("n7")
        t0 = time.monotonic()
        rc = main(["-c", str(confdir), "-d", "n7", "-y", "--wait-timeout", "0.8"])
        took = time.monotonic() - t0
        out, err = capsys.readouterr()
        assert rc == 3 and "Key for minion n7 deleted." in out
        assert "m2: no confirmation within 0.8 s" in err and "m1:" not in err
        assert 0.8 <= took < 2.5
        mute.heartbeat(stopped=True)
        reg.authorize("n8", pub)
        assert main(["-c", str(confdir), "-r", "n8", "-y"]) == 0      # m1 alone confirms
        assert main(["-c", str(confdir), "-a", "n8", "-y", "--include-rejected",
                     "--wait-timeout", "0"]) == 0
    finally:
        for m in (live, mute):
            m.responder.close()
            m.store.close()

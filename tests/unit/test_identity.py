"""One cluster identity: the master keypair read as one pair, agreed once on rsync, pinned once
by a minion; concurrent key decisions on several masters never pass through "deleted"."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from hamaster import crypto
from hamaster.minion.identity import MinionIdentity
from hamaster.pki_sync.keys import (
    AuthDecision,
    KeyRegistry,
    KeyState,
    generate_keypair,
    read_master_keypair,
)
from hamaster.store.fs import FsStore
from tests.kit import wait_until

PREFIX = "pki/master"


@pytest.fixture(scope="module")
def pubs() -> list[str]:
    return [generate_keypair(2048)[1].decode() for _ in range(2)]


# ------------------------------------------------------------------ the master keypair


def test_public_key_is_derived_from_the_private_key(tmp_path: Path, pubs: list[str]) -> None:
    """A master.pub from another pair (a half-replicated pair) is never read with master.pem."""
    store = FsStore(tmp_path / "s")
    priv, pub = generate_keypair(2048)
    store.put(f"{PREFIX}/master.pem", priv)
    store.put(f"{PREFIX}/master.pub", pubs[0].encode())
    got = read_master_keypair(store, PREFIX)
    assert got is not None and crypto.normalize_pem(got[1]) == crypto.normalize_pem(pub)
    assert read_master_keypair(FsStore(tmp_path / "empty"), PREFIX) is None


# ------------------------------------------------------------------ concurrent auto_accept


class RacingStore(FsStore):
    """An FsStore that runs ``hook`` once right after reading ``trigger``: what another
    master's write plus this master's watcher thread may do in that instant."""

    trigger: str | None = None
    hook = None

    def get(self, key: str) -> bytes | None:
        value = super().get(key)
        if key == self.trigger and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return value


def _left_accepted(events: list) -> list:
    return [e for e in events if e[1] is KeyState.ACCEPTED and e[2] is not KeyState.ACCEPTED]


def test_watch_during_refresh_never_shows_accepted_key_deleted(tmp_path: Path,
                                                               pubs: list[str]) -> None:
    """Regression: B re-reads the key's states from the store; between its read of
    ``minions/<id>`` (absent) and applying the reads, master A accepts the key and B's watch
    applies it. The stale "absent" must not undo it (old code: ACCEPTED -> None -> ACCEPTED,
    and B rotated its publish key)."""
    shared = tmp_path / "shared"
    a = KeyRegistry(FsStore(shared), PREFIX, auto_accept=True)
    b_store = RacingStore(shared)
    b = KeyRegistry(b_store, PREFIX, auto_accept=True)
    a.load()
    b.attach_watch()
    events: list = []
    b.on_change(lambda mid, old, new: events.append((mid, old, new)))

    def other_master_accepts() -> None:
        assert a.authorize("m1", pubs[0]) is AuthDecision.ACCEPTED
        b_store.poll_now()          # B's watcher delivers A's write now

    b_store.trigger, b_store.hook = f"{PREFIX}/minions/m1", other_master_accepts
    assert b.authorize("m1", pubs[0]) is AuthDecision.ACCEPTED
    assert b_store.hook is None, "the race was not exercised"
    assert _left_accepted(events) == [], events
    assert events == [("m1", None, KeyState.ACCEPTED)]


@pytest.mark.parametrize("pending_first", [False, True], ids=["new-key", "pending-key"])
def test_concurrent_auto_accept_on_three_masters_converges(tmp_path: Path, pubs: list[str],
                                                           pending_first: bool) -> None:
    """Three masters (registries with their own store and watcher on one directory) decide
    the same new key at the same instant, many rounds: never a transient leave of ACCEPTED."""
    shared = tmp_path / "shared"
    stores = [FsStore(shared, poll_interval=0.002) for _ in range(3)]
    regs = [KeyRegistry(s, PREFIX, auto_accept=True) for s in stores]
    events: list = []     # list.append is atomic: callbacks of three watcher threads
    for i, reg in enumerate(regs):
        reg.attach_watch()
        reg.on_change(lambda mid, old, new, i=i: events.append((i, mid, old, new)))
        reg.store.start()
    try:
        for rnd in range(25):
            mid = f"m{rnd}"
            if pending_first:
                stores[0].put(f"{PREFIX}/minions_pre/{mid}", (pubs[0] + "\n").encode())
                wait_until(lambda mid=mid: all(r.state_of(mid) is KeyState.PENDING for r in regs),
                           10, 0.01, f"{mid} pending on every registry")
            barrier = threading.Barrier(3)
            results: list = []

            def decide(reg: KeyRegistry, mid: str = mid, barrier: threading.Barrier = barrier,
                       results: list = results) -> None:
                barrier.wait()
                results.append(reg.authorize(mid, pubs[0]))

            threads = [threading.Thread(target=decide, args=(r,)) for r in regs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert results == [AuthDecision.ACCEPTED] * 3, (rnd, results)
            wait_until(lambda mid=mid: all(r.state_of(mid) is KeyState.ACCEPTED for r in regs),
                       10, 0.01, f"{mid} accepted on every registry")
    finally:
        for s in stores:
            s.close()
    bad = [e for e in events if e[2] is KeyState.ACCEPTED and e[3] is not KeyState.ACCEPTED]
    assert bad == [], bad


# ------------------------------------------------------------------ rsync agreement

needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


def _rsync_trees(tmp_path: Path, n: int, reachable: bool = True) -> list:
    from hamaster.store.rsync import RsyncStore

    roots = [tmp_path / f"t{i}" for i in range(n)]
    for r in roots:
        r.mkdir()
    stores = []
    for i, root in enumerate(roots):
        peers = [str(r) for j, r in enumerate(roots) if j != i] if reachable else \
            [str(tmp_path / f"nowhere{i}")]
        s = RsyncStore(root, peers, poll_interval=0.05, debounce=0.02, max_backoff=0.5,
                       member_id=f"m{i}")
        s.start()
        stores.append(s)
    return stores


@needs_rsync
@pytest.mark.parametrize("spacing", [0.0, 0.5], ids=["together", "0.5s-apart"])
def test_rsync_masters_agree_on_one_keypair(tmp_path: Path, spacing: float) -> None:
    from hamaster.pki_sync.masterkey import agree_master_keypair, candidates_prefix

    stores = _rsync_trees(tmp_path, 3)
    results: dict[int, tuple[bytes, bytes]] = {}

    def agree(i: int) -> None:
        results[i] = agree_master_keypair(stores[i], PREFIX, member_id=f"m{i}", expected=3,
                                          poll=0.05, timeout=60)

    threads = [threading.Thread(target=agree, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
            if spacing:
                time.sleep(spacing)     # the staggered start is the scenario, not a sync
        for t in threads:
            t.join(90)
        assert sorted(results) == [0, 1, 2]
        assert len({results[i] for i in range(3)}) == 1
        priv, pub = results[0]
        # every tree converges on that pair, candidates removed
        wait_until(lambda: all(s.get(f"{PREFIX}/master.pem") == priv for s in stores), 30, 0.01,
                   "every tree holding the chosen master.pem")
        wait_until(lambda: all(s.list(candidates_prefix(PREFIX)) == [] for s in stores), 30, 0.01,
                   "the candidates removed from every tree")
        assert all(crypto.normalize_pem(s.get(f"{PREFIX}/master.pub")) == crypto.normalize_pem(pub)
                   for s in stores)
    finally:
        for s in stores:
            s.close()


@needs_rsync
def test_rsync_master_without_peers_waits_then_operator_decides(tmp_path: Path) -> None:
    """Peers unreachable: the master waits (and says so) instead of inventing an identity;
    ``create_now`` (``--create-cluster-key``) is the explicit decision."""
    from hamaster.pki_sync.keys import KeyRegistryError
    from hamaster.pki_sync.masterkey import agree_master_keypair

    (store,) = _rsync_trees(tmp_path, 1, reachable=False)
    statuses: list = []
    try:
        with pytest.raises(KeyRegistryError, match="no cluster master keypair agreed"):
            agree_master_keypair(store, PREFIX, member_id="m0", expected=2, poll=0.05,
                                 timeout=0.5, on_wait=statuses.append)
        assert statuses and statuses[-1]["state"] == "waiting_for_master_key"
        assert statuses[-1]["candidates"] == ["m0"]
        assert store.get(f"{PREFIX}/master.pem") is None
        priv, _ = agree_master_keypair(store, PREFIX, member_id="m0", expected=2,
                                       create_now=True)
        assert store.get(f"{PREFIX}/master.pem") == priv
        assert store.list(f"{PREFIX}/candidates") == []
    finally:
        store.close()


# ------------------------------------------------------------------ minion pins once


def test_concurrent_first_pins_pin_exactly_one_key(tmp_path: Path, pubs: list[str]) -> None:
    """N threads pin at once, with two different master keys: one key is pinned, every caller
    gets it back, memory equals disk, and a restarted identity trusts the same key."""
    opts = {"pki_dir": str(tmp_path / "pki"), "keysize": 2048}
    ident = MinionIdentity(opts, "m1")
    barrier = threading.Barrier(8)
    got: list[str] = []

    def pin(i: int) -> None:
        barrier.wait()
        got.append(ident.pin_master_pub(pubs[i % 2]))

    threads = [threading.Thread(target=pin, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1
    pinned = got[0]
    assert pinned in {crypto.normalize_pem(p) for p in pubs}
    assert ident.pinned_master_pub() == pinned
    assert crypto.normalize_pem(ident.pinned_path.read_text()) == pinned
    again = MinionIdentity(opts, "m1")
    assert again.pinned_master_pub() == pinned
    other = next(p for p in pubs if crypto.normalize_pem(p) != pinned)
    assert again.pin_master_pub(other) == pinned     # a later, different key is not trusted

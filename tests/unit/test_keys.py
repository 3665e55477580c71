"""Tests for minion key states, Salt's auth decision and the master keypair on a store."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from hamaster.crypto import normalize_pem
from hamaster.pki_sync.keys import (
    AuthDecision,
    KeyRegistry,
    KeyState,
    UnknownMinion,
    generate_keypair,
    load_or_create_master_keypair,
    open_key_registry,
    pem_finger,
    valid_minion_id,
)
from hamaster.store.base import StoreUnavailable
from hamaster.store.fs import FsStore


@pytest.fixture(scope="module")
def pubs() -> list[str]:
    return [generate_keypair(2048)[1].decode() for _ in range(2)]


@pytest.fixture
def pki(tmp_path):
    return tmp_path / "pki"


def make(pki, **kw) -> KeyRegistry:
    reg = KeyRegistry(FsStore(pki), "", **kw)
    reg.load()
    return reg


def test_normalize_pem():
    assert normalize_pem(b"  A  \r\nB\t\r\n\n") == "A\nB"
    assert normalize_pem("A\nB\n") == normalize_pem("A\r\nB")
    assert normalize_pem(b"A\n\n  B\rC\xff") == "A\nB\nC\ufffd"  # never raises on bytes


def test_one_key_in_any_layout_is_the_same_accepted_key(pki, pubs):
    """The registry and the request handler compare keys with the one normaliser
    (``crypto.normalize_pem``): the accepted key re-wrapped with CRLF, indentation or a blank
    line is the same key, never a "denied" other key."""
    reg = make(pki, auto_accept=True)
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED
    lines = pubs[0].strip().split("\n")
    variants = ["\r\n".join(lines), "\n".join("  " + ln for ln in lines),
                "\n".join(lines[:2] + [""] + lines[2:]) + "\n\n"]
    for text in variants:
        assert reg.accepted_in_memory("web1", text), text
        assert reg.authorize("web1", text) is AuthDecision.ACCEPTED, text
    assert reg.state_of("web1") is KeyState.ACCEPTED
    assert not (pki / "minions_denied" / "web1").exists()


@pytest.mark.parametrize("mid,ok", [
    ("web1", True), ("web-1.example.com", True), ("", False), ("a/b", False),
    ("a\\b", False), ("a..b", False), (".hidden", False), ("a\0b", False), ("x" * 256, False),
    ("x" * 240, True), ("x" * 241, False), ("é" * 121, False), ("a\nb", False), (" web1", False),
])
def test_valid_minion_id(mid, ok):
    assert valid_minion_id(mid) is ok


def test_unknown_goes_pending_in_salt_layout(pki, pubs):
    reg = make(pki)
    assert reg.authorize("web1", pubs[0]) is AuthDecision.PENDING
    assert (pki / "minions_pre" / "web1").read_text().strip() == pubs[0].strip()
    assert reg.state_of("web1") is KeyState.PENDING
    # same key again: still pending, nothing new written
    assert reg.authorize("web1", pubs[0]) is AuthDecision.PENDING
    assert not (pki / "minions_denied" / "web1").exists()


def test_invalid_id_rejected_without_file(pki, pubs):
    reg = make(pki)
    assert reg.authorize("../etc", pubs[0]) is AuthDecision.REJECTED
    assert reg.store.list("") == []


def test_open_mode_accepts_anything(pki, pubs):
    reg = make(pki, open_mode=True)
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED
    assert reg.store.list("") == []


def test_rejected_stays_rejected(pki, pubs):
    reg = make(pki, auto_accept=True)
    reg.store.put("minions_rejected/web1", pubs[0].encode())
    assert reg.authorize("web1", pubs[0]) is AuthDecision.REJECTED
    assert reg.state_of("web1") is KeyState.REJECTED


def test_accepted_same_key_and_different_key(pki, pubs):
    reg = make(pki)
    reg.store.put("minions/web1", pubs[0].encode())
    assert reg.authorize("web1", pubs[0].replace("\n", "\r\n") + "  \n") is AuthDecision.ACCEPTED
    assert reg.authorize("web1", pubs[1]) is AuthDecision.DENIED
    assert normalize_pem((pki / "minions_denied" / "web1").read_text()) == normalize_pem(pubs[1])
    # the accepted key is untouched and still authenticates
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED


def test_autoreject_file(pki, pubs, tmp_path):
    f = tmp_path / "autoreject"
    f.write_text("# comment\nbad*\n")
    reg = make(pki, autoreject_file=str(f), auto_accept=True)
    reg.store.put("minions_pre/bad1", pubs[0].encode())
    reg.load()
    assert reg.authorize("bad1", pubs[0]) is AuthDecision.REJECTED
    assert (pki / "minions_rejected" / "bad1").exists()
    assert not (pki / "minions_pre" / "bad1").exists()
    assert reg.authorize("good1", pubs[0]) is AuthDecision.ACCEPTED


def test_pending_with_different_key_denied(pki, pubs):
    reg = make(pki, auto_accept=True)
    reg.authorize("web1", pubs[0])
    reg.store.delete("minions/web1")
    reg.store.put("minions_pre/web1", pubs[0].encode())
    reg.load()
    assert reg.authorize("web1", pubs[1]) is AuthDecision.DENIED
    assert (pki / "minions_denied" / "web1").exists()
    assert reg.state_of("web1") is KeyState.DENIED


def test_pending_same_key_autosign_accepts(pki, pubs, tmp_path):
    f = tmp_path / "autosign"
    f.write_text("web*\n")
    reg = make(pki, autosign_file=str(f))
    reg.store.put("minions_pre/web1", pubs[0].encode())
    reg.store.put("minions_pre/db1", pubs[1].encode())
    reg.load()
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED
    assert (pki / "minions" / "web1").exists() and not (pki / "minions_pre" / "web1").exists()
    assert reg.authorize("db1", pubs[1]) is AuthDecision.PENDING


def test_unknown_auto_accept(pki, pubs):
    reg = make(pki, auto_accept=True)
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED
    assert reg.accepted_pub("web1") == normalize_pem(pubs[0])
    assert reg.accepted_ids() == ["web1"]


def test_garbage_pub_never_accepted(pki):
    reg = make(pki, auto_accept=True)
    assert reg.authorize("web1", "not a key") is AuthDecision.REJECTED
    assert reg.state_of("web1") is None


def test_corrupted_accepted_file_never_authenticates(pki, pubs):
    reg = make(pki)
    reg.store.put("minions/web1", b"garbage\x00\xff")
    reg.load()
    assert reg.accepted_pub("web1") is None
    assert reg.authorize("web1", "garbage") is AuthDecision.REJECTED
    assert reg.authorize("web1", pubs[0]) is AuthDecision.PENDING


def test_decision_rereads_store_for_other_process_accept(pki, pubs):
    reg = make(pki)
    other = make(pki)
    assert reg.authorize("web1", pubs[0]) is AuthDecision.PENDING
    other.load()
    assert other.accept("web1") is True
    # no poll: the decision re-reads the store for this id
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED


def test_store_unavailable_decides_from_memory(pki, pubs, tmp_path):
    reg = make(pki, auto_accept=True)
    reg.store.put("minions/web1", pubs[0].encode())
    reg.load()
    os.rename(pki, tmp_path / "away")
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED  # from memory
    assert reg.authorize("new1", pubs[1]) is AuthDecision.PENDING  # never accept on doubt
    assert reg.authorize("web1", pubs[1]) is AuthDecision.DENIED
    with pytest.raises(StoreUnavailable):
        reg.load()


def test_accept_reject_delete(pki, pubs):
    reg = make(pki)
    events: list = []
    reg.on_change(lambda *e: events.append(e))
    reg.authorize("a", pubs[0])
    reg.authorize("b", pubs[1])
    assert reg.accept("a") is True
    assert reg.accept("a") is False  # no longer pending
    assert reg.list_keys()[KeyState.ACCEPTED] == ["a"]
    assert reg.reject("b") is True
    assert reg.state_of("b") is KeyState.REJECTED
    assert reg.accept("b") is False
    assert reg.accept("b", include_rejected=True) is True
    assert reg.reject("a", include_accepted=True) is True
    assert (pki / "minions_rejected" / "a").exists() and not (pki / "minions" / "a").exists()
    assert reg.delete("a") is True
    assert reg.delete("a") is False
    assert reg.state_of("a") is None
    assert ("a", KeyState.PENDING, KeyState.ACCEPTED) in events
    assert ("a", KeyState.ACCEPTED, KeyState.REJECTED) in events
    assert ("a", KeyState.REJECTED, None) in events


def test_all_variants(pki, pubs):
    reg = make(pki)
    for i in range(3):
        reg.authorize(f"m{i}", pubs[i % 2])
    assert reg.accept_all() == ["m0", "m1", "m2"]
    assert reg.reject_all() == []
    assert reg.reject_all(include_accepted=True) == ["m0", "m1", "m2"]
    assert reg.delete_all() == ["m0", "m1", "m2"]
    assert reg.list_keys() == {s: [] for s in KeyState}


def test_finger_matches_salt_format(pki, pubs):
    import hashlib

    reg = make(pki)
    reg.authorize("web1", pubs[0])
    fp = reg.finger("web1")
    # Salt hashes the PEM body lines as text, each with its newline (salt.utils.crypt.pem_finger)
    body = "".join(line + "\n" for line in pubs[0].strip().splitlines()[1:-1])
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert fp.replace(":", "") == digest
    assert len(fp.split(":")) == 32
    assert pem_finger(pubs[0]) == fp


def test_finger_equals_real_salt_output():
    # Printed by salt.utils.crypt.pem_finger() of salt 3008.5 for the vectors' master.pub.
    from pathlib import Path

    vec = Path(__file__).resolve().parents[3] / "shared/vectors/salt-3008.5/keys/master.pub"
    if not vec.exists():
        pytest.skip(f"vectors not found at {vec}")
    assert pem_finger(vec.read_text()) == (
        "96:3a:b0:f3:3a:86:4b:22:e3:27:11:d9:fb:0d:cd:db:36:8d:da:a7:31:e9:1a:3a:c2:24:a6:9c:8e:94:46:26"
    )


def test_finger_unknown_minion(pki):
    reg = make(pki)
    with pytest.raises(UnknownMinion, match="nobody"):
        reg.finger("nobody")


def test_second_registry_sees_changes_after_poll(pki, pubs):
    a = make(pki)
    b = KeyRegistry(FsStore(pki), "")
    events: list = []
    b.on_change(lambda *e: events.append(e))
    b.attach_watch()
    a.authorize("web1", pubs[0])
    b.store.poll_now()
    assert b.state_of("web1") is KeyState.PENDING
    a.accept("web1")
    b.store.poll_now()
    assert b.state_of("web1") is KeyState.ACCEPTED
    assert b.accepted_pub("web1") == normalize_pem(pubs[0])
    a.delete("web1")
    b.store.poll_now()
    assert b.state_of("web1") is None
    assert events == [("web1", None, KeyState.PENDING),
                      ("web1", KeyState.PENDING, KeyState.ACCEPTED),
                      ("web1", KeyState.ACCEPTED, None)]


def test_prefix_layout(tmp_path, pubs):
    store = FsStore(tmp_path / "shared")
    reg = KeyRegistry(store, "pki/master/")
    reg.load()
    reg.authorize("web1", pubs[0])
    assert store.list("pki") == ["pki/master/minions_pre/web1"]


def test_master_keypair_create_if_absent(tmp_path):
    store = FsStore(tmp_path / "s")
    priv, pub = load_or_create_master_keypair(store, "pki/master")
    assert priv.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert pub.startswith(b"-----BEGIN PUBLIC KEY-----")
    mode = stat.S_IMODE(os.stat(tmp_path / "s" / "pki" / "master" / "master.pem").st_mode)
    assert mode == 0o600
    again = load_or_create_master_keypair(FsStore(tmp_path / "s"), "pki/master")
    assert again == (priv, pub)


def test_master_keypair_race_never_overwrites(tmp_path):
    results: list = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(load_or_create_master_keypair(FsStore(tmp_path / "s"), ""))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert (tmp_path / "s" / "master.pem").read_bytes() == results[0][0]


def test_master_pub_mismatch_is_rewritten_from_the_private_key(tmp_path, pubs):
    """master.pub is derived from master.pem: a different one is rewritten, never fatal."""
    store = FsStore(tmp_path / "s")
    priv, pub = load_or_create_master_keypair(store, "")
    store.put("master.pub", pubs[0].encode())
    assert load_or_create_master_keypair(store, "") == (priv, pub)
    assert normalize_pem(store.get("master.pub")) == normalize_pem(pub)


def test_open_key_registry(tmp_path, pubs):
    pki = tmp_path / "pki"
    reg = open_key_registry({"pki_dir": str(pki), "auto_accept": True})
    assert reg.authorize("web1", pubs[0]) is AuthDecision.ACCEPTED
    assert (pki / "minions" / "web1").exists()
    assert open_key_registry({"pki_dir": str(pki)}).accepted_ids() == ["web1"]


def test_public_pem_of_loads_a_private_key_once() -> None:
    """The identity check derives the public key every few seconds; loading (validating) an
    RSA private key takes ~0.1 s of CPU with the GIL held, so it must be done once per key."""
    from hamaster.pki_sync.keys import generate_keypair, public_pem_of

    priv, pub = generate_keypair(1024)
    public_pem_of.cache_clear()
    assert public_pem_of(priv) == public_pem_of(priv)
    info = public_pem_of.cache_info()
    assert (info.misses, info.hits) == (1, 1)

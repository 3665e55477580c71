"""Core behaviour with real processes: keys, targeting, commands, restarts, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import time

import msgpack
import pytest
import zmq

from hamaster import crypto
from hamaster.bus import codec, messages
from hamaster.bus.crypticle import Crypticle, CrypticleError, generate_key_string
from tests.integration.harness import BIN, Cluster
from tests.integration.spy import SpyMinion
from tests.kit import wait_until


def _accept_all(c: Cluster, ids: list[str]) -> None:
    wait_until(lambda: set(c.keys().get("minions_pre", [])) >= set(ids), 20, what="keys pending")
    c.run("hamaster-key", "-A", "-y", check=True)


def test_accept_keys_and_run_commands(cluster: Cluster) -> None:
    cluster.add_master()
    cluster.add_minion("web1", extra={"grains": {"role": "web", "tier": 1}})
    cluster.add_minion("db1", extra={"grains": {"role": "db", "tier": 2}})
    _accept_all(cluster, ["web1", "db1"])
    assert set(cluster.keys()["minions"]) == {"web1", "db1"}
    cluster.wait_all_answer(["web1", "db1"])

    # cmd.run with a non-zero exit: output shown, exit status non-zero
    res = cluster.run("hamaster", "web1", "cmd.run", "echo out-$((40+2)); exit 3")
    assert "out-42" in res.stdout
    assert res.returncode == 1
    res = cluster.run("hamaster", "web1", "cmd.run", "echo fine", check=True)
    assert "fine" in res.stdout

    # --out json --static: exactly one JSON object
    res = cluster.run("hamaster", "--out", "json", "--static", "*",
                      "test.echo", "hello", check=True)
    assert json.loads(res.stdout) == {"web1": "hello", "db1": "hello"}

    # keyword arguments travel as __kwarg__
    res = cluster.run("hamaster", "--out", "json", "--static", "db1", "test.arg", "1",
                      "two", "key=val", check=True)
    ret = json.loads(res.stdout)["db1"]
    assert ret["args"] == [1, "two"] and ret["kwargs"]["key"] == "val"

    # targeting: grain (grains arrive through _pillar), list, pcre, compound
    assert set(cluster.ping("role:web", extra=("-G",))) == {"web1"}
    assert set(cluster.ping("web1,db1", extra=("-L",))) == {"web1", "db1"}
    assert set(cluster.ping("^d.*", extra=("-E",))) == {"db1"}
    assert set(cluster.ping("G@role:db or web*", extra=("-C",))) == {"web1", "db1"}
    assert set(cluster.ping("G@tier:1 and not db*", extra=("-C",))) == {"web1"}

    # --async prints the jid; jobs.lookup_jid finds the returns
    res = cluster.run("hamaster", "--async", "*", "test.echo", "later", check=True)
    jid = res.stdout.strip().split()[-1]
    assert len(jid) == 20 and jid.isdigit()
    wait_until(
        lambda: json.loads(cluster.run("hamaster-run", "--out", "json", "jobs.lookup_jid", jid,
                                       check=True).stdout)
        == {"web1": "later", "db1": "later"},
        15, what="lookup_jid",
    )
    jobs = json.loads(
        cluster.run("hamaster-run", "--out", "json", "jobs.list_jobs", check=True).stdout)
    assert jid in jobs and jobs[jid]["Function"] == "test.echo"
    status = json.loads(
        cluster.run("hamaster-run", "--out", "json", "manage.status", check=True).stdout)
    assert status == {"up": ["db1", "web1"], "down": []}


def test_unanswered_minion_listed_and_exit_nonzero(cluster: Cluster) -> None:
    cluster.add_master()
    m = cluster.add_minion("m1")
    _accept_all(cluster, ["m1"])
    cluster.wait_all_answer(["m1"])
    m.stop()
    res = cluster.run("hamaster", "-t", "2", "*", "test.ping")
    assert "Minion did not return" in res.stdout
    assert res.returncode == 1


def test_pending_key_runs_nothing(cluster: Cluster) -> None:
    info = cluster.add_master()
    cluster.add_minion("pend1")
    wait_until(lambda: "pend1" in cluster.keys().get("minions_pre", []), 20, what="pending key")
    res = cluster.run("hamaster", "*", "test.ping")
    assert res.returncode == 2 and "No minions matched" in res.stderr
    spy = SpyMinion("127.0.0.1", info["conf"]["ret_port"], "spy-pending")
    try:
        assert spy.auth().status == "pending"
        # a pending minion has no session: any aes request it forges is refused
        fake = Crypticle(generate_key_string())
        body = messages.stamp_load(
            {"cmd": "_return", "jid": "20260101000000000000", "return": True}, "spy-pending",
            spy.tok, messages.new_nonce())
        reply = spy.roundtrip(messages.aes_request("spy-pending", fake, body))
        assert codec.loads(reply) == "bad load"
    finally:
        spy.close()


def test_rejected_and_denied_keys(cluster: Cluster) -> None:
    info = cluster.add_master()
    cluster.add_minion("r1")
    _accept_all(cluster, ["r1"])
    cluster.wait_all_answer(["r1"])
    # the same id with a different key is denied and stored under minions_denied
    spy = SpyMinion("127.0.0.1", info["conf"]["ret_port"], "r1")
    try:
        assert spy.auth().status == "rejected"
    finally:
        spy.close()
    assert "r1" in cluster.keys()["minions_denied"]
    assert cluster.ping("r1") == {"r1": True}  # the real r1 is unaffected
    cluster.run("hamaster-key", "-r", "r1", "-y", "--include-accepted", check=True)
    keys = cluster.keys()
    assert "r1" in keys["minions_rejected"] and "r1" not in keys["minions"]
    res = cluster.run("hamaster", "r1", "test.ping")
    assert res.returncode == 2


def test_deleted_key_cannot_decrypt_new_publications(cluster: Cluster) -> None:
    info = cluster.add_master({"auto_accept": True})
    cluster.add_minion("keep1")
    cluster.wait_all_answer(["keep1"])
    spy = SpyMinion("127.0.0.1", info["conf"]["ret_port"], "spy-del")
    try:
        res = wait_until(
            lambda: spy.auth() if spy.auth().status == "accepted" else None, 10,
            what="spy accepted")
        old_key = res.aes_key
        spy.subscribe(info["conf"]["publish_port"])
        # while accepted, the spy can read publications
        def readable() -> bool:
            cluster.run("hamaster", "keep1", "test.ping")
            frame = spy.next_publication(2)
            return frame is not None and messages.open_publication(
                frame, Crypticle(old_key),
                crypto.load_public_key(spy.master_pub_text))["fun"] == "test.ping"
        wait_until(readable, 20, interval=0.1, what="spy reads a publication")
        cluster.run("hamaster-key", "-d", "spy-del", "-y", check=True)
        # the master rotates its publish key; the next publication is unreadable with the old key
        def rotated() -> bool:
            cluster.run("hamaster", "keep1", "test.echo", "secret")
            frame = spy.next_publication(2)
            if frame is None:
                return False
            env = codec.loads(frame)
            try:
                Crypticle(old_key).loads(codec.to_bytes(env["load"]))
                return False
            except CrypticleError:
                return True
        wait_until(rotated, 20, interval=0.1, what="publish key rotation")
        # and its old session can make no request any more
        with pytest.raises(messages.BadLoadReply):
            spy.request({"cmd": "_minion_event", "tag": "x", "data": {}})
    finally:
        spy.close()
    assert cluster.ping("keep1") == {"keep1": True}


def test_minion_and_master_restart(cluster: Cluster) -> None:
    master = cluster.add_master()
    m1 = cluster.add_minion("a1")
    cluster.add_minion("a2")
    _accept_all(cluster, ["a1", "a2"])
    cluster.wait_all_answer(["a1", "a2"])
    m1.stop()
    m1.start()
    cluster.wait_all_answer(["a1", "a2"], timeout=30)
    master["proc"].kill()
    master["proc"].start()
    cluster.wait_master_ready(master)
    cluster.wait_all_answer(["a1", "a2"], timeout=30)


def test_master_survives_bad_input(cluster: Cluster) -> None:
    info = cluster.add_master({"auto_accept": True})
    cluster.add_minion("b1")
    cluster.wait_all_answer(["b1"])
    ctx = zmq.Context()
    ep = f"tcp://127.0.0.1:{info['conf']['ret_port']}"
    spy = SpyMinion("127.0.0.1", info["conf"]["ret_port"], "spy-bad")
    try:
        wait_until(lambda: spy.auth().status == "accepted", 10, what="spy accepted")
        frames = [
            b"",
            b"\x81",
            b"\xc1\xc1\xc1",
            os.urandom(200),
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"enc": "aes", "load": 5, "version": 3}),
            msgpack.packb({"enc": "clear", "load": "x", "version": 3}),
            msgpack.packb({"enc": "clear", "load": {"cmd": "_auth"}, "version": 3}),
            msgpack.packb({"enc": "clear",
                           "load": {"cmd": "publish", "fun": "cmd.run"}, "version": 3}),
            msgpack.packb({"enc": "aes", "load": b"x" * 100, "version": 3, "id": "b1"}),
            msgpack.packb({"enc": "aes", "load": b"x" * 100, "version": 2, "id": "b1"}),
            msgpack.packb({"enc": "weird", "load": {}, "version": 3}),
            msgpack.packb({"enc": "aes", "load": b"x" * 100, "version": "3", "id": "b1"}),
        ]
        for f in frames:
            reply = spy.roundtrip(f)
            assert codec.loads(reply) == "bad load", f
        # a truncated frame on a raw DEALER with extra frames is dropped, not fatal
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(ep)
        dealer.send_multipart([b"a", b"b", b"c"])
        dealer.close(0)
        # an oversized frame (> MAXMSGSIZE) is dropped by libzmq without harming the master
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(ep)
        big.send_multipart([b"", b"\x00" * (65 * 1024 * 1024)])
        big.close(0)
        # unknown command from an authenticated minion: a reply it can decrypt ({}), like Salt
        assert spy.request({"cmd": "_no_such_cmd"}) == {}
        # a replayed request (same nonce) is refused
        session = Crypticle(spy.result.session_key)
        body = messages.stamp_load({"cmd": "_minion_event", "tag": "x", "data": {}}, "spy-bad",
                                   spy.tok, messages.new_nonce())
        frame = messages.aes_request("spy-bad", session, body)
        first = spy.roundtrip(frame)
        assert messages.parse_aes_reply(first, session, body["nonce"]) is None
        assert codec.loads(spy.roundtrip(frame)) == "bad load"
        # a forged tok (signed by another key) is refused
        other = SpyMinion("127.0.0.1", info["conf"]["ret_port"], "spy-bad")
        body = messages.stamp_load({"cmd": "_minion_event", "tag": "x"}, "spy-bad",
                                   other.tok, messages.new_nonce())
        assert codec.loads(spy.roundtrip(messages.aes_request("spy-bad", session,
                                                              body))) == "bad load"
        other.close()
        # envelope id differing from the load id is refused
        body = messages.stamp_load({"cmd": "_minion_event", "tag": "x", "id": "b1"}, "b1",
                                   spy.tok, messages.new_nonce())
        assert codec.loads(spy.roundtrip(messages.aes_request("spy-bad", session,
                                                              body))) == "bad load"
    finally:
        spy.close()
        ctx.term()
    assert info["proc"].running()
    assert cluster.ping("b1") == {"b1": True}
    assert "refused request" in info["proc"].log_text()


def test_jobs_run_concurrently_and_filtering(cluster: Cluster) -> None:
    cluster.add_master({"auto_accept": True, "zmq_filtering": True})
    cluster.add_minion("z1", extra={"zmq_filtering": True})
    cluster.add_minion("z2", extra={"zmq_filtering": True})
    cluster.wait_all_answer(["z1", "z2"])
    # a long job does not block the minion's connection
    cluster.run("hamaster", "--async", "z1", "test.sleep", "6", check=True)
    t0 = time.monotonic()
    assert cluster.ping("z1") == {"z1": True}
    assert time.monotonic() - t0 < 4
    # with zmq_filtering a job for z2 is delivered to z2 only (topic = sha1 of its id)
    assert set(cluster.ping("z2", extra=("-L",))) == {"z2"}
    assert set(cluster.ping("*")) == {"z1", "z2"}


def test_master_finger_and_call(cluster: Cluster) -> None:
    cluster.add_master({"auto_accept": True})
    bad = cluster.add_minion("fing1", extra={"master_finger": "00:11:22:33"})
    good = cluster.add_minion("fing2")
    cluster.wait_all_answer(["fing2"])
    finger = cluster.run("hamaster-key", "-F", check=True).stdout
    wait_until(lambda: "master_finger" in bad.log_text(), 15, what="fingerprint refusal logged")
    assert cluster.ping("fing1", timeout=2).get("fing1") is not True
    # hamaster-call through the minion's master(s) (not --local): authenticates first
    conf = good.confdir
    res = subprocess.run([str(BIN / "hamaster-call"), "-c", str(conf), "test.echo", "via-master"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "via-master" in res.stdout, res.stderr
    res = subprocess.run(
        [str(BIN / "hamaster-call"), "-c", str(conf), "--local", "grains.get", "id"],
        capture_output=True, text=True, timeout=60)
    assert "fing2" in res.stdout
    assert finger.startswith("Local Keys:\nmaster.pub:")


def test_every_command_has_help() -> None:
    for cmd in ("hamaster-master", "hamaster-minion", "hamaster", "hamaster-key", "hamaster-run",
                "hamaster-call", "hamaster-cluster"):
        res = subprocess.run([str(BIN / cmd), "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, cmd
        assert "usage:" in res.stdout and len(res.stdout) > 200, cmd

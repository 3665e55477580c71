"""HA on the fs backend: several masters sharing one ha_dir, minions connected to all of them."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from tests.integration.harness import Cluster
from tests.kit import wait_until


def _ha_cluster(c: Cluster, n_masters: int = 2, extra: dict | None = None) -> Path:
    shared = c.base / "shared"
    shared.mkdir()
    for _ in range(n_masters):
        c.add_master({"ha_dir": str(shared), **(extra or {})})
    return shared


def _keys(c: Cluster, master: int) -> dict:
    return c.keys(master)


def test_key_accepted_on_a_works_on_b_and_reject_on_b_refuses_on_a(cluster: Cluster) -> None:
    _ha_cluster(cluster)
    cluster.add_minion("h1")
    cluster.add_minion("h2")
    wait_until(
        lambda: set(_keys(cluster, 0)["minions_pre"]) >= {"h1", "h2"}, 20, what="pending on A")
    assert set(_keys(cluster, 1)["minions_pre"]) >= {"h1", "h2"}  # same store, same view
    t0 = time.monotonic()
    cluster.run("hamaster-key", "-a", "h1", "-y", master=0, check=True)
    wait_until(lambda: cluster.ping("h1", master=1, timeout=2) == {"h1": True}, 20,
               interval=0.1, what="h1 via B")
    lag = time.monotonic() - t0
    assert lag < 10, lag
    cluster.run("hamaster-key", "-a", "h2", "-y", master=1, check=True)
    cluster.wait_all_answer(["h1", "h2"], master=0)
    cluster.wait_all_answer(["h1", "h2"], master=1)
    # reject on B: A refuses the minion as well
    cluster.run("hamaster-key", "-r", "h2", "-y", "--include-accepted", master=1, check=True)
    def refused_on_a() -> bool:
        res = cluster.run("hamaster", "-t", "2", "h2", "test.ping", master=0)
        return res.returncode == 2
    wait_until(refused_on_a, 10, what="h2 refused through A")
    assert "h2" in _keys(cluster, 0)["minions_rejected"]


def test_files_jobs_and_returns_shared(cluster: Cluster) -> None:
    shared = _ha_cluster(cluster, extra={"auto_accept": True})
    cluster.add_minion("f1")
    cluster.wait_all_answer(["f1"], master=0)
    cluster.wait_all_answer(["f1"], master=1)
    # a file added to the shared file_roots is served by B
    target = shared / "file_roots" / "base" / "dir"
    target.mkdir(parents=True)
    (target / "motd.txt").write_text("shared file\n")
    dest = cluster.base / "dest-motd.txt"
    res = cluster.run("hamaster", "--out", "json", "--static", "f1", "cp.get_file",
                      "salt://dir/motd.txt", str(dest), master=1, check=True)
    assert json.loads(res.stdout) == {"f1": str(dest)}
    assert dest.read_text() == "shared file\n"
    # traversal is refused
    res = cluster.run("hamaster", "--out", "json", "--static", "f1", "cp.get_file",
                      "salt://../../etc/passwd", str(cluster.base / "x"), master=1)
    assert json.loads(res.stdout)["f1"] in ("", False)
    assert not (cluster.base / "x").exists()
    # a job through A is looked up on B
    res = cluster.run("hamaster", "--async", "f1", "test.echo", "shared-job", master=0, check=True)
    jid = res.stdout.split()[-1]
    wait_until(
        lambda: json.loads(cluster.run("hamaster-run", "--out", "json", "jobs.lookup_jid", jid,
                                       master=1).stdout or "{}") == {"f1": "shared-job"},
        15, what="lookup on B",
    )
    jobs_a = json.loads(
        cluster.run("hamaster-run", "--out", "json", "jobs.list_jobs", master=0, check=True).stdout)
    jobs_b = json.loads(
        cluster.run("hamaster-run", "--out", "json", "jobs.list_jobs", master=1, check=True).stdout)
    assert jid in jobs_a and jid in jobs_b
    status = json.loads(
        cluster.run("hamaster-run", "--out", "json", "cluster.status", master=1, check=True).stdout)
    assert set(status["masters"]) == {"master0", "master1"}
    assert all(m["alive"] for m in status["masters"].values())
    assert status["drift"] == {"config": False, "fileroots": False, "master_key": False,
                               "pillar": False}


def test_origin_master_killed_mid_job_return_survives(cluster: Cluster) -> None:
    _ha_cluster(cluster, extra={"auto_accept": True})
    cluster.add_minion("k1")
    cluster.wait_all_answer(["k1"], master=0)
    cluster.wait_all_answer(["k1"], master=1)
    res = cluster.run("hamaster", "--async", "k1", "test.sleep", "3", master=0, check=True)
    jid = res.stdout.split()[-1]
    cluster.masters[0]["proc"].kill()
    wait_until(
        lambda: json.loads(cluster.run("hamaster-run", "--out", "json", "jobs.lookup_jid", jid,
                                       master=1).stdout or "{}") == {"k1": True},
        30, interval=0.25, what="return of the orphaned job on the survivor",
    )
    # and pings keep working through the survivor
    assert cluster.ping("k1", master=1) == {"k1": True}


def test_store_unreachable_masters_keep_serving(cluster: Cluster) -> None:
    shared = _ha_cluster(cluster, extra={"auto_accept": True})
    cluster.add_minion("s1")
    cluster.wait_all_answer(["s1"], master=0)
    cluster.wait_all_answer(["s1"], master=1)
    hidden = shared.with_name("shared-away")
    os.rename(shared, hidden)
    try:
        for i in (0, 1):
            assert cluster.ping("s1", master=i) == {"s1": True}
        def reports_down() -> bool:
            st = json.loads(cluster.run("hamaster-run", "--out", "json", "cluster.status",
                                        master=0).stdout or "{}")
            return st.get("store_ok") is False
        wait_until(reports_down, 15, what="store reported down")
    finally:
        os.rename(hidden, shared)
    assert cluster.ping("s1", master=0) == {"s1": True}
    assert cluster.masters[0]["proc"].running() and cluster.masters[1]["proc"].running()


def test_concurrent_accepts_on_two_masters(cluster: Cluster) -> None:
    _ha_cluster(cluster)
    ids = ["c1", "c2"]
    for i in ids:
        cluster.add_minion(i)
    wait_until(lambda: set(_keys(cluster, 0)["minions_pre"]) >= set(ids), 20, what="pending")
    results = {}
    def accept(mid: str, master: int) -> None:
        results[mid] = cluster.run("hamaster-key", "-a", mid, "-y", master=master).returncode
    threads = [threading.Thread(target=accept, args=("c1", 0)),
               threading.Thread(target=accept, args=("c2", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"c1": 0, "c2": 0}
    assert set(_keys(cluster, 0)["minions"]) == {"c1", "c2"}
    cluster.wait_all_answer(ids, master=0)
    cluster.wait_all_answer(ids, master=1)


def test_corrupted_store_entries_are_skipped(cluster: Cluster) -> None:
    shared = _ha_cluster(cluster, extra={"auto_accept": False})
    cluster.add_minion("ok1")
    wait_until(lambda: "ok1" in _keys(cluster, 0)["minions_pre"], 20, what="pending")
    cluster.run("hamaster-key", "-a", "ok1", "-y", check=True)
    cluster.wait_all_answer(["ok1"], master=1)
    accepted = shared / "pki" / "master" / "minions"
    (accepted / "evil").write_text("this is not a key")
    (accepted / ".tmp-halfwritten").write_text("-----BEGIN PUBLIC KEY-----\nMIIB")
    (shared / "jobs" / "20200101000000000000").mkdir(parents=True, exist_ok=True)
    (shared / "jobs" / "20200101000000000000" / "load").write_bytes(b"\xc1garbage")
    # masters keep running and serving; the bogus key authenticates nobody
    assert cluster.ping("ok1", master=0) == {"ok1": True}
    assert cluster.ping("ok1", master=1) == {"ok1": True}
    assert cluster.run("hamaster-run", "--out", "json", "jobs.list_jobs", master=1).returncode == 0
    res = cluster.run("hamaster", "-t", "2", "evil", "test.ping", master=0)
    assert "True" not in res.stdout
    assert all(m["proc"].running() for m in cluster.masters)


def test_same_jid_from_two_masters_runs_once(cluster: Cluster) -> None:
    from hamaster.jobs.jid import gen_jid
    from hamaster.localapi import LocalClient

    _ha_cluster(cluster, extra={"auto_accept": True})
    cluster.add_minion("once1")
    cluster.wait_all_answer(["once1"], master=0)
    cluster.wait_all_answer(["once1"], master=1)
    marker = cluster.base / "ran.txt"
    jid = gen_jid()
    for i in (0, 1):
        sock_dir = str(Path(cluster.masters[i]["conf"]["root_dir"]) / "var/run/hamaster/master")
        with LocalClient(sock_dir) as c:
            c.send({"cmd": "publish", "tgt": "once1", "fun": "cmd.run",
                    "arg": [f"echo run >> {marker}"], "jid": jid, "timeout": 5})
            assert c.recv()["jid"] == jid
            for _ in c.stream():
                pass
    wait_until(marker.exists, 10, what="job ran")
    assert marker.read_text().count("run") == 1


def test_frozen_master_detected_and_survivor_serves(cluster: Cluster) -> None:
    import signal as sig

    _ha_cluster(cluster, extra={"auto_accept": True})
    m = cluster.add_minion("fz1",
                           extra={"master_heartbeat_interval": 1.0, "master_dead_after": 6.0})
    cluster.wait_all_answer(["fz1"], master=0)
    cluster.wait_all_answer(["fz1"], master=1)
    victim = cluster.masters[0]
    t0 = time.monotonic()
    victim["proc"].signal(sig.SIGSTOP)
    try:
        # pings through the survivor keep working while the other master is frozen
        for _ in range(3):
            assert cluster.ping("fz1", master=1) == {"fz1": True}
        port = victim["conf"]["ret_port"]
        wait_until(lambda: f"127.0.0.1:{port} stopped answering" in m.log_text(), 15,
                   what="frozen master noticed")
        assert time.monotonic() - t0 <= 10.5
    finally:
        victim["proc"].signal(sig.SIGCONT)
    cluster.wait_all_answer(["fz1"], master=0, timeout=20)


def test_failover_master_type(cluster: Cluster) -> None:
    _ha_cluster(cluster, extra={"auto_accept": True})
    cluster.add_minion("fo1", extra={"master_type": "failover", "master_alive_interval": 1})
    cluster.wait_all_answer(["fo1"], master=0)
    # one master at a time: the second does not see it
    assert cluster.ping("fo1", master=1, timeout=2).get("fo1") is not True
    cluster.masters[0]["proc"].kill()
    cluster.wait_all_answer(["fo1"], master=1, timeout=30)


def test_shared_config_fragment_and_drift(cluster: Cluster) -> None:
    shared = cluster.base / "shared"
    (shared / "config" / "master.d").mkdir(parents=True)
    (shared / "config" / "master.d" / "10-accept.conf").write_text(
        "auto_accept: true\npublish_port: 1\n")
    cluster.add_master({"ha_dir": str(shared)})
    cluster.add_master({"ha_dir": str(shared)})
    # the fragment applies to both masters: the minion is accepted with no operator action
    cluster.add_minion("cf1")
    cluster.wait_all_answer(["cf1"], master=0)
    cluster.wait_all_answer(["cf1"], master=1)
    assert "per-host option 'publish_port'" in cluster.masters[0]["proc"].log_text()
    def status() -> dict:
        return json.loads(cluster.run("hamaster-run", "--out", "json", "cluster.status",
                                      master=0).stdout or "{}")
    wait_until(
        lambda: len([m for m in status().get("masters", {}).values() if m.get("alive")]) == 2, 15,
        what="2 masters alive")
    assert status()["drift"]["config"] is False
    # a third master with a different local setting shows up as config drift
    cluster.add_master({"ha_dir": str(shared), "keep_jobs": 1})
    wait_until(lambda: status().get("drift", {}).get("config") is True, 15,
               what="config drift shown")

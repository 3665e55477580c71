"""Issue #18 with real masters: ids, jids, refusal logs and local directories.

- an id within 255 characters but over 255 UTF-8 bytes is refused at ``_auth``; the shared fs
  store stays up (it used to go "unavailable": ERROR lines, ``hamaster_store_up`` 0, resyncs);
- a ``_return`` with jid ``00000000000000000000`` is dropped, and such an entry planted in the
  job cache no longer stops old jobs from expiring;
- a flood of ``_auth`` with new, long ids full of newlines and escape sequences leaves a few
  escaped, bounded lines in the log;
- a master whose ``sock_dir`` belongs to another user refuses to start, naming the path.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import urllib.request
from pathlib import Path

import msgpack
import pytest

from hamaster.bus import codec, messages
from tests.integration.harness import BIN, Cluster
from tests.integration.spy import SpyMinion
from tests.kit import free_port, wait_until


def _metrics(port: int) -> str:
    """The master's /metrics text, or "" while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()
    except OSError:  # URLError included: not listening yet
        return ""


def _store_up(port: int) -> float | None:
    for line in _metrics(port).splitlines():
        if line.startswith("hamaster_store_up{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_long_byte_id_is_refused_and_the_store_stays_up(cluster: Cluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    port = free_port()
    m = cluster.add_master({"ha_dir": str(shared), "metrics_port": port, "auto_accept": True})
    wait_until(lambda: _store_up(port) == 1, 10, what="store up")
    ret_port = m["conf"]["ret_port"]
    long_id = "é" * 200  # 200 characters, 400 bytes: over a file name's 255 bytes
    spies = [SpyMinion("127.0.0.1", ret_port, long_id, keysize=2048)]
    try:
        for _ in range(5):
            assert spies[0].auth().status == "rejected"
        good = SpyMinion("127.0.0.1", ret_port, "good1")
        spies.append(good)
        assert good.auth().status == "accepted"  # the store took the new key at once
        for _ in range(3):  # the metric is refreshed every 2 s: look over a few refreshes
            assert _store_up(port) == 1
        wait_until(lambda: "invalid_id" in _metrics(port), 10, what="metric")
    finally:
        for s in spies:
            s.close()
    log = m["proc"].log_text()
    assert "unavailable" not in log and "[ERROR]" not in log, log[-3000:]
    assert [p.name for p in (shared / "pki" / "master").rglob("*") if "é" in p.name] == []


def test_poisoned_jid_is_dropped_and_expiry_still_runs(cluster: Cluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    jobs = shared / "jobs"
    old = (datetime.datetime.now() - datetime.timedelta(hours=48)).strftime("%Y%m%d%H%M%S%f")
    for jid in ("00000000000000000000", old):  # planted before start (an older master wrote it)
        (jobs / jid / "returns").mkdir(parents=True)
        (jobs / jid / "returns" / "web1").write_bytes(msgpack.packb({"return": True}))
    (jobs / old / "load").write_bytes(msgpack.packb({"fun": "test.ping"}))
    m = cluster.add_master({"ha_dir": str(shared), "keep_jobs": 24, "auto_accept": True})
    wait_until(lambda: not (jobs / old).exists(), 20, what="the old job expired")
    log = m["proc"].log_text()
    assert log.count("skipping jobs/00000000000000000000 in expiry") == 1, log[-3000:]
    assert "job cache cleanup failed" not in log
    spy = SpyMinion("127.0.0.1", m["conf"]["ret_port"], "ret1")
    try:
        assert spy.auth().status == "accepted"
        for jid in ("00000000000000000000", "20261399123456123456", "٠" * 20):
            assert spy.request({"cmd": "_return", "jid": jid, "fun": "test.ping", "return": True,
                                "retcode": 0, "success": True}) in (None, {}, True, False)
        # a well-formed return right after is stored: the writer was not poisoned either
        good = datetime.datetime.now().strftime("%Y%m%d%H%M%S%f")
        spy.request({"cmd": "_return", "jid": good, "fun": "test.ping", "return": True})
        wait_until(lambda: (jobs / good / "returns" / "ret1").exists(), 10, what="good return")
    finally:
        spy.close()
    assert sorted(p.name for p in jobs.iterdir()) == ["00000000000000000000", good]
    assert "dropped" in m["proc"].log_text()


def test_a_flood_of_hostile_ids_leaves_few_escaped_lines(cluster: Cluster) -> None:
    m = cluster.add_master()
    ret_port = m["conf"]["ret_port"]
    before = len(m["proc"].log_text())
    spy = SpyMinion("127.0.0.1", ret_port, "x")
    try:
        for i in range(150):
            forged = "\n2026-12-06 00:00:00,000 [hamaster][CRITICAL] FORGED\x1b[2J"
            mid = f"evil{i}{forged}" + "A" * 30000
            frame, _ = messages.auth_request(mid, spy.pub_text, messages.new_nonce(), None)
            reply = codec.loads(spy.roundtrip(frame))
            assert isinstance(reply, dict)  # a (signed) refusal, not a crash
        spy.minion_id = "after-flood"
        assert spy.auth().status == "pending"  # the master still serves
    finally:
        spy.close()
    grown = m["proc"].log_text()[before:]
    assert len(grown) < 40_000, len(grown)
    assert "\x1b" not in grown
    assert not [ln for ln in grown.splitlines() if "FORGED" in ln and not ln.startswith("20")]
    assert not [ln for ln in grown.splitlines() if ln.startswith("2026-12-06 00:00:00,000")]
    assert "refused _auth" in grown


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give sock_dir to another user")
def test_master_refuses_a_sock_dir_another_user_owns(cluster: Cluster) -> None:
    sock_dir = cluster.base / "master0" / "root" / "sock"  # under root_dir: not re-rooted
    sock_dir.mkdir(mode=0o700, parents=True)
    os.chown(sock_dir, 65534, 65534)
    m = cluster.add_master({"sock_dir": str(sock_dir)}, start=False)
    res = subprocess.run([str(BIN / "hamaster-master"), "-c", str(m["confdir"])],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"sock_dir {sock_dir} is owned by nobody" in res.stderr, res.stderr
    assert not (sock_dir / "master.sock").exists()
    os.chown(sock_dir, 0, 0)  # the fix the message names: the master then starts
    m["proc"].start()
    cluster.wait_master_ready(m)


def test_minion_with_an_invalid_id_refuses_to_start(cluster: Cluster) -> None:
    cluster.add_master()
    proc = cluster.add_minion("web..1", start=False)
    res = subprocess.run(proc.argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "minion id web..1 contains '..'" in res.stderr and "set a valid `id`" in res.stderr

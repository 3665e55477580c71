"""A key change is in force on every live master when ``hamaster-key`` returns (issue #10).

Two masters on each backend (fs, etcd, rsync), the default watch poll (0.5 s), two hamaster
minions listing both masters. Many rounds of: accept n1, n1 answers through both masters,
``hamaster-key -d n1 -y`` returns 0, then at once ``test.echo`` through each master: n1 is not
targeted and never runs it (its log is checked: it could not even decrypt the publication),
n2 answers. Then: a frozen master is named and the command exits 3 within its bounded wait; a
stopped or dead master is not waited on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.integration.harness import Cluster
from tests.integration.services import etcd_server, rsync_daemon
from tests.kit import wait_until

POLL = 0.5          # the default ha_poll_interval: the window the barrier closes
ROUNDS = {"fs": 12, "etcd": 12, "rsync": 8}


def _start_masters(c: Cluster, stack: ExitStack, backend: str, extra: dict | None = None) -> None:
    """Two masters on ``backend``; services are stopped by ``stack`` after the cluster."""
    base = {"ha_poll_interval": POLL, **(extra or {})}
    if backend == "fs":
        shared = c.base / "shared"
        shared.mkdir()
        for _ in range(2):
            c.add_master({**base, "ha_dir": str(shared)})
    elif backend == "etcd":
        etcd = stack.enter_context(etcd_server())
        for _ in range(2):
            c.add_master({**base, "ha_backend": "etcd", "ha_etcd_endpoints": etcd.endpoints,
                          "ha_etcd_prefix": "/hm-keyack"})
    else:
        trees = [c.base / "ha0", c.base / "ha1"]
        daemons = [stack.enter_context(rsync_daemon(t)) for t in trees]
        for i in range(2):
            peer = daemons[1 - i]
            c.add_master({**base, "ha_backend": "rsync", "ha_dir": str(trees[i]),
                          "ha_rsync_peers": [peer.url],
                          "ha_rsync_password_file": str(peer.password_file)}, start=False)
        # Both start together: on rsync the masters agree on one keypair before serving
        # (docs/architecture.md, "One cluster identity").
        for m in c.masters:
            m["proc"].start()
        for m in c.masters:
            c.wait_master_ready(m)


@pytest.fixture
def stack(cluster: Cluster) -> Iterator[ExitStack]:
    """Backing services, stopped after the cluster's processes (fixture order)."""
    with ExitStack() as st:
        yield st
        for p in reversed(cluster.procs):   # masters and minions first, then etcd / rsyncd
            p.stop()


def _key_run(c: Cluster, *args: str, master: int = 0) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = c.run("hamaster-key", *args, master=master, timeout=60)
    return res, time.monotonic() - t0


def _echo(c: Cluster, token: str, master: int) -> dict:
    res = c.run("hamaster", "-t", "5", "--out", "json", "--static", "*", "test.echo", token,
                master=master)
    try:
        return json.loads(res.stdout) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        return {"_unparsed": res.stdout + res.stderr}


def _answers_both(c: Cluster, ids: set[str]) -> Callable[[], bool]:
    def check() -> bool:
        return all({k for k, v in c.ping(master=i, timeout=3).items() if v is True} >= ids
                   for i in (0, 1))
    return check


def _accept(c: Cluster, mid: str, master: int = 0) -> float:
    wait_until(lambda: mid in c.keys(master)["minions_pre"], 20, 0.1, f"{mid} pending")
    res, took = _key_run(c, "-a", mid, "-y", master=master)
    assert res.returncode == 0, res.stdout + res.stderr
    return took


@pytest.mark.parametrize("backend", ["fs", "etcd", "rsync"])
def test_deleted_minion_never_answers_after_the_command_returns(cluster: Cluster, stack: ExitStack,
                                                                backend: str) -> None:
    _start_masters(cluster, stack, backend)
    n1 = cluster.add_minion("n1")
    cluster.add_minion("n2")
    _accept(cluster, "n2")
    delete_s: list[float] = []
    accept_s: list[float] = []
    for r in range(ROUNDS[backend]):
        accept_s.append(_accept(cluster, "n1", master=r % 2))
        # Through both masters at once after the accept returned (the accept is confirmed
        # too; n1 itself still has to authenticate, so this waits for it).
        wait_until(_answers_both(cluster, {"n1", "n2"}), 20, 0.1, f"round {r}: n1, n2 answer")
        res, took = _key_run(cluster, "-d", "n1", "-y", master=r % 2)
        assert res.returncode == 0, res.stdout + res.stderr
        delete_s.append(took)
        for i in (r % 2, 1 - r % 2):
            token = f"after-delete-{r}-via-{i}"
            got = _echo(cluster, token, master=i)
            assert got == {"n2": token}, (r, i, got)
    ran = [ln for ln in n1.log_text().splitlines() if "running test.echo" in ln]
    assert ran == [], ran     # n1 never read a publication sent after its key was deleted
    print(json.dumps({"backend": backend, "rounds": len(delete_s),
                      "delete_s": {"min": round(min(delete_s), 3),
                                   "median": round(sorted(delete_s)[len(delete_s) // 2], 3),
                                   "max": round(max(delete_s), 3)},
                      "accept_s_median": round(sorted(accept_s)[len(accept_s) // 2], 3)}))


def test_frozen_master_is_named_and_stopped_or_dead_masters_are_not_waited_on(
        cluster: Cluster, stack: ExitStack) -> None:
    _start_masters(cluster, stack, "fs", {"ha_member_ttl": 2.0})
    cluster.add_minion("n1")
    _accept(cluster, "n1")
    wait_until(_answers_both(cluster, {"n1"}), 20, 0.1, "n1 answers through both")
    m1 = cluster.masters[1]["proc"]
    # Frozen: still "live" by its heartbeat, but it cannot confirm.
    os.killpg(m1.pid, signal.SIGSTOP)
    try:
        res, took = _key_run(cluster, "-d", "n1", "-y", "--wait-timeout", "1.5")
    finally:
        os.killpg(m1.pid, signal.SIGCONT)
    assert res.returncode == 3, res.stdout + res.stderr
    error = [ln for ln in res.stderr.splitlines() if ln.startswith("hamaster-key: error:")]
    assert len(error) == 1 and "master1: no confirmation within 1.5 s" in error[0], res.stderr
    assert "master0" not in error[0], error
    assert "Key for minion n1 deleted." in res.stdout
    assert 1.5 <= took < 5.0, took
    assert "n1" not in cluster.keys(0)["minions"]            # the change stays made
    # Thawed, master1 applies it from the store: accept n1 again, confirmed by both.
    _accept(cluster, "n1")
    wait_until(_answers_both(cluster, {"n1"}), 20, 0.1, "n1 answers through both again")
    # Stopped gracefully: its record says so at once; not waited on.
    m1.stop()
    res, took = _key_run(cluster, "-d", "n1", "-y", "--log-level", "info")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "not waiting for master master1: stopped" in res.stderr, res.stderr
    assert took < 5.0, took
    # Dead (SIGKILL): waited on only until its heartbeat is older than its ttl (2 s here).
    m1.start()
    cluster.wait_master_ready(cluster.masters[1])
    _accept(cluster, "n1")
    m1.kill()

    def dead() -> bool:
        st = json.loads(cluster.run("hamaster-run", "--out", "json", "cluster.status").stdout)
        return st["masters"]["master1"]["alive"] is False
    wait_until(dead, 15, 0.2, "master1 seen dead")
    res, took = _key_run(cluster, "-d", "n1", "-y")
    assert res.returncode == 0, res.stdout + res.stderr
    assert took < 5.0, took


def test_single_master_applies_the_change_before_the_command_returns(cluster: Cluster) -> None:
    """One master (no shared store): hamaster-key asks it over the CLI socket to apply the
    change, so the removed minion never answers a publication sent after the command returns
    (the master's own poll used to be the only way it learnt of the change)."""
    cluster.add_master({"ha_poll_interval": 2.0})   # a slow poll: only the socket call helps
    cluster.add_minion("s1")
    cluster.add_minion("s2")
    _accept(cluster, "s2")
    for r in range(5):
        _accept(cluster, "s1")
        cluster.wait_all_answer(["s1", "s2"])
        res, took = _key_run(cluster, "-d", "s1", "-y", "--log-level", "info")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "key change in force on the local master" in res.stderr, res.stderr
        assert took < 3.0, took
        token = f"single-{r}"
        assert _echo(cluster, token, 0) == {"s2": token}, r
    # no master running: the change is stored and the command does not wait
    cluster.masters[0]["proc"].stop()
    _key_run(cluster, "-a", "s1", "-y")  # s1 may not be pending: only the exit code matters
    res, took = _key_run(cluster, "-d", "s2", "-y")
    assert res.returncode == 0 and took < 3.0, res.stdout + res.stderr


def test_rsync_cli_on_a_host_whose_master_is_down_pushes_its_tree(cluster: Cluster,
                                                                   stack: ExitStack) -> None:
    """rsync: nothing on master0's host pushes its tree while master0 is stopped; the CLI run
    there pushes the change and the request itself, and master1 confirms."""
    _start_masters(cluster, stack, "rsync")
    cluster.add_minion("n1")
    _accept(cluster, "n1")
    wait_until(_answers_both(cluster, {"n1"}), 20, 0.1, "n1 answers through both")
    cluster.masters[0]["proc"].stop()
    res, took = _key_run(cluster, "-d", "n1", "-y", "--log-level", "info", master=0)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "not waiting for master master0: stopped" in res.stderr, res.stderr
    assert "key change in force on master1" in res.stderr, res.stderr
    assert "n1" not in cluster.keys(1)["minions"]
    assert took < 5.0, took

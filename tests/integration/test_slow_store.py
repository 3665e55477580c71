"""A store that stops answering never stalls the master's request loop.

A real single-node etcd is frozen with SIGSTOP (requests to it hang, as with an overloaded or
partitioned etcd, until ``ha_etcd_timeout``). While it is frozen a new minion asks to
authenticate — deciding its key needs the store — and another minion asks for a file (file_roots
live in etcd too); both accepted minions must keep answering pings through the same master the whole
time.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import Cluster
from tests.integration.services import EtcdCluster, etcd_server
from tests.kit import wait_until

STORE_TIMEOUT = 5.0


@pytest.fixture()
def etcd() -> Iterator[EtcdCluster]:
    with etcd_server() as srv:
        yield srv


def test_new_minion_auth_on_a_frozen_store_does_not_stall_pings(etcd: EtcdCluster,
                                                                cluster: Cluster) -> None:
    # etcd first: set up before the masters and torn down after they have stopped.
    cluster.add_master({"ha_backend": "etcd", "ha_etcd_endpoints": etcd.endpoints,
                        "ha_etcd_prefix": "/hm-slow",
                        "ha_etcd_timeout": STORE_TIMEOUT, "auto_accept": True})
    cluster.add_minion("steady")
    cluster.add_minion("reader")
    cluster.wait_all_answer(["steady", "reader"])
    member = etcd.members[0]
    assert member.proc is not None
    os.kill(member.proc.pid, signal.SIGSTOP)
    try:
        # Its _auth reaches the master within a second, before anything has noticed the frozen
        # store; deciding it waits on the store for up to STORE_TIMEOUT.
        newcomer = cluster.add_minion("newcomer")
        # And another minion asks for a file: with file_roots in etcd that read hangs too. Its
        # own ping returns must not queue behind that request (the minion keeps several
        # request sockets per master).
        res = cluster.run("hamaster", "--async", "reader", "cp.hash_file",
                          "salt://top.sls", check=True)
        assert res.stdout.strip()
        results: list[tuple[float, bool]] = []
        t0 = time.monotonic()
        for _ in range(60):  # bounded: pings for about one store timeout
            if time.monotonic() - t0 > STORE_TIMEOUT + 1:
                break
            started = time.monotonic()
            got = cluster.ping("steady,reader", timeout=3, extra=("-L",))
            results.append((round(started - t0, 2),
                            got.get("steady") is True and got.get("reader") is True))
        failed = [t for t, ok in results if not ok]
        assert len(results) >= 3 and not failed, f"pings failed at {failed} s (of {len(results)})"
        # The newcomer's decision did hit the frozen store (then fell back to memory: pending).
        wait_until(lambda: ("auth of newcomer decided from memory"
                            in cluster.masters[0]["proc"].log_text()),
                   STORE_TIMEOUT + 10, 0.2,
                   what="the newcomer's key decision to give up on the store")
    finally:
        os.kill(member.proc.pid, signal.SIGCONT)
    # Once the store answers again the newcomer is accepted (auto_accept) and answers too.
    cluster.wait_all_answer(["steady", "reader", "newcomer"], timeout=60)
    assert newcomer.running()

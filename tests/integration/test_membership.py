"""Cluster membership seen through ``cluster.status`` on real masters (master/membership.py).

Two masters on fs and on etcd, ``ha_member_ttl: 2``: both list each other alive with their
records; a graceful stop is not alive at once (before the ttl); a SIGKILLed master turns not
alive once its presence expires (on etcd: etcd expires its lease, the leased key is gone) and
stays listed with its last-seen age; restarted, it is alive again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.integration.harness import Cluster
from tests.integration.services import etcd_server
from tests.kit import wait_until

TTL = 2.0


@pytest.fixture
def stack(cluster: Cluster) -> Iterator[ExitStack]:
    """Backing services, stopped after the cluster's processes."""
    with ExitStack() as st:
        yield st
        for p in reversed(cluster.procs):
            p.stop()


def _status(c: Cluster, master: int = 0) -> dict[str, Any]:
    res = c.run("hamaster-run", "--out", "json", "cluster.status", master=master, timeout=30)
    return json.loads(res.stdout) if res.stdout.strip() else {}


def _alive(c: Cluster, master: int = 0) -> dict[str, bool]:
    return {mid: bool(rec.get("alive"))
            for mid, rec in _status(c, master).get("masters", {}).items()
            if not mid.startswith("_")}


@pytest.mark.parametrize("backend", ["fs", "etcd"])
def test_alive_stopped_killed_and_back(cluster: Cluster, stack: ExitStack, backend: str) -> None:
    base: dict[str, Any] = {"ha_member_ttl": TTL}
    etcd = None
    if backend == "fs":
        shared = cluster.base / "shared"
        shared.mkdir()
        base["ha_dir"] = str(shared)
    else:
        etcd = stack.enter_context(etcd_server())
        base.update(ha_backend="etcd", ha_etcd_endpoints=etcd.endpoints,
                    ha_etcd_prefix="/hm-membership")
    for _ in range(2):
        cluster.add_master(dict(base))
    both = {"master0": True, "master1": True}
    wait_until(lambda: _alive(cluster, 0) == both and _alive(cluster, 1) == both, 20, 0.2,
               "both masters alive on both")
    rec = _status(cluster, 0)["masters"]["master1"]
    assert rec["ttl"] == TTL and rec["state"] == "serving" and rec["master_id"] == "master1"
    assert rec["address"].endswith(f":{cluster.masters[1]['conf']['ret_port']}")

    m1 = cluster.masters[1]["proc"]
    m1.stop()                                  # graceful: not alive at once, well before the ttl
    t0 = time.monotonic()
    assert _alive(cluster, 0) == {"master0": True, "master1": False}
    assert _status(cluster, 0)["masters"]["master1"].get("stopped") is True
    assert time.monotonic() - t0 < TTL

    m1.start()
    cluster.wait_master_ready(cluster.masters[1])
    wait_until(lambda: _alive(cluster, 0) == both, 20, 0.2, "master1 alive again")

    m1.kill()
    killed = time.monotonic()
    wait_until(lambda: _alive(cluster, 0) == {"master0": True, "master1": False}, TTL + 8, 0.2,
               "master1 seen dead after its ttl")
    assert time.monotonic() - killed >= TTL - 1.0   # not before its presence could expire
    rec = _status(cluster, 0)["masters"]["master1"]
    assert not rec.get("stopped") and rec["last_seen_s"] >= TTL - 1.0
    if etcd is not None:                       # the presence was a leased key, gone with it
        from hamaster.store.etcd import EtcdStore

        store = EtcdStore(etcd.endpoints, prefix="/hm-membership", timeout=2.0)
        try:
            assert set(store.members()) == {"master0"}
        finally:
            store.close()

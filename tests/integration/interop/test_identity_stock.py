"""A stock salt-minion 3008.5 and the cluster's one master key (issue 10).

* Three hamaster masters on the rsync backend (127.0.0.1-3, same ports, as three hosts), started
  together on empty trees: a multi-master stock minion pins the one key the masters agreed on and
  answers through each, also after a restart.
* Two unrelated masters with different keys: after a restart the stock minion trusts only the
  key in its ``minion_master.pub`` and refuses the other master with Salt's own error (what
  docs/security.md says a stock minion does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hamaster import crypto
from hamaster.pki_sync.keys import public_pem_of
from tests.integration.harness import Cluster
from tests.integration.identitykit import backend_confs, start_masters, wait_one_key
from tests.integration.interop.test_interop import (
    free_ports_on,
    salt_bin,
    stock_minion_config,
    wait_answers,
)
from tests.integration.services import need_binary
from tests.kit import wait_until

try:
    from tests.integration.interop import saltenv
except ImportError:  # rootdir not on sys.path
    import saltenv  # type: ignore[no-redef]

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]
VERSION = "3008.5"
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def _stock(c: Cluster, mid: str, masters: list[dict], pub: int) -> Any:
    addrs = [f"{m['host']}:{m['conf']['ret_port']}" for m in masters]
    return saltenv.SaltMinionProc(salt_bin(VERSION), c.base / f"s-{mid}", mid, addrs,
                                  extra=stock_minion_config(VERSION, pub))


def test_stock_minion_pins_the_key_three_rsync_masters_agreed_on(cluster: Cluster) -> None:
    need_binary("rsync")
    salt_bin(VERSION)
    pub, ret = free_ports_on(2, HOSTS)
    with backend_confs("rsync", cluster, 3) as confs:
        start_masters(cluster, [{**c, "publish_port": pub, "ret_port": ret} for c in confs],
                      0.0, hosts=HOSTS)
        finger, _ = wait_one_key(cluster)
        for m in cluster.masters:
            cluster.wait_master_ready(m, timeout=60)
        mn = _stock(cluster, "stock-ident", cluster.masters, pub)
        try:
            mn.start()
            for i in range(3):
                wait_answers(cluster, [mn.minion_id], master=i, timeout=90)
            pinned = (mn.pki_dir / "minion_master.pub").read_text()
            assert crypto.pem_fingerprint(pinned) == finger
            mn.stop(timeout=5)
            mn.start()
            for i in range(3):
                wait_answers(cluster, [mn.minion_id], master=i, timeout=90)
            assert "The master key has changed" not in mn.log_text()
        finally:
            mn.stop(timeout=5)


def test_stock_minion_refuses_a_master_with_another_key_after_restart(cluster: Cluster) -> None:
    salt_bin(VERSION)
    pub, ret = free_ports_on(2, HOSTS[:2])
    for host in HOSTS[:2]:
        cluster.add_master({"auto_accept": True, "publish_port": pub, "ret_port": ret},
                           host=host)
    pems = [Path(m["conf"]["root_dir"]) / "etc/hamaster/pki/master/master.pem"
            for m in cluster.masters]
    pems = [p if p.exists() else next(Path(m["conf"]["root_dir"]).rglob("master.pem"))
            for p, m in zip(pems, cluster.masters, strict=True)]
    fingers = [crypto.pem_fingerprint(public_pem_of(p.read_bytes())) for p in pems]
    assert fingers[0] != fingers[1]
    mn = _stock(cluster, "stock-two", cluster.masters, pub)
    try:
        mn.start()
        wait_until(lambda: (mn.pki_dir / "minion_master.pub").exists(), 60, 0.2,
                   "minion_master.pub written")
        mn.stop(timeout=5)
        trusted = fingers.index(crypto.pem_fingerprint(
            (mn.pki_dir / "minion_master.pub").read_text()))
        mn.start()
        wait_answers(cluster, [mn.minion_id], master=trusted, timeout=90)
        wait_until(lambda: "The master key has changed" in mn.log_text(), 90, 0.5,
                   "Salt's refusal of the other master")
        assert "public key did not authenticate" in mn.log_text()
    finally:
        mn.stop(timeout=5)

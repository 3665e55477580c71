"""Stock salt-minions in an auth storm against hamaster masters that shed (issue 12).

20 multi-master salt-minions (the newest Salt release whose venv builds) and 100 hamaster swarm
identities start at once against two hamaster masters (127.0.0.1 and 127.0.0.2, one ``ha_dir``,
``auto_accept``) whose auth queues hold only 3 requests, so many ``_auth`` requests of the first
wave are dropped unanswered. A stock minion treats that as a timed-out ``_auth`` and retries after
``acceptance_wait_time``: every one must still end up answering through both masters, with the
shedding counted in ``hamaster_auth_shed_total``.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import pytest

from tests.integration.harness import Cluster, free_port
from tests.integration.interop.test_interop import (
    SALT_VERSIONS,
    available_bins,
    free_ports_on,
    stock_minion_config,
    stop_all,
    wait_answers,
)
from tests.integration.stormkit import start_swarm

try:
    from tests.integration.interop import saltenv
except ImportError:  # rootdir not on sys.path
    import saltenv  # type: ignore[no-redef]

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

N_STOCK = 20


def _shed(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r"^hamaster_auth_shed_total\{[^}]*\} ([0-9.e+]+)$",
                                               text, re.M))


def test_twenty_stock_minions_converge_through_shedding_masters() -> None:
    bins = available_bins(SALT_VERSIONS)
    if not bins:
        pytest.skip(f"no Salt venv could be built for {SALT_VERSIONS}")
    version = max(bins, key=lambda v: tuple(int(x) for x in v.split(".")))
    c = Cluster.create()
    stock: list[Any] = []
    try:
        shared = c.base / "ha"
        shared.mkdir()
        pub, ret = free_ports_on(2, ["127.0.0.1", "127.0.0.2"])
        metrics = [free_port(), free_port()]
        for host, mport in zip(("127.0.0.1", "127.0.0.2"), metrics, strict=True):
            c.add_master({"ha_dir": str(shared), "auto_accept": True, "publish_port": pub,
                          "ret_port": ret, "metrics_port": mport, "auth_queue_max": 3,
                          "timeout": 10}, host=host)
        addrs = [f"{m['host']}:{m['conf']['ret_port']}" for m in c.masters]
        for i in range(N_STOCK):
            cfg = stock_minion_config(version, pub, acceptance_wait_time=2,
                                      log_level_logfile="info")
            stock.append(saltenv.SaltMinionProc(bins[version], c.base / f"s{i:02d}",
                                                f"stock-storm-{i:02d}", addrs, extra=cfg))
        swarm = start_swarm(c, 100, 1, c.base / "swarm-pki", "sw-", {"keysize": 1024})
        for mn in stock:        # all at once, with the swarm
            mn.start()
        ids = [mn.minion_id for mn in stock]
        for i in (0, 1):
            wait_answers(c, ids, master=i, timeout=240)
        assert sum(_shed(p) for p in metrics) > 0
        assert swarm.running()
    finally:
        stop_all(stock)
        c.close()

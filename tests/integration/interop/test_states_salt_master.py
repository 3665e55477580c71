"""Our minion's state runs under a stock salt-master 3008.5 (issue #16).

The salt-master serves the sls tree (its own ``file_roots``) to a hamaster minion through Salt's
file-server commands; ``salt ID state.apply`` is printed by Salt's own highstate outputter and
``--out=json`` carries Salt's return shape. Every process is real and stopped by PID.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.harness import Cluster
from tests.integration.interop import saltenv
from tests.integration.test_states import TREE, _write

VERSION = "3008.5"


def test_hamaster_minion_state_apply_under_stock_salt_master(cluster: Cluster) -> None:
    try:
        bin_dir = saltenv.ensure_salt(VERSION)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"salt {VERSION} not available: {exc}")
    sm = saltenv.SaltMasterProc(bin_dir, cluster.base / "sm", interface="127.0.0.1",
                                extra={"worker_threads": 2})
    out = cluster.base / "out"
    _write(Path(sm.workdir) / "root" / "srv" / "salt", TREE, out)
    sm.start()
    try:
        sm.wait_ready(120)
        fake = {"host": "127.0.0.1", "conf": {"ret_port": sm.ret_port}}
        cluster.add_minion("hm-states", masters=[fake])
        sm.accept_key("hm-states", timeout=60)
        sm.ping("hm-states", timeout=90)
        r = sm.salt("-t60", "hm-states", "state.apply", "app", timeout=120)
        assert "Summary for hm-states" in r.stdout, (r.stdout, r.stderr)
        assert "Succeeded: 10 (changed=7)\nFailed:     0\n" in r.stdout, r.stdout
        assert (out / "app" / "app.conf").read_text().endswith("id=hm-states\n")
        data, r = sm.run_job("hm-states", "state.apply", "checks", job_timeout=60)
        ret = (data or {}).get("hm-states")
        assert isinstance(ret, dict) and len(ret) == 3, (r.stdout, r.stderr)
        assert all(v["result"] is True and "__run_num__" in v for v in ret.values()), ret
        r = sm.salt("-t60", "--out=json", "hm-states", "state.apply", "broken", timeout=120)
        ret = json.loads(r.stdout)["hm-states"]
        assert {v["__id__"]: v["result"] for v in ret.values()} == {
            "bad": False, "needs-bad": False, "rescue": True}
    finally:
        sm.stop()

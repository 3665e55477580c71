"""Key accepted on master A → first successful ping through master B, per backend (median of N).

Run: ``python bench/bench_key_lag.py [--backends fs,etcd,rsync] [--n 20]``. Prints figures,
asserts nothing. Targets (backends issue): etcd ≤ 0.3 s, rsync ≤ 2 s, fs ≤ 1 s.

The accept is made in-process through A's store (what ``hamaster-key -a`` does, without its
Python start-up) and the ping is sent through B's CLI socket in-process, so the figure is the
cluster's propagation time, not the start-up time of two command-line processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hamaster.config import load_master_config  # noqa: E402
from hamaster.localapi import LocalClient  # noqa: E402
from hamaster.master.shared import open_shared_state  # noqa: E402
from tests.integration.harness import Cluster  # noqa: E402
from tests.kit import wait_until  # noqa: E402


def ping_via(conf_dir: Path, mid: str, timeout: float = 1.0) -> bool:
    opts = load_master_config(conf_dir)
    try:
        with LocalClient(opts["sock_dir"], timeout=timeout + 2) as c:
            c.send({"cmd": "publish", "tgt": mid, "tgt_type": "glob", "fun": "test.ping",
                    "arg": [], "timeout": timeout})
            if not c.recv().get("jid"):
                return False
            return any(m.get("ret", {}).get(mid, {}).get("return") is True for m in c.stream())
    except Exception:
        return False


def run(backend: str, n: int) -> dict:
    from contextlib import ExitStack

    c = Cluster.create()
    stack = ExitStack()
    try:
        extra: list[dict] = []
        if backend == "fs":
            shared = c.base / "shared"
            shared.mkdir()
            extra = [{"ha_dir": str(shared)}] * 2
        elif backend == "etcd":
            from tests.integration.services import etcd_server

            cluster = stack.enter_context(etcd_server())
            extra = [{"ha_backend": "etcd", "ha_etcd_endpoints": cluster.endpoints,
                      "ha_etcd_prefix": "/bench"}] * 2
        elif backend == "rsync":
            from tests.integration.services import rsync_daemon

            dirs = [c.base / "tree0", c.base / "tree1"]
            for d in dirs:
                d.mkdir()
            daemons = [stack.enter_context(rsync_daemon(d)) for d in dirs]
            extra = [
                {"ha_backend": "rsync", "ha_dir": str(dirs[i]),
                 "ha_rsync_peers": [daemons[1 - i].url],
                 "ha_rsync_password_file": str(daemons[1 - i].password_file)}
                for i in (0, 1)
            ]
        for e in extra:
            c.add_master({**e, "log_level": "warning", "ha_poll_interval": 0.5})
        opts_a = load_master_config(c.masters[0]["confdir"])
        keys_a = open_shared_state(opts_a).keys
        lags = []
        for i in range(n):
            mid = f"lag{i:02d}"
            c.add_minion(mid, extra={"log_level": "warning", "acceptance_wait_time": 0.1})
            wait_until(
                lambda mid=mid: ((keys_a.load() or True)
                                 and mid in keys_a.list_keys().get(_pending(), [])),
                30, what="pending")
            t0 = time.perf_counter()
            keys_a.accept(mid)
            wait_until(lambda mid=mid: ping_via(c.masters[1]["confdir"], mid, 0.15), 30,
                       interval=0.0, what="ping via B")
            lags.append(time.perf_counter() - t0)
        return {"backend": backend, "n": n, "median_s": round(statistics.median(lags), 3),
                "max_s": round(max(lags), 3)}
    finally:
        c.close()
        stack.close()


def _pending():
    from hamaster.pki_sync.keys import KeyState

    return KeyState.PENDING


def main() -> None:
    import compileall

    import hamaster

    compileall.compile_dir(str(Path(hamaster.__file__).parent), quiet=1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backends", default="fs,etcd,rsync")
    p.add_argument("--n", type=int, default=20)
    args = p.parse_args()
    for b in args.backends.split(","):
        print(json.dumps(run(b, args.n)), flush=True)


if __name__ == "__main__":
    main()

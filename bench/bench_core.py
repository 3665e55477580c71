"""Core benchmark: `hamaster '*' test.ping` wall time, RSS, start-up, and a 1,000-identity swarm.

Run: ``python bench/bench_core.py [--sizes 1,10,50] [--swarm 1000] [--repeat 10]``.
Prints figures; asserts nothing (it is not a timed test). Targets from the core issue:
ping ≤ 0.15 s at N=1 and 10, ≤ 0.25 s at N=50; swarm N=1,000 ≤ 1.5 s with 0 missing;
minion ≤ 35 MiB RSS; master ≤ 150 MiB RSS at N=50; 50 minions auto-accept → all answering ≤ 5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import BIN, Cluster  # noqa: E402
from tests.kit import rss_mib, wait_until  # noqa: E402

SWARM_PKI = Path("/var/cache/hamaster-bench/swarm-pki")


def cli_ping(c: Cluster, timeout: float = 10) -> tuple[float, dict]:
    """Wall time of one `hamaster '*' test.ping --out json --static` from CLI start to exit."""
    argv = [str(BIN / "hamaster"), "-c", str(c.masters[0]["confdir"]), "-t", str(timeout), "--out",
            "json", "--static", "*", "test.ping"]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    return dt, (json.loads(res.stdout) if res.stdout.strip() else {})


def bench_fleet(n: int, repeat: int) -> dict:
    c = Cluster.create()
    try:
        c.add_master({"auto_accept": True, "log_level": "warning"})
        ids = [f"b{n}-{i:03d}" for i in range(n)]
        t0 = time.perf_counter()
        procs = [c.add_minion(mid, extra={"log_level": "warning", "acceptance_wait_time": 0.5})
                 for mid in ids]
        wait_until(lambda: sum(v is True for v in c.ping(timeout=1).values()) == n, 120,
                   interval=0.05, what="all answering")
        startup = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            dt, got = cli_ping(c)
            assert sum(v is True for v in got.values()) == n, got
            times.append(dt)
        return {
            "minions": n,
            "ping_median_s": round(statistics.median(times), 3),
            "ping_min_s": round(min(times), 3),
            "ping_max_s": round(max(times), 3),
            "start_to_all_answering_s": round(startup, 2),
            "master_rss_mib": round(rss_mib(c.masters[0]["proc"].pid), 1),
            "minion_rss_mib": round(statistics.median(rss_mib(p.pid) for p in procs), 1),
        }
    finally:
        c.close()


def bench_swarm(n: int, repeat: int) -> dict:
    c = Cluster.create()
    try:
        c.add_master({"auto_accept": True, "log_level": "warning", "keysize": 2048})
        # The kept identities trusted the previous run's master key; this master is a new one.
        for pinned in SWARM_PKI.glob("swarm/*/minion_master.pub"):
            pinned.unlink()
        t0 = time.perf_counter()
        # A swarm is a load generator: a slower heartbeat keeps 1,000 identities from spending the
        # two cores on liveness pings (the liveness target applies to real minions).
        proc = c.add_minion(
            "swarm",
            extra={
                "log_level": "warning", "acceptance_wait_time": 1, "master_heartbeat_interval": 10,
                "master_dead_after": 30, "auth_timeout": 30,
                # generating 1,000 RSA keys takes minutes on 2 cores: keep them between runs
                # (root_dir "/" so that pki_dir is not re-rooted into the throw-away directory)
                "root_dir": "/",
                "pki_dir": str(SWARM_PKI),
                "cachedir": str(c.base / "swarm-cache"),
                "sock_dir": str(c.base / "swarm-sock"),
                "log_file": str(c.base / "swarm-minion.log"),
            },
            args=["--swarm", str(n), "--swarm-prefix", "sw-"],
        )
        wait_until(lambda: sum(v is True for v in c.ping(timeout=5).values()) == n, 900,
                   interval=1.0, what="swarm answering")
        startup = time.perf_counter() - t0
        times, missing = [], []
        for _ in range(repeat):
            dt, got = cli_ping(c, timeout=10)
            times.append(dt)
            missing.append(n - sum(v is True for v in got.values()))
        return {
            "swarm_identities": n,
            "ping_median_s": round(statistics.median(times), 3),
            "ping_max_s": round(max(times), 3),
            "missing_max": max(missing),
            "start_incl_keygen_to_all_answering_s": round(startup, 1),
            "swarm_process_rss_mib": round(rss_mib(proc.pid), 1),
            "master_rss_mib": round(rss_mib(c.masters[0]["proc"].pid), 1),
        }
    finally:
        c.close()


def main() -> None:
    # A packaged install ships compiled bytecode; an editable checkout run with
    # PYTHONDONTWRITEBYTECODE=1 (as on these machines) would recompile every module at every
    # process start and measure the compiler, not hamaster.
    import compileall

    import hamaster

    compileall.compile_dir(str(Path(hamaster.__file__).parent), quiet=1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1,10,50")
    p.add_argument("--swarm", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    for n in [int(x) for x in args.sizes.split(",") if x]:
        print(json.dumps(bench_fleet(n, args.repeat)), flush=True)
    if args.swarm:
        print(json.dumps(bench_swarm(args.swarm, max(3, args.repeat // 2))), flush=True)


if __name__ == "__main__":
    main()

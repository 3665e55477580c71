"""Pillar serving: ``'*' pillar.items`` wall time, and a burst of ``_pillar`` requests.

Run: ``python bench/bench_pillar_serving.py [--minions 50] [--burst 1000] [--repeat 5]``.
Prints figures, asserts nothing. Targets (pillar issue #13): ``hamaster '*' pillar.items`` at
N=50 ≤ 0.5 s; N minions' ``_pillar`` requests at once with the master's event loop never
blocked: ``test.ping`` of another minion through the same master ≤ 0.2 s meanwhile. The master's
own ``hamaster_event_loop_lag_seconds`` over the burst is printed too (``loop_lag_over_s``: how
many 0.1 s ticks ran later than each bound), which tells a held loop from a slow probe minion.

One master with ``ha_dir`` (the clustered layout: the tree in ``ha_dir/pillar_roots/base/``, 50
files; compiles run in the store pool), a swarm minion process with N identities (1024-bit keys
kept between runs under /var/cache/hamaster-bench, to spare key generation) and one ordinary
``probe`` minion. ``pillar.items`` makes every minion send ``_pillar`` (a fresh compile each).
Times are measured through the master's CLI socket (no CLI process start-up in the figures).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_pillar import make_tree  # noqa: E402
from hamaster.localapi import LocalClient  # noqa: E402
from tests.integration.harness import Cluster  # noqa: E402
from tests.integration.stormkit import metric_sum  # noqa: E402
from tests.kit import free_port, wait_until  # noqa: E402

SWARM_PKI = Path("/var/cache/hamaster-bench/pillar-swarm-pki")


def publish_wait(sock_dir: str, tgt: str, fun: str, timeout: float = 60,
                 tgt_type: str = "glob") -> tuple[float, dict]:
    """Publish through the CLI socket and wait for every return: (seconds, returns)."""
    t0 = time.perf_counter()
    rets: dict = {}
    with LocalClient(sock_dir, timeout=timeout + 10) as cli:
        cli.send({"cmd": "publish", "tgt": tgt, "fun": fun, "arg": [], "timeout": timeout,
                  "tgt_type": tgt_type})
        for msg in cli.stream():
            if isinstance(msg, dict) and "jid" in msg and not msg.get("jid"):
                raise RuntimeError(f"publish failed: {msg}")
            if isinstance(msg, dict) and "ret" in msg:
                rets.update(msg["ret"])
    return time.perf_counter() - t0, rets


def _loop_lag(port: int) -> dict[float, float]:
    """The master's ``hamaster_event_loop_lag_seconds`` histogram: cumulative count per bound."""
    out: dict[float, float] = {}
    for labels, v in metric_sum(port, "hamaster_event_loop_lag_seconds_bucket").items():
        le = re.search(r'le="([^"]+)"', labels)
        if le:
            out[float(le.group(1))] = v
    return out


def _complete(rets: dict) -> int:
    """Returns that carry the compiled pillar."""
    return sum(1 for v in rets.values()
               if isinstance(v, dict) and isinstance(v.get("return"), dict)
               and "common" in v["return"])


def run(n: int, burst: int, repeat: int) -> dict:
    c = Cluster.create()
    try:
        shared = c.base / "ha"
        make_tree(shared / "pillar_roots" / "base", 50)
        metrics_port = free_port()
        m = c.add_master({"ha_dir": str(shared), "auto_accept": True, "log_level": "warning",
                          "pillar_roots": {"base": []}, "metrics_port": metrics_port})
        sock_dir = str(Path(m["conf"]["root_dir"]) / "var/run/hamaster/master")
        for pinned in SWARM_PKI.glob("swarm/*/minion_master.pub"):
            pinned.unlink()
        size = max(n, burst)
        c.add_minion("swarm", extra={
            "log_level": "warning", "acceptance_wait_time": 1, "master_heartbeat_interval": 10,
            "master_dead_after": 30, "auth_timeout": 30, "keysize": 1024, "root_dir": "/",
            "pki_dir": str(SWARM_PKI), "cachedir": str(c.base / "swarm-cache"),
            "sock_dir": str(c.base / "swarm-sock"), "log_file": str(c.base / "swarm.log"),
            "grains": {"os": "Debian"}}, args=["--swarm", str(size), "--swarm-prefix", "web-"])
        c.add_minion("probe", extra={"log_level": "warning"})
        wait_until(lambda: sum(v is True for v in c.ping(timeout=10).values()) == size + 1,
                   1200, interval=2.0, what="swarm answering")
        out: dict = {"files": 50}
        # 1. '*' pillar.items at N (a target list of N swarm identities)
        tgt = ",".join(f"web-{i:05d}" for i in range(n))  # the swarm's ids
        times = []
        for _ in range(repeat):
            dt, rets = publish_wait(sock_dir, tgt, "pillar.items", tgt_type="list")
            ok = _complete(rets)
            times.append(dt)
        out.update({"pillar_items_minions": n, "pillar_items_median_s":
                    round(statistics.median(times), 3), "pillar_items_max_s": round(max(times), 3),
                    "pillar_items_complete": ok})
        # 2. burst: every swarm identity asks for pillar at once; ping the probe meanwhile
        lat: list[float] = []
        done = threading.Event()

        def pinger() -> None:
            while not done.is_set():
                dt, rets = publish_wait(sock_dir, "probe", "test.ping", 10)
                lat.append(dt if (rets.get("probe") or {}).get("return") is True
                           else float("inf"))
                time.sleep(0.1)  # pacing: an operator's pings, not a flood

        th = threading.Thread(target=pinger)
        # progress on stderr (e.g. to attach a profiler to the master for the burst only)
        print(f"burst starts: master pid {m['proc'].pid}", file=sys.stderr, flush=True)
        lag0 = _loop_lag(metrics_port)
        th.start()
        dt, rets = publish_wait(sock_dir, "web-*", "pillar.items", 300)
        done.set()
        th.join()
        lag1 = _loop_lag(metrics_port)
        lag = {le: lag1[le] - lag0.get(le, 0) for le in lag1}
        total = lag.get(float("inf"), 0)
        out["loop_lag_ticks"] = int(total)
        out["loop_lag_over_s"] = {str(le): int(total - n) for le, n in sorted(lag.items())
                                  if le in (0.05, 0.1, 0.2, 0.5)}
        ok = _complete(rets)
        out.update({"burst_minions": burst, "burst_all_pillar_s": round(dt, 2),
                    "burst_complete": ok, "probe_pings": len(lat),
                    "probe_ping_median_s": round(statistics.median(lat), 3) if lat else None,
                    "probe_ping_p95_s": round(sorted(lat)[int(len(lat) * 0.95) - 1], 3)
                    if len(lat) >= 20 else None,
                    "probe_pings_over_target": sum(1 for x in lat if x > 0.2),
                    "probe_ping_max_s": round(max(lat), 3) if lat else None,
                    "target_ping_s": 0.2})
        return out
    finally:
        c.close()


def main() -> None:
    import compileall

    import hamaster

    compileall.compile_dir(str(Path(hamaster.__file__).parent), quiet=1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minions", type=int, default=50)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(run(args.minions, args.burst, args.repeat), indent=2))


if __name__ == "__main__":
    main()

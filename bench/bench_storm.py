"""Auth-storm benchmark (issue 12): N new minion identities start at once against 2 masters.

Run: ``python bench/bench_storm.py [--n 1000] [--procs 4] [--backend etcd|fs] [--restart]``.
Prints the "answering over time" table (answering ``test.ping`` through each master), the
shedding counts, the masters' RSS and CPU seconds per 1,000 accepted auths. With
``--restart``, after convergence master 0 is restarted and the table of its recovery follows.
Swarm keys are generated once and kept in /var/cache/hamaster-bench/storm-pki-<keysize>.
Targets: 1,000 new ≤ 20 s, 5,000 new ≤ 90 s, 1,000 after a master restart ≤ 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import Cluster, free_port  # noqa: E402
from tests.integration.stormkit import answering, cpu_seconds, run_storm, start_swarm  # noqa: E402


def main() -> None:
    import compileall

    import hamaster

    compileall.compile_dir(str(Path(hamaster.__file__).parent), quiet=1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--backend", choices=("etcd", "fs"), default="etcd")
    p.add_argument("--keysize", type=int, default=2048)
    p.add_argument("--deadline", type=float, default=180)
    p.add_argument("--restart", action="store_true", help="then restart master 0 and time recovery")
    p.add_argument("--queue-max", type=int, default=0, help="masters' auth_queue_max")
    p.add_argument("--pki", default=None, help="swarm key directory (default: kept per keysize)")
    p.add_argument("--swarm-log-level", default="info")
    p.add_argument("--ping-timeout", type=float, default=4.0, help="a sample's test.ping timeout")
    p.add_argument("--heartbeat", type=float, default=5.0,
                   help="the swarm's master_heartbeat_interval (master_dead_after: 4 times it)")
    p.add_argument("--keep", action="store_true", help="keep the cluster directory (logs)")
    p.add_argument("--master-opt", action="append", default=[], metavar="NAME=YAML",
                   help="a master option for both masters (repeatable), e.g. zmq_io_threads=16")
    args = p.parse_args()
    master_opts = {}
    for item in args.master_opt:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--master-opt {item!r}: expected NAME=VALUE")
        master_opts[name.strip()] = yaml.safe_load(value)
    pki = Path(args.pki or f"/var/cache/hamaster-bench/storm-pki-{args.keysize}")
    pki.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    c = Cluster.create()
    etcd_ctx = None
    try:
        ports = [free_port(), free_port()]
        if args.backend == "etcd":
            from tests.integration.services import etcd_server

            etcd_ctx = etcd_server()
            etcd = etcd_ctx.__enter__()
            backend = {"ha_backend": "etcd", "ha_etcd_endpoints": etcd.endpoints,
                       "ha_etcd_prefix": "/hm-bench-storm"}
        else:
            shared = c.base / "shared"
            shared.mkdir()
            backend = {"ha_dir": str(shared)}
        for port in ports:
            c.add_master({**backend, "auto_accept": True, "metrics_port": port,
                          "log_level": "info",
                          **({"auth_queue_max": args.queue_max} if args.queue_max else {}),
                          **master_opts})
        swarm = start_swarm(c, args.n, args.procs, pki, "st-", {
            "keysize": args.keysize, "log_level": args.swarm_log_level,
            "master_heartbeat_interval": args.heartbeat, "master_dead_after": 4 * args.heartbeat})
        # key generation (first run only) is not part of the storm: wait for the keys on disk
        while sum(1 for _ in pki.glob("swarm/st-*/minion.pub")) < args.n:
            time.sleep(1)
        res = run_storm(c, args.n, args.procs, pki, ports, deadline_s=args.deadline, swarm=swarm,
                        ping_timeout=args.ping_timeout)
        print(f"# {args.n} new identities, {args.procs} swarm processes, 2 masters on "
              f"{args.backend}; load average before {load[0]:.1f}, cores {os.cpu_count()}"
              + (f"; master options {master_opts}" if master_opts else ""))
        print(res.table())
        out = {
            "n": args.n, "backend": args.backend, "converged_s": res.converged_s,
            "shed": res.shed, "auths_accepted": res.auths_accepted,
            "master_cpu_s": [round(x, 1) for x in res.master_cpu_s],
            "master_cpu_s_per_1000_auths": round(res.cpu_s_per_1000_auths() or 0, 2),
            "master_rss_mib": res.master_rss_mib,
            "master_fds": res.master_fds,
            "swarm_cpu_s": res.swarm_cpu_s,
            "requests": res.requests,
            "swarm_log_counts": {k: res.swarm_log.count(k) for k in (
                "not answering auth", "unreachable", "stopped answering", "wake-up",
                "never retrieved", "Too many open files", "does not verify",
                "not delivered yet")},
        }
        if args.restart and res.converged_s is not None:
            m = c.masters[0]
            m["proc"].stop()
            m["proc"].start()
            c.wait_master_ready(m)
            t0 = time.monotonic()
            cpu0 = cpu_seconds(m["proc"].popen.pid)
            rows = []
            while time.monotonic() - t0 < args.deadline:
                k = len(answering(m, "st-*", 4.0))
                rows.append((round(time.monotonic() - t0, 1), k))
                if k == args.n:
                    break
            print("# after restarting master0\n    t(s)  master0")
            for t, k in rows:
                print(f"{t:8.1f}{k:9d}")
            out["restart_recovered_s"] = rows[-1][0] if rows and rows[-1][1] == args.n else None
            out["restart_cpu_s"] = round(cpu_seconds(m["proc"].popen.pid) - cpu0, 1)
        print(json.dumps(out), flush=True)
    finally:
        if args.keep:
            c.owns_base = False
            print(f"# cluster kept in {c.base}")
        c.close()
        if etcd_ctx is not None:
            etcd_ctx.__exit__(None, None, None)


if __name__ == "__main__":
    main()

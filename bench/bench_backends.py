"""Per-backend figures: a burst of 1,000 job returns written on master A, visible on master B.

Run: ``python bench/bench_backends.py [--returns 1000] [--backends fs,etcd]``. Prints figures,
asserts nothing. Target (backends issue): etcd ≤ 1 s for the 1,000-return burst.
Uses the real JobCache over two store instances ("two masters") on one backend; etcd is a real
single-node server started here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hamaster.jobs.cache import JobCache  # noqa: E402
from hamaster.jobs.jid import gen_jid  # noqa: E402


def burst(store_a, store_b, n: int) -> dict:
    a, b = JobCache(store_a), JobCache(store_b)
    jid = gen_jid()
    rets = [(jid, f"m{i:05d}", {"return": True, "retcode": 0, "success": True, "fun": "test.ping"})
            for i in range(n)]
    t0 = time.perf_counter()
    a.save_returns(rets)
    t_write = time.perf_counter() - t0
    deadline = t0 + 60
    seen = 0
    while time.perf_counter() < deadline:
        seen = len(b.get_returns(jid))
        if seen >= n:
            break
    total = time.perf_counter() - t0
    return {"returns": n, "write_s": round(t_write, 3),
            "visible_on_other_master_s": round(total, 3), "seen": seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--returns", type=int, default=1000)
    p.add_argument("--backends", default="fs,etcd")
    args = p.parse_args()
    for backend in args.backends.split(","):
        if backend == "fs":
            from hamaster.store.fs import FsStore

            d = tempfile.mkdtemp(prefix="hm-bench-fs-")
            try:
                res = burst(FsStore(d), FsStore(d), args.returns)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        elif backend == "etcd":
            from hamaster.store.etcd import EtcdStore
            from tests.integration.services import etcd_server

            with etcd_server() as cluster:
                sa, sb = EtcdStore(cluster.endpoints), EtcdStore(cluster.endpoints)
                try:
                    res = burst(sa, sb, args.returns)
                finally:
                    sa.close()
                    sb.close()
        else:
            raise SystemExit(f"unknown backend {backend}")
        print(json.dumps({"backend": backend, **res}), flush=True)


if __name__ == "__main__":
    main()

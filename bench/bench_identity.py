"""Time from the first master's start to "every master serves the one cluster key", per backend
and start spacing (3 masters on an empty store, started together, 0.5 s and 1 s apart).

Run: ``python bench/bench_identity.py [--backends fs,etcd,rsync] [--spacings 0,0.5,1] [--n 3]``.
Prints one JSON line per round and a median per (backend, spacing); asserts nothing (the tests
in tests/integration/test_identity.py do). ``after_last_s`` is the same time counted from the
last master's start: what an agreement adds once everyone is up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.harness import Cluster  # noqa: E402
from tests.integration.identitykit import (  # noqa: E402
    backend_confs,
    served_keys,
    start_masters,
    wait_one_key,
)


def one_round(backend: str, spacing: float, n_masters: int = 3) -> dict:
    c = Cluster.create()
    try:
        with backend_confs(backend, c, n_masters) as confs:
            t0 = start_masters(c, confs, spacing, extra={"log_level": "info"})
            finger, t_one = wait_one_key(c, timeout=120)
            keys = served_keys(c)
            return {"backend": backend, "spacing_s": spacing,
                    "all_serve_one_key_s": round(t_one - t0, 3),
                    "after_last_s": round(t_one - t0 - spacing * (n_masters - 1), 3),
                    "one_key": all(v == [finger] for v in keys.values())}
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="fs,etcd,rsync")
    p.add_argument("--spacings", default="0,0.5,1")
    p.add_argument("--n", type=int, default=3)
    args = p.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "hamaster")], check=False)
    summary = []
    for backend in args.backends.split(","):
        for spacing in (float(s) for s in args.spacings.split(",")):
            rounds = [one_round(backend, spacing) for _ in range(args.n)]
            for r in rounds:
                print(json.dumps(r), flush=True)
            times = [r["all_serve_one_key_s"] for r in rounds]
            summary.append({"backend": backend, "spacing_s": spacing,
                            "median_s": round(statistics.median(times), 2),
                            "max_s": round(max(times), 2),
                            "median_after_last_s": round(statistics.median(
                                r["after_last_s"] for r in rounds), 2),
                            "one_key_every_round": all(r["one_key"] for r in rounds)})
    for s in summary:
        print(json.dumps({"summary": s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

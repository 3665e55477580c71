"""Event bus figures: events emitted on master A at a steady rate, seen in master B's stream.

Run: ``python bench/bench_events.py [--rate 1000] [--seconds 5] [--backends fs,etcd]``. Prints
figures, asserts nothing. Uses the real :class:`~hamaster.events.bus.EventBus` (writer thread,
store watch) on two store instances ("two masters") per backend; etcd is a real single-node
server started here. Target (events issue): 1,000 events/s through the bus on 2 masters.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hamaster.events.bus import EventBus  # noqa: E402
from tests.kit import WaitTimeout, wait_until  # noqa: E402


def run(store_a, store_b, rate: int, seconds: float) -> dict:
    a, b = EventBus(store_a, "A"), EventBus(store_b, "B")
    a.attach()
    b.attach()
    store_a.start()
    store_b.start()
    a.start()
    seen: dict[int, float] = {}
    lock = threading.Lock()

    def got(events: list) -> None:
        now = time.perf_counter()
        with lock:
            for ev in events:
                if ev.src == "A" and isinstance(ev.data, dict) and "i" in ev.data:
                    seen.setdefault(ev.data["i"], now)

    b.on_events(got)
    total = int(rate * seconds)
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.perf_counter()
        a.emit("bench/event", {"i": i})
    emit_s = time.perf_counter() - t0
    try:
        wait_until(lambda: len(seen) >= total, 30, 0.05, "every event seen on B")
    except WaitTimeout:
        pass  # reported: seen_on_B < events
    done = time.perf_counter() - t0
    lat = sorted(seen[i] - sent[i] for i in seen)
    a.stop()
    for s in (store_a, store_b):
        s.close()
    return {"events": total, "emitted_in_s": round(emit_s, 2), "seen_on_B": len(seen),
            "all_seen_after_s": round(done, 2),
            "latency_median_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p99_s": round(lat[int(len(lat) * 0.99) - 1], 3) if lat else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--backends", default="fs,etcd")
    args = p.parse_args()
    for backend in args.backends.split(","):
        if backend == "fs":
            from hamaster.store.fs import FsStore

            tmp = Path(tempfile.mkdtemp(prefix="hm-bench-ev-"))
            try:
                res = run(FsStore(tmp, poll_interval=0.2), FsStore(tmp, poll_interval=0.2),
                          args.rate, args.seconds)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif backend == "etcd":
            from hamaster.store.etcd import EtcdStore
            from tests.integration.services import etcd_server

            with etcd_server() as cluster:
                res = run(EtcdStore(cluster.endpoints, prefix="/bench"),
                          EtcdStore(cluster.endpoints, prefix="/bench"), args.rate, args.seconds)
        else:
            raise SystemExit(f"unknown backend {backend}")
        print(backend, res, flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: cost of an FsStore watch pass over 10,000 unchanged keys in one prefix.

Usage: python bench/bench_fs_poll.py [--keys 10000] [--passes 200] [--dir DIR]
Prints the mean wall/CPU time per pass (incremental and full-rescan passes separately) and the
CPU share at the default poll interval of 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from hamaster.store.fs import FULL_RESCAN_EVERY, STAT_RESCAN_EVERY, FsStore


def main() -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--passes", type=int, default=2 * STAT_RESCAN_EVERY)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--dir", default=None, help="store directory (default: a temp dir)")
    args = p.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="bench-fs-poll-")
    writer = FsStore(base)
    for i in range(args.keys):
        writer.put(f"pki/master/minions/minion{i:05d}", b"-----BEGIN PUBLIC KEY-----\nx\n")
    old = time.time_ns() - 3600 * 10**9  # age the directory mtime: no "hot" re-listing
    os.utime(os.path.join(base, "pki/master/minions"), ns=(old, old))
    watcher = FsStore(base, poll_interval=args.interval)
    watcher.watch("pki/master", lambda changes: None)
    kinds = {"incremental": [0.0, 0.0, 0], "names re-list": [0.0, 0.0, 0],
             "full stat rescan": [0.0, 0.0, 0]}
    for _ in range(args.passes):
        n = watcher._passes + 1
        kind = ("full stat rescan" if n % STAT_RESCAN_EVERY == 0 else
                "names re-list" if n % FULL_RESCAN_EVERY == 0 else "incremental")
        w0, c0 = time.perf_counter(), time.process_time()
        changes = watcher.poll_now()
        w1, c1 = time.perf_counter(), time.process_time()
        assert not changes, changes[:3]
        acc = kinds[kind]
        acc[0] += w1 - w0
        acc[1] += c1 - c0
        acc[2] += 1
    print(f"keys={args.keys} passes={args.passes} (names re-list every {FULL_RESCAN_EVERY}, "
          f"stat rescan every {STAT_RESCAN_EVERY})")
    total_cpu = 0.0
    for kind, (wall, cpu, n) in kinds.items():
        total_cpu += cpu
        if n:
            print(f"{kind:>17} pass: {wall / n * 1e3:8.3f} ms wall, {cpu / n * 1e3:8.3f} ms CPU"
                  f"  (x{n})")
    per_pass = total_cpu / args.passes
    print(f"mean per pass: {per_pass * 1e3:.3f} ms CPU -> "
          f"{per_pass / args.interval * 100:.2f}% CPU at poll interval {args.interval} s")


if __name__ == "__main__":
    main()

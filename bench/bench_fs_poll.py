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

from hamaster.store.fs import FULL_RESCAN_EVERY, FsStore


def main() -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--passes", type=int, default=200)
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
    inc_wall = inc_cpu = full_wall = full_cpu = 0.0
    n_inc = n_full = 0
    for _ in range(args.passes):
        full = (watcher._passes + 1) % FULL_RESCAN_EVERY == 0
        w0, c0 = time.perf_counter(), time.process_time()
        changes = watcher.poll_now()
        w1, c1 = time.perf_counter(), time.process_time()
        assert not changes, changes[:3]
        if full:
            full_wall += w1 - w0
            full_cpu += c1 - c0
            n_full += 1
        else:
            inc_wall += w1 - w0
            inc_cpu += c1 - c0
            n_inc += 1
    total_cpu = inc_cpu + full_cpu
    print(f"keys={args.keys} passes={args.passes} (full rescan every {FULL_RESCAN_EVERY})")
    print(f"incremental pass: {inc_wall / n_inc * 1e3:.3f} ms wall, "
          f"{inc_cpu / n_inc * 1e3:.3f} ms CPU")
    if n_full:
        print(f"full-rescan pass: {full_wall / n_full * 1e3:.1f} ms wall, "
              f"{full_cpu / n_full * 1e3:.1f} ms CPU")
    per_pass = total_cpu / args.passes
    print(f"mean per pass: {per_pass * 1e3:.3f} ms CPU -> "
          f"{per_pass / args.interval * 100:.2f}% CPU at poll interval {args.interval} s")


if __name__ == "__main__":
    main()

"""One minion's footprint: steady RSS connected to a master, and ``cp.get_file`` of a big file.

Run: ``python bench/bench_minion.py [--minions 3] [--mib 100] [--repeat 3]``.
Starts one master (``file_roots`` holding a ``--mib`` MiB file of random bytes) and ``--minions``
minions at log level ``warning``; once all answer and have idled for a few heartbeats, reports
the median minion RSS and a breakdown by mapping (Python heap and anonymous memory vs shared
libraries), then the wall time and the minion's CPU time of ``hamaster MINION cp.get_file
salt://big DEST`` (the minion fetches the file in ``file_buffer_size`` chunks, each checked with
HMAC-SHA256, checks the file's SHA-256, writes it), and the SHA-256 throughput, in a process
importing the minion's entry point, of :mod:`hashlib` and of :func:`hamaster.crypto.hexdigest`
(what the minion hashes files with). Prints JSON lines; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import Cluster  # noqa: E402
from tests.kit import wait_until  # noqa: E402

SHA_PROBE = r"""
import sys, time
import hamaster.cli.minion  # the minion's entry point, as its console script imports it
import hashlib
from hamaster import crypto
data = b"x" * (100 * 1024 * 1024)
def best(f):
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return round(100 * 1.048576 / min(out))
print(best(lambda: hashlib.sha256(data).digest()), best(lambda: crypto.hexdigest("sha256", data)),
      "_hashlib" in sys.modules, "ssl" in sys.modules)
"""

from tests.kit import rss_mib  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_by_mapping(pid: int) -> dict[str, float]:
    """RSS of ``pid`` in MiB per mapped file (anonymous and heap together), largest first."""
    out: dict[str, float] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=6)
            if len(first) >= 5 and "-" in first[0] and ":" in first[3]:
                path = first[5].strip() if len(first) > 5 else ""
                name = os.path.basename(path) if path.startswith("/") else "[anon]"
            elif line.startswith("Rss:"):
                out[name] = out.get(name, 0.0) + int(line.split()[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.3}


def main() -> None:
    # Compiled bytecode, as a packaged install ships it (see bench_core.py).
    import compileall

    import hamaster

    compileall.compile_dir(str(Path(hamaster.__file__).parent), quiet=1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--minions", type=int, default=3)
    p.add_argument("--mib", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    sha = subprocess.run([sys.executable, "-c", SHA_PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    print(json.dumps({"sha256_MBps_hashlib": int(sha[0]),
                      "sha256_MBps_crypto_hexdigest": int(sha[1]),
                      "_hashlib_loaded": sha[2] == "True", "ssl_loaded": sha[3] == "True"}),
          flush=True)

    c = Cluster.create()
    try:
        roots = c.base / "srv"
        roots.mkdir()
        with open(roots / "big", "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1024 * 1024))
        c.add_master({"auto_accept": True, "log_level": "warning",
                      "file_roots": {"base": [str(roots)]}, "timeout": 300})
        ids = [f"fp{i}" for i in range(args.minions)]
        procs = [c.add_minion(mid, extra={"log_level": "warning"}) for mid in ids]
        c.wait_all_answer(ids, timeout=120)
        # steady state: a few heartbeats after everyone answered
        deadline = time.monotonic() + 5
        wait_until(lambda: time.monotonic() >= deadline, 10, 0.5, "5 s of idle")
        rss = [rss_mib(pr.pid) for pr in procs]
        print(json.dumps({"minion_rss_mib_median": round(statistics.median(rss), 1),
                          "minion_rss_mib": [round(r, 1) for r in rss],
                          "by_mapping_mib": rss_by_mapping(procs[0].pid)}), flush=True)

        times, cpu = [], []
        for i in range(args.repeat):
            dest = c.base / f"dest{i}"
            t0, c0 = time.perf_counter(), cpu_s(procs[0].pid)
            res = c.run("hamaster", "-t", "300", "--out", "json", "--static", ids[0],
                        "cp.get_file", "salt://big", str(dest), timeout=600)
            times.append(time.perf_counter() - t0)
            cpu.append(cpu_s(procs[0].pid) - c0)
            got = json.loads(res.stdout)
            assert got == {ids[0]: str(dest)}, (res.stdout, res.stderr)
            assert dest.stat().st_size == args.mib * 1024 * 1024
            dest.unlink()
        print(json.dumps({f"cp_get_file_{args.mib}MiB_s": [round(t, 2) for t in times],
                          "median_s": round(statistics.median(times), 2),
                          "minion_cpu_s_median": round(statistics.median(cpu), 2),
                          "minion_rss_after_mib": round(rss_mib(procs[0].pid), 1)}), flush=True)
    finally:
        c.close()


if __name__ == "__main__":
    main()

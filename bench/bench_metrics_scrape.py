"""Benchmark: scraping a master's /metrics with 10,000 accepted keys and 1,000 connected minions.

Usage: python bench/bench_metrics_scrape.py [--keys 10000] [--minions 1000] [--scrapes 50]

What runs:
- a real :class:`~hamaster.master.daemon.Master` in this process (its own thread and asyncio
  loop, as ``hamaster-master`` runs it), single-master layout, whose ``pki_dir/minions/`` holds
  ``--keys`` accepted key files (one public key text reused for every id: generating 10,000 RSA
  keys would take minutes and changes nothing for the scrape). That key pair is 1024-bit by
  default (``--minion-key-bits``): each swarm identity loads and validates it at start, ~8 ms at
  1024 bits against 60-300 ms at 2048, which would stretch start-up to minutes; the master's own
  key stays 2048-bit, and the scrape depends on neither;
- ``hamaster-minion --swarm N`` (a subprocess): N real minion identities sharing that key pair,
  which authenticate and heartbeat, so ``hamaster_minions_connected`` reaches N;
- ``--scrapes`` sequential ``GET /metrics`` from a separate Python process (the client does not
  compete for this process's GIL), timed end to end; median / p95 / max are printed.

How "the scrape does not touch the store" is verified, in this process:
- the master's store object (``master.keys.store``) has every public method wrapped to record
  the calling thread, and a ``sys.addaudithook`` hook records every ``open`` / ``os.listdir`` /
  ``os.scandir`` / ``os.rename`` / ``os.remove`` / ``os.mkdir`` under the master's root_dir;
- the registry's ``collect`` is wrapped to mark the thread while a scrape collects, and the
  HTTP server's request threads are recognised by name (``process_request_thread``);
- after the scrapes, the bench asserts that zero store calls and zero file accesses under the
  master's root came from a scrape, while showing the (non-zero) store activity of the
  master's background threads over the same window, which proves the hooks were live.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kit import free_port, stop_group, wait_until  # noqa: E402

BIN = Path(sys.executable).parent

SCRAPER = r"""
import json, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
urllib.request.urlopen(url, timeout=10).read()  # warm-up
out = []
for _ in range(n):
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    out.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"ms": out, "bytes": len(body)}))
"""


def percentile(ms: list[float], pct: float) -> float:
    ms = sorted(ms)
    return ms[max(0, min(len(ms) - 1, int(round(pct / 100 * len(ms))) - 1))]


def summary(ms: list[float]) -> str:
    return (f"{len(ms)} scrapes, median {statistics.median(ms):.2f} ms, "
            f"p95 {percentile(ms, 95):.2f} ms, max {max(ms):.2f} ms")


def timed_scrapes(port: int, n: int) -> list[float]:
    """``n`` sequential scrapes timed by a separate Python process (ms each)."""
    res = subprocess.run(
        [sys.executable, "-c", SCRAPER, f"http://127.0.0.1:{port}/metrics", str(n)],
        capture_output=True, text=True, check=True, timeout=600,
    )
    return json.loads(res.stdout)["ms"]


def metric(body: str, name: str) -> float | None:
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


class Recorder:
    """Store calls and file accesses under ``root``, tagged scrape / background."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.local = threading.local()
        self.active = False
        self.scrape_hits: list[str] = []
        self.background = 0
        self.lock = threading.Lock()

    def in_scrape(self) -> bool:
        return (getattr(self.local, "collecting", False)
                or "process_request_thread" in threading.current_thread().name)

    def hit(self, what: str) -> None:
        if not self.active:
            return
        with self.lock:
            if self.in_scrape():
                self.scrape_hits.append(f"{threading.current_thread().name}: {what}")
            else:
                self.background += 1

    def audit(self, event: str, args: tuple) -> None:
        if not self.active or event not in ("open", "os.listdir", "os.scandir",
                                            "os.rename", "os.remove", "os.mkdir"):
            return
        path = args[0] if args else None
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if isinstance(path, str) and path.startswith(self.root):
            self.hit(f"{event} {path}")

    def wrap_store(self, store: object) -> None:
        for name in ("get", "put", "delete", "list", "compare_and_put", "delete_tree", "members",
                     "heartbeat", "poll_now", "healthy"):
            fn = getattr(store, name, None)
            if fn is None:
                continue

            def wrapper(*a, _fn=fn, _name=name, **kw):
                self.hit(f"store.{_name}")
                return _fn(*a, **kw)

            setattr(store, name, wrapper)

    def wrap_collect(self, registry: object) -> None:
        orig = registry.collect

        def collect():
            self.local.collecting = True
            try:
                yield from orig()
            finally:
                self.local.collecting = False

        registry.collect = collect


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--minions", type=int, default=1_000)
    p.add_argument("--scrapes", type=int, default=50)
    p.add_argument("--switch-interval", type=float, default=None,
                   help="experiment: sys.setswitchinterval() for the master (Python's "
                        "default 0.005 s)")
    p.add_argument("--minion-key-bits", type=int, default=1024)
    p.add_argument("--heartbeat", type=float, default=2.0,
                   help="minions' master_heartbeat_interval (hamaster's default 2 s: 500 "
                        "requests/s at 1,000 minions)")
    p.add_argument("--connect-timeout", type=float, default=300.0)
    args = p.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from hamaster import crypto
    from hamaster.config import load_master_config, load_minion_config
    from hamaster.master.daemon import Master

    base = Path(tempfile.mkdtemp(prefix="hm-bench-", dir="/tmp"))
    swarm = None
    thread = None
    loop_box: dict = {}
    try:
        mport = free_port()
        mconf = base / "master-conf"
        mconf.mkdir()
        (mconf / "master").write_text(yaml.safe_dump({
            "root_dir": str(base / "m"), "interface": "127.0.0.1", "publish_port": free_port(),
            "ret_port": free_port(), "master_id": "bench", "metrics_port": mport,
            "log_level": "warning",
            "auto_accept": False,
        }))
        opts = load_master_config(str(mconf))
        t0 = time.perf_counter()
        priv, pub = crypto.generate_keypair(args.minion_key_bits)
        keydir = Path(opts["pki_dir"]) / "minions"
        keydir.mkdir(parents=True, exist_ok=True)
        ids = [f"bench-{i:05d}" for i in range(args.keys)]
        for mid in ids:
            (keydir / mid).write_bytes(pub)
        print(
            f"wrote {args.keys} accepted key files in {time.perf_counter() - t0:.1f} s", flush=True)

        t0 = time.perf_counter()
        master = Master(opts)
        print(f"master loaded {len(master.keys.accepted_ids())} accepted keys in "
              f"{time.perf_counter() - t0:.2f} s")
        rec = Recorder(str(base / "m"))
        rec.wrap_store(master.keys.store)
        rec.wrap_collect(master.metrics.registry)
        sys.addaudithook(rec.audit)

        async def serve() -> None:
            loop_box["loop"] = asyncio.get_running_loop()
            await master.run()

        thread = threading.Thread(target=lambda: asyncio.run(serve()),
                                  name="master-loop", daemon=True)
        thread.start()
        wait_until(lambda: scrape(mport), 30, 0.1, "the master's /metrics", ignore=(OSError,))

        # baseline: the same master before any minion connects
        base_ms = timed_scrapes(mport, args.scrapes)
        print(f"/metrics, {args.keys} keys, no minion connected: {summary(base_ms)}", flush=True)

        # the swarm: N identities sharing one key pair
        sconf = base / "swarm-conf"
        sconf.mkdir()
        (sconf / "minion").write_text(yaml.safe_dump({
            "root_dir": str(base / "s"), "id": "bench", "master": [f"127.0.0.1:{opts['ret_port']}"],
            "master_heartbeat_interval": args.heartbeat, "acceptance_wait_time": 1,
            "log_level": "warning", "auth_timeout": 30,
        }))
        sopts = load_minion_config(str(sconf))
        for mid in ids[: args.minions]:
            d = Path(sopts["pki_dir"]) / "swarm" / mid
            d.mkdir(parents=True)
            (d / "minion.pem").write_bytes(priv)
            os.chmod(d / "minion.pem", 0o600)
            (d / "minion.pub").write_bytes(pub)
        t0 = time.perf_counter()
        swarm = subprocess.Popen(
            [str(BIN / "hamaster-minion"), "-c", str(sconf), "-l", "warning", "--swarm",
             str(args.minions),
             "--swarm-prefix", "bench-"],
            stdout=open(base / "swarm.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
        )
        deadline = time.monotonic() + args.connect_timeout
        connected = 0.0
        last_note = time.monotonic()
        while time.monotonic() < deadline:
            connected = metric(scrape(mport), "hamaster_minions_connected") or 0
            if connected >= args.minions:
                break
            if time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                print(
                    f"  {int(connected)} connected after {time.perf_counter() - t0:.0f} s",
                    flush=True)
            if swarm.poll() is not None:
                raise SystemExit(f"swarm exited: {(base / 'swarm.log').read_text()[-2000:]}")
            time.sleep(0.5)
        else:
            raise SystemExit(f"only {connected} of {args.minions} minions connected")
        print(f"{int(connected)} minions connected in {time.perf_counter() - t0:.1f} s")

        body = scrape(mport)
        assert metric(body, 'hamaster_keys{master_id="bench",state="minions"}') == args.keys, (
            "keys gauge")

        # the timed scrapes, from another process
        rec.active = True
        ms = timed_scrapes(mport, args.scrapes)
        rec.active = False
        p95 = percentile(ms, 95)
        print(f"/metrics, {args.keys} keys, {int(connected)} minions connected: {summary(ms)}, "
              f"body {len(scrape(mport))} bytes")
        # the CPU cost of producing the body, without HTTP or waiting for the GIL
        from prometheus_client import generate_latest

        cpu = []
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            generate_latest(master.metrics.registry)
            cpu.append((time.perf_counter() - t0) * 1e3)
        print(f"generate_latest(registry) in this process (shares the GIL with the busy master "
              f"loop): {summary(cpu)}")
        print(f"store calls / file accesses under root_dir from scrapes: {len(rec.scrape_hits)}; "
              f"from background threads in the same window: {rec.background}")
        assert not rec.scrape_hits, rec.scrape_hits[:10]

        # cost of one key-change callback (what every key event on the store watch triggers)
        t0 = time.perf_counter()
        for _ in range(10):
            master._update_key_metrics()
        print(f"_update_key_metrics with {args.keys} keys: "
              f"{(time.perf_counter() - t0) / 10 * 1e3:.2f} ms per key event")
        verdict = "OK" if p95 <= 50 else "OVER BUDGET"
        print(f"budget 50 ms: p95 {p95:.2f} ms -> {verdict}")
    finally:
        if thread is not None and "loop" in loop_box:
            loop_box["loop"].call_soon_threadsafe(master.stop)
            thread.join(timeout=20)
        stop_group(swarm, 30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

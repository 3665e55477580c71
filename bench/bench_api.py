"""REST API benchmark: ``POST /`` ``local`` ``test.ping`` through the API, idle and under load.

Run: ``python bench/bench_api.py [--minions 10] [--repeat 20] [--rate 200] [--seconds 5]``.
Prints JSON lines; asserts nothing. Targets from the API issue: ``POST /`` ``local``
``test.ping`` at N=10 ≤ 0.1 s median (one kept-alive HTTP connection, no interpreter start);
200 authenticated requests/s on one master with the ping latency through it ≤ 0.2 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import Cluster  # noqa: E402
from tests.kit import free_port, wait_until  # noqa: E402

PING = json.dumps([{"client": "local", "tgt": "*", "fun": "test.ping"}]).encode()


class Api:
    """A kept-alive HTTP connection to one master's API."""

    def __init__(self, port: int, token: str = "") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.token = token

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["X-Auth-Token"] = self.token
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())


def ping_once(api: Api, n: int) -> float:
    """Wall time of one ``POST /`` local test.ping; checks every minion answered."""
    t0 = time.perf_counter()
    status, out = api.call("POST", "/", PING)
    dt = time.perf_counter() - t0
    assert status == 200 and sum(v is True for v in out["return"][0].values()) == n, out
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minions", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rate", type=int, default=200, help="authenticated requests/s under load")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "hamaster"], check=False)
    c = Cluster.create()
    try:
        users = c.base / "users"
        users.write_text("bench:benchpw\n")
        port = free_port()
        c.add_master({
            "auto_accept": True, "log_level": "warning",
            "rest_cherrypy": {"port": port, "host": "127.0.0.1", "disable_ssl": True},
            "netapi_enable_clients": ["local", "runner", "wheel"],
            "external_auth": {"file": {"^filename": str(users),
                                       "bench": [".*", "@runner", "@wheel"]}},
        })
        ids = [f"api{i:03d}" for i in range(args.minions)]
        for mid in ids:
            c.add_minion(mid, extra={"log_level": "warning"})
        c.wait_all_answer(ids, timeout=120)
        login = Api(port)
        status, out = login.call("POST", "/login", json.dumps(
            {"username": "bench", "password": "benchpw", "eauth": "file"}).encode())
        assert status == 200, out
        token = out["return"][0]["token"]
        api = Api(port, token)
        wait_until(lambda: ping_once(api, args.minions) > 0, 30, what="pings through the API")
        idle = [ping_once(api, args.minions) for _ in range(args.repeat)]
        print(json.dumps({"bench": "api_ping_idle", "minions": args.minions,
                          "median_s": round(statistics.median(idle), 4),
                          "max_s": round(max(idle), 4), "repeat": args.repeat}))

        # load: `rate` authenticated requests/s (GET /keys and /stats alternately) from 16
        # threads with their own connections, while one client pings through the API
        stop = threading.Event()
        sent = [0]
        errors = [0]
        lock = threading.Lock()
        interval = 16 / args.rate

        def loader(k: int) -> None:
            conn = Api(port, token)
            nxt = time.perf_counter()
            while not stop.is_set():
                path = "/keys" if k % 2 else "/stats"
                try:
                    status, _ = conn.call("GET", path)
                    ok = status == 200
                except Exception:
                    ok = False
                    conn = Api(port, token)
                with lock:
                    sent[0] += 1
                    errors[0] += 0 if ok else 1
                nxt += interval
                time.sleep(max(0.0, nxt - time.perf_counter()))

        pings: list[float] = []
        with ThreadPoolExecutor(16) as pool:
            for k in range(16):
                pool.submit(loader, k)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                pings.append(ping_once(api, args.minions))
            elapsed = time.perf_counter() - t0
            stop.set()
        print(json.dumps({"bench": "api_ping_under_load", "minions": args.minions,
                          "load_rps": round(sent[0] / elapsed, 1), "load_errors": errors[0],
                          "ping_median_s": round(statistics.median(pings), 4),
                          "ping_p90_s": round(sorted(pings)[int(len(pings) * 0.9)], 4),
                          "pings": len(pings)}))
    finally:
        c.close()


if __name__ == "__main__":
    main()

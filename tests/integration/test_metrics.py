"""Prometheus metrics on real masters: the exposition, values that move, and a real Prometheus.

The Prometheus test starts Debian's ``prometheus`` on a free port with a private config and data
directory, lets it scrape two HA masters, and asks its HTTP API. Every wait polls a condition
against a deadline; the first scrape takes ~6 s to appear, so those deadlines are generous.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Cluster
from tests.kit import free_port, stop_group, wait_until

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

# The metric families the issue asks for (sample names, as exposed).
REQUIRED = (
    "hamaster_minions_connected",
    "hamaster_keys",
    "hamaster_auth_requests_total",
    "hamaster_jobs_published_total",
    "hamaster_returns_received_total",
    "hamaster_job_return_latency_seconds_bucket",
    "hamaster_requests_rejected_total",
    "hamaster_store_up",
    "hamaster_store_operation_seconds_bucket",
    "hamaster_store_watch_events_total",
    "hamaster_sync_lag_seconds_bucket",
    "hamaster_event_loop_lag_seconds_bucket",
    "hamaster_cluster_masters_alive",
    "hamaster_config_info",
    "hamaster_fileroots_info",
    "hamaster_fileserver_bytes_served_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
)


# -- helpers ------------------------------------------------------------------------------------


def scrape(port: int) -> str:
    """The body of ``GET /metrics`` on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(body: str) -> list[tuple[str, dict, float]]:
    """Every sample of an exposition as (name, labels, value)."""
    return [(s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(body) for s in fam.samples]


def value(body: str, name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels``; None if absent."""
    for n, lab, v in samples(body):
        if n == name and all(lab.get(k) == want for k, want in labels.items()):
            return v
    return None


def promtool_check(body: str) -> None:
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=body,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, (f"promtool check metrics failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")


def send_garbage(port: int) -> bytes:
    """Send one frame that is not a request envelope to ``ret_port``; return the reply."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(b"\xc1 this is not msgpack")
        reply = sock.recv()
        sock.close(0)
        return reply
    finally:
        ctx.term()


def ha_masters(c: Cluster, n: int = 2, extra: dict | None = None) -> list[int]:
    """``n`` masters sharing one ha_dir, each serving /metrics; returns their metrics ports."""
    shared = c.base / "shared"
    shared.mkdir()
    ports = []
    for _ in range(n):
        port = free_port()
        c.add_master({"ha_dir": str(shared), "metrics_port": port, **(extra or {})})
        ports.append(port)
    return ports


# -- one master: exposition, promtool, values --------------------------------------------------


@pytest.mark.skipif(PROMTOOL is None,
                    reason="promtool missing: apt-get install --no-install-recommends prometheus")
def test_metrics_exposition_and_values_move(cluster: Cluster) -> None:
    port = free_port()
    m = cluster.add_master({"metrics_port": port, "auto_accept": True})
    cluster.add_minion("mx1")
    cluster.wait_all_answer(["mx1"])

    body = scrape(port)
    promtool_check(body)
    names = {n for n, _, _ in samples(body)}
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"metrics missing from /metrics: {missing}"
    # all hamaster_ series carry master_id
    for n, lab, _ in samples(body):
        if n.startswith("hamaster_"):
            assert lab.get("master_id") == "master0", (n, lab)
    # key counts are refreshed by the housekeeping pass (every 2 s), not on every key event
    wait_until(lambda: value(scrape(port), "hamaster_keys", state="minions") == 1,
               10, 0.2, "1 accepted key")
    body = scrape(port)
    assert value(body, "hamaster_keys", state="minions_pre") == 0
    assert value(body, "hamaster_auth_requests_total", result="accepted") >= 1
    assert value(body, "hamaster_store_up") == 1
    assert value(body, "hamaster_config_info") == 1
    wait_until(lambda: value(scrape(port), "hamaster_minions_connected") == 1, 10, 0.2,
               "minions_connected == 1")

    # a ping: one job published, one return received, one latency observation
    before = scrape(port)
    assert cluster.ping("mx1") == {"mx1": True}
    after = scrape(port)
    assert (value(after, "hamaster_jobs_published_total")
            == value(before, "hamaster_jobs_published_total") + 1)
    assert (value(after, "hamaster_returns_received_total")
            == value(before, "hamaster_returns_received_total") + 1)
    assert (
        value(after, "hamaster_job_return_latency_seconds_count")
        == value(before, "hamaster_job_return_latency_seconds_count") + 1
    )
    assert (value(after, "hamaster_job_return_latency_seconds_sum")
            > value(before, "hamaster_job_return_latency_seconds_sum"))

    # a garbage frame on ret_port: refused and counted as malformed
    rejected = value(after, "hamaster_requests_rejected_total", reason="malformed") or 0
    send_garbage(m["conf"]["ret_port"])
    wait_until(
        lambda: (value(scrape(port), "hamaster_requests_rejected_total", reason="malformed")
                 or 0) == rejected + 1,
        5, 0.1, "malformed rejection counted",
    )
    promtool_check(scrape(port))


def test_metrics_port_zero_disables(cluster: Cluster) -> None:
    cluster.add_master({"metrics_port": 0})
    log = cluster.masters[0]["proc"].log_text()
    assert "metrics on http" not in log


# -- two HA masters: store, watch, sync lag, drift info ----------------------------------------


@pytest.mark.skipif(PROMTOOL is None,
                    reason="promtool missing: apt-get install --no-install-recommends prometheus")
def test_ha_store_and_cluster_metrics(cluster: Cluster) -> None:
    ports = ha_masters(cluster, 2, {"auto_accept": True})
    cluster.add_minion("hs1")
    cluster.wait_all_answer(["hs1"], master=0)
    cluster.wait_all_answer(["hs1"], master=1)

    def settled() -> bool:
        bodies = [scrape(p) for p in ports]
        return all(
            value(b, "hamaster_cluster_masters_alive") == 2
            and value(b, "hamaster_fileroots_info") == 1
            and (value(b, "hamaster_sync_lag_seconds_count") or 0) > 0
            for b in bodies
        )

    wait_until(settled, 20, 0.25, "masters_alive == 2, fileroots hash and sync lag on both masters")
    bodies = [scrape(p) for p in ports]
    for b in bodies:
        promtool_check(b)
        assert value(b, "hamaster_store_up") == 1
        assert (value(b, "hamaster_store_operation_seconds_count", op="put") or 0) > 0
        assert (value(b, "hamaster_store_operation_seconds_count", op="get") or 0) > 0
        assert (value(b, "hamaster_store_watch_events_total") or 0) > 0
        lag_sum = value(b, "hamaster_sync_lag_seconds_sum")
        lag_count = value(b, "hamaster_sync_lag_seconds_count")
        assert 0 <= lag_sum / lag_count < 5, (lag_sum, lag_count)

    def hashes(name: str) -> set[str]:
        return {lab["hash"] for b in bodies for n, lab, _ in samples(b) if n == name}

    # same config (per-host options excluded) and same file_roots: one hash each, no drift
    assert len(hashes("hamaster_config_info")) == 1
    assert len(hashes("hamaster_fileroots_info")) == 1


# -- a real Prometheus scraping two HA masters -------------------------------------------------


class Prometheus:
    """A private Prometheus scraping ``targets`` every second."""

    def __init__(self, base: Path, targets: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="prom-", dir=base))
        self.port = free_port()
        conf = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "hamaster", "static_configs": [{"targets": targets}]}],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(conf))
        self.log = open(self.dir / "prometheus.log", "wb")
        assert PROMETHEUS is not None
        self.popen = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def query(self, promql: str) -> dict[str, float]:
        """Instant query; returns ``{instance or master_id: value}`` (empty on any error)."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                data = json.load(resp)
        except (OSError, ValueError):
            return {}
        if data.get("status") != "success":
            return {}
        out = {}
        for r in data["data"]["result"]:
            key = r["metric"].get("master_id") or r["metric"].get("instance", "")
            out[key] = float(r["value"][1])
        return out

    def log_text(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.popen, 20)
        self.log.close()


@pytest.mark.skipif(PROMETHEUS is None,
                    reason="prometheus missing: apt-get install --no-install-recommends prometheus")
def test_real_prometheus_scrapes_two_ha_masters(cluster: Cluster) -> None:
    ports = ha_masters(cluster, 2, {"auto_accept": False})
    inst = {f"127.0.0.1:{p}": f"master{i}" for i, p in enumerate(ports)}
    for mid in ("p1", "p2"):
        cluster.add_minion(mid)
    wait_until(lambda: set(cluster.keys(0)["minions_pre"]) >= {"p1", "p2"},
               20, 0.2, "p1, p2 pending")
    cluster.run("hamaster-key", "-a", "p1", "-y", master=0, check=True)
    cluster.run("hamaster-key", "-a", "p2", "-y", master=1, check=True)
    cluster.wait_all_answer(["p1", "p2"], master=0)
    cluster.wait_all_answer(["p1", "p2"], master=1)

    prom = Prometheus(cluster.base, list(inst))
    try:
        q = prom.query
        both = {"master0", "master1"}

        # the first scrape takes ~6 s to show up
        up = wait_until(lambda: (lambda r: r if len(r) == 2 and all(r.values()) else None)(
                            q('up{job="hamaster"}')),
                        40, 0.5, "both masters up in Prometheus")
        assert set(up) == set(inst)
        wait_until(lambda: q("hamaster_minions_connected") == dict.fromkeys(both, 2.0), 30, 0.5,
                   "minions_connected == 2 on each master")
        wait_until(lambda: q('hamaster_keys{state="minions"}') == dict.fromkeys(both, 2.0), 20, 0.5,
                   "2 accepted keys on each master")

        # one more minion: pending on both, then accepted through master0, counted on both
        cluster.add_minion("p3")
        wait_until(lambda: q('hamaster_keys{state="minions_pre"}') == dict.fromkeys(both, 1.0), 30,
                   0.5,
                   "p3 pending on both masters")
        cluster.run("hamaster-key", "-a", "p3", "-y", master=0, check=True)
        wait_until(lambda: q('hamaster_keys{state="minions"}') == dict.fromkeys(both, 3.0), 30, 0.5,
                   "3 accepted keys on both masters")
        assert q('hamaster_keys{state="minions_pre"}') == dict.fromkeys(both, 0.0)
        wait_until(lambda: q("hamaster_minions_connected") == dict.fromkeys(both, 3.0), 30, 0.5,
                   "minions_connected == 3 on each master")
        assert q("count(count by (hash) (hamaster_config_info))") == {"": 1.0}

        # SIGKILL master1: its up goes to 0, master0's figures stay right
        dead = f"127.0.0.1:{ports[1]}"
        alive = f"127.0.0.1:{ports[0]}"
        cluster.masters[1]["proc"].kill()
        wait_until(lambda: q('up{job="hamaster"}') == {dead: 0.0, alive: 1.0}, 30, 0.5,
                   "up == 0 for the killed master")
        wait_until(lambda: q("hamaster_cluster_masters_alive") == {"master0": 1.0}, 30, 0.5,
                   "master0 sees one master alive")
        assert q("hamaster_minions_connected") == {"master0": 3.0}
        assert q('hamaster_keys{state="minions"}') == {"master0": 3.0}
        assert q("hamaster_store_up") == {"master0": 1.0}
        # and master0 still serves the minions
        assert cluster.ping("p3", master=0) == {"p3": True}
        assert q('up{job="hamaster"}') == {dead: 0.0, alive: 1.0}
    except AssertionError:
        print(f"===== prometheus log (tail) =====\n{prom.log_text()[-3000:]}")
        raise
    finally:
        prom.stop()

"""Auth storms against real masters (issue 12): used by tests/integration/test_storm.py and
bench/bench_storm.py.

N swarm identities (``hamaster-minion --swarm N --procs P``, keys kept between runs, pinned
master keys forgotten) start at once against the cluster's masters; every ``sample_s`` the
number answering ``test.ping`` through each master is counted (over the master's CLI socket),
with the masters' RSS, CPU seconds and ``hamaster_auth_*`` counters.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hamaster.localapi import LocalClient
from tests.integration.harness import Cluster, Proc
from tests.kit import rss_mib

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (one level: the swarm's processes)."""
    total = cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def metric_sum(port: int, name: str) -> dict[str, float]:
    """``name``'s samples on a master's /metrics, by their label set text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def answering(master: dict, tgt: str, timeout: float) -> set[str]:
    """Ids that return ``test.ping`` through ``master`` within ``timeout``."""
    sock_dir = master["conf"].get("sock_dir") or str(
        Path(master["conf"]["root_dir"]) / "var/run/hamaster/master")
    got: set[str] = set()
    with LocalClient(sock_dir, timeout=timeout + 30) as client:
        client.send({"cmd": "publish", "tgt": tgt, "tgt_type": "glob", "fun": "test.ping",
                     "arg": [], "timeout": timeout})
        for frame in client.stream():
            if "minions" in frame and not (frame.get("jid") and frame["minions"]):
                break               # no minion matched (none accepted yet): no job, no stream
            for mid, ret in (frame.get("ret") or {}).items():
                if ret.get("return") is True if isinstance(ret, dict) else ret is True:
                    got.add(mid)
    return got


def _accepted(port: int) -> float:
    return sum(v for k, v in metric_sum(port, "hamaster_auth_requests_total").items()
               if 'result="accepted"' in k)


@dataclass
class StormResult:
    """What a storm did: the curve and the masters' costs."""

    n: int
    converged_s: float | None = None
    #: (seconds since start, answering through master 0, through master 1, …)
    curve: list[tuple[float, ...]] = field(default_factory=list)
    #: accepted ``_auth`` requests of each master at each sample (since the storm's start)
    auth_curve: list[tuple[int, ...]] = field(default_factory=list)
    shed: dict[str, float] = field(default_factory=dict)
    auths_accepted: float = 0.0
    master_cpu_s: list[float] = field(default_factory=list)
    master_rss_mib: list[float] = field(default_factory=list)
    master_fds: list[int] = field(default_factory=list)
    #: CPU seconds of the load generator (the swarm processes) during the storm
    swarm_cpu_s: float = 0.0
    #: requests the masters served during the storm, by command (all masters)
    requests: dict[str, int] = field(default_factory=dict)
    swarm_log: str = ""

    def table(self) -> str:
        """The "answering over time" table."""
        k = len(self.curve[0]) - 1 if self.curve else 0
        heads = "".join(f"  master{i}" for i in range(k))
        auths = "".join(f"  auths{i}" for i in range(k)) if self.auth_curve else ""
        lines = [f"    t(s){heads}{auths}"]
        for i, row in enumerate(self.curve):
            line = f"{row[0]:8.1f}" + "".join(f"{v:9d}" for v in row[1:])
            if i < len(self.auth_curve):
                line += "".join(f"{v:8d}" for v in self.auth_curve[i])
            lines.append(line)
        return "\n".join(lines)

    def cpu_s_per_1000_auths(self) -> float | None:
        """Masters' CPU seconds (all masters) per 1,000 accepted auths."""
        return 1000 * sum(self.master_cpu_s) / self.auths_accepted if self.auths_accepted else None


def start_swarm(c: Cluster, n: int, procs: int, pki: Path, prefix: str,
                extra: dict | None = None) -> Proc:
    """``hamaster-minion --swarm n --procs procs`` against every master of ``c``."""
    conf = {
        "log_level": "info",        # run_storm's clock starts at each process's "started" line
        # a load generator: liveness pings at a realistic fleet rate, not the test rate
        "master_heartbeat_interval": 5.0, "master_dead_after": 20.0,
        "acceptance_wait_time": 2, "auth_timeout": 5, "random_reauth_delay": 5,
        "keysize": 2048,
        "root_dir": "/",            # pki_dir is kept between runs (key generation is slow)
        "pki_dir": str(pki),
        "cachedir": str(c.base / f"{prefix}cache"),
        "sock_dir": str(c.base / f"{prefix}sock"),
        "log_file": str(c.base / f"{prefix}swarm.log"),
        **(extra or {}),
    }
    return c.add_minion(f"{prefix}swarm", extra=conf, args=[
        "--swarm", str(n), "--procs", str(procs), "--swarm-prefix", prefix,
        "--swarm-forget-master"])


def run_storm(c: Cluster, n: int, procs: int, pki: Path, metrics_ports: list[int], *,
              prefix: str = "st-", deadline_s: float = 60.0, ping_timeout: float = 4.0,
              sample_s: float = 1.0,
              swarm_extra: dict | None = None, swarm: Proc | None = None) -> StormResult:
    """Start the swarm (unless given) and sample until all ``n`` answer through every master."""
    res = StormResult(n)
    pids = [m["proc"].popen.pid for m in c.masters]
    cpu0 = [cpu_seconds(p) for p in pids]
    acc0s = [_accepted(port) for port in metrics_ports]
    req0 = [metric_sum(port, "hamaster_requests_total") for port in metrics_ports]
    acc0 = sum(acc0s)
    if swarm is None:
        swarm = start_swarm(c, n, procs, pki, prefix, swarm_extra)
    # The storm starts when every swarm process has loaded its identities (key generation and
    # loading is the load generator's cost, not the masters'): their "started" log lines.
    log = c.base / f"{prefix}swarm.log"
    t_wait = time.monotonic()
    while time.monotonic() - t_wait < 600 and swarm.running():
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(f"minion {prefix}swarm started (") >= min(procs, n):
            break
        time.sleep(0.1)
    swarm_cpu0 = tree_cpu_seconds(swarm.popen.pid)
    t0 = time.monotonic()
    next_sample = t0
    while time.monotonic() - t0 < deadline_s:
        # pacing of the samples (a ping finds nobody and returns at once before any auth)
        time.sleep(max(0.0, next_sample - time.monotonic()))
        next_sample = time.monotonic() + sample_s
        counts = [len(answering(m, f"{prefix}*", ping_timeout)) for m in c.masters]
        res.curve.append((round(time.monotonic() - t0, 1), *counts))
        try:
            res.auth_curve.append(tuple(int(_accepted(port) - a0)
                                        for port, a0 in zip(metrics_ports, acc0s, strict=True)))
        except OSError:  # a master not answering /metrics: no figure for this sample
            res.auth_curve.append(tuple(-1 for _ in metrics_ports))
        if all(k == n for k in counts):
            res.converged_s = res.curve[-1][0]
            break
        if not swarm.running():
            break
    res.master_cpu_s = [cpu_seconds(p) - c0 for p, c0 in zip(pids, cpu0, strict=True)]
    res.master_rss_mib = [round(rss_mib(p), 1) for p in pids]
    res.master_fds = [len(os.listdir(f"/proc/{p}/fd")) for p in pids]
    if swarm.running():
        res.swarm_cpu_s = round(tree_cpu_seconds(swarm.popen.pid) - swarm_cpu0, 1)
    for port in metrics_ports:
        for labels, v in metric_sum(port, "hamaster_auth_shed_total").items():
            why = re.search(r'reason="([^"]+)"', labels)
            if why:
                res.shed[why.group(1)] = res.shed.get(why.group(1), 0) + v
        res.auths_accepted += _accepted(port)
    for port, before in zip(metrics_ports, req0, strict=True):
        for labels, v in metric_sum(port, "hamaster_requests_total").items():
            cmd = re.search(r'cmd="([^"]+)"', labels)
            if cmd:
                name = cmd.group(1)
                res.requests[name] = res.requests.get(name, 0) + int(v - before.get(labels, 0))
    res.auths_accepted -= acc0
    res.swarm_log = log.read_text(errors="replace") if log.exists() else ""
    return res

"""The one process harness for integration tests: N masters + M minions on free ports.

Processes are real (``hamaster-master`` / ``hamaster-minion`` subprocesses), each in its own
process group, stopped by PID with SIGTERM then SIGKILL. Waits poll a condition against a
deadline; nothing sleeps for a fixed time as synchronisation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.kit import free_port, kill_group, stop_group, wait_until

__all__ = ["BIN", "Cluster", "Proc", "free_port", "wait_until"]

BIN = Path(sys.executable).parent


@dataclass
class Proc:
    """A daemon started by the harness."""

    name: str
    argv: list[str]
    confdir: Path
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        """Start (or restart) the process in its own process group."""
        self.log_fh = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self.log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group."""
        if self.running():
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, wait, then SIGKILL it (tests.kit.stop_group); close the log."""
        if self.popen is None:
            return
        stop_group(self.popen, timeout)
        self.log_fh.close()

    def kill(self) -> None:
        """SIGKILL the group and reap it."""
        if self.running():
            kill_group(self.popen)
            self.log_fh.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Cluster:
    """Masters and minions under one temporary directory."""

    base: Path
    procs: list[Proc] = field(default_factory=list)
    masters: list[dict] = field(default_factory=list)
    owns_base: bool = False

    @classmethod
    def create(cls) -> Cluster:
        """A cluster under a short private directory in /tmp (Unix socket paths stay short)."""
        return cls(Path(tempfile.mkdtemp(prefix="hm-", dir="/tmp")), owns_base=True)

    def _write_conf(self, confdir: Path, name: str, conf: dict) -> None:
        confdir.mkdir(parents=True, exist_ok=True)
        (confdir / name).write_text(yaml.safe_dump(conf))

    def add_master(self, extra: dict | None = None,
                   host: str = "127.0.0.1", start: bool = True) -> dict:
        """Configure (and start) a master; returns its info dict."""
        idx = len(self.masters)
        confdir = self.base / f"master{idx}" / "conf"
        root = self.base / f"master{idx}" / "root"
        conf = {
            "root_dir": str(root),
            "interface": host,
            "publish_port": free_port(host),
            "ret_port": free_port(host),
            "master_id": f"master{idx}",
            "log_level": "debug",
            "timeout": 10,
            # the CLI probes minions that have not returned after -t every gather_job_timeout
            # (Salt's 10 s): short here, so a test pinging a stopped minion does not wait long
            "gather_job_timeout": 2,
            "ha_poll_interval": 0.2,
        }
        conf.update(extra or {})
        self._write_conf(confdir, "master", conf)
        proc = Proc(
            f"master{idx}",
            [str(BIN / "hamaster-master"), "-c", str(confdir), "-l", str(conf["log_level"])],
            confdir,
            self.base / f"master{idx}.log",
        )
        info = {"conf": conf, "confdir": confdir, "proc": proc, "host": host}
        self.masters.append(info)
        self.procs.append(proc)
        if start:
            proc.start()
            self.wait_master_ready(info)
        return info

    def wait_master_ready(self, info: dict, timeout: float = 20) -> None:
        sock = Path(info["conf"]["root_dir"]) / "var/run/hamaster/master/master.sock"
        if "sock_dir" in info["conf"]:
            sock = Path(info["conf"]["sock_dir"]) / "master.sock"
        def ready() -> bool:
            if not info["proc"].running():
                raise AssertionError(f"{info['proc'].name} "
                                     f"exited:\n{info['proc'].log_text()[-3000:]}")
            return sock.exists()
        wait_until(ready, timeout, what=f"{info['proc'].name} ready")

    def add_minion(self, mid: str, masters: list[dict] | None = None, extra: dict | None = None,
                   start: bool = True, args: list[str] | None = None) -> Proc:
        """Configure (and start) a minion connected to ``masters`` (default: all)."""
        masters = masters if masters is not None else self.masters
        confdir = self.base / f"minion-{mid}" / "conf"
        conf = {
            "root_dir": str(self.base / f"minion-{mid}" / "root"),
            "id": mid,
            "master": [f"{m['host']}:{m['conf']['ret_port']}" for m in masters],
            "acceptance_wait_time": 0.5,
            "random_reauth_delay": 0,      # re-auth at once after a publish-key rotation
            "log_level": "debug",
            "master_heartbeat_interval": 1.0,
            "master_dead_after": 4.0,
            "auth_timeout": 3,
        }
        conf.update(extra or {})
        self._write_conf(confdir, "minion", conf)
        proc = Proc(
            f"minion-{mid}",
            [str(BIN / "hamaster-minion"), "-c", str(confdir), "-l",
             str(conf["log_level"]), *(args or [])],
            confdir,
            self.base / f"minion-{mid}.log",
        )
        self.procs.append(proc)
        if start:
            proc.start()
        return proc

    def run(self, cmd: str, *args: str, master: int = 0,
            check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a CLI (``hamaster``, ``hamaster-key``…) against master ``master``."""
        argv = [str(BIN / cmd), "-c", str(self.masters[master]["confdir"]), *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def keys(self, master: int = 0) -> dict:
        out = self.run("hamaster-key", "-L", "--out", "json", master=master, check=True).stdout
        return json.loads(out)

    def ping(self, target: str = "*", master: int = 0,
             timeout: float = 5, extra: tuple = ()) -> dict:
        """``hamaster TARGET test.ping --out json --static``; returns the parsed mapping."""
        res = self.run("hamaster", "-t", str(timeout), "--out", "json", "--static", *extra, target,
                       "test.ping", master=master)
        try:
            return json.loads(res.stdout) if res.stdout.strip() else {}
        except json.JSONDecodeError:
            return {}

    def wait_all_answer(self, ids: list[str], master: int = 0, timeout: float = 30) -> None:
        """Wait until every id answers test.ping through ``master``."""
        want = set(ids)
        wait_until(
            lambda: {k for k, v in self.ping(master=master, timeout=3).items()
                     if v is True} >= want,
            timeout, interval=0.2, what=f"{sorted(want)} answering through master{master}",
        )

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

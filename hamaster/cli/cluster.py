"""``hamaster-cluster``: a local demo cluster (N masters sharing one ``ha_dir``, M minions).

``up`` starts it, accepts the minion keys once and waits until every minion answers through
every master; ``status`` shows it; ``down`` stops it (by PID); ``demo`` runs the whole story:
ping through each master, kill master 1, ping through the others, restart it, ping through it
again, with timings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from hamaster.cli.common import die

DEFAULT_DIR = "/tmp/hamaster-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


class LocalCluster:
    """Layout, processes and state file of a local cluster under one directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state_file = base / "cluster.json"
        self._lock = threading.Lock()
        self.state: dict = {}
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    def save(self) -> None:
        """Write the state file atomically (safe from several threads)."""
        with self._lock:
            tmp = self.state_file.with_name(f".{self.state_file.name}.{threading.get_ident()}")
            tmp.write_text(json.dumps(self.state, indent=2))
            os.replace(tmp, self.state_file)

    # -- layout -------------------------------------------------------------------------------------

    def configure(self, n_masters: int, n_minions: int) -> None:
        shared = self.base / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        (shared / "file_roots" / "base").mkdir(parents=True, exist_ok=True)
        hello = shared / "file_roots" / "base" / "hello.txt"
        if not hello.exists():
            hello.write_text("hello from the shared file_roots\n")
        masters = []
        for i in range(n_masters):
            conf = {
                "master_id": f"master{i + 1}",
                "root_dir": str(self.base / f"master{i + 1}"),
                "interface": "127.0.0.1",
                "publish_port": _free_port(),
                "ret_port": _free_port(),
                "ha_backend": "fs",
                "ha_dir": str(shared),
                "log_level": "info",
                "timeout": 5,
            }
            confdir = self.base / f"master{i + 1}" / "conf"
            confdir.mkdir(parents=True, exist_ok=True)
            (confdir / "master").write_text(yaml.safe_dump(conf))
            masters.append({"name": conf["master_id"], "confdir": str(confdir), "conf": conf, "pid": None})
        minions = []
        for j in range(n_minions):
            mid = f"minion{j + 1}"
            conf = {
                "id": mid,
                "root_dir": str(self.base / mid),
                "master": [f"127.0.0.1:{m['conf']['ret_port']}" for m in masters],
                "acceptance_wait_time": 1,
                "log_level": "info",
                "master_heartbeat_interval": 1.0,
                "master_dead_after": 4.0,
            }
            confdir = self.base / mid / "conf"
            confdir.mkdir(parents=True, exist_ok=True)
            (confdir / "minion").write_text(yaml.safe_dump(conf))
            minions.append({"name": mid, "confdir": str(confdir), "pid": None})
        self.state = {"masters": masters, "minions": minions}
        self.save()

    # -- processes ----------------------------------------------------------------------------------

    def _start(self, entry: dict, kind: str) -> None:
        log = open(self.base / f"{entry['name']}.log", "ab")
        proc = subprocess.Popen(
            [_bin(f"hamaster-{kind}"), "-c", entry["confdir"]],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        entry["pid"] = proc.pid
        self.save()

    @staticmethod
    def alive(entry: dict) -> bool:
        pid = entry.get("pid")
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split()[2] != "Z"
        except OSError:
            return True

    def stop(self, entry: dict, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        pid = entry.get("pid")
        if not pid or not self.alive(entry):
            entry["pid"] = None
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.alive(entry):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if self.alive(entry):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        entry["pid"] = None
        self.save()

    def start_master(self, m: dict, timeout: float = 20) -> None:
        from hamaster.config import load_master_config
        from hamaster.localapi import socket_path

        self._start(m, "master")
        sock = socket_path(load_master_config(m["confdir"])["sock_dir"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(m):
                raise RuntimeError(f"{m['name']} exited; see {self.base / (m['name'] + '.log')}")
            if _accepts(sock):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{m['name']} did not become ready in {timeout}s")

    def ping(self, m: dict, timeout: float = 3) -> dict:
        """``test.ping`` to every minion through master ``m``: {id: True} for those that answered."""
        from hamaster.config import load_master_config
        from hamaster.localapi import LocalApiError, LocalClient

        opts = load_master_config(m["confdir"])
        try:
            with LocalClient(opts["sock_dir"], timeout=timeout + 5) as c:
                c.send({"cmd": "publish", "tgt": "*", "tgt_type": "glob", "fun": "test.ping", "arg": [], "timeout": timeout})
                pub = c.recv()
                if not pub.get("jid"):
                    return {}
                got = {}
                for msg in c.stream():
                    for mid, ret in (msg.get("ret") or {}).items():
                        got[mid] = ret.get("return")
                return got
        except (LocalApiError, OSError):
            return {}

    def wait_all(self, m: dict, ids: list[str], timeout: float = 30) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            got = self.ping(m, timeout=2)
            if all(got.get(i) is True for i in ids):
                return time.monotonic() - t0
        raise RuntimeError(f"not every minion answered through {m['name']} within {timeout}s")

    def accept_keys(self, ids: list[str], timeout: float = 30) -> None:
        from hamaster.config import load_master_config
        from hamaster.master.shared import open_shared_state

        keys = open_shared_state(load_master_config(self.state["masters"][0]["confdir"])).keys
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            keys.load()
            pending = set(keys.list_keys().get(_pending_state(), []))
            accepted = set(keys.accepted_ids())
            for mid in pending & set(ids):
                keys.accept(mid)
            if set(ids) <= accepted | pending:
                if set(ids) <= set(keys.accepted_ids()):
                    return
            time.sleep(0.1)
        raise RuntimeError("minion keys did not show up as pending in time")


def _accepts(path: str) -> bool:
    """True when a Unix socket at ``path`` accepts a connection (a stale file does not)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pending_state():
    from hamaster.pki_sync.keys import KeyState

    return KeyState.PENDING


def cmd_up(c: LocalCluster, n_masters: int, n_minions: int) -> int:
    t0 = time.monotonic()
    if c.state and any(c.alive(e) for e in c.state.get("masters", []) + c.state.get("minions", [])):
        return die(f"a cluster is already running in {c.base}; run `hamaster-cluster down --dir {c.base}` first")
    c.configure(n_masters, n_minions)
    for m in c.state["masters"]:
        c.start_master(m)
    for n in c.state["minions"]:
        c._start(n, "minion")
    ids = [n["name"] for n in c.state["minions"]]
    c.accept_keys(ids)
    print(f"keys accepted once for {len(ids)} minions (shared by all {n_masters} masters)")
    for m in c.state["masters"]:
        c.wait_all(m, ids)
        print(f"  every minion answers through {m['name']} ({m['conf']['interface']}:{m['conf']['ret_port']})")
    print(f"cluster up in {time.monotonic() - t0:.2f} s: {n_masters} masters, {n_minions} minions, dir {c.base}")
    return 0


def cmd_status(c: LocalCluster) -> int:
    if not c.state:
        return die(f"no cluster in {c.base}")
    for kind in ("masters", "minions"):
        for e in c.state[kind]:
            print(f"{e['name']:<10} {'running' if c.alive(e) else 'stopped':<8} pid {e.get('pid')}")
    live = [m for m in c.state["masters"] if c.alive(m)]
    if live:
        res = subprocess.run([_bin("hamaster-run"), "-c", live[0]["confdir"], "cluster.status"], capture_output=True, text=True)
        print(res.stdout.rstrip())
    return 0


def cmd_down(c: LocalCluster) -> int:
    if not c.state:
        print(f"no cluster in {c.base}")
        return 0
    for e in c.state.get("minions", []) + c.state.get("masters", []):
        c.stop(e)
    print(f"cluster in {c.base} stopped")
    return 0


def cmd_demo(c: LocalCluster, n_masters: int, n_minions: int, keep: bool) -> int:
    if n_masters < 2:
        return die("the demo needs at least 2 masters")
    rc = cmd_up(c, n_masters, n_minions)
    if rc:
        return rc
    ids = [n["name"] for n in c.state["minions"]]
    try:
        masters = c.state["masters"]
        for m in masters:
            t0 = time.monotonic()
            got = c.ping(m)
            print(f"ping through {m['name']}: {sum(v is True for v in got.values())}/{len(ids)} in {time.monotonic() - t0:.3f} s")
        victim, others = masters[0], masters[1:]
        t_kill = time.monotonic()
        c.stop(victim, signal.SIGKILL)
        print(f"killed {victim['name']} (SIGKILL)")
        for m in others:
            t0 = time.monotonic()
            got = c.ping(m)
            print(f"ping through {m['name']} with {victim['name']} dead: {sum(v is True for v in got.values())}/{len(ids)} in {time.monotonic() - t0:.3f} s")
        t0 = time.monotonic()
        c.start_master(victim)
        took = c.wait_all(victim, ids)
        print(f"restarted {victim['name']}: every minion answers through it {time.monotonic() - t0:.2f} s after restart (ping loop {took:.2f} s); {victim['name']} was down {t0 - t_kill:.2f} s")
        got = c.ping(victim)
        print(f"ping through {victim['name']} again: {sum(v is True for v in got.values())}/{len(ids)}")
        ok = all(got.get(i) is True for i in ids)
    finally:
        if not keep:
            cmd_down(c)
    print("demo passed" if ok else "demo FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="hamaster-cluster",
        description="Start, inspect and stop a local hamaster cluster on the embedded fs backend.",
        epilog="Examples:\n  hamaster-cluster demo\n  hamaster-cluster up --masters 2 --minions 3\n"
        "  hamaster-cluster status\n  hamaster-cluster down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "demo", "status", "down"):
        sp = sub.add_parser(name)
        sp.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
        if name in ("up", "demo"):
            sp.add_argument("--masters", type=int, default=2)
            sp.add_argument("--minions", type=int, default=3)
        if name == "demo":
            sp.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    args = p.parse_args(argv)
    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    c = LocalCluster(base)
    try:
        if args.cmd == "up":
            return cmd_up(c, args.masters, args.minions)
        if args.cmd == "demo":
            return cmd_demo(c, args.masters, args.minions, args.keep)
        if args.cmd == "status":
            return cmd_status(c)
        return cmd_down(c)
    except RuntimeError as exc:
        return die(str(exc), 1)


if __name__ == "__main__":
    raise SystemExit(main())

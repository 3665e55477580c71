"""A local cluster under one directory: its layout, configuration files, processes and state
file (``cluster.json``), for ``hamaster-cluster`` (:mod:`hamaster.cli.cluster`, which only
parses arguments and prints) and ``hamaster-drill`` (:mod:`hamaster.drill.actions`).

Backends: ``fs`` (one shared ``<dir>/shared``), ``etcd`` (an existing etcd, or local members
started here) and ``rsync`` (a tree per master, served by an authenticated rsync daemon each);
backend processes are ``services`` in ``cluster.json`` with their PID, command line and log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from hamaster import cluster_services as cs
from hamaster.store import registry as store_registry

#: The default cluster directory: created 0700 and refused if another user owns it (see
#: hamaster.localdirs), so no one else can plant a ``master.d`` file or swap a socket in it.
DEFAULT_DIR = "/tmp/hamaster-demo"
BACKENDS = store_registry.names()
RSYNC_MAX_BACKOFF = 2.0  # a local peer that is back is retried within 2 s (default 30 s)


def program(name: str) -> str:
    """The path of console script ``name`` next to this Python (else ``name``, from PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


class LocalCluster:
    """Layout, processes and state file of a local cluster under one directory."""

    def __init__(self, base: Path, create: bool = False) -> None:
        """The cluster under ``base``, which must be the user's own private directory.

        Raises :class:`~hamaster.localdirs.UnsafeDirectory` if another user owns it or could
        write into it (anyone who can add a ``master.d`` file there controls the cluster).
        ``create`` makes it (0700) when missing.
        """
        from hamaster.localdirs import ensure_private_dir

        ensure_private_dir(base, "cluster directory", create=create, only_me=True)
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

    # -- layout ------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self.state.get("backend", "fs")

    def services(self, kind: str | None = None) -> list[dict]:
        """Backend processes (etcd members, rsync daemons), optionally of one ``kind``."""
        return [e for e in self.state.get("services", []) if kind is None or e.get("kind") == kind]

    def configure(self, n_masters: int, n_minions: int, backend: str = "fs",
                  etcd_endpoints: list[str] | None = None, etcd_members: int = 3) -> None:
        old = self.state
        services: list[dict] = []
        extra: dict = {}
        per_master: list[dict] = [{} for _ in range(n_masters)]
        if backend == "fs":
            shared = self.base / "shared"
            shared.mkdir(parents=True, exist_ok=True)
            (shared / "file_roots" / "base").mkdir(parents=True, exist_ok=True)
            hello = shared / "file_roots" / "base" / "hello.txt"
            if not hello.exists():
                hello.write_text(HELLO)
            per_master = [{"ha_backend": "fs", "ha_dir": str(shared)} for _ in range(n_masters)]
        elif backend == "etcd":
            extra["etcd"] = etcd = self._configure_etcd(old, etcd_endpoints, etcd_members, services)
            per_master = [{"ha_backend": "etcd", "ha_etcd_endpoints": etcd["endpoints"],
                           "ha_etcd_prefix": etcd["prefix"]} for _ in range(n_masters)]
        elif backend == "rsync":
            per_master = self._configure_rsync(n_masters, services)
        else:
            raise RuntimeError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
        masters = []
        for i in range(n_masters):
            conf = {
                "master_id": f"master{i + 1}",
                "root_dir": str(self.base / f"master{i + 1}"),
                "interface": "127.0.0.1",
                "publish_port": cs.free_port(),
                "ret_port": cs.free_port(),
                **per_master[i],
                "log_level": "info",
                "timeout": 5,
            }
            confdir = self.base / f"master{i + 1}" / "conf"
            confdir.mkdir(parents=True, exist_ok=True)
            (confdir / "master").write_text(yaml.safe_dump(conf))
            masters.append({"name": conf["master_id"], "confdir": str(confdir),
                            "conf": conf, "pid": None})
        minions = []
        for j in range(n_minions):
            mid = f"minion{j + 1}"
            conf = {
                "id": mid,
                "root_dir": str(self.base / mid),
                "master": [f"127.0.0.1:{m['conf']['ret_port']}" for m in masters],
                "acceptance_wait_time": 1,
                "random_reauth_delay": 0,
                "log_level": "info",
                "master_heartbeat_interval": 1.0,
                "master_dead_after": 4.0,
            }
            confdir = self.base / mid / "conf"
            confdir.mkdir(parents=True, exist_ok=True)
            (confdir / "minion").write_text(yaml.safe_dump(conf))
            minions.append({"name": mid, "confdir": str(confdir), "pid": None})
        self.state = {"backend": backend, "masters": masters, "minions": minions,
                      "services": services, **extra}
        self.save()

    def _configure_etcd(self, old: dict, endpoints: list[str] | None,
                        n: int, services: list[dict]) -> dict:
        """Either an existing etcd (own prefix) or ``n`` local members (ports kept across
        up/down)."""
        if endpoints:
            prev = old.get("etcd") or {}
            prefix = (prev.get("prefix")
                      if prev.get("endpoints") == endpoints and not prev.get("local") else None)
            return {"local": False, "endpoints": endpoints,
                    "prefix": prefix or f"/hamaster-cluster/{secrets.token_hex(4)}"}
        etcd_bin = shutil.which("etcd")
        if etcd_bin is None:
            raise RuntimeError("--backend etcd without --etcd-endpoints needs the etcd binary "
                               "(Debian: apt-get install etcd-server etcd-client)")
        names = [f"etcd{i + 1}" for i in range(n)]
        datadir = self.base / "etcd"
        prev = {e["name"]: e for e in old.get("services", []) if e.get("kind") == "etcd"}
        if sorted(prev) == names and all((datadir / nm).is_dir() for nm in names):
            ports = [(prev[nm]["client_port"], prev[nm]["peer_port"]) for nm in names]
            busy = [p for pair in ports for p in pair if cs.port_open(p)]
            if busy:
                raise RuntimeError(f"the etcd data in {datadir} needs ports {busy}, which "
                                   f"are in use; stop what uses them, or remove "
                                   f"{self.base} and start afresh")
        else:
            shutil.rmtree(datadir, ignore_errors=True)
            ports = [(cs.free_port(), cs.free_port()) for _ in names]
        datadir.mkdir(parents=True, exist_ok=True)
        initial = cs.etcd_initial_cluster(
            [(nm, pp) for nm, (_, pp) in zip(names, ports, strict=True)])
        for nm, (cp, pp) in zip(names, ports, strict=True):
            services.append({
                "name": nm, "kind": "etcd", "pid": None, "endpoint": f"127.0.0.1:{cp}",
                "client_port": cp, "peer_port": pp, "data_dir": str(datadir / nm),
                "log": str(self.base / f"{nm}.log"),
                "argv": cs.etcd_argv(etcd_bin, nm, datadir / nm, cp, pp, initial),
            })
        return {"local": True,
                "endpoints": [e["endpoint"] for e in services], "prefix": "/hamaster"}

    def _configure_rsync(self, n: int, services: list[dict]) -> list[dict]:
        """Per master: its own ha_dir, an authenticated rsync daemon serving it, the others as
        peers."""
        rsync_bin = shutil.which("rsync")
        if rsync_bin is None:
            raise RuntimeError("--backend rsync needs rsync (Debian: apt-get install rsync)")
        password = secrets.token_hex(16)
        per_master = []
        for i in range(n):
            name = f"master{i + 1}"
            ha_dir = self.base / name / "ha"
            port = cs.free_port()
            conf, passfile = cs.write_rsyncd_config(
                self.base / "rsyncd" / name, ha_dir, port, password)
            services.append({
                "name": f"rsyncd-{name}", "kind": "rsyncd", "master": name, "pid": None,
                "port": port,
                "path": str(ha_dir), "log": str(self.base / f"rsyncd-{name}.log"),
                "argv": cs.rsyncd_argv(rsync_bin, conf, port),
            })
            per_master.append({"ha_backend": "rsync", "ha_dir": str(ha_dir),
                               "ha_rsync_password_file": str(passfile),
                               "ha_rsync_max_backoff": RSYNC_MAX_BACKOFF})
        for i, conf in enumerate(per_master):
            conf["ha_rsync_peers"] = [f"rsync://hamaster@127.0.0.1:{e['port']}/hamaster"
                                      for j, e in enumerate(services) if j != i]
        hello = Path(per_master[0]["ha_dir"]) / "file_roots" / "base" / "hello.txt"
        if not hello.exists():  # the first master's tree; replication brings it to the others
            hello.parent.mkdir(parents=True, exist_ok=True)
            hello.write_text(HELLO)
        return per_master

    # -- backend processes -------------------------------------------------------------------------

    def start_service(self, entry: dict) -> None:
        """Start one etcd member or rsync daemon (idempotent); see :meth:`wait_service`."""
        if self.alive(entry):
            return
        proc = cs.spawn(entry["argv"], entry["log"])
        entry["pid"] = proc.pid
        self.save()

    def wait_service(self, entry: dict, timeout: float = 30) -> float:
        """Seconds until the service serves: an etcd member a quorum read, a daemon its port."""
        t0 = time.monotonic()
        if entry["kind"] == "rsyncd":
            cs.wait_port(lambda: self.alive(entry), entry["port"], timeout,
                         entry["name"], entry["log"])
            return time.monotonic() - t0
        while time.monotonic() - t0 < timeout:
            if not self.alive(entry):
                raise RuntimeError(f"{entry['name']} exited; see {entry['log']}")
            if cs.etcd_healthy(entry["endpoint"]):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"{entry['name']} not healthy after {timeout:g}s; see {entry['log']}")

    def start_services(self, entries: list[dict], timeout: float = 30) -> float:
        """Start every entry, then wait until each serves; seconds taken."""
        t0 = time.monotonic()
        for e in entries:
            self.start_service(e)
        for e in entries:
            self.wait_service(e, max(1.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def seed_store(self) -> None:
        """Put the demo file in an etcd store's file_roots (fs and rsync get it as a file)."""
        if self.backend != "etcd":
            return
        from hamaster.config import load_master_config
        from hamaster.master.shared import open_store

        store = open_store(load_master_config(self.state["masters"][0]["confdir"]))
        try:
            if store.get("file_roots/base/hello.txt") is None:
                store.put("file_roots/base/hello.txt", HELLO.encode())
        finally:
            store.close()

    # -- processes ---------------------------------------------------------------------------------

    def _start(self, entry: dict, kind: str) -> None:
        log = open(self.base / f"{entry['name']}.log", "ab")
        proc = subprocess.Popen(
            [program(f"hamaster-{kind}"), "-c", entry["confdir"]],
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
        """Start master ``m`` and wait until it is ready."""
        self._start(m, "master")
        self.wait_master(m, timeout)

    def wait_master(self, m: dict, timeout: float = 20) -> None:
        """Wait until master ``m`` (started) accepts CLI connections."""
        from hamaster.config import load_master_config
        from hamaster.localapi import socket_path

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
        """``test.ping`` to every minion through master ``m``: {id: True} for those that
        answered."""
        from hamaster.config import load_master_config
        from hamaster.localapi import LocalApiError, LocalClient

        opts = load_master_config(m["confdir"])
        try:
            with LocalClient(opts["sock_dir"], timeout=timeout + 5) as c:
                c.send({"cmd": "publish", "tgt": "*", "tgt_type": "glob", "fun": "test.ping",
                        "arg": [], "timeout": timeout})
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


HELLO = "hello from the shared file_roots\n"


def _pending_state():
    from hamaster.pki_sync.keys import KeyState

    return KeyState.PENDING



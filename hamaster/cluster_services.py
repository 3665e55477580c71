"""Start-up of the local backing services of a test or demo cluster: etcd members, rsync daemons.

Used by ``hamaster-cluster`` (processes recorded by PID in ``cluster.json``) and by the
integration-test fixtures (``tests/integration/services.py``), so both start the services the same
way: Debian's ``etcd`` binary on loopback ports, and ``rsync --daemon --no-detach`` serving one
authenticated module (secrets file and client password file, both mode 0600).

Every process is started in its own session (``start_new_session``), so its PID is also its
process group and it survives the CLI that started it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ETCD_HEARTBEAT_MS = 100   # etcd's defaults: an election takes about a second after a leader dies
ETCD_ELECTION_MS = 1000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def spawn(argv: list[str], log_path: str | Path) -> subprocess.Popen:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                start_new_session=True)


# ---------------------------------------------------------------------------------- etcd


def etcd_initial_cluster(members: list[tuple[str, int]]) -> str:
    """``--initial-cluster`` for ``[(name, peer_port), ...]`` on loopback."""
    return ",".join(f"{name}=http://127.0.0.1:{peer}" for name, peer in members)


def etcd_argv(etcd: str, name: str, data_dir: str | Path, client_port: int, peer_port: int,
              initial_cluster: str, heartbeat_ms: int = ETCD_HEARTBEAT_MS,
              election_ms: int = ETCD_ELECTION_MS) -> list[str]:
    """The command line of one loopback etcd member (restartable: the data dir is kept)."""
    return [
        etcd, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://127.0.0.1:{client_port}",
        "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", initial_cluster,
        "--initial-cluster-state", "new",
        "--heartbeat-interval", str(heartbeat_ms),
        "--election-timeout", str(election_ms),
        "--log-level", "warn",
    ]


def etcd_healthy(endpoint: str, timeout: float = 1.0, etcdctl: str | None = None) -> bool:
    """True when ``endpoint`` serves a quorum read (``etcdctl endpoint health``).

    Without ``etcdctl`` (Debian's etcd-client) the read goes through the store's own client.
    """
    etcdctl = etcdctl or shutil.which("etcdctl")
    if etcdctl:
        try:
            r = subprocess.run([etcdctl, f"--endpoints={endpoint}", f"--command-timeout={timeout}s",
                                "endpoint", "health"], capture_output=True, timeout=timeout + 2,
                               env={**os.environ, "ETCDCTL_API": "3"})
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0
    from hamaster.store.base import StoreError
    from hamaster.store.etcd import EtcdStore

    store = EtcdStore([endpoint], prefix="/hamaster-health", timeout=timeout)
    try:
        store.get("probe")
        return True
    except StoreError:
        return False
    finally:
        store.close()


def etcd_leader(endpoints: list[str], timeout: float = 2.0) -> str | None:
    """The client endpoint (``host:port``) of the current etcd leader, None when none is known."""
    import pyetcd

    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        try:
            client = pyetcd.client(host, int(port), timeout=timeout)
            try:
                urls = list(client.status().leader.client_urls)
            finally:
                client.close()
        except Exception:  # this member is down or has no leader: ask the next
            continue
        for url in urls:
            return url.split("://", 1)[-1].rstrip("/")
    return None


# ---------------------------------------------------------------------------------- rsync


def write_rsyncd_config(workdir: str | Path, path: str | Path, port: int, password: str,
                        module: str = "hamaster", user: str = "hamaster") -> tuple[Path, Path]:
    """An rsyncd.conf serving ``path`` as ``module`` to ``user`` (from 127.0.0.1 only).

    Writes ``rsyncd.conf``, ``rsyncd.secrets`` (``user:password``, 0600) and ``client.pass``
    (the password alone, 0600, for ``--password-file`` / ``ha_rsync_password_file``) in
    ``workdir``; returns ``(conf, client password file)``. Like ``ops/rsync/rsyncd.conf``,
    the module refuses every delete option (deletions travel as tombstones) and is
    ``write only``: the masters only push, so the password never lets anyone download the
    tree (``master.pem`` included).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    Path(path).mkdir(parents=True, exist_ok=True)
    secrets = workdir / "rsyncd.secrets"
    passfile = workdir / "client.pass"
    for f, text in ((secrets, f"{user}:{password}\n"), (passfile, password + "\n")):
        f.touch(mode=0o600)
        f.chmod(0o600)
        f.write_text(text)
    conf = workdir / "rsyncd.conf"
    conf.write_text(
        f"pid file = {workdir}/rsyncd.pid\n"
        "use chroot = no\nuid = root\ngid = root\n"
        f"log file = {workdir}/rsyncd.xfer.log\n"
        f"[{module}]\n"
        f"  path = {path}\n"
        "  read only = false\n"
        "  write only = yes\n"
        "  list = false\n"
        "  hosts allow = 127.0.0.1\n"
        f"  auth users = {user}\n"
        f"  secrets file = {secrets}\n"
        "  strict modes = true\n"
        "  refuse options = delete delete-before delete-during delete-after delete-delay "
        "delete-excluded remove-source-files\n"
    )
    return conf, passfile


def rsyncd_argv(rsync: str, conf: str | Path, port: int) -> list[str]:
    """``rsync --daemon`` in the foreground on ``127.0.0.1:port`` (so it can be stopped by PID)."""
    return [rsync, "--daemon", "--no-detach", f"--config={conf}",
            "--address=127.0.0.1", f"--port={port}"]


def wait_port(proc_alive: Callable[[], bool], port: int, timeout: float,
              what: str, log_path: str | Path) -> None:
    """Wait until ``port`` accepts connections; RuntimeError if ``proc_alive()`` turns False."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if not proc_alive():
            raise RuntimeError(f"{what} exited: {_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not listening on {port} after {timeout:g}s: "
                               f"{_tail(log_path)}")
        time.sleep(0.02)


def _tail(path: str | Path, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"

"""Real backing services for store tests: etcd (one node or a cluster) and an rsync daemon.

Each is a context manager that starts the service on free loopback ports in a private temp
directory and stops it by PID (SIGTERM, then SIGKILL) in ``finally``. When the binary is missing
the test is skipped with the reason (CI installs ``etcd-server etcd-client rsync``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hamaster import cluster_services as cs
from tests.kit import free_port


def need_binary(name: str) -> str:
    """Path of ``name`` or skip the test (the package that provides it is not installed)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install "
                    f"{'etcd-server etcd-client' if name.startswith('etcd') else name})")
    return path


def _tmpdir(tag: str) -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=f"hm-{tag}-", dir=base))


def _stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------- etcd


@dataclass
class EtcdMember:
    """One etcd member: ports, data dir and its process (restartable)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    initial_cluster: str
    heartbeat_ms: int
    election_ms: int
    proc: subprocess.Popen | None = None
    _started_once: bool = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """Start (or restart, keeping its data dir) this member."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = cs.spawn(cs.etcd_argv(need_binary("etcd"), self.name, self.data_dir,
                                          self.client_port,
                                          self.peer_port, self.initial_cluster, self.heartbeat_ms,
                                          self.election_ms), self.log_path)
        self._started_once = True

    def kill(self) -> None:
        """SIGKILL this member (a crash), by PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL), by PID."""
        _stop(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    """A running etcd cluster started by :func:`etcd_cluster` / :func:`etcd_server`."""

    members: list[EtcdMember] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def healthy(self, member: EtcdMember | None = None, timeout: float = 1.0) -> bool:
        """``etcdctl endpoint health`` (a quorum read) through ``member`` or any member."""
        targets = [member] if member else [m for m in self.members if m.running()]
        etcdctl = need_binary("etcdctl")
        return any(cs.etcd_healthy(m.endpoint, timeout, etcdctl) for m in targets)

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None and m._started_once \
                        and m.proc.returncode not in (None, -9, -15):
                    raise RuntimeError(f"etcd {m.name} exited {m.proc.returncode}: "
                                       f"{m.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        logs = "\n".join(f"--- {m.name}\n{m.log_path.read_text()[-1500:]}" for m in self.members)
        raise RuntimeError(f"etcd cluster not healthy after {timeout}s\n{logs}")

    def stop_all(self) -> None:
        for m in self.members:
            _stop(m.proc)


@contextmanager
def etcd_cluster(n: int = 3,
                 heartbeat_ms: int = 50, election_ms: int = 500) -> Iterator[EtcdCluster]:
    """An ``n``-member etcd cluster on loopback ports, data on /dev/shm; stopped at exit."""
    need_binary("etcd")
    need_binary("etcdctl")
    workdir = _tmpdir("etcd")
    names = [f"m{i}" for i in range(n)]
    ports = [(free_port(), free_port()) for _ in names]
    initial = cs.etcd_initial_cluster([(nm, pp) for nm, (_, pp) in zip(names, ports, strict=True)])
    cluster = EtcdCluster(workdir=workdir)
    for nm, (cp, pp) in zip(names, ports, strict=True):
        cluster.members.append(EtcdMember(
            name=nm, client_port=cp, peer_port=pp, data_dir=workdir / nm,
            log_path=workdir / f"{nm}.log", initial_cluster=initial,
            heartbeat_ms=heartbeat_ms, election_ms=election_ms,
        ))
    try:
        for m in cluster.members:
            m.start()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def etcd_server() -> Iterator[EtcdCluster]:
    """A single-node etcd (fast elections); ``.members[0]`` can be stopped and restarted."""
    with etcd_cluster(1, heartbeat_ms=20, election_ms=200) as cluster:
        yield cluster


# ---------------------------------------------------------------------------------- rsync


@dataclass
class RsyncDaemon:
    """An ``rsync --daemon`` serving one authenticated module (restartable)."""

    path: Path
    module: str
    user: str
    password: str
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rsync://{self.user}@127.0.0.1:{self.port}/{self.module}"

    @property
    def password_file(self) -> Path:
        return self.workdir / "client.pass"

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = self.workdir / "rsyncd.log"
        proc = self.proc = cs.spawn(
            cs.rsyncd_argv(need_binary("rsync"), self.workdir / "rsyncd.conf", self.port), log)
        cs.wait_port(lambda: proc.poll() is None, self.port, timeout, "rsync daemon", log)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@contextmanager
def rsync_daemon(path: str | Path, module: str = "hamaster", user: str = "hamaster",
                 password: str = "s3cret") -> Iterator[RsyncDaemon]:
    """An rsync daemon on a free loopback port serving ``path`` as ``module`` with auth."""
    need_binary("rsync")
    workdir = _tmpdir("rsyncd")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cs.write_rsyncd_config(workdir, path, port, password, module=module, user=user)
    daemon = RsyncDaemon(path=path, module=module, user=user, password=password, port=port,
                         workdir=workdir)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)

"""Clusters of masters started on an empty store, on fs, etcd or rsync, at a chosen spacing.

Shared by the identity tests (tests/integration/test_identity.py) and the start-up bench
(bench/identity_startup.py): start N masters ``spacing`` seconds apart, and find out when
every one of them serves the same master key (the fingerprint each logs at start).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from hamaster import crypto
from tests.integration.harness import Cluster
from tests.integration.services import etcd_server, rsync_daemon
from tests.kit import wait_until

BACKENDS = ["fs", "etcd", "rsync"]
SERVES = re.compile(r"master (\S+) serves the cluster master key ([0-9a-f:]+)")
PINNED = re.compile(r"pinned master key ([0-9a-f:]+)")


@contextmanager
def backend_confs(backend: str, c: Cluster, n: int) -> Iterator[list[dict[str, Any]]]:
    """Per-master config for ``n`` masters sharing state on ``backend`` (services started).

    On exit the cluster's processes are stopped before the services they use (a master
    whose etcd is gone takes seconds to stop).
    """
    def stop_procs() -> None:
        for p in reversed(c.procs):
            p.stop()

    with ExitStack() as stack:
        if backend == "fs":
            shared = c.base / "shared"
            shared.mkdir()
            stack.callback(stop_procs)
            yield [{"ha_dir": str(shared)} for _ in range(n)]
        elif backend == "etcd":
            etcd = stack.enter_context(etcd_server())
            prefix = f"/hm-ident-{uuid.uuid4().hex[:8]}"
            stack.callback(stop_procs)
            yield [{"ha_backend": "etcd", "ha_etcd_endpoints": etcd.endpoints,
                    "ha_etcd_prefix": prefix} for _ in range(n)]
        else:
            trees = [c.base / f"tree{i}" for i in range(n)]
            daemons = [stack.enter_context(rsync_daemon(t)) for t in trees]
            stack.callback(stop_procs)
            yield [{"ha_backend": "rsync", "ha_dir": str(trees[i]),
                    "ha_rsync_password_file": str(daemons[i].password_file),
                    "ha_rsync_peers": [d.url for j, d in enumerate(daemons) if j != i],
                    "ha_rsync_max_backoff": 1.0}
                   for i in range(n)]


def start_masters(c: Cluster, confs: list[dict], spacing: float, extra: dict | None = None,
                  hosts: list[str] | None = None) -> float:
    """Configure and start one master per conf (on ``hosts[i]`` if given), ``spacing`` seconds
    apart; returns the monotonic time the first one was started."""
    infos = [c.add_master({**conf, "auto_accept": True, **(extra or {})}, start=False,
                          host=hosts[i] if hosts else "127.0.0.1")
             for i, conf in enumerate(confs)]
    t0 = time.monotonic()
    for i, info in enumerate(infos):
        if i and spacing:
            # the spacing between starts is the scenario under test, not a synchronisation
            time.sleep(max(0.0, t0 + i * spacing - time.monotonic()))
        info["proc"].start()
    return t0


def served_keys(c: Cluster) -> dict[str, list[str]]:
    """master name → every fingerprint it logged serving (one entry per start)."""
    return {m["proc"].name: [f for _, f in SERVES.findall(m["proc"].log_text())]
            for m in c.masters}


def wait_one_key(c: Cluster, timeout: float = 60) -> tuple[str, float]:
    """Wait until every master serves, all the same key; (fingerprint, monotonic time)."""
    def one() -> str | None:
        for m in c.masters:
            if not m["proc"].running():
                raise AssertionError(f"{m['proc'].name} exited:\n{m['proc'].log_text()[-3000:]}")
        keys = served_keys(c)
        if all(keys.values()):
            return keys[c.masters[0]["proc"].name][-1]
        return None

    finger = wait_until(one, timeout, interval=0.02, what="every master serving a key")
    return finger, time.monotonic()


def pem_finger_of_private(priv: bytes) -> str:
    """Salt's fingerprint of the public half of a private PEM."""
    from hamaster.pki_sync.keys import public_pem_of

    return crypto.pem_fingerprint(public_pem_of(priv))


def stored_fingers(backend: str, c: Cluster) -> set[str]:
    """The fingerprint(s) of ``master.pem`` as the store(s) hold it (one per rsync tree)."""
    if backend == "fs":
        paths = [Path(c.masters[0]["conf"]["ha_dir"]) / "pki/master/master.pem"]
    elif backend == "rsync":
        paths = [Path(m["conf"]["ha_dir"]) / "pki/master/master.pem" for m in c.masters]
    else:
        from hamaster.master.shared import open_store

        store = open_store(c.masters[0]["conf"])
        try:
            raw = store.get("pki/master/master.pem")
        finally:
            store.close()
        return {pem_finger_of_private(raw)} if raw else set()
    return {pem_finger_of_private(p.read_bytes()) for p in paths if p.exists()}

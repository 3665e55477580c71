"""``hamaster-drill`` against local clusters on the etcd and rsync backends.

- etcd: ``hamaster-cluster up --backend etcd --etcd-members 3`` (2 masters, 3 minions): kill a
  master; lose an etcd follower, then the leader (quorum kept: no user-visible error, not even
  during the election); lose two
  members of three (quorum lost: pings from memory, key change refused with a clear error,
  convergence when quorum returns).
- rsync: ``hamaster-cluster up --backend rsync`` (2 masters, 3 minions): kill a master; stop one
  master's rsync daemon (its peer cannot push) and restart it, checking convergence; Ctrl-C during
  the loss restarts the daemon.

Each class has its own cluster; ``hamaster-cluster down`` always runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.drillkit import assert_drill_passed, drill_file, run_drill
from tests.integration.harness import BIN
from tests.kit import wait_until

TARGETS = {"max_failed_pings": 0, "max_detect_s": 10, "max_recovery_s": 5, "max_lost_results": 0}
FIGURES = ("failed_pings", "pings_sent", "detect_minions_s", "detect_status_s", "recovery_s",
           "lost_results",
           "key_change_s", "key_change_refused", "key_change_visible", "key_visible_s",
           "store_errors",
           "lookup_errors", "backend_lost")


def _need(*names: str) -> None:
    for n in names:
        if shutil.which(n) is None:
            pytest.skip(f"{n} is not installed")


def _cluster(backend: str, *extra: str) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix=f"hmdr-{backend}-", dir="/tmp"))
    try:
        res = subprocess.run([str(BIN / "hamaster-cluster"), "up", "--dir", str(base), "--masters",
                              "2",
                              "--minions", "3", "--backend", backend, *extra],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        yield base
    finally:
        subprocess.run([str(BIN / "hamaster-cluster"), "down", "--dir", str(base)],
                       capture_output=True, timeout=120)
        state = (json.loads((base / "cluster.json").read_text())
                 if (base / "cluster.json").exists() else {})
        shutil.rmtree(base, ignore_errors=True)
        for e in state.get("services", []) + state.get("masters", []) + state.get("minions", []):
            assert not e.get("pid"), f"{e['name']} still recorded as running after down"


def _drill_file(base: Path, example: str, **changes: object) -> Path:
    return drill_file(base, example, **changes)


def _run(path: Path, timeout: float = 150) -> tuple[int, dict, str]:
    rc, doc, err = run_drill(path, timeout)
    m = doc["measured"]
    print(json.dumps({"drill": doc["drill"], **{k: m[k] for k in FIGURES if k in m}}))
    return rc, doc, err


def _passed(rc: int, doc: dict, err: str) -> dict:
    return assert_drill_passed(rc, doc, err)


def _services(base: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((base / "cluster.json").read_text())["services"]}


def _running(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------------- etcd


class TestEtcd:
    @pytest.fixture(scope="class")
    def etcd_dir(self) -> Iterator[Path]:
        _need("etcd", "etcdctl")
        yield from _cluster("etcd", "--etcd-members", "3")

    def test_kill_master(self, etcd_dir: Path) -> None:
        rc, doc, err = _run(_drill_file(etcd_dir, "kill",
                                        objectives={**TARGETS, "key_change_visible": True}))
        m = _passed(rc, doc, err)
        assert m["failed_pings"] == 0 and m["lost_results"] == 0 and m["key_change_visible"] is True
        assert m["detect_status_s"] <= 10 and m["detect_minions_s"] <= 10 and m["recovery_s"] <= 5

    def test_follower_loss_is_invisible(self, etcd_dir: Path) -> None:
        rc, doc, err = _run(_drill_file(etcd_dir, "etcd-member-loss",
                                        backend={"etcd_members": ["follower"]}))
        m = _passed(rc, doc, err)
        assert m["failed_pings"] == 0 and m["lost_results"] == 0 and m["store_errors"] == 0
        assert m["key_change_visible"] is True and "lookup_errors" not in m
        assert all(_running(e["pid"]) for e in _services(etcd_dir).values())  # restarted

    def test_leader_loss(self, etcd_dir: Path) -> None:
        strict = {"max_failed_pings": 0, "max_lost_results": 0, "key_change_visible": True,
                  "max_recovery_s": 5,
                  "max_store_errors": 0}
        rc, doc, err = _run(_drill_file(etcd_dir, "etcd-member-loss", objectives=strict))
        m = _passed(rc, doc, err)
        assert m["failed_pings"] == 0 and m["lost_results"] == 0 and m["key_change_visible"] is True
        # The election is invisible: no store_ok false on any master, no failed lookup.
        assert m["store_errors"] == 0 and "lookup_errors" not in m
        assert all(_running(e["pid"]) for e in _services(etcd_dir).values())

    def test_quorum_loss(self, etcd_dir: Path) -> None:
        rc, doc, err = _run(_drill_file(etcd_dir, "etcd-quorum-loss"))
        m = _passed(rc, doc, err)
        assert m["failed_pings"] == 0 and m["pings_sent"] > 0  # served from memory
        assert m["key_change_refused"] is True and "quorum" in m["key_change_error"]
        assert m["key_change_visible"] is True and m["lost_results"] == 0  # converged afterwards
        assert m["detect_s"] <= 15 and m["recovery_s"] <= 5  # detection: 1-2 x ha_etcd_timeout
        assert all(_running(e["pid"]) for e in _services(etcd_dir).values())


# ---------------------------------------------------------------------------------- rsync


class TestRsync:
    @pytest.fixture(scope="class")
    def rsync_dir(self) -> Iterator[Path]:
        _need("rsync")
        yield from _cluster("rsync")

    def test_kill_master(self, rsync_dir: Path) -> None:
        rc, doc, err = _run(_drill_file(rsync_dir, "kill",
                                        objectives={**TARGETS, "key_change_visible": True}))
        m = _passed(rc, doc, err)
        assert m["failed_pings"] == 0 and m["lost_results"] == 0 and m["key_change_visible"] is True
        assert m["detect_status_s"] <= 10 and m["recovery_s"] <= 5

    def test_peer_loss_converges(self, rsync_dir: Path) -> None:
        rc, doc, err = _run(_drill_file(rsync_dir, "rsync-peer-loss"))
        m = _passed(rc, doc, err)
        assert m["backend_lost"] == ["rsyncd-master2"]
        assert m["failed_pings"] == 0 and m["store_errors"] == 0  # master2 kept its store
        assert m["detect_s"] <= 10 and m["recovery_s"] <= 5
        # reached master2 afterwards
        assert m["key_change_visible"] is True and m["lost_results"] == 0
        assert _running(_services(rsync_dir)["rsyncd-master2"]["pid"])

    def test_ctrl_c_restarts_the_daemon(self, rsync_dir: Path) -> None:
        path = _drill_file(rsync_dir, "rsync-peer-loss", hold_s=60)
        err_path = rsync_dir / "ctrl-c.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen([str(BIN / "hamaster-drill"), "run",
                                     str(path), "--out", "json"],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            wait_until(lambda: "holding the failure" in err_path.read_text(),
                       30, what="daemon stopped")
            assert not _running(_services(rsync_dir)["rsyncd-master2"]["pid"])
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err_path.read_text()
        doc = json.loads(out)
        assert doc["interrupted"] and not doc["restore_problems"]
        assert "restoring: start rsyncd-master2" in err_path.read_text()
        assert _running(_services(rsync_dir)["rsyncd-master2"]["pid"])

"""``hamaster-drill`` against a real local cluster (fs backend): every scenario meets its targets.

One ``hamaster-cluster up --masters 2 --minions 3`` serves every test (each drill restores what
it broke and checks the cluster is healthy afterwards); ``hamaster-cluster down`` always runs.
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

# The targets for one master of two.
TARGETS = {"max_failed_pings": 0, "max_detect_s": 10, "max_recovery_s": 5, "max_lost_results": 0}


@pytest.fixture(scope="module")
def cluster_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="hmdr-", dir="/tmp"))
    try:
        res = subprocess.run([str(BIN / "hamaster-cluster"), "up", "--dir", str(base),
                              "--masters", "2", "--minions", "3"],
                             capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stdout + res.stderr
        yield base
    finally:
        subprocess.run([str(BIN / "hamaster-cluster"), "down", "--dir", str(base)],
                       capture_output=True, timeout=90)
        shutil.rmtree(base, ignore_errors=True)


def _drill_file(base: Path, scenario: str, **changes: object) -> Path:
    return drill_file(base, scenario, **changes)


def _run(path: Path, timeout: float = 120) -> tuple[int, dict, str]:
    return run_drill(path, timeout)


def _assert_passed(rc: int, doc: dict, err: str) -> dict:
    m = doc["measured"]
    print(json.dumps({k: m.get(k) for k in ("failed_pings", "pings_sent", "detect_minions_s",
                                            "detect_status_s",
                                             "detect_s", "recovery_s", "lost_results",
                                            "key_change_visible")}))
    return assert_drill_passed(rc, doc, err)


@pytest.mark.parametrize("scenario", ["kill", "stop", "freeze"])
def test_master_failure_meets_targets(cluster_dir: Path, scenario: str) -> None:
    rc, doc, err = _run(_drill_file(cluster_dir, scenario,
                                    objectives={**TARGETS, "key_change_visible": True}))
    m = _assert_passed(rc, doc, err)
    assert m["failed_pings"] == 0 and m["pings_sent"] > 0
    assert m["detect_minions_s"] is not None and m["detect_minions_s"] <= 10
    assert m["detect_status_s"] is not None and m["detect_status_s"] <= 10
    assert m["recovery_s"] <= 5 and m["lost_results"] == 0
    assert m["key_change_visible"] is True


@pytest.mark.skipif(shutil.which("iptables") is None or os.geteuid() != 0,
                    reason="needs iptables and root")
def test_partition_meets_targets(cluster_dir: Path) -> None:
    rc, doc, err = _run(_drill_file(cluster_dir, "partition",
                                    objectives={**TARGETS, "key_change_visible": True}))
    m = _assert_passed(rc, doc, err)
    assert m["detect_minions_s"] <= 10 and m["recovery_s"] <= 5 and m["lost_results"] == 0
    assert "detect_status_s" not in m  # the victim keeps its fs heartbeat: said so, not faked
    rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True).stdout
    assert "hamaster-drill" not in rules


def test_backend_loss_masters_keep_serving(cluster_dir: Path) -> None:
    rc, doc, err = _run(_drill_file(cluster_dir, "backend-loss"))
    m = _assert_passed(rc, doc, err)
    assert m["failed_pings"] == 0 and m["lost_results"] == 0
    assert m["detect_s"] <= 10 and m["recovery_s"] <= 5
    assert (cluster_dir / "shared").is_dir() and not (cluster_dir / "shared.drill-away").exists()


def test_minion_storm(cluster_dir: Path) -> None:
    rc, doc, err = _run(_drill_file(cluster_dir, "minion-storm"))
    m = _assert_passed(rc, doc, err)
    assert m["recovery_s"] <= 10 and m["key_change_visible"] is True and m["failed_pings"] == 0


def test_rolling_restart_no_failed_ping(cluster_dir: Path) -> None:
    rc, doc, err = _run(_drill_file(cluster_dir, "rolling-restart"))
    m = _assert_passed(rc, doc, err)
    assert m["failed_pings"] == 0 and m["lost_results"] == 0 and m["key_change_visible"] is True
    assert set(m["recovery_by_master"]) == {"master1", "master2"}


def test_impossible_objective_fails_the_drill(cluster_dir: Path) -> None:
    rc, doc, _ = _run(_drill_file(cluster_dir, "backend-loss", hold_s=0,
                                  objectives={"max_recovery_s": 0}))
    assert rc == 1 and doc["ok"] is False
    assert [c["objective"] for c in doc["objectives"] if not c["met"]] == ["max_recovery_s"]


def test_ctrl_c_restores_the_victim(cluster_dir: Path) -> None:
    path = _drill_file(cluster_dir, "kill", hold_s=60, objectives=TARGETS)
    err_path = cluster_dir / "ctrl-c.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([str(BIN / "hamaster-drill"), "run", str(path), "--out", "json"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        wait_until(lambda: "is down for the drill" in err_path.read_text(),
                   30, what="victim killed")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err_path.read_text()
    doc = json.loads(out)
    assert doc["interrupted"] and not doc["restore_problems"]
    state = json.loads((cluster_dir / "cluster.json").read_text())
    victim = next(m for m in state["masters"] if m["name"] == "master1")
    os.kill(victim["pid"], 0)  # restarted by the restore
    assert "restoring: start master1" in err_path.read_text()


def test_bad_drill_file_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenario: explode\ncluster_dir: /nonexistent\n")
    res = subprocess.run([str(BIN / "hamaster-drill"), "run", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "scenario" in res.stderr and "kill" in res.stderr
    bad.write_text("scenario: minion-storm\ncluster_dir: /nonexistent\nobjectives: "
                   "{max_detect_s: 5}\n")
    res = subprocess.run([str(BIN / "hamaster-drill"), "check", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "cluster.json" in res.stderr
    out = subprocess.run([str(BIN / "hamaster-drill"), "list"], capture_output=True,
                         text=True).stdout
    for s in ("kill", "stop", "freeze", "partition", "backend-loss",
              "minion-storm", "rolling-restart"):
        assert s in out


def test_leader_drill_refuses_an_unconfigured_cluster(cluster_dir: Path) -> None:
    """This cluster has no drill reactor: the leader drill stops before breaking anything and
    names the option to add."""
    rc, doc, err = _run(_drill_file(cluster_dir, "leader-kill"))
    assert rc == 3 and doc["aborted"], err
    assert "reactor: no entry matches 'hamaster/drill/<n>'" in doc["aborted"]
    assert "schedule: no job 'hamaster-drill'" in doc["aborted"]
    assert "--leader-drills" in doc["aborted"] and not doc["restore_problems"]
    assert doc["measured"].get("healthy_after") is True and "leader_before" not in doc["measured"]

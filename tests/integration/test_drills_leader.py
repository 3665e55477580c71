"""``hamaster-drill`` leader scenarios against a real local cluster: 3 masters on the fs backend
(``hamaster-cluster up --leader-drills --lease-ttl 2``: the drill reactor and a 2 s master
schedule on every master) and a hamaster minion.

``leader-kill`` then ``leader-freeze``: the victim is whoever holds the lease; numbered events are
fired at the minion through the survivors the whole time, the reactor appends each number to a
file on the minion. Each number must be there exactly once, no schedule slot may have two jids,
and another master must hold the lease (a new epoch) within TTL + 1 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.drillkit import assert_drill_passed, drill_file, run_drill
from tests.integration.harness import BIN

TTL = 2.0
OBJECTIVES = {"duplicate_reactions": 0, "missed_reactions": 0, "duplicate_schedule_runs": 0,
              "leader_failover_s": TTL + 1.0}


@pytest.fixture(scope="module")
def leader_cluster() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="hmld-", dir="/tmp"))
    try:
        res = subprocess.run([str(BIN / "hamaster-cluster"), "up", "--dir", str(base), "--masters",
                              "3",
                              "--minions", "1", "--leader-drills", "--lease-ttl", str(TTL)],
                             capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stdout + res.stderr
        yield base
    finally:
        subprocess.run([str(BIN / "hamaster-cluster"), "down", "--dir", str(base)],
                       capture_output=True,
                       timeout=90)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("scenario", ["leader-kill", "leader-freeze"])
def test_leader_failure_reacts_once_and_fails_over(leader_cluster: Path, scenario: str) -> None:
    rc, doc, err = run_drill(
        drill_file(leader_cluster, scenario, objectives=OBJECTIVES), timeout=120)
    m = assert_drill_passed(rc, doc, err)
    print(json.dumps({k: m.get(k) for k in ("leader_failover_s", "events_fired", "reactions",
                                             "duplicate_reactions", "missed_reactions",
                                            "schedule_runs",
                                             "schedule_slots", "schedule_slots_missed",
                                             "duplicate_schedule_runs")}))
    before, after = m["leader_before"], m["leader_after"]
    assert doc["victim"] == before["master"] and after["master"] != before["master"]
    assert after["epoch"] > before["epoch"]
    assert m["leader_failover_s"] <= TTL + 1.0
    assert m["events_fired"] >= 10 and m["reactions"] == m["events_fired"]
    assert m["duplicate_reactions"] == 0 and m["missed_reactions"] == 0
    # The schedule ran again under the new leader (a slot after the restore), never twice a slot.
    assert m["schedule_resumed"] is True and m["schedule_runs"] >= 1
    assert m["duplicate_schedule_runs"] == 0
    victim = before["master"]
    assert (f"kill -9 {victim}" if scenario == "leader-kill"
            else f"freeze {victim} (SIGSTOP") in err

"""Drill files of the leader scenarios (leader-kill, leader-freeze, leader-partition): parsing,
the errors that name the field, the examples, and what the cluster must have configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hamaster.drill import DrillError
from hamaster.drill.setup import (
    REACTOR_SLS,
    SCHEDULE_JOB,
    leader_drill_options,
    missing_leader_options,
    remove_leader_drill_config,
    write_leader_drill_config,
)
from hamaster.drill.spec import LEADER_SCENARIOS, SCENARIOS, parse_drill

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "drills"


def _cluster(tmp_path: Path, backend: str = "fs") -> Path:
    masters = [{"name": f"master{i}", "confdir": str(tmp_path / f"m{i}"), "pid": None,
                "conf": {"interface": "127.0.0.1", "ret_port": 4506 + 10 * i,
                         "publish_port": 4505 + 10 * i}}
               for i in (1, 2, 3)]
    state = {"backend": backend, "masters": masters, "services": [],
             "minions": [{"name": "minion1", "confdir": str(tmp_path / "n1"), "pid": None}]}
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    return tmp_path


def _doc(tmp_path: Path, scenario: str = "leader-kill",
         backend: str = "fs", **extra: object) -> dict:
    return {"scenario": scenario, "cluster_dir": str(_cluster(tmp_path, backend)), **extra}


def test_leader_scenarios_are_in_the_table_with_their_objectives() -> None:
    for name in LEADER_SCENARIOS:
        assert SCENARIOS[name].measures == ("duplicate_reactions", "missed_reactions",
                                            "duplicate_schedule_runs", "leader_failover_s")


@pytest.mark.parametrize("scenario", ["leader-kill", "leader-freeze"])
def test_leader_drill_parses(tmp_path: Path, scenario: str) -> None:
    d = parse_drill(_doc(tmp_path, scenario, victim="leader", event_interval_s=0.5,
                         objectives={"duplicate_reactions": 0, "missed_reactions": 0,
                                     "duplicate_schedule_runs": 0, "leader_failover_s": 6}))
    assert d.victim == "leader" and d.event_interval_s == 0.5
    assert d.objectives == {"duplicate_reactions": 0, "missed_reactions": 0,
                            "duplicate_schedule_runs": 0, "leader_failover_s": 6.0}
    assert isinstance(d.objectives["leader_failover_s"], float)
    assert d.key_change is None          # no key change in the leader scenarios
    with pytest.raises(DrillError, match="resolved when the drill runs"):
        _ = d.victim_node
    assert parse_drill(_doc(tmp_path, scenario)).victim == "leader"   # the default


def test_leader_drill_refuses_a_named_victim(tmp_path: Path) -> None:
    with pytest.raises(DrillError, match=r"victim: .*victim: leader"):
        parse_drill(_doc(tmp_path, victim="master2"))


def test_leader_objectives_only_on_leader_scenarios(tmp_path: Path) -> None:
    with pytest.raises(DrillError,
                       match=r"objectives.duplicate_reactions: scenario kill does not measure"):
        parse_drill(_doc(tmp_path, "kill", objectives={"duplicate_reactions": 0}))
    with pytest.raises(DrillError,
                       match=r"objectives.max_failed_pings: scenario leader-kill does not"):
        parse_drill(_doc(tmp_path, objectives={"max_failed_pings": 0}))
    with pytest.raises(DrillError, match=r"objectives.missed_reactions: must be a whole number"):
        parse_drill(_doc(tmp_path, objectives={"missed_reactions": 0.5}))
    with pytest.raises(DrillError, match=r"objectives.leader_failover_s: must be a number"):
        parse_drill(_doc(tmp_path, objectives={"leader_failover_s": "6s"}))


def test_leader_partition_needs_etcd_locally(tmp_path: Path) -> None:
    with pytest.raises(DrillError,
                       match=r"scenario: leader-partition cannot cut the fs store.*etcd"):
        parse_drill(_doc(tmp_path, "leader-partition"))
    d = parse_drill(_doc(tmp_path, "leader-partition", backend="etcd"))
    assert d.scenario == "leader-partition" and d.victim == "leader"


def test_leader_fields_are_validated(tmp_path: Path) -> None:
    with pytest.raises(DrillError, match=r"reaction_file: must be an absolute path"):
        parse_drill(_doc(tmp_path, reaction_file="rel/file"))
    with pytest.raises(DrillError, match=r"reaction_file: must be an absolute path"):
        parse_drill(_doc(tmp_path, reaction_file="/tmp/x'; rm -rf /"))
    with pytest.raises(DrillError, match=r"event_minion: 'web9' is not a minion.*minion1"):
        parse_drill(_doc(tmp_path, event_minion="web9"))
    with pytest.raises(DrillError, match=r"event_interval_s: must be >= 0.02"):
        parse_drill(_doc(tmp_path, event_interval_s=0))
    d = parse_drill(_doc(tmp_path, reaction_file="/var/tmp/r.log", event_minion="minion1"))
    assert d.reaction_file == "/var/tmp/r.log" and d.event_minion == "minion1"


def test_remote_leader_drill_needs_commands_on_every_master() -> None:
    masters = [{"name": "m1", "ret_port": 4506, "confdir": "/etc/hamaster", "exec": "ssh m1",
                "commands": {"kill": "k", "start": "s"}},
               {"name": "m2", "ret_port": 4506, "confdir": "/etc/hamaster", "exec": "ssh m2"}]
    doc = {"scenario": "leader-kill", "masters": masters, "minions": [{"name": "web1"}]}
    # Any master may hold the lease: m2 has no way to be killed and started again.
    with pytest.raises(DrillError,
                       match=r"master m2.commands.kill: is needed for scenario leader-kill"):
        parse_drill(doc)
    masters[1]["commands"] = {"kill": "k", "start": "s"}
    assert parse_drill(doc).victim == "leader"
    doc["scenario"] = "leader-partition"
    with pytest.raises(DrillError, match=r"master m1.commands.isolate: is needed"):
        parse_drill(doc)


@pytest.mark.parametrize("name", ["leader-kill", "leader-freeze", "leader-partition"])
def test_examples_parse(tmp_path: Path, name: str) -> None:
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    assert doc["scenario"] == name and doc["victim"] == "leader"
    doc["cluster_dir"] = str(_cluster(tmp_path, "etcd"))
    d = parse_drill(doc, f"{name}.yaml")
    assert set(d.objectives) == set(SCENARIOS[name].measures)


def test_missing_configuration_names_the_options(tmp_path: Path) -> None:
    missing = missing_leader_options({}, want_schedule=True)
    assert len(missing) == 2
    assert missing[0].startswith("reactor:") and "'hamaster/drill/*'" in missing[0]
    assert missing[1].startswith("schedule:") and SCHEDULE_JOB in missing[1]
    assert missing_leader_options({}, want_schedule=False) == [missing[0]]
    assert missing_leader_options({"reactor": [{"other/*": ["/x.sls"]}]}, False) == [missing[0]]
    assert missing_leader_options({"reactor": "nonsense"}, False)[0].startswith(
        "reactor: reactor must be")
    assert missing_leader_options(leader_drill_options("/x.sls", "minion1"), True) == []

    sls = write_leader_drill_config(tmp_path,
                                    [str(tmp_path / "c1"), str(tmp_path / "c2")], "minion1", 2.0)
    from hamaster.config import load_master_config

    for c in ("c1", "c2"):
        opts = load_master_config(tmp_path / c)
        assert missing_leader_options(opts, True) == []
        assert opts["ha_lease_ttl"] == 2.0 and opts["reactor"] == [{"hamaster/drill/*": [str(sls)]}]
        assert opts["schedule"][SCHEDULE_JOB]["args"][0] == "minion1"
    assert sls.read_text() == REACTOR_SLS
    remove_leader_drill_config([str(tmp_path / "c1")])   # `up` again without --leader-drills
    assert not load_master_config(tmp_path / "c1")["reactor"]   # the default: no rules
    assert missing_leader_options(load_master_config(tmp_path / "c2"), True) == []


def test_drill_reactor_sls_puts_only_numbers_into_the_shell() -> None:
    from hamaster.events.render import render_jinja_yaml

    out = render_jinja_yaml(REACTOR_SLS, {"tag": "hamaster/drill/1234", "data": {
        "id": "minion1", "data": {"n": 7}}})
    action = out["hamaster_drill_reaction"]["local.cmd.run"]
    assert action[0] == {"tgt": "minion1"}
    assert action[1]["arg"][0].startswith("echo 1234 7 >> /")
    hostile = render_jinja_yaml(REACTOR_SLS, {"tag": "hamaster/drill/$(reboot)", "data": {
        "id": "minion1", "data": {"n": "1; reboot"}}})
    assert hostile["hamaster_drill_reaction"]["local.cmd.run"][1]["arg"][0].startswith(
        "echo 0 0 >> /")


def test_configuration_in_the_shared_store_counts(tmp_path: Path) -> None:
    """A reactor in the cluster's shared config/master.d/ (fs: under ha_dir) is what the masters
    run with: the drill's configuration check must see it."""
    from hamaster.drill.setup import effective_master_options

    ha = tmp_path / "ha"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "master").write_text(yaml.safe_dump({"master_id": "m1", "ha_backend": "fs",
                                                 "ha_dir": str(ha),
                                                 "root_dir": str(tmp_path / "root")}))
    assert len(missing_leader_options(effective_master_options(str(conf)), True)) == 2
    (ha / "config" / "master.d").mkdir(parents=True)
    (ha / "config" / "master.d" / "drill.conf").write_text(
        yaml.safe_dump(leader_drill_options("/srv/r.sls", "minion1")))
    assert missing_leader_options(effective_master_options(str(conf)), True) == []

"""The drill file: YAML schema, validation with errors that name the field, and the scenarios.

A drill names the cluster either by ``cluster_dir`` (a ``hamaster-cluster`` directory: masters,
minions, PIDs, confdirs and logs are read from its ``cluster.json``) or explicitly::

    name: kill master1
    scenario: kill                  # see SCENARIOS / `hamaster-drill list`
    cluster_dir: /tmp/hamaster-demo
    victim: master1                 # a master name (default: the first master)
    hold_s: 1                       # keep the failure this long after it was detected
    objectives:
      max_failed_pings: 0
      max_detect_s: 10
      max_recovery_s: 5
      max_lost_results: 0
      key_change_visible: true

    # or, for real hosts:
    masters:
      - name: m1
        host: m1.example.com        # as the minions name it (with ret_port, for log matching)
        ret_port: 4506
        publish_port: 4505
        confdir: /etc/hamaster      # passed to the hamaster CLIs as -c
        exec: ssh root@m1           # run the hamaster CLIs there (default: here, by socket)
        commands:                   # shell commands; {name} {host} {pid} {confdir} {ret_port}
          stop: ssh root@m1 systemctl stop hamaster-master
          start: ssh root@m1 systemctl start hamaster-master
    minions:
      - name: web1
        log: /var/log/hamaster/minion   # optional: detection from the minion's view
    backend:                        # backend-loss: how to take the shared store away and back
      stop: ssh root@nfs1 systemctl stop nfs-server
      start: ssh root@nfs1 systemctl start nfs-server
      store_down_on: all            # masters expected to report store_ok: false
                                    # (all | none | [names])
      expect_key_change: refused    # a key change during the loss: works | refused
                                    # (default: none made)

    # backend-loss on a hamaster-cluster dir (cluster_dir) on etcd or rsync:
    backend: {etcd_members: [etcd1]}        # stop these etcd members by PID
                                            # (etcd_member: etcd1 too; `leader` / `follower`:
                                            # the member in that role right then)
    backend: {rsync_daemon: master2}        # stop master2's rsync daemon (its peers cannot push)
    # optional: signal: KILL (default, a crash) or TERM; store_down_on / expect_key_change
    # default to what the loss implies (quorum kept: none / works; quorum lost: all / refused;
    # rsync: the other masters / works).

The leader scenarios (``leader-kill``, ``leader-freeze``, ``leader-partition``) take ``victim:
leader`` (whoever holds the lease when the drill runs) and ``event_interval_s``, ``event_minion``,
``reaction_file``; the cluster needs the drill reactor and schedule (:mod:`hamaster.drill.setup`).

Without commands, nodes are handled locally: signals to ``pid`` (or the PID in ``pidfile``),
``hamaster-master -c confdir`` to start, iptables on the loopback interface to isolate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hamaster.drill import DrillError

COMMAND_NAMES = ("stop", "start", "kill", "freeze", "thaw", "isolate", "heal")
LEADER_VICTIM = "leader"  # victim: leader — whoever holds the leader lease when the drill starts
DEFAULT_REACTION_FILE = "/tmp/hamaster-drill-reactions.log"


@dataclass(frozen=True)
class Scenario:
    """One kind of drill."""

    name: str
    summary: str
    measures: tuple[str, ...]
    note: str = ""


# What each scenario measures (the objectives it accepts).
_FAILOVER = ("max_failed_pings", "max_detect_s", "max_recovery_s",
             "max_lost_results", "key_change_visible")

# The leader scenarios (issue 14): reactions and schedule runs exactly once across a failover.
_LEADER = ("duplicate_reactions", "missed_reactions",
           "duplicate_schedule_runs", "leader_failover_s")
_LEADER_NOTE = ("the victim is whoever holds the leader lease when the drill starts; the cluster "
                "needs the drill's reactor and schedule options (docs/drills.md, `hamaster-cluster "
                "up --leader-drills`).")
LEADER_SCENARIOS = ("leader-kill", "leader-freeze", "leader-partition")

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("kill", "SIGKILL one master, then restart it.", _FAILOVER),
        Scenario("stop",
                 "Stop one master gracefully (SIGTERM or its stop command), start it again.",
                 _FAILOVER),
        Scenario("freeze", "SIGSTOP one master (a hung host), then SIGCONT.", _FAILOVER),
        Scenario("partition",
                 "Cut one master off minions (locally: iptables DROP of its ports on lo; its fs "
                 "store access stays).",
                 _FAILOVER,
                 note="locally the victim keeps its access to an fs ha_dir (a directory "
                 "cannot be cut by iptables), so cluster.status keeps showing it alive; "
                 "detection is from the minions' view. Needs iptables and root; on real "
                 "hosts give isolate/heal commands."),
        Scenario("backend-loss",
                 "Lose (part of) the store: fs ha_dir renamed away, etcd members or an rsync "
                 "daemon stopped, or your stop/start commands.",
                 ("max_failed_pings", "max_detect_s", "max_recovery_s", "max_lost_results",
                  "key_change_visible",
                  "key_change_refused", "max_store_errors"),
                 note="fs: no key change (a key command would re-create the renamed ha_dir). etcd "
                 "with quorum kept: nothing to detect; a key change through a master must work "
                 "during the loss and lookups are made during it. Quorum lost: the key change must "
                 "fail with a clear error, then the key converges (or is accepted again) once "
                 "quorum returns. rsync: the masters pushing to the stopped daemon report "
                 "store_ok: false (replication degraded, writes kept locally); the key change is "
                 "made through one of them and must reach the peer after it returns."),
        Scenario("minion-storm",
                 "Restart every minion at once; all must answer through every master again.",
                 ("max_failed_pings", "max_recovery_s", "key_change_visible"),
                 note="no tracked job (a job dies with its minion) and no detection; failed pings "
                 "are counted after the minions are back, not while they are down."),
        Scenario("rolling-restart",
                 "Restart every master in turn; pings through the others must never fail.",
                 ("max_failed_pings", "max_recovery_s", "max_lost_results", "key_change_visible")),
        Scenario("leader-kill", "SIGKILL the master holding the leader lease, then restart it.",
                 _LEADER,
                 note=_LEADER_NOTE),
        Scenario("leader-freeze",
                 "SIGSTOP the leader past the lease TTL, SIGCONT it after another master "
                 "took over.", _LEADER, note=_LEADER_NOTE),
        Scenario("leader-partition",
                 "Cut the leader off minions and the store (iptables), then heal.",
                 _LEADER,
                 note=_LEADER_NOTE + " Locally needs an etcd cluster, iptables and root (an fs "
                 "ha_dir cannot be cut, the leader would keep its lease); on real hosts give "
                 "isolate/heal commands that also cut the store."),
    )
}

OBJECTIVES = {
    "max_failed_pings": int,
    "max_detect_s": float,
    "max_recovery_s": float,
    "max_lost_results": int,
    "key_change_visible": bool,
    # backend-loss: the key change during the loss failed with a clear error
    "key_change_refused": bool,
    # backend-loss: store_ok false on a master expected to keep its store
    "max_store_errors": int,
    # leader-*: limits (the value measured must be <= the limit)
    "duplicate_reactions": int,   # event numbers reacted to more than once
    "missed_reactions": int,      # event numbers fired but never reacted to
    "duplicate_schedule_runs": int,  # schedule slots with more than one jid in the job cache
    # failure -> a survivor sees another master hold the lease (new epoch)
    "leader_failover_s": float,
}

ETCD_ROLES = ("leader", "follower")  # backend.etcd_members may name a role instead of a member
_BACKEND_KEYS = ("stop", "start", "dir", "etcd_member", "etcd_members", "rsync_daemon", "signal",
                 "store_down_on", "expect_key_change")

_TOP_KEYS = {
    "name", "scenario", "cluster_dir", "masters", "minions", "victim", "hold_s", "job_sleep_s",
    "ping_timeout_s", "ping_interval_s", "detect_timeout_s", "recovery_timeout_s",
    "preflight_timeout_s", "key_change", "objectives", "backend", "description",
    "event_interval_s", "reaction_file", "event_minion",
}
_NODE_KEYS = {"name", "host", "ret_port", "publish_port", "confdir", "exec", "pid", "pidfile",
              "log", "commands", "minion_sees_as"}


@dataclass
class Node:
    """A master or minion of the drilled cluster."""

    name: str
    kind: str  # "master" | "minion"
    host: str = "127.0.0.1"
    ret_port: int | None = None
    publish_port: int | None = None
    confdir: str | None = None
    exec: list[str] | None = None
    pid: int | None = None
    pidfile: str | None = None
    log: str | None = None
    commands: dict[str, str] = field(default_factory=dict)
    minion_sees_as: str | None = None
    local_entry: dict | None = None  # the cluster.json entry (cluster_dir mode)

    @property
    def seen_as(self) -> str:
        """How minions name this master in their logs (``host:ret_port``)."""
        return self.minion_sees_as or f"{self.host}:{self.ret_port}"

    def current_pid(self) -> int | None:
        if self.local_entry is not None:
            return self.local_entry.get("pid")
        if self.pidfile:
            try:
                return int(Path(self.pidfile).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None
        return self.pid


@dataclass
class Drill:
    """A validated drill file."""

    path: str
    name: str
    scenario: str
    masters: list[Node]
    minions: list[Node]
    victim: str | None
    cluster_dir: str | None = None
    hold_s: float = 1.0
    job_sleep_s: float = 3.0
    ping_timeout_s: float = 3.0
    ping_interval_s: float = 0.2
    detect_timeout_s: float = 30.0
    recovery_timeout_s: float = 30.0
    preflight_timeout_s: float = 30.0
    key_change: str | None = "auto"
    objectives: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    # backend-loss, resolved from `backend:` and the cluster: what is lost and what to expect.
    backend_mode: str | None = None          # "dir" | "commands" | "etcd" | "rsync"
    etcd_members: list[str] = field(default_factory=list)
    rsync_daemon: str | None = None          # the master whose rsync daemon is stopped
    backend_signal: str = "KILL"
    store_down_on: list[str] = field(default_factory=list)
    expect_key_change: str | None = None     # "works" | "refused" | None (no key change)
    cluster_backend: str | None = None       # cluster_dir mode: fs | etcd | rsync
    # cluster_dir mode: etcd members, rsync daemons
    services: list[dict] = field(default_factory=list)
    # leader-*: numbered events fired every event_interval_s at event_minion (default: the first
    # minion); the drill reactor appends "<nonce> <n>" to reaction_file on that minion.
    event_interval_s: float = 0.2
    reaction_file: str = DEFAULT_REACTION_FILE
    event_minion: str | None = None

    def master(self, name: str) -> Node:
        for m in self.masters:
            if m.name == name:
                return m
        raise DrillError(f"no master named {name!r}")

    @property
    def victim_node(self) -> Node:
        if self.victim == LEADER_VICTIM:
            raise DrillError("victim: leader is resolved when the drill runs (the "
                             "lease holder then)")
        return self.master(self.victim) if self.victim else self.masters[0]


def _err(path: str, where: str, msg: str) -> DrillError:
    return DrillError(f"{path}: {where}: {msg}")


def _num(path: str, where: str, value: Any, kind: type, minimum: float = 0) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _err(path, where, f"must be a number, not {value!r}")
    if kind is int and not float(value).is_integer():
        raise _err(path, where, f"must be a whole number, not {value!r}")
    if value < minimum:
        raise _err(path, where, f"must be >= {minimum}, not {value!r}")
    return kind(value)


def _str_list(path: str, where: str, value: Any) -> list[str]:
    import shlex

    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _err(path, where, "must be a string or a list of strings")


def _node(path: str, where: str, raw: Any, kind: str) -> Node:
    if not isinstance(raw, dict):
        raise _err(path, where, "must be a mapping with at least `name`")
    unknown = set(raw) - _NODE_KEYS
    if unknown:
        raise _err(path, where,
                   f"unknown field(s) {', '.join(sorted(unknown))}; known: "
                   f"{', '.join(sorted(_NODE_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _err(path, f"{where}.name", "is required (a string)")
    cmds = raw.get("commands") or {}
    if not isinstance(cmds, dict):
        raise _err(path, f"{where}.commands", "must be a mapping of command name to shell command")
    for k, v in cmds.items():
        if k not in COMMAND_NAMES:
            raise _err(path, f"{where}.commands.{k}",
                       f"unknown command; known: {', '.join(COMMAND_NAMES)}")
        if not isinstance(v, str) or not v.strip():
            raise _err(path, f"{where}.commands.{k}", "must be a non-empty shell command")
    node = Node(name=name, kind=kind, commands=dict(cmds))
    if "host" in raw:
        if not isinstance(raw["host"], str):
            raise _err(path, f"{where}.host", "must be a string")
        node.host = raw["host"]
    for port in ("ret_port", "publish_port", "pid"):
        if raw.get(port) is not None:
            setattr(node, port, _num(path, f"{where}.{port}", raw[port], int, 1))
    for s in ("confdir", "pidfile", "log", "minion_sees_as"):
        if raw.get(s) is not None:
            if not isinstance(raw[s], str):
                raise _err(path, f"{where}.{s}", "must be a string")
            setattr(node, s, raw[s])
    if raw.get("exec") is not None:
        node.exec = _str_list(path, f"{where}.exec", raw["exec"])
    return node


def _from_cluster_dir(path: str, cdir: str) -> tuple[list[Node], list[Node], dict]:
    state_file = Path(cdir) / "cluster.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise _err(path, "cluster_dir", f"{state_file} not found: start the cluster with "
                   f"`hamaster-cluster up --dir {cdir}`") from None
    except (OSError, ValueError) as exc:
        raise _err(path, "cluster_dir", f"cannot read {state_file}: {exc}") from None
    masters = []
    for m in state.get("masters", []):
        conf = m.get("conf", {})
        masters.append(Node(
            name=m["name"], kind="master", host=conf.get("interface", "127.0.0.1"),
            ret_port=conf.get("ret_port"), publish_port=conf.get("publish_port"),
            confdir=m["confdir"],
            log=str(Path(cdir) / f"{m['name']}.log"), local_entry=m,
        ))
    minions = [
        Node(name=n["name"], kind="minion", confdir=n["confdir"],
             log=str(Path(cdir) / f"{n['name']}.log"),
             local_entry=n)
        for n in state.get("minions", [])
    ]
    return masters, minions, state


def parse_drill(data: Any, path: str = "<drill>") -> Drill:
    """Validate a parsed drill document; raise :class:`DrillError` naming the bad field."""
    if not isinstance(data, dict):
        raise DrillError(
            f"{path}: a drill file is a YAML mapping (see `hamaster-drill run --help`)")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _err(path, ", ".join(sorted(unknown)),
                   f"unknown field(s); known: {', '.join(sorted(_TOP_KEYS))}")
    scenario = data.get("scenario")
    if scenario not in SCENARIOS:
        raise _err(path, "scenario",
                   f"{scenario!r} is not a scenario; one of: {', '.join(SCENARIOS)}")
    sc = SCENARIOS[scenario]
    cdir = data.get("cluster_dir")
    if cdir is not None and ("masters" in data or "minions" in data):
        raise _err(path, "cluster_dir", "give either cluster_dir or masters/minions, not both")
    if cdir is not None:
        if not isinstance(cdir, str):
            raise _err(path, "cluster_dir", "must be a path")
        masters, minions, state = _from_cluster_dir(path, cdir)
    else:
        state = {}
        if not isinstance(data.get("masters"), list) or not data["masters"]:
            raise _err(path, "masters",
                       "is required (a list of masters) unless cluster_dir is given")
        if not isinstance(data.get("minions"), list) or not data["minions"]:
            raise _err(path, "minions",
                       "is required (a list of minions) unless cluster_dir is given")
        masters = [_node(path, f"masters[{i}]", m, "master") for i, m in enumerate(data["masters"])]
        minions = [_node(path, f"minions[{i}]", m, "minion") for i, m in enumerate(data["minions"])]
    for kind, nodes in (("masters", masters), ("minions", minions)):
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise _err(path, kind, "names must be unique")
    if not masters or not minions:
        raise _err(path, "masters/minions", "the cluster needs at least one master and one minion")
    for m in masters:
        if m.exec is None and not m.confdir:
            raise _err(path, f"master {m.name}",
                       "needs `confdir` (to reach its CLI socket) or `exec`")
        if m.ret_port is None:
            raise _err(path, f"master {m.name}", "needs `ret_port`")

    drill = Drill(path=path, name=str(data.get("name") or Path(path).stem), scenario=scenario,
                  masters=masters, minions=minions, victim=None, cluster_dir=cdir)
    if cdir is not None:
        drill.cluster_backend = state.get("backend", "fs")
        drill.services = list(state.get("services", []))
    for key in ("hold_s", "job_sleep_s", "ping_timeout_s", "ping_interval_s", "detect_timeout_s",
                "recovery_timeout_s", "preflight_timeout_s"):
        if data.get(key) is not None:
            setattr(drill, key, _num(path, key, data[key], float, 0))
    if drill.ping_timeout_s <= 0:
        raise _err(path, "ping_timeout_s", "must be > 0")

    victim = data.get("victim")
    if scenario in LEADER_SCENARIOS:
        if victim not in (None, LEADER_VICTIM):
            raise _err(path, "victim",
                       f"scenario {scenario} drills the lease holder: `victim: leader` "
                       f"(or leave it out), not {victim!r}")
        victim = None
        drill.victim = LEADER_VICTIM
        _parse_leader_fields(drill, data, minions)
    if victim is not None:
        if not isinstance(victim, str) or victim not in {m.name for m in masters}:
            raise _err(path, "victim", f"{victim!r} is not a master of this cluster; masters: "
                       f"{', '.join(m.name for m in masters)}")
        drill.victim = victim
    if (scenario in ("kill", "stop", "freeze", "partition", "backend-loss", "rolling-restart")
            or scenario in LEADER_SCENARIOS) and len(masters) < 2:
        raise _err(path, "masters",
                   f"scenario {scenario} needs at least 2 masters (a survivor to measure through)")

    kc = data.get("key_change", "auto")
    if kc is False or kc == "off":
        drill.key_change = None
    elif isinstance(kc, str) and kc:
        drill.key_change = kc
    else:
        raise _err(path, "key_change", "must be `auto`, `off` or the id of a pending key to accept")
    _parse_backend(drill, data.get("backend"))
    if "key_change_visible" not in sc.measures or (scenario == "backend-loss"
                                                   and drill.expect_key_change is None):
        drill.key_change = None
    if drill.key_change == "auto" and any(m.exec for m in masters):
        raise _err(path, "key_change",
                   "with remote masters (`exec`), pre-stage a pending key and name it here, "
                   "or set `key_change: off`")

    obj = data.get("objectives") or {}
    if not isinstance(obj, dict):
        raise _err(path, "objectives",
                   "must be a mapping, e.g. {max_failed_pings: 0, max_recovery_s: 5}")
    for k, v in obj.items():
        if k not in OBJECTIVES:
            raise _err(path, f"objectives.{k}",
                       f"unknown objective; known: {', '.join(OBJECTIVES)}")
        if k not in sc.measures:
            raise _err(path, f"objectives.{k}",
                       f"scenario {scenario} does not measure this; it measures "
                       f"{', '.join(sc.measures)}")
        if OBJECTIVES[k] is bool:
            if not isinstance(v, bool):
                raise _err(path, f"objectives.{k}", "must be true or false")
            drill.objectives[k] = v
        else:
            drill.objectives[k] = _num(path, f"objectives.{k}", v, OBJECTIVES[k], 0)
    for k in ("key_change_visible", "key_change_refused"):
        if k not in drill.objectives or drill.key_change is not None:
            continue
        if scenario == "backend-loss" and drill.expect_key_change is None:
            raise _err(path, f"objectives.{k}",
                       "this backend loss makes no key change (fs: a key command "
                       "would re-create the renamed ha_dir); with stop/start commands set "
                       "backend.expect_key_change: works | refused")
        raise _err(path, f"objectives.{k}", "needs key_change (auto or a pending key id)")
    if ("max_store_errors" in drill.objectives
            and set(drill.store_down_on) >= {m.name for m in masters}):
        raise _err(path, "objectives.max_store_errors",
                   "every master is expected to lose its store here "
                   "(store_down_on: all): there is no master whose store errors could be counted")
    if drill.objectives.get("key_change_refused") and drill.expect_key_change != "refused":
        raise _err(path, "objectives.key_change_refused",
                   f"the store is expected to take writes during this loss (expect_key_change: "
                   f"{drill.expect_key_change}); a refusal cannot be an objective")

    _check_capabilities(drill)
    return drill


def _parse_leader_fields(d: Drill, data: dict, minions: list[Node]) -> None:
    """``event_interval_s``, ``reaction_file``, ``event_minion`` of the leader scenarios."""
    path = d.path
    if data.get("event_interval_s") is not None:
        d.event_interval_s = _num(path, "event_interval_s", data["event_interval_s"], float, 0.02)
    rf = data.get("reaction_file")
    if rf is not None:
        if not isinstance(rf, str) or not rf.startswith("/") or any(c in rf for c in "\n'\"$`\\"):
            raise _err(path, "reaction_file",
                       "must be an absolute path (no quotes, $, ` or newlines): the "
                       "file the drill reactor appends to on the minion")
        d.reaction_file = rf
    em = data.get("event_minion")
    if em is not None:
        if em not in {n.name for n in minions}:
            raise _err(path, "event_minion", f"{em!r} is not a minion of this drill; minions: "
                       f"{', '.join(n.name for n in minions)}")
        d.event_minion = em
    if (d.scenario == "leader-partition" and d.cluster_dir is not None
            and d.cluster_backend != "etcd"):
        raise _err(path, "scenario",
                   f"leader-partition cannot cut the {d.cluster_backend} store of a local "
                   "cluster (the leader keeps its lease: a directory is not cut by iptables); run "
                   "it on a `hamaster-cluster up --backend etcd` cluster, or on real hosts with "
                   "isolate/heal commands")


def _parse_backend(d: Drill, raw: Any) -> None:
    """Validate ``backend:`` and resolve what backend-loss stops and what it expects."""
    path = d.path
    be = raw or {}
    if not isinstance(be, dict):
        raise _err(path, "backend",
                   "must be a mapping: `dir`, `stop`/`start`, `etcd_members` or `rsync_daemon`")
    unknown = set(be) - set(_BACKEND_KEYS)
    if unknown:
        raise _err(path, "backend",
                   f"unknown field(s) {', '.join(sorted(unknown))}; known: "
                   f"{', '.join(_BACKEND_KEYS)}")
    for k in ("stop", "start", "dir", "rsync_daemon", "signal", "expect_key_change", "etcd_member"):
        if k in be and (not isinstance(be[k], str) or not be[k].strip()):
            raise _err(path, f"backend.{k}", "must be a non-empty string")
    if ("stop" in be) != ("start" in be):
        raise _err(path, "backend", "give both `stop` and `start`")
    if "etcd_member" in be and "etcd_members" in be:
        raise _err(path, "backend", "give `etcd_member` or `etcd_members`, not both")
    members = be.get("etcd_members", be.get("etcd_member"))
    if members is not None:
        if isinstance(members, str):
            members = [members]
        if (not isinstance(members, list) or not members
                or not all(isinstance(m, str) and m for m in members)):
            raise _err(path, "backend.etcd_members",
                       "must be a member name or a non-empty list of them")
        if len(set(members)) != len(members):
            raise _err(path, "backend.etcd_members", "names must be unique")
    modes = [m for m, present in (("dir", "dir" in be), ("commands", "stop" in be),
                                  ("etcd", members is not None),
                                  ("rsync", "rsync_daemon" in be)) if present]
    if len(modes) > 1:
        raise _err(path, "backend",
                   "give one of `dir`, `stop`/`start`, `etcd_members`, `rsync_daemon`")
    d.backend = {k: v for k, v in be.items() if k in ("stop", "start", "dir")}
    if d.scenario != "backend-loss":
        return
    master_names = [m.name for m in d.masters]
    mode = modes[0] if modes else None
    if mode is None and d.cluster_dir is not None:
        if d.cluster_backend == "etcd" and not any(e.get("kind") == "etcd" for e in d.services):
            raise _err(path, "backend",
                       "this cluster uses an etcd it did not start: give backend stop/start "
                       "commands (and store_down_on / expect_key_change)")
        if d.cluster_backend == "etcd":
            raise _err(path, "backend", "this cluster is on etcd: name the members to "
                       "stop, e.g. `backend: {etcd_members: [etcd1]}` (quorum kept) or "
                       "`[etcd1, etcd2]` (quorum lost)")
        if d.cluster_backend == "rsync":
            raise _err(path, "backend", "this cluster is on rsync: name whose daemon to stop, e.g. "
                       f"`backend: {{rsync_daemon: {master_names[-1]}}}`")
        mode = "dir"
    d.backend_mode = mode
    if mode in ("etcd", "rsync") and d.cluster_dir is None:
        raise _err(path, "backend",
                   f"`{'etcd_members' if mode == 'etcd' else 'rsync_daemon'}` needs cluster_dir "
                   "(a hamaster-cluster dir that started them); on real hosts give "
                   "`stop`/`start` commands")
    sig = str(be.get("signal", "KILL")).upper().removeprefix("SIG")
    if sig not in ("KILL", "TERM"):
        raise _err(path, "backend.signal",
                   "must be KILL (a crash, the default) or TERM (a clean stop)")
    d.backend_signal = sig
    down_on: list[str]
    expect: str | None
    if mode == "etcd":
        known = [e["name"] for e in d.services if e.get("kind") == "etcd"]
        if not known:
            raise _err(path, "backend.etcd_members",
                       "this cluster's etcd was not started by hamaster-cluster "
                       "(or it is not on etcd): give backend stop/start commands")
        bad = [m for m in members if m not in known and m not in ETCD_ROLES]
        if bad:
            raise _err(path, "backend.etcd_members",
                       f"{', '.join(bad)}: not a member; members: "
                       f"{', '.join(known)} (or {' / '.join(ETCD_ROLES)}: "
                       f"whichever member has that role when the drill runs)")
        if len(members) > len(known):
            raise _err(path, "backend.etcd_members", f"more names than members ({len(known)})")
        d.etcd_members = list(members)
        quorum_kept = len(known) - len(members) >= len(known) // 2 + 1
        down_on, expect = ([], "works") if quorum_kept else (list(master_names), "refused")
    elif mode == "rsync":
        owner = be["rsync_daemon"]
        if not any(e.get("kind") == "rsyncd" and e.get("master") == owner for e in d.services):
            known = [e["master"] for e in d.services if e.get("kind") == "rsyncd"]
            raise _err(path, "backend.rsync_daemon",
                       f"{owner!r} has no rsync daemon in this cluster"
                       + (f"; masters with one: {', '.join(known)}" if known
                          else " (is it on the rsync backend?)"))
        d.rsync_daemon = owner
        down_on, expect = [m for m in master_names if m != owner], "works"
    else:
        down_on, expect = list(master_names), None
    sdo = be.get("store_down_on")
    if sdo is not None:
        if sdo == "all":
            down_on = list(master_names)
        elif sdo == "none":
            down_on = []
        elif (isinstance(sdo, list) and all(isinstance(x, str) for x in sdo)
              and set(sdo) <= set(master_names)):
            down_on = [m for m in master_names if m in sdo]
        else:
            raise _err(path, "backend.store_down_on",
                       f"must be all, none or a list of masters ({', '.join(master_names)})")
    if "expect_key_change" in be:
        if be["expect_key_change"] not in ("works", "refused"):
            raise _err(path, "backend.expect_key_change", "must be works or refused")
        if mode == "dir":
            raise _err(path, "backend.expect_key_change",
                       "not with an fs ha_dir renamed away: a key command "
                       "would re-create the directory")
        expect = be["expect_key_change"]
    d.store_down_on = down_on
    d.expect_key_change = expect


def _check_capabilities(d: Drill) -> None:
    """Refuse a drill that could break something it cannot restore."""
    local = d.cluster_dir is not None

    def need(node: Node, cmd: str, alt: str) -> None:
        if cmd in node.commands:
            return
        if local or (alt == "pid" and (node.pid or node.pidfile)):
            return
        raise _err(d.path, f"{node.kind} {node.name}.commands.{cmd}",
                   f"is needed for scenario {d.scenario} (no "
                   f"cluster_dir{' or pid/pidfile' if alt == 'pid' else ''})")

    if d.scenario in LEADER_SCENARIOS:  # any master may hold the lease when the drill runs
        for m in d.masters:
            if d.scenario == "leader-kill":
                need(m, "kill", "pid")
                need(m, "start", "none")
            elif d.scenario == "leader-freeze":
                need(m, "freeze", "pid")
                need(m, "thaw", "pid")
            elif ("isolate" in m.commands) != ("heal" in m.commands):
                raise _err(d.path, f"master {m.name}.commands", "give both `isolate` and `heal`")
            elif "isolate" not in m.commands and (
                    not local or m.host not in ("127.0.0.1", "localhost", "::1")):
                raise _err(d.path, f"master {m.name}.commands.isolate",
                           "is needed: the built-in isolation only cuts local masters of a "
                           "hamaster-cluster dir")
        return
    v = d.victim_node
    if d.scenario in ("kill", "stop"):
        need(v, d.scenario, "pid")
        need(v, "start", "none")
    elif d.scenario == "freeze":
        need(v, "freeze", "pid")
        need(v, "thaw", "pid")
    elif d.scenario == "partition":
        if ("isolate" in v.commands) != ("heal" in v.commands):
            raise _err(d.path, f"master {v.name}.commands", "give both `isolate` and `heal`")
        if "isolate" not in v.commands and v.host not in ("127.0.0.1", "localhost", "::1"):
            raise _err(d.path, f"master {v.name}.commands.isolate",
                       "is needed: the built-in isolation only cuts loopback ports on this machine")
    elif d.scenario == "rolling-restart":
        for m in d.masters:
            need(m, "stop", "pid")
            need(m, "start", "none")
    elif d.scenario == "minion-storm":
        for n in d.minions:
            need(n, "stop", "pid")
            need(n, "start", "none")
    elif d.scenario == "backend-loss":
        if d.backend_mode is None:
            raise _err(d.path, "backend", "is needed for backend-loss (`dir` or `stop`/`start`)")
        if d.backend_mode == "dir" and not local and "dir" not in d.backend:
            raise _err(d.path, "backend", "is needed for backend-loss (`dir` or `stop`/`start`)")


def load_drill(path: str) -> Drill:
    """Read and validate a drill file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DrillError(f"cannot read drill file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DrillError(f"{path}: not valid YAML: {exc}") from None
    return parse_drill(data, path)
